"""Mixture sampling and packing: batch layout, weights, determinism, resume, ranks, validation, and
the proof that packed documents are seen by the model exactly as if run alone."""

import json

import numpy as np
import pytest
import torch

from data_helpers import make_texts, tiny_tokenizer, write_jsonl
from mobilellm.config import ModelConfig
from mobilellm.data import (IGNORE_INDEX, DomainSampler, MixtureLoader, Packer, Source, TokenDataset,
                            collate, tokenize_to_shards, validation_batches, window_example)
from mobilellm.data.sources import DataError
from mobilellm.model import build_model


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny model is too small to gain from threads; on a busy shared machine they only spin."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mix")
    tokenizer = tiny_tokenizer()
    domains = {  # long documents (many rows each) and short ones
        "long": [Source(write_jsonl(tmp / "long.jsonl", make_texts(60, seed=1, min_words=50, max_words=400)))],
        "short": [Source(write_jsonl(tmp / "short.jsonl", make_texts(300, seed=2, max_words=20)))],
    }
    tokenize_to_shards(domains, tokenizer, tmp / "shards", val_fraction=0.1, shard_chars=4000, progress=False)
    return TokenDataset(tmp / "shards")


def _check_batch(batch, B, T, eos, padded=False):
    assert set(batch) == {"tokens", "targets", "positions", "doc_ids"}
    for value in batch.values():
        assert value.shape == (B, T) and value.dtype == torch.int64
    tokens, targets, pos, doc = batch["tokens"], batch["targets"], batch["positions"], batch["doc_ids"]
    new_doc = torch.cat([torch.ones(B, 1, dtype=torch.bool), doc[:, 1:] != doc[:, :-1]], dim=1)
    assert torch.equal(pos == 0, new_doc)  # positions restart exactly where a document starts
    assert torch.equal(pos[:, 1:][~new_doc[:, 1:]], pos[:, :-1][~new_doc[:, 1:]] + 1)
    steps = doc[:, 1:] - doc[:, :-1]
    assert (doc[:, 0] == 0).all() and ((steps == 0) | (steps == 1)).all()
    crossing = doc[:, 1:] != doc[:, :-1]  # the next token starts another document: nothing to predict
    assert (targets[:, :-1][crossing] == IGNORE_INDEX).all()
    assert (tokens[:, :-1][crossing] == eos).all()  # inside a row a document only ends at its EOS
    inside = ~crossing & (targets[:, :-1] != IGNORE_INDEX) if padded else ~crossing
    assert torch.equal(targets[:, :-1][inside], tokens[:, 1:][inside])
    assert (targets != IGNORE_INDEX).any()


def test_batches_have_the_documented_layout(dataset):
    loader = MixtureLoader(dataset, {"long": 1, "short": 1}, seq_len=64, global_batch_size=4, seed=0)
    for _ in range(5):
        _check_batch(next(loader), 4, 64, dataset.eos_id)


def test_rows_are_the_sampled_documents_back_to_back(dataset):
    """Concatenated windows reproduce the drawn documents in order, none lost or duplicated."""
    sampler = DomainSampler(dataset, {"long": 1, "short": 3}, seed=7)
    packer = Packer(seq_len=50)
    windows = np.concatenate([np.concatenate(packer.next_row(sampler.draw)) for _ in range(60)])
    reference = DomainSampler(dataset, {"long": 1, "short": 3}, seed=7)
    stream = np.concatenate([reference.draw()[1] for _ in range(sampler.draws)])
    assert np.array_equal(windows, stream[:windows.size])
    # A document ends with EOS: where a new document starts the previous token is EOS.
    example = window_example(packer.next_row(sampler.draw))
    starts = np.flatnonzero(example["positions"] == 0)[1:]
    assert (example["tokens"][starts - 1] == dataset.eos_id).all()


def test_weights_are_normalised_and_checked(dataset):
    sampler = DomainSampler(dataset, {"long": 3, "short": 1}, seed=0)
    assert sampler.weights == {"long": 0.75, "short": 0.25}
    for _ in range(4000):
        sampler.draw()
    assert abs(sampler.drawn["long"] / 4000 - 0.75) < 0.03
    assert DomainSampler(dataset, {"long": 0, "short": 2}).weights == {"short": 1.0}
    with pytest.raises(DataError, match="unknown domain.*web.*known: long, short"):
        DomainSampler(dataset, {"web": 1.0})
    with pytest.raises(DataError, match="weight of domain 'short' must be a finite number >= 0, got -1"):
        DomainSampler(dataset, {"long": 1, "short": -1})
    with pytest.raises(DataError, match="finite"):
        DomainSampler(dataset, {"long": float("nan")})
    with pytest.raises(DataError, match="sum to 0"):
        DomainSampler(dataset, {"long": 0})


