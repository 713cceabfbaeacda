"""Token shards: round trip, EOS and offsets, deterministic validation split, manifest, resume."""

import json
import random

import numpy as np
import pytest

from data_helpers import make_texts, tiny_tokenizer, write_jsonl
from mobilellm.data import sharding as shards
from mobilellm.data.sharding import tokenize_to_shards
from mobilellm.data.shards import FORMAT, TokenDataset, is_validation, token_dtype
from mobilellm.data.sources import DataError, Source
from mobilellm.tokenizer import TokenizerError


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def _all_docs(ds, domain, split):
    store = ds.documents(domain, split)
    return [store.document(i) for i in range(len(store))]


def _decode(tokenizer, ids):
    assert ids[-1] == tokenizer.eos_ids[0]
    return tokenizer.decode(ids[:-1].tolist())


def test_documents_round_trip_with_eos_and_offsets(tmp_path, tokenizer):
    texts = make_texts(300)
    manifest = tokenize_to_shards({"d": [Source(write_jsonl(tmp_path / "d.jsonl", texts))]}, tokenizer,
                                  tmp_path / "out", val_fraction=0.2, shard_chars=2000, progress=False)
    record = manifest["domains"]["d"]
    assert len(record["shards"]) > 3 and manifest["dtype"] == "uint16"
    ds = TokenDataset(tmp_path / "out")
    train = [_decode(tokenizer, d) for d in _all_docs(ds, "d", "train")]
    val = [_decode(tokenizer, d) for d in _all_docs(ds, "d", "val")]
    assert sorted(train + val) == sorted(texts)  # every document exactly once
    assert train == [t for t in texts if not is_validation(t, 0.2)]  # input order kept
    assert 30 < len(val) < 90  # ~20% of 300
    assert record["train_tokens"] == ds.documents("d").num_tokens == sum(len(d) for d in _all_docs(ds, "d", "train"))
    assert record["train_documents"] + record["val_documents"] == 300
    shard0 = np.load(tmp_path / "out" / record["shards"][0]["train"]["tokens"], mmap_mode="r")
    assert shard0.dtype == np.uint16 and isinstance(shard0, np.memmap)


def test_validation_choice_is_by_content_not_order(tmp_path, tokenizer):
    texts = make_texts(200)
    shuffled = texts[:]
    random.Random(1).shuffle(shuffled)
    vals = []
    for name, docs in (("a", texts), ("b", shuffled)):
        tokenize_to_shards({name: [Source(write_jsonl(tmp_path / f"{name}.jsonl", docs))]}, tokenizer,
                           tmp_path / name, val_fraction=0.1, shard_chars=500, progress=False)
        vals.append({_decode(tokenizer, d) for d in _all_docs(TokenDataset(tmp_path / name), name, "val")})
    assert vals[0] == vals[1] and len(vals[0]) > 5


def test_token_dtype_follows_the_vocabulary():
    assert token_dtype(49_152) == np.uint16 and token_dtype(65_536) == np.uint16
    assert token_dtype(65_537) == np.uint32 and token_dtype(202_048) == np.uint32


def test_manifest_names_the_tokenizer_and_a_mismatch_is_refused(tmp_path, tokenizer):
    source = Source(write_jsonl(tmp_path / "d.jsonl", make_texts(50)))
    manifest = tokenize_to_shards({"d": [source]}, tokenizer, tmp_path / "out", progress=False)
    assert manifest["tokenizer"]["vocab_size"] == tokenizer.vocab_size
    assert manifest["tokenizer"]["eos_id"] == tokenizer.eos_ids[0]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == manifest
    ds = TokenDataset(tmp_path / "out")
    ds.check_tokenizer(tokenizer)
    tokenizer.save(tmp_path / "tok")  # the identity survives save + load
    ds.check_tokenizer(type(tokenizer).load(tmp_path / "tok"))
    other = tiny_tokenizer(vocab_size=320)
    with pytest.raises(TokenizerError, match="tokenized with another tokenizer .*vocab 300.* given \\(vocab 320"):
        ds.check_tokenizer(other)
    with pytest.raises(DataError, match="holds shards made with another tokenizer"):
        tokenize_to_shards({"e": [source]}, other, tmp_path / "out", progress=False)
    with pytest.raises(DataError, match="val_fraction 0.01, not 0.5"):
        tokenize_to_shards({"e": [source]}, tokenizer, tmp_path / "out", val_fraction=0.5, progress=False)
    with pytest.raises(TokenizerError, match="300 tokens but the model's vocabulary is 256"):
        ds.check_model_vocab(256)


def test_missing_or_unfinished_shards_are_refused(tmp_path):
    with pytest.raises(DataError, match="no manifest.json in .*mobilellm tokenize"):
        TokenDataset(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": FORMAT, "domains": {
        "d": {"complete": False, "shards": []}}}))
    with pytest.raises(DataError, match="domain 'd' .* was not finished .*re-run the same tokenize command"):
        TokenDataset(tmp_path)


class _Killed(BaseException):
    """Stands in for SIGKILL: nothing after it runs (not even `except Exception` handlers)."""


