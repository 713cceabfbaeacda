"""Nested state on disk without pickle: the structure in JSON, the tensors in safetensors.

`write_state(folder, name, tree)` writes NAME.json and NAME.safetensors; `read_state(folder, name)` gives the
tree back. Reading parses JSON and safetensors and nothing else, so a planted file can fail to load but
never runs code. A tree holds exactly these, and writing refuses anything else (naming where it sits):

    None, bool, int, float (nan, inf), str     JSON values
    list; dict with str keys not starting "$"   JSON arrays and objects
    tuple                                       {"$tuple": [...]}
    torch.Tensor                                {"$tensor": key}, the data in NAME.safetensors (read back on the CPU)
    numpy.ndarray of a dtype torch has          {"$ndarray": key}, the data in NAME.safetensors
    numpy scalar                                the Python number it equals
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..hf import CheckpointError

FORMAT = "mobilellm-state-1"


def write_state(folder: Path, name: str, tree) -> None:
    """Write `tree` as folder/NAME.json + folder/NAME.safetensors, both fsynced."""
    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(tree, name, tensors, {})
    tensor_path, json_path = Path(folder) / f"{name}.safetensors", Path(folder) / f"{name}.json"
    save_file(tensors, tensor_path, metadata={"format": FORMAT})
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump({"format": FORMAT, "state": encoded}, f)
        f.flush()
        os.fsync(f.fileno())
    with open(tensor_path, "rb") as f:
        os.fsync(f.fileno())


def read_state(folder: Path, name: str):
    """The tree `write_state(folder, name, tree)` wrote; CheckpointError (naming the file) for anything else."""
    json_path, tensor_path = Path(folder) / f"{name}.json", Path(folder) / f"{name}.safetensors"
    try:
        doc = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {json_path}: not a JSON state file ({err})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or "state" not in doc:
        raise CheckpointError(f"{json_path} is not a {FORMAT} state file")
    try:
        tensors = load_file(tensor_path)
    except (OSError, SafetensorError) as err:
        raise CheckpointError(f"cannot read {tensor_path}: not a safetensors file ({err})") from None
    return _decode(doc["state"], tensors, json_path)


def _encode(value, path: str, tensors: dict, names: dict):
    """JSON for `value`; tensors and arrays go into `tensors` under a key made from `path`.

    `names` maps id(tensor) and ("storage", data_ptr) of what is stored already to its key."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (np.bool_, np.number)):
        return value.item()
    if isinstance(value, (torch.Tensor, np.ndarray)):
        marker = "$tensor" if isinstance(value, torch.Tensor) else "$ndarray"
        if id(value) not in names:
            key, n = path, 0
            while key in tensors:  # a dict key with a dot in it can repeat another path
                n += 1
                key = f"{path}#{n}"
            tensor = _as_tensor(value, path)
            storage = ("storage", tensor.untyped_storage().data_ptr())
            tensors[key] = tensor.clone() if storage in names else tensor  # safetensors takes no views of another
            names[id(value)], names[storage] = key, key
        return {marker: names[id(value)]}
    if isinstance(value, tuple):
        return {"$tuple": [_encode(v, f"{path}.{i}", tensors, names) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{path}.{i}", tensors, names) for i, v in enumerate(value)]
    if isinstance(value, dict):
        bad = [k for k in value if not isinstance(k, str) or k.startswith("$")]
        if bad:
            raise CheckpointError(f"cannot store {path}: dict keys must be strings not starting with '$', got {bad[0]!r}")
        return {k: _encode(v, f"{path}.{k}", tensors, names) for k, v in value.items()}
    raise CheckpointError(f"cannot store {path}: {type(value).__module__}.{type(value).__qualname__} is not one of "
                          "the types a checkpoint holds (JSON values, tuples, tensors, numpy arrays)")


def _as_tensor(value, path: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().contiguous()
    try:
        return torch.from_numpy(np.ascontiguousarray(value))
    except TypeError as err:
        raise CheckpointError(f"cannot store {path}: numpy array of dtype {value.dtype} ({err})") from None


def _decode(value, tensors: dict[str, torch.Tensor], source: Path):
    if isinstance(value, list):
        return [_decode(v, tensors, source) for v in value]
    if not isinstance(value, dict):
        return value
    if not any(k.startswith("$") for k in value):  # written dicts never have such keys: this is a marker
        return {k: _decode(v, tensors, source) for k, v in value.items()}
    marker, payload = next(iter(value.items())) if len(value) == 1 else (None, None)
    if marker == "$tuple" and isinstance(payload, list):
        return tuple(_decode(v, tensors, source) for v in payload)
    if marker in ("$tensor", "$ndarray") and isinstance(payload, str):
        if payload not in tensors:
            raise CheckpointError(f"{source} names tensor {payload!r}, which its .safetensors file lacks")
        if marker == "$tensor":
            return tensors[payload]
        try:
            return tensors[payload].numpy()
        except TypeError as err:
            raise CheckpointError(f"{source}: tensor {payload!r} is no numpy array ({err})") from None
    raise CheckpointError(f"{source}: malformed entry {json.dumps(value)[:200]}")