def test_every_document_once_per_epoch(dataset):
    sampler = DomainSampler(dataset, {"short": 1}, seed=3)
    n = len(dataset.documents("short"))
    first = [sampler.draw()[0][1] for _ in range(n)]
    second = [sampler.draw()[0][1] for _ in range(n)]
    assert sorted(first) == sorted(second) == list(range(n)) and first != second  # reshuffled per epoch


def test_same_seed_same_batches_other_seed_other_batches(dataset):
    def take(seed, n=4):
        loader = MixtureLoader(dataset, {"long": 1, "short": 1}, seq_len=32, global_batch_size=2, seed=seed)
        return [next(loader)["tokens"] for _ in range(n)]

    assert all(torch.equal(a, b) for a, b in zip(take(0), take(0)))
    assert not all(torch.equal(a, b) for a, b in zip(take(0), take(1)))


@pytest.mark.parametrize("stop_after", [1, 7, 13])
def test_a_restored_loader_continues_the_stream_exactly(dataset, stop_after):
    make = lambda: MixtureLoader(dataset, {"long": 2, "short": 1}, seq_len=40, global_batch_size=3, seed=5)  # noqa: E731
    uninterrupted = make()
    expected = [next(uninterrupted) for _ in range(stop_after + 6)]
    first = make()
    for _ in range(stop_after):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # it must survive a checkpoint file
    restored = make()
    restored.load_state_dict(state)
    for want in expected[stop_after:]:
        got = next(restored)
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert restored.state_dict() == uninterrupted.state_dict()


def test_a_state_from_other_settings_is_refused(dataset):
    loader = MixtureLoader(dataset, {"long": 1}, seq_len=40, global_batch_size=2, seed=5)
    state = loader.state_dict()
    other = MixtureLoader(dataset, {"long": 1}, seq_len=64, global_batch_size=2, seed=5)
    with pytest.raises(DataError, match=r"other settings \(seq_len\): saved \[40\], now \[64\]"):
        other.load_state_dict(state)


LAYOUTS = [(2, 1), (1, 2), (2, 2), (4, 1), (4, 2)]  # (world_size, grad_accum) splitting a global batch of 8


def global_batches(dataset, world_size, grad_accum, steps, state=None, **kw):
    """Per optimizer step, the micro-batches of all processes in (rank, micro-batch) order, concatenated."""
    loaders = [MixtureLoader(dataset, {"long": 2, "short": 1}, seq_len=40, global_batch_size=8, seed=5, rank=r,
                             world_size=world_size, grad_accum=grad_accum, **kw) for r in range(world_size)]
    if state is not None:
        for loader in loaders:
            loader.load_state_dict(state)
    out = []
    for _ in range(steps):
        parts = [next(loader) for loader in loaders for _ in range(grad_accum)]
        out.append({k: torch.cat([p[k] for p in parts]) for k in parts[0]})
    states = [loader.state_dict() for loader in loaders]
    assert all(s == states[0] for s in states)  # the state is global: the same on every process
    return out, states[0]