def test_resume_after_interruption_skips_finished_shards(tmp_path, tokenizer, monkeypatch):
    texts = make_texts(400)
    domains = {"d": [Source(write_jsonl(tmp_path / "d.jsonl", texts))]}
    clean = tokenize_to_shards(domains, tokenizer, tmp_path / "clean", val_fraction=0.1, shard_chars=1500,
                               progress=False)
    n_shards = len(clean["domains"]["d"]["shards"])
    real_write = shards._write_shard
    written = []

    def write_then_die(out, name, *args, **kwargs):
        if len(written) == 3:
            raise _Killed
        written.append(name)
        return real_write(out, name, *args, **kwargs)

    monkeypatch.setattr(shards, "_write_shard", write_then_die)
    with pytest.raises(_Killed):
        tokenize_to_shards(domains, tokenizer, tmp_path / "out", val_fraction=0.1, shard_chars=1500, progress=False)
    assert not any(p.name.startswith(".") for p in (tmp_path / "out").iterdir())  # no temp files left
    with pytest.raises(DataError, match="not finished"):
        TokenDataset(tmp_path / "out")

    written.clear()
    monkeypatch.setattr(shards, "_write_shard", lambda out, name, *a, **k: written.append(name) or real_write(out, name, *a, **k))
    resumed = tokenize_to_shards(domains, tokenizer, tmp_path / "out", val_fraction=0.1, shard_chars=1500,
                                 progress=False)
    assert written == [f"d-00000-{k:05d}" for k in range(3, n_shards)]  # only the unfinished shards
    assert resumed["domains"] == clean["domains"]
    a, b = TokenDataset(tmp_path / "clean"), TokenDataset(tmp_path / "out")
    for split in ("train", "val"):
        assert all(np.array_equal(x, y) for x, y in zip(_all_docs(a, "d", split), _all_docs(b, "d", split), strict=True))

    written.clear()  # a finished domain is skipped as a whole
    tokenize_to_shards(domains, tokenizer, tmp_path / "out", val_fraction=0.1, shard_chars=1500, progress=False)
    assert written == []


def test_changed_input_is_retokenized_and_stale_shards_removed(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", make_texts(300))
    out = tmp_path / "out"
    first = tokenize_to_shards({"d": [Source(path)]}, tokenizer, out, shard_chars=1500, progress=False)
    write_jsonl(path, make_texts(100, seed=5))
    second = tokenize_to_shards({"d": [Source(path)]}, tokenizer, out, shard_chars=1500, progress=False)
    assert len(second["domains"]["d"]["shards"]) < len(first["domains"]["d"]["shards"])
    assert second["domains"]["d"]["train_documents"] + second["domains"]["d"]["val_documents"] == 100
    on_disk = {p.name for p in out.glob("d-*.npy")}
    named = {e[s][f] for e in second["domains"]["d"]["shards"] for s in ("train", "val") for f in ("tokens", "offsets")}
    assert on_disk == named


def test_domains_can_be_added_to_a_folder(tmp_path, tokenizer, monkeypatch):
    out = tmp_path / "out"
    tokenize_to_shards({"a": [Source(write_jsonl(tmp_path / "a.jsonl", make_texts(40)))]}, tokenizer, out, progress=False)
    written = []
    real_write = shards._write_shard
    monkeypatch.setattr(shards, "_write_shard", lambda o, name, *a, **k: written.append(name) or real_write(o, name, *a, **k))
    tokenize_to_shards({"a": [Source(tmp_path / "a.jsonl")],
                        "b": [Source(write_jsonl(tmp_path / "b.jsonl", make_texts(40, seed=3)))]},
                       tokenizer, out, progress=False)
    assert written == ["b-00000-00000"] and TokenDataset(out).domains == ["a", "b"]


def test_bad_arguments(tmp_path, tokenizer):
    source = Source(write_jsonl(tmp_path / "d.jsonl", make_texts(5)))
    with pytest.raises(DataError, match=r"val_fraction must be in \[0, 1\)"):
        tokenize_to_shards({"d": [source]}, tokenizer, tmp_path / "o", val_fraction=1.0)
    with pytest.raises(DataError, match="domain name '../x'"):
        tokenize_to_shards({"../x": [source]}, tokenizer, tmp_path / "o")


def test_real_smollm2_tokenizer(tmp_path):
    from mobilellm.artifacts import FetchError, fetch_smollm2
    from mobilellm.tokenizer import Tokenizer

    try:
        folder = fetch_smollm2()
    except FetchError as err:
        pytest.skip(f"SmolLM2 not available: {err}")
    tokenizer = Tokenizer.load(folder)
    texts = ["The capital of France is Paris.", "def f(x):\n    return x + 1\n", "Ünïcode ✓ 😀"]
    manifest = tokenize_to_shards({"d": [Source(write_jsonl(tmp_path / "d.jsonl", texts))]}, tokenizer,
                                  tmp_path / "out", val_fraction=0.0, progress=False)
    assert manifest["dtype"] == "uint16" and manifest["tokenizer"]["vocab_size"] == 49_152
    ds = TokenDataset(tmp_path / "out")
    ds.check_tokenizer(Tokenizer.load(folder))  # a fresh load has the same identity
    store = ds.documents("d")
    for i, text in enumerate(texts):
        assert store.document(i).tolist() == tokenizer.encode(text) + [tokenizer.eos_ids[0]]
