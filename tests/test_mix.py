"""Simulation-driven data mixing: the utilities -> weights math, gradients against a reference, the whole
simulation (determinism, the junk domain ranked last, mix.json read by pretrain and recipes), bad inputs."""

import json
import math

import pytest
import torch

from mobilellm.data import DataError, TokenDataset
from mobilellm.data.mixture import DocLengths
from mobilellm.mix import (MixConfig, MixMapping, Target, aggregate, clip_to_bounds, mean_gradient, read_mix,
                           shuffle_documents, simulate, with_junk_domain)
from mobilellm.mix.influence import alignments
from mobilellm.mix.target import domain_probes
from mobilellm.model import build_model
from mobilellm.train.distributed import SingleProcess
from mobilellm.train.losses import CrossEntropy
from tests.mix_helpers import mix_shards, proxy_recipe
from tests.train_common import one_thread  # noqa: F401 (autouse fixture)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return mix_shards(tmp_path_factory.mktemp("mix-data"))


# ---- utilities -> weights ------------------------------------------------------------------------------------

def test_aligned_orthogonal_opposed_gradients_get_weights_in_that_order():
    g_target = torch.tensor([1.0, 2.0, 0.0, -1.0])
    domains = {"aligned": 3 * g_target, "orthogonal": torch.tensor([2.0, -1.0, 5.0, 0.0]), "opposed": -0.5 * g_target}
    utilities = {d: float(g @ g_target / (g.norm() * g_target.norm())) for d, g in domains.items()}
    assert utilities == pytest.approx({"aligned": 1.0, "orthogonal": 0.0, "opposed": -1.0}, abs=1e-6)
    weights = MixMapping().weights(aggregate([utilities] * 4, [1, 2, 3, 4]))
    assert weights["aligned"] > weights["orthogonal"] > weights["opposed"] > 0
    assert sum(weights.values()) == pytest.approx(1.0)
    # the stated mapping by hand: z = (1, 0, -1) / sqrt(2/3), softmax at T=1 (no bound binds at floor .2, cap .6)
    z = [u / math.sqrt(2 / 3) for u in (1.0, 0.0, -1.0)]
    expected = [math.exp(v) / sum(math.exp(x) for x in z) for v in z]
    assert list(weights.values()) == pytest.approx(clip_to_bounds(expected, 0.2 / 3, 0.6))


def test_the_mapping_never_collapses_to_one_hot_unless_asked():
    utilities = {"a": 10.0, "b": 0.0, "c": -3.0, "d": -3.1}
    for temperature in (1.0, 0.1, 1e-4):
        w = MixMapping(temperature=temperature, floor=0.2, cap=0.6).weights(utilities)
        assert min(w.values()) >= 0.2 / 4 - 1e-12 and max(w.values()) <= 0.6 + 1e-12
        assert sum(w.values()) == pytest.approx(1.0)
        assert list(w.values()) == sorted(w.values(), reverse=True)  # order kept
    one_hot = MixMapping(temperature=1e-4, floor=0.0, cap=1.0).weights(utilities)
    assert one_hot["a"] == pytest.approx(1.0)
    assert MixMapping().weights({"a": 0.3, "b": 0.3, "c": 0.3}) == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})
    scaled = MixMapping().weights({k: 5 * v + 2 for k, v in utilities.items()})  # scale/offset free
    assert scaled == pytest.approx(MixMapping().weights(utilities))


def test_checkpoints_count_in_proportion_to_their_step():
    got = aggregate([{"a": 1.0, "b": 0.0}, {"a": 0.0, "b": 1.0}], [1, 3])
    assert got == pytest.approx({"a": 0.25, "b": 0.75})


@pytest.mark.parametrize("mapping, match", [(MixMapping(temperature=0), "temperature"),
                                            (MixMapping(floor=1.5), "floor"), (MixMapping(cap=0.1), "cap")])
def test_bad_mapping_settings_are_refused(mapping, match):
    with pytest.raises(ValueError, match=match):
        mapping.weights({"a": 1.0, "b": 0.0, "c": 2.0})


# ---- gradients ------------------------------------------------------------------------------------------------

def test_mean_gradient_equals_autograd_on_the_whole_block(data):
    shards, _ = data
    model = build_model(proxy_recipe(*data).student, seed=0)
    rows = next(domain_probes(TokenDataset(shards), ["prose"], 32, 6, seed=0))["prose"]
    got, loss = mean_gradient(model, rows, SingleProcess(), micro_rows=4)  # micro-batches of 4 + 2 rows
    ce = CrossEntropy()
    model.zero_grad()
    reference = ce(model, rows) / ce.count(rows)
    reference.backward()
    want = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert loss == pytest.approx(reference.item(), rel=1e-6)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_a_domain_whose_data_is_the_target_has_utility_one(data):
    shards, _ = data
    model = build_model(proxy_recipe(*data).student, seed=0)
    blocks = next(domain_probes(TokenDataset(shards), ["count", "prose"], 32, 4, seed=0))
    result = alignments(model, {"t": blocks["count"]}, {"same": blocks["count"], "other": blocks["prose"]},
                        SingleProcess(), micro_rows=4)
    assert result["utilities"]["same"] == pytest.approx(1.0, abs=1e-5)
    assert result["utilities"]["other"] < 0.999


