"""SFT batches: packed rows give every conversation its unpacked logits, targets only on assistant tokens, whole
examples per row, over-long ones truncated or dropped and counted; the row stream resumes exactly and splits
over processes like MixtureLoader."""

import json

import numpy as np
import pytest
import torch

from mobilellm.data import IGNORE_INDEX
from mobilellm.data.batch_source import BatchLayout
from mobilellm.data.chat import Conversation, render
from mobilellm.data.chat_batches import ChatData
from mobilellm.data.rows import PackPlan, pack_rows
from mobilellm.errors import DataError
from mobilellm.model import build_model
from tests.data_helpers import WORDS, tiny_tokenizer
from tests.train_common import TINY, one_thread  # noqa: F401 (autouse fixture)


def conversations(n: int, seed: int = 0, turns: int = 2) -> list[dict]:
    rng = np.random.default_rng(seed)

    def words(k):
        return " ".join(rng.choice(WORDS, size=int(rng.integers(1, k))))
    records = []
    for i in range(n):
        messages = [{"role": "system", "content": f"case {i}"}] if i % 3 == 0 else []
        for _ in range(1 + i % turns):
            messages += [{"role": "user", "content": words(12)}, {"role": "assistant", "content": words(20)}]
        records.append({"messages": messages})
    return records


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def build(path, tokenizer, seq_len=64, rows=4, grad_accum=1, rank=0, world=1, val=None, **options):
    layout = BatchLayout(seq_len, rows, grad_accum, rows // (world * grad_accum), rank, world, seed=1)
    return ChatData(path, val_path=val, **options).build(layout, tokenizer, tokenizer.vocab_size, None if val is None else 8)


def test_first_fit_packing_keeps_examples_whole_and_fills_rows():
    lengths = np.array([9, 3, 7, 2, 5, 1, 8])
    rows = pack_rows(lengths, 10, np.arange(7), rng=None)
    assert sorted(i for row in rows for i in row) == list(range(7))
    assert all(lengths[row].sum() <= 10 for row in rows)
    assert len(rows) == 4  # 35 tokens in rows of 10: the fewest possible
    plan = PackPlan(lengths, 10, seed=3)
    epoch0, epoch1 = [plan.row(i) for i in range(len(plan.epoch_rows(0)))], plan.epoch_rows(1)
    assert sorted(sum(epoch0, [])) == list(range(7)) and epoch0 != epoch1  # every example once, a new order
    assert PackPlan(lengths, 10, seed=3).row(len(epoch0)) == epoch1[0]  # random access across epochs


def test_packed_rows_give_each_conversation_its_own_logits(tmp_path, tokenizer):
    records = conversations(12)
    built = build(write_jsonl(tmp_path / "chat.jsonl", records), tokenizer, seq_len=256, rows=2)
    assert built.report["truncated"] == 0 and built.report["rows_per_epoch"] < 12  # whole and packed
    model = build_model(TINY.replace(vocab_size=tokenizer.vocab_size), seed=0).eval()
    rendered = render(tokenizer, [Conversation(tuple(r["messages"]), 0, "") for r in records])
    by_tokens = {tuple(r.tokens.tolist()): r for r in rendered}
    seen = set()
    for _ in range(built.report["rows_per_epoch"] // 2):
        batch = next(built.train)
        with torch.no_grad():
            packed = model(batch["tokens"], batch["positions"], batch["doc_ids"])  # (B, T, V)
        for b in range(batch["tokens"].shape[0]):
            for doc in batch["doc_ids"][b].unique().tolist():
                where = (batch["doc_ids"][b] == doc).nonzero().squeeze(1)  # one segment of the row
                tokens = tuple(batch["tokens"][b, where].tolist())
                # A segment that ends the row has its last token as the row's last target only.
                example = by_tokens.get(tokens) or by_tokens.get(tokens + (int(batch["targets"][b, where[-1]]),))
                if example is None:
                    assert (batch["targets"][b, where] == IGNORE_INDEX).all()  # the padding tail
                    continue
                assert batch["positions"][b, where].tolist() == list(range(len(where)))
                with torch.no_grad():
                    alone = model(torch.from_numpy(example.tokens[None, :len(where)]))[0]
                torch.testing.assert_close(packed[b, where], alone, rtol=1e-5, atol=1e-5)
                want = np.where(example.learned[1:], example.tokens[1:], IGNORE_INDEX).tolist() + [IGNORE_INDEX]
                assert batch["targets"][b, where].tolist() == want[:len(where)]
                seen.add(tokens)
    assert len(seen) >= 10  # nearly every conversation of the epoch, each checked on its own


def test_over_long_conversations_are_truncated_or_dropped_and_counted(tmp_path, tokenizer):
    long = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a " * 300}]}
    prompt_only = {"messages": [{"role": "user", "content": "of " * 300}, {"role": "assistant", "content": "it"}]}
    path = write_jsonl(tmp_path / "chat.jsonl", conversations(6) + [long, prompt_only])
    truncated = build(path, tokenizer, seq_len=256).report
    assert truncated["examples"] == 8 and truncated["truncated"] == 2
    assert truncated["dropped_nothing_to_learn"] == 1 and truncated["trained_examples"] == 7  # the cut-off answer
    dropped = build(path, tokenizer, seq_len=256, overflow="drop").report
    assert dropped["truncated"] == 0 and dropped["dropped_too_long"] == 2 and dropped["trained_examples"] == 6
    with pytest.raises(DataError, match="no conversation left to train on"):
        build(write_jsonl(tmp_path / "long.jsonl", [long]), tokenizer, seq_len=16, overflow="drop")


def test_unpacked_rows_hold_one_conversation_each(tmp_path, tokenizer):
    built = build(write_jsonl(tmp_path / "chat.jsonl", conversations(8)), tokenizer, packing=False)
    batch = next(built.train)
    for b in range(4):
        real = batch["tokens"][b] != 0
        assert batch["doc_ids"][b][real].unique().numel() == 1


def test_the_stream_resumes_exactly_and_splits_over_processes(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "chat.jsonl", conversations(20))
    whole = build(path, tokenizer, rows=4).train
    reference = [next(whole) for _ in range(12)]  # past one epoch
    resumed = build(path, tokenizer, rows=4).train
    for _ in range(5):
        next(resumed)
    state = json.loads(json.dumps(resumed.state_dict()))
    again = build(path, tokenizer, rows=4).train
    again.load_state_dict(state)
    for want in reference[5:]:
        got = next(again)
        assert all(torch.equal(got[k], want[k]) for k in want)
    # Two processes x two micro-batches take the same global batches, each its contiguous rows.
    parts = [build(path, tokenizer, rows=4, grad_accum=2, rank=r, world=2).train for r in (0, 1)]
    for want in reference[:3]:
        rows = [next(parts[r]) for r in (0, 1) for _ in range(2)]  # rank 0's two micro-batches, then rank 1's
        assert torch.equal(torch.cat([b["tokens"] for b in [rows[0], rows[2]]]), want["tokens"][[0, 2]])
        assert torch.equal(torch.cat([b["tokens"] for b in [rows[1], rows[3]]]), want["tokens"][[1, 3]])
    (tmp_path / "chat.jsonl").write_text((tmp_path / "chat.jsonl").read_text() + json.dumps(conversations(1)[0]) + "\n")
    with pytest.raises(DataError, match="other settings .data_sha256."):
        build(path, tokenizer, rows=4).train.load_state_dict(state)


def test_validation_rows_are_split_over_processes(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "chat.jsonl", conversations(6))
    val = write_jsonl(tmp_path / "val.jsonl", conversations(9, seed=5))
    one = build(path, tokenizer, val=val).validation
    halves = [build(path, tokenizer, rows=4, world=2, rank=r, val=val).validation for r in (0, 1)]
    assert len(halves[0]) == len(halves[1])
    count = lambda batches: sum(int((b["targets"] != IGNORE_INDEX).sum()) for b in batches)  # noqa: E731
    assert count(one) == count(halves[0]) + count(halves[1]) > 0