def assert_same_batches(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert all(torch.equal(a[k], b[k]) for k in b)


@pytest.mark.parametrize("world_size, grad_accum", LAYOUTS)
def test_processes_and_micro_batches_split_the_same_global_batch(dataset, world_size, grad_accum):
    reference, reference_state = global_batches(dataset, 1, 1, steps=4)
    split, state = global_batches(dataset, world_size, grad_accum, steps=4)
    assert_same_batches(split, reference)
    assert state == reference_state


def test_each_process_builds_only_its_own_rows(dataset, monkeypatch):
    import mobilellm.data.mixture as mixture
    built = []
    monkeypatch.setattr(mixture, "window_example", lambda *a: built.append(1) or window_example(*a))
    loader = MixtureLoader(dataset, {"long": 1, "short": 1}, seq_len=40, global_batch_size=8, rank=3, world_size=4)
    assert next(loader)["tokens"].shape == (2, 40) and len(built) == 2  # 8 rows packed, 2 built


@pytest.mark.parametrize("world_size, grad_accum", [(1, 1)] + LAYOUTS)
def test_a_state_saved_on_two_processes_resumes_on_another_layout(dataset, world_size, grad_accum):
    reference, _ = global_batches(dataset, 1, 1, steps=6)
    first, state = global_batches(dataset, 2, 1, steps=3)
    state = json.loads(json.dumps(state))  # it must survive a checkpoint file
    rest, end_state = global_batches(dataset, world_size, grad_accum, steps=3, state=state)
    assert_same_batches(first + rest, reference)
    assert end_state == global_batches(dataset, 1, 1, steps=6)[1]


def test_a_state_saved_inside_a_global_batch_resumes_only_on_the_same_layout(dataset):
    make = lambda **kw: MixtureLoader(dataset, {"long": 1, "short": 1}, seq_len=40, global_batch_size=8, seed=2,  # noqa: E731
                                      rank=1, world_size=2, **kw)
    uninterrupted = make(grad_accum=2)
    expected = [next(uninterrupted) for _ in range(5)]
    loader = make(grad_accum=2)
    for _ in range(3):  # one step and a half
        next(loader)
    restored = make(grad_accum=2)
    restored.load_state_dict(json.loads(json.dumps(loader.state_dict())))
    assert all(torch.equal(a[k], b[k]) for a, b in zip([next(restored), next(restored)], expected[3:]) for k in b)
    with pytest.raises(DataError, match="middle of a global batch .micro-batch 1 of 2 on 2 process"):
        make(grad_accum=1).load_state_dict(loader.state_dict())


def test_batch_layout_errors_name_the_problem(dataset):
    with pytest.raises(DataError, match="rank must be in"):
        MixtureLoader(dataset, {"long": 1}, seq_len=40, global_batch_size=4, rank=2, world_size=2)
    with pytest.raises(DataError, match="global batch of 6 windows does not split evenly over 2 process.es. x 2 "
                                        "micro-batch.es. .needs a multiple of 4"):
        MixtureLoader(dataset, {"long": 1}, seq_len=40, global_batch_size=6, world_size=2, grad_accum=2)


def test_validation_batches_are_fixed_and_cover_the_held_out_split(dataset):
    run = lambda **kw: list(validation_batches(dataset, seq_len=48, batch_size=4, **kw))  # noqa: E731
    batches = run()
    assert all(torch.equal(a[k], b[k]) for a, b in zip(batches, run()) for k in a)
    held_out = sum(dataset.documents(d, "val").num_tokens for d in dataset.domains)
    # Each row predicts T of its T + 1 tokens; counting the real tokens (non-padding) of the rows:
    real = sum(int((b["targets"] != IGNORE_INDEX).sum()) for b in batches)
    n_docs = sum(len(dataset.documents(d, "val")) for d in dataset.domains)
    rows = sum(b["tokens"].shape[0] for b in batches)
    assert held_out - n_docs - rows <= real <= held_out - n_docs  # one unpredictable first token per segment
    for b in batches:
        _check_batch(b, b["tokens"].shape[0], 48, dataset.eos_id, padded=True)
    assert batches[-1]["targets"][-1, -1] == IGNORE_INDEX  # the padded tail is never a target
    for world_size in (2, 3):
        split = [run(rank=r, world_size=world_size) for r in range(world_size)]
        per_rank = [[b["tokens"].shape[0] for b in s] for s in split]
        assert all(p == per_rank[0] for p in per_rank)  # every rank runs the same batches
        assert rows <= sum(map(sum, per_rank)) < rows + world_size
        assert sum(int((b["targets"] != IGNORE_INDEX).sum()) for s in split for b in s) == real
    assert len(run(max_batches=1)) == 1
    assert len(run(domains=["short"])) < len(batches)


def test_validation_deals_rows_from_every_domain_in_turn(dataset):
    """However few batches are asked for, every domain is measured: each domain's rows (packed alone, in stored
    order) are dealt round-robin, not the first domain's documents first."""
    rows = lambda batches: [row for b in batches for row in b["tokens"]]  # noqa: E731
    alone = {d: rows(validation_batches(dataset, seq_len=48, batch_size=4, domains=[d])) for d in dataset.domains}
    assert len(alone["long"]) > len(alone["short"]) > 2
    dealt = rows(validation_batches(dataset, seq_len=48, batch_size=4))
    expected = [alone[d][i] for i in range(len(alone["long"])) for d in dataset.domains if i < len(alone[d])]
    assert len(dealt) == len(expected) and all(torch.equal(a, b) for a, b in zip(dealt, expected))
    first = rows(validation_batches(dataset, seq_len=48, batch_size=2, max_batches=1))
    assert torch.equal(first[0], alone[dataset.domains[0]][0]) and torch.equal(first[1], alone[dataset.domains[1]][0])


def test_packed_documents_give_the_same_logits_as_each_document_alone():
    """The tiny model (local + global layers, window 8) on a packed batch equals per-document runs."""
    config = ModelConfig.from_name("tiny")
    model = build_model(config, seed=0).eval()
    rng = np.random.default_rng(0)
    documents = [rng.integers(3, config.vocab_size, size=n) for n in (5, 30, 2, 17, 41, 9, 12)]
    docs = iter(enumerate(documents))
    packer = Packer(seq_len=32)
    examples = [window_example(packer.next_row(lambda: next(docs, None))) for _ in range(4)]
    batch = collate(examples)
    for backend in ("sdpa", "eager"):
        model.attn_backend = backend
        with torch.no_grad():
            packed = model(batch["tokens"], batch["positions"], batch["doc_ids"])  # (B, T, V)
            segments = 0
            for row in range(batch["tokens"].shape[0]):
                for doc in batch["doc_ids"][row].unique():
                    where = batch["doc_ids"][row] == doc
                    alone = model(batch["tokens"][row][where][None])  # positions 0.. by default
                    torch.testing.assert_close(packed[row][where], alone[0], rtol=1e-4, atol=1e-5)
                    segments += 1
        assert segments > len(documents)  # some documents were cut across rows
        # Without the document ids the packed logits differ: the mask matters.
        with torch.no_grad():
            unmasked = model(batch["tokens"], batch["positions"])
        assert not torch.allclose(unmasked, packed, atol=1e-3)


def test_loader_batches_drive_the_model_and_loss(dataset):
    config = ModelConfig.from_name("tiny").replace(vocab_size=dataset.vocab_size)
    dataset.check_model_vocab(config.vocab_size)
    model = build_model(config, seed=0)
    batch = next(MixtureLoader(dataset, {"long": 1, "short": 1}, seq_len=64, global_batch_size=2))
    logits = model(batch["tokens"], batch["positions"], batch["doc_ids"])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), ignore_index=IGNORE_INDEX)
    assert abs(loss.item() - np.log(config.vocab_size)) < 1.0  # an untrained model: near-uniform
    loss.backward()


