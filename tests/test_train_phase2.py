"""Phase 2 (implicit positional distillation): long-window packing against a hand-built case, short and long
document rules, KD on a packed window equal to KD on the same window run unpacked, cached top-k equal to
computed top-k, the context change recorded in every checkpoint (our loader and transformers'), and the bad
inputs refused: a window past the teacher's context, another tokenizer, theta without a longer context."""

import json

import numpy as np
import pytest
import torch

from data_helpers import make_texts, tiny_tokenizer, write_jsonl
from mobilellm.attention import attention_mask
from mobilellm.cli import main as cli
from mobilellm.config import ModelConfig
from mobilellm.data import IGNORE_INDEX, MixtureLoader, Packer, Source, TokenDataset, tokenize_to_shards, window_example
from mobilellm.data.batch_source import BatchLayout, TokenShards
from mobilellm.data.mixture import DocLengths, DocumentPieces
from mobilellm.hf import read_config, save_pretrained
from mobilellm.infer.engine import generate, new_cache
from mobilellm.infer.sampling import SamplingConfig
from mobilellm.loading import load
from mobilellm.model import build_model
from mobilellm.tokenizer import Tokenizer
from mobilellm.train.context import ContextError, context_extension
from mobilellm.train.losses import Distillation
from mobilellm.train.recipe import run_recipe
from mobilellm.train.teacher import TeacherError
from mobilellm.train.teacher_cache import TopKCache
from recipes.phase2 import phase2
from tests.train_common import one_thread  # noqa: F401 (autouse fixture)

TINY_LLAMA = ModelConfig.from_name("tiny-llama")


class _Store:  # a DocumentStore's interface over hand-written documents
    def __init__(self, docs):
        self.docs = [np.asarray(d) for d in docs]
        self.offsets = [np.concatenate([[0], np.cumsum([len(d) for d in docs])])]

    def __len__(self):
        return len(self.docs)

    def document(self, i):
        return self.docs[i]


A, B, C = [10, 11, 12, 2], [20, 21, 2], [30, 31, 32, 33, 34, 35, 2]  # EOS = 2


def test_document_length_rules_cut_and_keep_documents_as_written_by_hand():
    short = DocumentPieces(_Store([A, B, C]), DocLengths(max_tokens=4))
    assert [list(short.document(i)) for i in range(len(short))] == [A, B, [30, 31, 32, 33], [34, 35, 2]]
    long = DocumentPieces(_Store([A, B, C]), DocLengths(min_tokens=5))
    assert [list(long.document(i)) for i in range(len(long))] == [C]
    whole = DocumentPieces(_Store([A, B, C]), DocLengths())
    assert [list(whole.document(i)) for i in range(len(whole))] == [A, B, C]
    with pytest.raises(ValueError, match="max_tokens must be a positive"):
        DocLengths(max_tokens=0)