def test_probes_draw_documents_in_the_pieces_the_proxy_trains_on(data):
    """A probe block of a recipe with max_doc_tokens holds pieces of at most that many tokens each."""
    shards, _ = data
    whole = next(domain_probes(TokenDataset(shards), ["count"], 32, 4, seed=0))["count"]
    cut = next(domain_probes(TokenDataset(shards), ["count"], 32, 4, seed=0, lengths=DocLengths(max_tokens=9)))["count"]

    def longest_document(rows):
        return max(int((row == d).sum()) for row in rows["doc_ids"] for d in row.unique())

    assert longest_document(whole) > 9  # counting documents run 21-61 tokens
    assert longest_document(cut) <= 9


# ---- the junk domain ------------------------------------------------------------------------------------------

def test_shuffled_documents_keep_their_tokens_and_eos():
    tokens, offsets = torch.arange(1, 21).numpy(), torch.tensor([0, 5, 6, 20]).numpy()
    out = shuffle_documents(tokens, offsets, seed=0)
    for a, b in zip(offsets[:-1], offsets[1:]):
        assert sorted(out[a:b]) == sorted(tokens[a:b]) and out[b - 1] == tokens[b - 1]
    assert (out != tokens).any() and (shuffle_documents(tokens, offsets, seed=0) == out).all()


def test_the_junk_domain_links_the_original_shards_and_leaves_them_alone(data, tmp_path):
    shards, _ = data
    before = sorted(p.name for p in shards.iterdir())
    derived = with_junk_domain(shards, "count", tmp_path / "with-junk")
    dataset = TokenDataset(derived)
    assert dataset.domains == ["count", "prose", "shuffled-count"]
    original = TokenDataset(shards).documents("count")
    junk = dataset.documents("shuffled-count")
    assert len(junk) == len(original) and sorted(junk.document(3)) == sorted(original.document(3))
    assert sorted(p.name for p in shards.iterdir()) == before
    with pytest.raises(DataError, match="unknown domain 'poetry'"):
        with_junk_domain(shards, "poetry", tmp_path / "x")


# ---- the simulation -------------------------------------------------------------------------------------------

def test_simulation_writes_a_deterministic_mix_that_pretrain_and_recipes_read(data, tmp_path):
    shards, tok = data
    target = Target(domains=("prose",), rows=4)
    config = MixConfig(probe_rows=4, micro_rows=4)
    first = simulate(proxy_recipe(shards, tok), target, tmp_path / "a", config=config, log=lambda line: None)
    again = simulate(proxy_recipe(shards, tok), target, tmp_path / "b", config=config, log=lambda line: None)
    assert first["weights"] == again["weights"] and first["checkpoints"] == again["checkpoints"]
    written = json.loads((tmp_path / "a" / "mix.json").read_text())
    assert [c["step"] for c in written["checkpoints"]] == [2, 4, 6, 8]
    assert set(written) >= {"weights", "utilities", "natural", "uniform", "proxy", "target", "data", "cost"}
    assert written["cost"]["tokens"] == 8 * 8 * 32 + 4 * 32 * (4 * 2 + 4) and written["cost"]["seconds"] > 0
    assert len(written["data"]["sha256"]) == 64 and written["proxy"]["train"]["save_every"] == 2
    assert (tmp_path / "a" / "mix.png").read_bytes()[:4] == b"\x89PNG"
    assert read_mix(tmp_path / "a" / "mix.json") == pytest.approx(first["weights"])

    recipe = proxy_recipe(shards, tok, steps=1).replace(domain_weights=str(tmp_path / "a" / "mix.json"))
    recipe.validate(1)
    from mobilellm.train.recipe import run_recipe
    run_recipe(recipe, tmp_path / "main")
    summary = json.loads((tmp_path / "main" / "recipe.json").read_text())
    assert summary["domain_weights"] == str(tmp_path / "a" / "mix.json")


def test_the_junk_domain_is_ranked_last_with_under_half_the_uniform_weight(data, tmp_path):
    shards, tok = data
    mix = simulate(proxy_recipe(shards, tok, steps=160), Target(domains=("count", "prose"), rows=16),
                   tmp_path / "mix", config=MixConfig(probe_rows=16, junk="count"), log=lambda line: None)
    weights = mix["weights"]
    assert min(weights, key=weights.get) == "shuffled-count"
    assert weights["shuffled-count"] < 0.5 * mix["uniform"]["shuffled-count"]


@pytest.mark.parametrize("target, match", [
    (Target(), "the target is empty"),
    (Target(domains=("poetry",)), "unknown target domain.*poetry"),
    (Target(files=("/no/such/file.jsonl",)), "does not exist"),
])
def test_bad_targets_fail_before_training(data, tmp_path, target, match):
    with pytest.raises(DataError, match=match):
        simulate(proxy_recipe(*data), target, tmp_path / "mix", log=lambda line: None)
    assert not (tmp_path / "mix" / "proxy").exists()


