"""safe_state: every type a checkpoint holds comes back exactly (types included); anything else is refused."""

import json
import math
import random

import numpy as np
import pytest
import torch

from mobilellm.hf import CheckpointError
from mobilellm.train.checkpoint import rng_state, set_rng_state
from mobilellm.train.safe_state import read_state, write_state


def assert_same(a, b):
    assert type(a) is type(b), (a, b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b)
    else:
        assert a == b


def test_every_allowed_type_round_trips_exactly(tmp_path):
    shared = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    tree = {
        "json": [None, True, 7, -2**80, 1.5, math.inf, math.nan, "text", [], {}],
        "tuple": (1, ("nested", [2, (3,)])),
        "tensors": {"bf16": torch.randn(3, 4).bfloat16(), "scalar": torch.tensor(5.0), "int64": torch.arange(3),
                    "transposed": shared.t(), "twice": [shared, shared], "row": shared[1]},
        "array": np.arange(10, dtype=np.uint32),
        "pcg64": np.random.default_rng(1).bit_generator.state,  # 128-bit Python ints
        "a.b": {"c": torch.ones(1)}, "a": {"b.c": torch.zeros(1)},  # dotted keys giving the same path
    }
    write_state(tmp_path, "s", tree)
    back = read_state(tmp_path, "s")
    assert_same(back, tree)
    assert back["tensors"]["twice"][0] is back["tensors"]["twice"][1]  # one tensor stored once


def test_numpy_scalars_come_back_as_python_numbers(tmp_path):
    write_state(tmp_path, "s", {"i": np.int64(3), "f": np.float32(0.5), "b": np.bool_(True)})
    assert_same(read_state(tmp_path, "s"), {"i": 3, "f": 0.5, "b": True})


def test_rng_states_round_trip_and_restore_the_streams(tmp_path):
    torch.manual_seed(1), random.seed(2), np.random.seed(3)
    write_state(tmp_path, "rng", [rng_state()])
    expected = torch.rand(3), random.random(), np.random.rand(3)
    set_rng_state(read_state(tmp_path, "rng")[0])
    got = torch.rand(3), random.random(), np.random.rand(3)
    assert torch.equal(expected[0], got[0]) and expected[1] == got[1] and np.array_equal(expected[2], got[2])


@pytest.mark.parametrize("value,where", [({"x": {1, 2}}, "s.x"), ({"x": [object()]}, "s.x.0"),
                                         ({3: "int key"}, "s"), ({"$tensor": "x"}, "s"),
                                         ({"x": b"bytes"}, "s.x"), ({"x": np.array(["a"], dtype=object)}, "s.x")])
def test_other_types_are_refused_when_writing(tmp_path, value, where):
    with pytest.raises(CheckpointError, match=f"cannot store {where}:"):
        write_state(tmp_path, "s", value)


@pytest.mark.parametrize("state,error", [
    ({"x": {"$eval": "print(1)"}}, "malformed entry"),
    ({"x": {"$tuple": [1], "y": 2}}, "malformed entry"),
    ({"x": {"$tensor": 3}}, "malformed entry"),
    ({"x": {"$tensor": "absent"}}, "lacks"),
])
def test_a_tampered_state_file_is_refused(tmp_path, state, error):
    write_state(tmp_path, "s", {"x": torch.ones(1)})
    (tmp_path / "s.json").write_text(json.dumps({"format": "mobilellm-state-1", "state": state}))
    with pytest.raises(CheckpointError, match=error):
        read_state(tmp_path, "s")


def test_a_json_file_of_another_format_is_refused(tmp_path):
    write_state(tmp_path, "s", {})
    (tmp_path / "s.json").write_text(json.dumps({"step": 3}))
    with pytest.raises(CheckpointError, match="s.json is not a mobilellm-state-1 state file"):
        read_state(tmp_path, "s")