def test_window_packing_matches_a_hand_built_row():
    docs = iter([("a", np.array(A)), ("b", np.array(B)), ("c", np.array(C))])
    segments = Packer(8).next_row(lambda: next(docs, None))  # 9 tokens: A, B and the start of C
    row = window_example(segments, mask_documents=False)
    assert row["tokens"].tolist() == [10, 11, 12, 2, 20, 21, 2, 30]
    assert row["targets"].tolist() == [11, 12, 2, 20, 21, 2, 30, 31]  # across documents, EOS -> next included
    assert row["positions"].tolist() == list(range(8))  # continuous across the window
    assert row["doc_ids"].tolist() == [0] * 8
    masked = window_example(segments)  # the default elsewhere: each document alone
    assert masked["positions"].tolist() == [0, 1, 2, 3, 0, 1, 2, 0]
    assert masked["targets"].tolist() == [11, 12, 2, IGNORE_INDEX, 21, 2, IGNORE_INDEX, 31]
    pos, doc = torch.tensor(row["positions"])[None], torch.tensor(row["doc_ids"])[None]
    mask = attention_mask("full_attention", pos, pos, doc, doc)[0, 0]
    assert torch.equal(mask, torch.ones(8, 8, dtype=torch.bool).tril())  # attention across documents: plain causal


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tokenizer, shards of short and long documents, a phase-1 student (32-token context) and a teacher."""
    root = tmp_path_factory.mktemp("phase2")
    tokenizer = tiny_tokenizer(root / "tok")
    domains = {"short": [Source(write_jsonl(root / "short.jsonl", make_texts(80, seed=1, max_words=12)))],
               "long": [Source(write_jsonl(root / "long.jsonl", make_texts(40, seed=2, min_words=10, max_words=160)))]}
    tokenize_to_shards(domains, tokenizer, root / "shards", val_fraction=0.1, progress=False)
    config = TINY_LLAMA.replace(vocab_size=tokenizer.vocab_size)
    folders = {}
    for name, cfg, seed in (("student", config.replace(max_seq_len=32), 1), ("teacher", config, 2),
                            ("short_teacher", config.replace(max_seq_len=48), 3)):
        save_pretrained(build_model(cfg, seed=seed), root / name)
        tokenizer.save(root / name)
        folders[name] = str(root / name)
    return {"root": root, "shards": str(root / "shards"), "tokenizer": tokenizer, **folders}


def window_batch(setup, packing="window", seq_len=64, rows=2, **lengths):
    layout = BatchLayout(seq_len, rows, 1, rows)
    source = TokenShards(setup["shards"], {"short": 1.0}, packing=packing, **lengths)
    return next(source.build(layout, setup["tokenizer"], setup["tokenizer"].vocab_size, None).train)


def test_token_shards_in_window_mode_pack_short_pieces_into_one_causal_sequence(setup):
    batch = window_batch(setup, max_doc_tokens=16)
    assert torch.equal(batch["positions"], torch.arange(64).expand(2, 64)) and (batch["doc_ids"] == 0).all()
    assert (batch["targets"] != IGNORE_INDEX).all()
    dataset = TokenDataset(setup["shards"])
    loader = MixtureLoader(dataset, {"long": 1}, seq_len=64, global_batch_size=2, mask_documents=False,
                           lengths=DocLengths(min_tokens=65))
    store = loader.sampler.docs["long"].store
    assert 0 < len(store) < len(dataset.documents("long", "train"))
    assert all(len(store.document(i)) >= 65 for i in range(len(store)))
    assert loader.state_dict()["setting"]["doc_lengths"] == [65, None]  # a resumed stream keeps its rule
    with pytest.raises(ValueError, match="domain 'short' has no documents in this split of the requested length "
                                         "\\(leave it out"):
        MixtureLoader(dataset, {"short": 1}, seq_len=64, global_batch_size=2, lengths=DocLengths(min_tokens=65))


def kl_reference(student, teacher, tokens, targets):
    """Naive full-logits forward KL(teacher || student), each model run on the plain token sequence."""
    keep = targets != IGNORE_INDEX
    log_s = student(tokens).float().log_softmax(-1)[keep]
    with torch.no_grad():
        log_t = teacher(tokens).float().log_softmax(-1)[keep]
    return (log_t.exp() * (log_t - log_s)).sum()


def test_kd_on_the_packed_window_equals_kd_on_the_same_window_unpacked(setup):
    student = load(setup["student"], config_changes={"max_seq_len": 64}).model
    teacher = load(setup["teacher"]).model.eval().requires_grad_(False)
    batch = window_batch(setup, max_doc_tokens=16)
    loss = Distillation(teacher, chunk_size=40)(student, batch)  # chunks cross rows: the chunking is exercised
    loss.backward()
    got = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    expected = kl_reference(student, teacher, batch["tokens"], batch["targets"])
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    for g, e in zip(got, (p.grad for p in student.parameters())):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
    # The document-masked packing of the same stream is another computation: the test can tell them apart.
    masked = window_batch(setup, packing="documents", max_doc_tokens=16)
    assert torch.equal(masked["tokens"], batch["tokens"])
    with torch.no_grad():
        seen = teacher(masked["tokens"], masked["positions"], masked["doc_ids"])
        later = masked["doc_ids"] > 0  # the documents after the first in each row
        assert (seen - teacher(masked["tokens"]))[later].abs().max() > 1e-2


class _NoTeacher(torch.nn.Module):
    def hidden_states(self, *args):
        raise AssertionError("the teacher ran although its outputs were cached")


def test_cached_top_k_equals_computed_top_k_and_the_teacher_runs_once(setup, tmp_path):
    student = load(setup["student"], config_changes={"max_seq_len": 64}).model
    teacher = load(setup["teacher"]).model.eval().requires_grad_(False)
    batch = window_batch(setup, max_doc_tokens=16)
    grads = []
    for cache in (None, TopKCache(tmp_path, teacher, 8, 2.0, {"teacher": "t"})):
        loss = Distillation(teacher, temperature=2.0, top_k=8, tail_bucket=True, ce_weight=0.25, cache=cache)(student, batch)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in student.parameters()]))
        student.zero_grad()
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    files = sorted(tmp_path.rglob("*.safetensors"))
    assert len(files) == 2  # one entry per window
    again = TopKCache(tmp_path, _NoTeacher(), 8, 2.0, {"teacher": "t"})  # same identity: read, never computed
    log_p, ids = again.lookup(batch)
    assert again.hits == 2 and again.misses == 0 and log_p.shape == ids.shape == (2, 64, 8)
    other = TopKCache(tmp_path, _NoTeacher(), 8, 1.0, {"teacher": "t"})  # another temperature: its own entries
    with pytest.raises(AssertionError, match="the teacher ran"):
        other.lookup(batch)
    with pytest.raises(ValueError, match="top-8 at temperature 2.0"):
        Distillation(teacher, temperature=1.0, top_k=8, cache=again)


def test_context_extension_refuses_what_cannot_be_meant():
    base = TINY_LLAMA.replace(max_seq_len=256, rope_theta=10_000.0)
    assert context_extension(base, max_seq_len=1024, rope_theta=40_000) == {"max_seq_len": 1024, "rope_theta": 40_000.0}
    assert context_extension(base, max_seq_len=1024) == {"max_seq_len": 1024}
    with pytest.raises(ContextError, match="without a longer context .*give the new max_seq_len"):
        context_extension(base, max_seq_len=None, rope_theta=40_000)
    with pytest.raises(ContextError, match="without a longer context"):
        context_extension(base, max_seq_len=256, rope_theta=40_000)
    with pytest.raises(ContextError, match="shorter than"):
        context_extension(base, max_seq_len=128)
    with pytest.raises(ContextError, match="below"):
        context_extension(base, max_seq_len=1024, rope_theta=5_000)
    with pytest.raises(ContextError, match="do not fit the new 512-token context"):
        context_extension(base, max_seq_len=512, seq_len=1024)


def ipd(setup, **changes):
    args = dict(seq_len=64, rope_theta=40_000.0, teacher=setup["teacher"], short_doc_tokens=16, steps=2,
                batch_rows=2, lr=1e-3, print_every=1000)
    return phase2(setup["student"], setup["shards"], **{**args, **changes})


def test_phase2_records_the_new_context_in_every_checkpoint(setup, tmp_path):
    result = run_recipe(ipd(setup, top_k=8, teacher_cache=str(tmp_path / "cache")), tmp_path / "ipd")
    config = read_config(result.checkpoint)
    assert (config.rope_theta, config.max_seq_len) == (40_000.0, 64)
    hf_config = json.loads((result.checkpoint / "config.json").read_text())
    assert (hf_config["rope_theta"], hf_config["max_position_embeddings"]) == (40_000.0, 64)
    assert any((tmp_path / "cache").rglob("*.safetensors"))
    model = load(result.checkpoint).model.eval()
    tokens = torch.randint(3, config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(tokens)
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(result.checkpoint, dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, ours, atol=2e-5, rtol=1e-4)
    cache = new_cache(model)  # the checkpoint's own context: 64 slots
    new = list(generate(model, tokens[0, :63].tolist(), cache, max_new_tokens=1, sampling=SamplingConfig(temperature=0)))
    assert new == [int(ours[0, 62].argmax())]  # decodes to the new length, as the full forward predicts
    recipe = json.loads((tmp_path / "ipd" / "recipe.json").read_text())
    assert recipe["data"]["packing"] == "window" and recipe["data"]["max_doc_tokens"] == 16


def test_the_long_data_baseline_trains_on_long_documents_alone(setup, tmp_path):
    recipe = phase2(setup["student"], setup["shards"], seq_len=64, loss="ce", steps=1, batch_rows=2, print_every=1000,
                    domain_weights={"long": 1.0})
    assert recipe.data.min_doc_tokens == 65 and recipe.objective.__class__.__name__ == "CE"
    result = run_recipe(recipe, tmp_path / "ce")
    assert read_config(result.checkpoint).max_seq_len == 64
    with pytest.raises(ValueError, match="drop the teacher"):
        phase2(setup["student"], setup["shards"], seq_len=64, loss="ce", teacher=setup["teacher"])


def test_phase2_bad_inputs_are_refused_naming_the_problem(setup, tmp_path):
    with pytest.raises(TeacherError, match="longer than the teacher's context .*48 tokens"):
        run_recipe(ipd(setup, teacher=setup["short_teacher"]), tmp_path / "a")
    other = tmp_path / "other"
    texts = [t.upper() for t in make_texts(200, seed=99)]
    save_pretrained(build_model(read_config(setup["teacher"]), seed=5), other)
    Tokenizer.train_bpe(texts, setup["tokenizer"].vocab_size, show_progress=False).save(other)
    with pytest.raises(TeacherError, match="uses another tokenizer"):
        run_recipe(ipd(setup, teacher=str(other)), tmp_path / "b")
    with pytest.raises(ContextError, match="without a longer context"):
        phase2(setup["student"], setup["shards"], seq_len=32, max_seq_len=32, rope_theta=40_000.0,
               teacher=setup["teacher"])
    with pytest.raises(ValueError, match="top_k"):
        run_recipe(ipd(setup, teacher_cache=str(tmp_path / "c")), tmp_path / "c")
    plain = ipd(setup).replace(config_changes={})  # a window past the student's context, unextended
    with pytest.raises(ValueError, match="past the model's 32-token context"):
        run_recipe(plain, tmp_path / "d")


def test_pro_1b_phase2_has_the_papers_budget(tmp_path):
    from recipes.pro_1b import pro_1b, pro_1b_phase2

    phase1 = pro_1b()
    assert phase1.student.max_seq_len == phase1.seq_len == 4096  # phase 1 records the length it trains at
    phase1.student.save(tmp_path / "phase1")  # a config alone: the recipe reads no weights
    recipe = pro_1b_phase2(str(tmp_path / "phase1"), teacher="scout", shards="s")
    s = recipe.train.schedule
    assert (recipe.train.steps, s.total_steps, s.peak_lr, s.final_lr) == (100_000, 100_000, 4e-5, 0.0)
    tokens = recipe.train.steps * recipe.seq_len * recipe.global_batch_rows
    assert abs(tokens - 20e9) / 20e9 < 0.02  # "20B tokens"
    assert recipe.config_changes == {"max_seq_len": 131_072, "rope_theta": 8_000_000.0}
    assert recipe.objective.teacher == "scout" and recipe.data.packing == "window"
    assert recipe.data.max_doc_tokens == 4096 and recipe.data.domain_weights["fineweb-edu"] == 89.75
    assert recipe.validate(world_size=3) == 1
    with pytest.raises(ValueError, match="--teacher"):
        pro_1b_phase2(str(tmp_path / "phase1"), teacher=None, shards="s").validate(world_size=1)


def test_extend_context_position_loss_and_retrieval_commands(setup, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli(["extend-context", setup["student"], "--data", setup["shards"], "--teacher", setup["teacher"],
                "--seq-len", "64", "--rope-theta", "40000", "--short-docs", "16", "--steps", "1", "--batch-rows", "2",
                "--out", str(run)]) == 0
    checkpoint = capsys.readouterr().out.split("checkpoint: ")[-1].strip()
    assert read_config(checkpoint).rope_theta == 40_000.0
    assert cli(["position-loss", checkpoint, "--data", setup["shards"], "--length", "48", "--buckets", "4",
                "--split", "train", "--domains", "long", "--out", str(tmp_path / "pl.json"),
                "--png", str(tmp_path / "pl.png")]) == 0
    curve = json.loads((tmp_path / "pl.json").read_text())["position_loss"]
    assert curve["edges"] == [0, 12, 24, 36, 48] and len(curve["loss"]) == 4 and curve["documents"] > 0
    assert (tmp_path / "pl.png").read_bytes()[:4] == b"\x89PNG"
    assert cli(["extend-context", setup["student"], "--data", setup["shards"], "--seq-len", "32",
                "--max-seq-len", "32", "--rope-theta", "40000", "--teacher", setup["teacher"]]) == 2
    assert "without a longer context" in capsys.readouterr().err
    assert cli(["position-loss", checkpoint, "--data", setup["shards"], "--length", "100000"]) == 2
    assert "no documents of at least 100,001 tokens" in capsys.readouterr().err
    assert cli(["retrieval", checkpoint, "--lengths", "500,700", "--depths", "0,1", "--trials", "1",
                "--out", str(tmp_path / "r.json"), "--png", str(tmp_path / "r.png")]) == 0
    grid = json.loads((tmp_path / "r.json").read_text())["retrieval"]
    assert grid["lengths"] == [500, 700] and len(grid["accuracy"]) == 2  # past the 64-token context
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