def test_a_domain_without_held_out_data_and_an_empty_file_are_refused(data, tmp_path):
    from mobilellm.data import Source, tokenize_to_shards
    from mobilellm.tokenizer import Tokenizer
    from tests.data_helpers import write_jsonl
    shards, tok = data
    tokenize_to_shards({"all": [Source(write_jsonl(tmp_path / "a.jsonl", ["some text here"] * 3))]},
                       Tokenizer.load(tok), tmp_path / "no-val", val_fraction=0.0, progress=False)
    with pytest.raises(DataError, match="'all' has no held-out documents"):
        Target(domains=("all",)).check(TokenDataset(tmp_path / "no-val"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="no documents in .*empty.txt"):
        Target(files=(str(tmp_path / "empty.txt"),)).parts(TokenDataset(shards), Tokenizer.load(tok), 32)


def test_a_text_file_target_is_tokenized_with_the_run_tokenizer(data, tmp_path):
    from mobilellm.tokenizer import Tokenizer
    shards, tok = data
    (tmp_path / "t.txt").write_text("one two three four five six seven eight nine zero one two three")
    parts = Target(files=(str(tmp_path / "t.txt"),), rows=2).parts(TokenDataset(shards), Tokenizer.load(tok), 8)
    rows = parts[f"file:{tmp_path / 't.txt'}"]
    assert rows["tokens"].shape == (2, 8)


def test_bad_simulation_settings_and_mix_files(data, tmp_path):
    with pytest.raises(ValueError, match="at least 4 checkpoints"):
        simulate(proxy_recipe(*data), Target(domains=("prose",)), tmp_path, config=MixConfig(checkpoints=2))
    with pytest.raises(ValueError, match="multiple of the checkpoint count"):
        simulate(proxy_recipe(*data, steps=6), Target(domains=("prose",)), tmp_path)
    (tmp_path / "bad.json").write_text(json.dumps({"weights": {"a": 1}}))
    with pytest.raises(DataError, match="not a mix file"):
        read_mix(tmp_path / "bad.json")
    with pytest.raises(DataError, match="does not exist"):
        read_mix(tmp_path / "none.json")


MIX_CHILD = """
import sys
from pathlib import Path
from mobilellm.mix import MixConfig, Target, simulate
from mobilellm.train.distributed import init_parallel
from tests.mix_helpers import proxy_recipe

strategy, out = sys.argv[1], Path(sys.argv[2])
shards, tok = Path(sys.argv[5]), Path(sys.argv[6])
simulate(proxy_recipe(shards, tok), Target(domains=("prose", "count"), rows=4), out,
         config=MixConfig(probe_rows=4, micro_rows=1), parallel=init_parallel(strategy), log=lambda line: None)
"""


@pytest.mark.slow  # two torchrun processes start in about 30 s on a loaded 2-core machine
def test_two_processes_reduce_gradients_to_the_one_process_weights(data, tmp_path):
    from tests.test_train_distributed import torchrun
    shards, tok = data
    config = MixConfig(probe_rows=4, micro_rows=1)
    single = simulate(proxy_recipe(shards, tok), Target(domains=("prose", "count"), rows=4), tmp_path / "one",
                      config=config, log=lambda line: None)
    torchrun(tmp_path, "ddp", tmp_path / "two", 0, child=MIX_CHILD, extra=(shards, tok))
    double = json.loads((tmp_path / "two" / "mix.json").read_text())
    assert double["cost"]["processes"] == 2
    for a, b in zip(single["checkpoints"], double["checkpoints"]):
        assert b["utilities"] == pytest.approx(a["utilities"], abs=1e-4)
        assert b["target_loss"] == pytest.approx(a["target_loss"], rel=1e-5)
    assert double["weights"] == pytest.approx(single["weights"], abs=1e-4)


# ---- the extra corpus domains --------------------------------------------------------------------------------

def test_bigbench_corpus_text_takes_tasks_in_turn_and_never_the_evaluated_ones():
    from mobilellm.data.starter import bigbench_records
    from mobilellm.eval.tasks.bigbench import bigbench_dir
    if not all((bigbench_dir() / t / "task.json").exists() for t in ("tense", "operators")):
        pytest.skip("BIG-bench tasks not extracted (mobilellm eval fetches them)")
    records = list(bigbench_records(("tense", "operators")))
    assert [s.split("#")[0] for s, _ in records[:4]] == ["bigbench:tense", "bigbench:operators"] * 2
    assert records[0][1].startswith("\nQ: ") and "\nA: " in records[0][1]
    with pytest.raises(DataError, match="winowhy are held out"):
        list(bigbench_records(("tense", "winowhy")))


def test_the_starter_corpus_refuses_unknown_domains(tmp_path):
    from mobilellm.data.starter import build_starter_corpus
    with pytest.raises(DataError, match="unknown starter domain.*poetry.*docs, bigbench"):
        build_starter_corpus(tmp_path, domains=("poetry",))
