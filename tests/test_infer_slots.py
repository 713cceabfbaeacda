"""The slot cache of continuous batching: rows at different positions decoded in one batch give each row the
logits it gets alone in the single-sequence KVCache, across the sliding window's ring wrap: bit for bit with an
int4 model and int8 cache (the same kernels, row by row), to float rounding with float weights or KV."""

import pytest
import torch

from mobilellm.config import ModelConfig
from mobilellm.infer.engine import compiled_decode_step, decode_one_token, new_cache, prefill
from mobilellm.infer.slots import SlotCache
from mobilellm.model import build_model
from mobilellm.quant import QuantConfig, quantize_


def forward(model, view, tokens):
    return model.lm_head(model.hidden_states(tokens, positions=view.positions(tokens.shape[1]), cache=view))[:, -1]


def alone(model, prompt, steps, int8):
    """Greedy logits of one sequence through the single-sequence engine: after the prompt, then per step."""
    cache = new_cache(model, 64, int8=int8)
    logits = [prefill(model, torch.tensor([prompt]), cache, chunk_size=5)]
    for _ in range(steps):
        logits.append(decode_one_token(model, logits[-1].argmax(-1, keepdim=True), cache))
    return logits


@pytest.mark.parametrize("int8,int4", [(False, False), (True, False), (True, True)])
def test_batched_slots_at_different_positions_equal_each_sequence_alone(int8, int4):
    model = build_model(ModelConfig.from_name("tiny"), seed=0).eval()  # sliding window 8: rings wrap
    if int4:
        model = quantize_(model, QuantConfig.from_scheme("cpu"))
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 256, (n,), generator=gen).tolist() for n in (3, 11, 6)]
    steps = 14
    want = [alone(model, p, steps, int8) for p in prompts]
    cache = SlotCache(model.config, n_slots=4, max_len=64, int8=int8)
    slots = [2, 0, 3]  # not in order, slot 1 left empty
    got = [[] for _ in prompts]
    with torch.no_grad():
        # stale keys of an earlier occupant in slot 0 must be invisible
        forward(model, cache.rows([0]), torch.randint(3, 256, (1, 9), generator=gen))
        cache.truncate(0, 0)
        for i, (slot, prompt) in enumerate(zip(slots, prompts)):  # chunked prefill, one slot at a time
            for start in range(0, len(prompt), 5):
                logits = forward(model, cache.rows([slot]), torch.tensor([prompt[start:start + 5]]))
            got[i].append(logits[0])
        for _ in range(steps):
            tokens = torch.stack([g[-1].argmax() for g in got])[:, None]
            logits = forward(model, cache.rows(slots), tokens)
            for i in range(len(prompts)):
                got[i].append(logits[i])
    # int4 + int8 KV: the same kernels row by row as alone, bit for bit; float weights: BLAS sums a batch
    # in another order than one row (and float KV decodes several rows through masked SDPA)
    tol = 0.0 if int4 else 1e-5
    for w, g in zip(want, got):
        torch.testing.assert_close(torch.stack(g), torch.cat(w), atol=tol, rtol=tol)
    assert cache.lengths.tolist() == [11 + steps, 0, 3 + steps, 6 + steps]


def test_int4_rows_batched_equal_rows_alone():
    """The int4 kernel computes each row of a batch exactly as that row alone: batching is bit-neutral there."""
    model = quantize_(build_model(ModelConfig.from_name("tiny"), seed=0).eval(), QuantConfig.from_scheme("cpu"))
    x = torch.randn(5, model.config.dim, generator=torch.Generator().manual_seed(1))
    linear = model.lm_head
    with torch.no_grad():
        assert torch.equal(linear(x), torch.cat([linear(x[i:i + 1]) for i in range(5)]))


def test_truncating_a_wrapped_ring_is_refused():
    model = build_model(ModelConfig.from_name("tiny"), seed=0).eval()
    cache = SlotCache(model.config, n_slots=1, max_len=32)
    with torch.no_grad():
        forward(model, cache.rows([0]), torch.randint(3, 256, (1, 12)))
    assert not cache.can_truncate(0, 5) and cache.can_truncate(0, 12)
    with pytest.raises(ValueError, match="cannot be cut back"):
        cache.truncate(0, 5)


@pytest.mark.slow  # compiles two graphs: ~50 s of CPU, 4 min on a busy 2-core machine
def test_compiled_batched_decode_step_equals_eager_with_two_graphs_for_all_batch_sizes():
    """`serve --compile`: the compiled decode step over slot views of changing rows and batch sizes gives eager's
    logits to float rounding, leaves the same lengths, and compiles once for B = 1 and once for every B >= 2."""
    from torch._dynamo.utils import counters

    model = quantize_(build_model(ModelConfig.from_name("tiny"), seed=0).eval(),
                      QuantConfig.from_scheme("cpu")).fuse_projections()

    def run(step):
        cache = SlotCache(model.config, n_slots=4, max_len=64, int8=True)
        gen = torch.Generator().manual_seed(0)
        logits = []
        with torch.no_grad():
            for slot, n in enumerate((3, 11, 6, 2)):  # slot 1 past the window of 8: its ring wrapped
                forward(model, cache.rows([slot]), torch.randint(3, 256, (1, n), generator=gen))
            for rows in [[2, 0, 3], [1], [0, 1], [3, 2, 1, 0], [2], [0, 3]] * 2:
                tokens = torch.randint(3, 256, (len(rows), 1), generator=gen)
                logits.append(step(model, tokens, cache.rows(rows)))
        return logits, cache.lengths.tolist()

    want, want_lengths = run(decode_one_token)
    torch._dynamo.reset()
    counters.clear()
    got, got_lengths = run(compiled_decode_step(model))
    assert counters["stats"]["unique_graphs"] == 2
    assert got_lengths == want_lengths
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