def test_unmasked_packing_is_one_causal_sequence_per_row(dataset):
    masked = MixtureLoader(dataset, {"short": 1}, seq_len=64, global_batch_size=2, seed=1)
    plain = MixtureLoader(dataset, {"short": 1}, seq_len=64, global_batch_size=2, seed=1, mask_documents=False)
    a, b = next(masked), next(plain)
    assert torch.equal(a["tokens"], b["tokens"])  # the same stream, only the labels differ
    assert torch.equal(b["positions"], torch.arange(64).expand(2, 64)) and (b["doc_ids"] == 0).all()
    assert torch.equal(b["targets"][:, :-1], b["tokens"][:, 1:])  # EOS -> next document is a target too
    assert (a["targets"] == IGNORE_INDEX).sum() > 0 == (b["targets"] == IGNORE_INDEX).sum()
    last = list(validation_batches(dataset, seq_len=48, batch_size=64, mask_documents=False))[-1]
    padded = last["targets"][-1] == IGNORE_INDEX
    assert padded.any() and (last["doc_ids"][-1][1:][padded[:-1]] == 1).all()



def test_a_loader_state_in_the_old_per_process_format_is_refused_clearly(dataset):
    loader = MixtureLoader(dataset, {"long": 1}, seq_len=40, global_batch_size=2)
    with pytest.raises(DataError, match="older mobilellm"):
        loader.load_state_dict({"sampler": {"draws": 3, "drawn": {}}, "windows": 0})
