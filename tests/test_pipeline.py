"""`mobilellm pipeline`: the whole recipe end to end on tiny configs and local data; a second run skips every
stage; a changed stage recipe re-runs that stage and those after it only; a run killed at a random point and
restarted ends with the same final int4 weights as an uninterrupted one; the pro-1b dry run states its compute."""

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mobilellm.cli import main as cli
from mobilellm.loading import load
from mobilellm.pipeline import BaselineSpec, build_stages, content_hash, read_record, run_pipeline, write_report
from tests.pipeline_helpers import make_inputs, tiny_plan
from tests.train_common import one_thread  # noqa: F401 (autouse fixture)

ROOT = Path(__file__).resolve().parents[1]
ORDER = ["corpus", "tokenize", "mix", "phase1", "phase2", "specialists", "merge", "qat", "sft", "dpo", "eval", "export"]
MODELS = ["full precision", "PTQ int4", "QAT int4", "final, fake quant", "final int4"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_inputs(tmp_path_factory.mktemp("pipeline-inputs"))


def run(plan, out, **kwargs):
    lines = []
    records = run_pipeline(build_stages(plan), out, log=lines.append, **kwargs)
    return records, lines


def ran(lines):
    return [line.split()[1].rstrip(":") for line in lines if " running in " in line or " resuming in " in line]


def test_pipeline_end_to_end_then_skips_then_reruns_only_a_changed_stage_and_after(inputs, tmp_path):
    plan, out = tiny_plan(inputs), tmp_path / "run"
    records, lines = run(plan, out)
    assert list(records) == ORDER and ran(lines) == ORDER
    for name in ORDER:
        data = json.loads((out / name / "stage.json").read_text())
        assert data["stage"] == name and data["seconds"] >= 0 and not (out / f"{name}.partial").exists()
        for output in data["outputs"].values():  # the recorded hashes are the files' own
            assert content_hash(out / name / output["path"]) == output["sha256"]
    phase2 = read_record(out / "phase2").data
    assert phase2["inputs"]["phase1"]["outputs"] == read_record(out / "phase1").hashes()
    assert phase2["inputs"]["teacher"]["sha256"] == content_hash(inputs["teacher"])
    assert phase2["metrics"]["steps"] == 4 and phase2["tokens"] == 4 * 2 * 64
    final = load(records["export"].path("int4"))
    assert final.quant is not None and final.quant.scheme == "cpu" and final.model.config.max_seq_len == 256
    ev = records["eval"].data["metrics"]
    assert list(ev["models"]) == MODELS
    for name, result in ev["models"].items():  # recorded where it lies once the stage is done, not in its .partial
        assert Path(result["checkpoint"]).exists(), (name, result["checkpoint"])
    assert ev["models"]["final, fake quant"]["checkpoint"] == str(records["dpo"].path("checkpoint"))
    assert ev["vs_full_precision"]["PTQ int4"]["tasks"][0]["task"] == "arc_easy"
    assert records["export"].data["metrics"]["pte"].startswith(("model.pte", "skipped: ExecuTorch"))

    report = write_report(plan, out, list(records))
    text, page = report.read_text(), (out / "report.html").read_text()
    for section in ("Environment", "Summary", "Loss curves", "Data mix", "Long context", "Merge",
                    "Full precision vs PTQ vs QAT", "The final int4 model", "Lineage of every checkpoint"):
        assert f"## {section}" in text and section in page
    check_report_numbers(records, text, page)

    records, lines = run(plan, out)  # nothing changed: everything skipped
    assert ran(lines) == [] and sum("up to date" in line for line in lines) == len(ORDER)

    changed = plan.replace(qat=plan.qat.replace(steps=4))  # one stage's recipe
    before = {name: read_record(out / name).data["key"] for name in ORDER}
    records, lines = run(changed, out)
    assert ran(lines) == ORDER[ORDER.index("qat"):]
    after = {name: read_record(out / name).data["key"] for name in ORDER}
    assert [n for n in ORDER if before[n] != after[n]] == ORDER[ORDER.index("qat"):]
    assert read_record(out / "qat").data["metrics"]["steps"] == 4

    with pytest.raises(Exception, match="stage merge .* is not finished or its inputs changed"):
        run(changed.replace(merge=dataclasses.replace(changed.merge, val_batches=1)), out, from_="sft")
    records, lines = run(changed, out, from_="export", until="export")
    assert ran(lines) == ["export"] and list(records) == ORDER


def check_report_numbers(records, text, page):
    """The report's numbers are the run's own: each one looked up in the stage.json it comes from."""
    figures = ["report-figures/losses.png", "report-figures/phase1-val.png", "mix/mix.png",
               "eval/needle-full-precision.png", "eval/needle-final-int4.png", "eval/position-loss.png",
               "merge/merged.search.png"]
    assert all(f"]({f})" in text for f in figures) and page.count("data:image/png;base64,") == len(figures)
    assert "src=\"report-figures" not in page and "<img src=\"data:image/png;base64," in page  # self-contained
    env = records["phase1"].data["environment"]
    assert f"| commit | {env['commit']} |" in text and f"| torch | {env['torch']} |" in text
    mix = records["mix"].data["metrics"]
    assert f"| count | {mix['utilities']['count']:.4f} | {mix['weights']['count']:.4f}" in text
    for name in ORDER:  # summary rows: tokens and wall time
        data = records[name].data
        tokens = "-" if data["tokens"] is None else f"{data['tokens']:,}"
        assert f"| {name} | {tokens} |" in text
    ev = records["eval"].data["metrics"]
    for name, result in ev["models"].items():
        assert f"| {name} | {result['held_out_loss']:.4f} | {result['held_out_perplexity']:.4f} |" in text
    grid = ev["needle"]["final int4"]
    assert f"Needle, final int4: mean {grid['mean']:.3f}" in text
    curve = ev["position_loss"]["curves"]["phase 2 (IPD)"]["loss"]
    assert "| phase 2 (IPD) | " + " | ".join(f"{v:.4f}" for v in curve) + " |" in text
    merge = records["merge"].data["metrics"]
    assert f"| searched | {[round(w, 3) for w in merge['best']['weights']]} |" in text
    assert f"{merge['best']['report_losses']['mean']:.4f} |" in text
    export = records["export"].data["metrics"]
    assert f"| size (weights on disk) | {export['size_bytes'] / 1e6:.2f} MB |" in text
    assert f"| decode tokens/s (greedy, this machine) | {export['decode_tokens_per_s']:.4f} |" in text
    assert f"| answer | {repr(export['answer']).replace('|', '/')} |" in text
    for name in ORDER:
        for entry in records[name].data["lineage"]:
            assert f"| {name} | {entry['checkpoint']} | {'; '.join(entry['from'])} |" in text


def test_kd_versus_ce_arms_same_tokens_and_seed_two_seeds_paired_in_the_report(inputs, tmp_path):
    plan = tiny_plan(inputs)  # a 64-token phase-1 context: the multiple-choice items fit the arms
    plan, out = plan.replace(name="tiny-experiment", phase1=plan.phase1.replace(seq_len=64),
                             baseline=BaselineSpec(seeds=(0, 1))), tmp_path / "x"
    records, lines = run(plan, out, until="phase1-baseline")
    assert ran(lines) == ["corpus", "tokenize", "mix", "phase1", "phase1-baseline"]
    base = records["phase1-baseline"]
    m = base.data["metrics"]
    assert list(m["arms"]) == ["kd-seed0", "ce-seed0", "kd-seed1", "ce-seed1"]
    assert m["arms"]["kd-seed0"]["checkpoint"] == str(records["phase1"].path("checkpoint"))  # the main run
    for arm, r in m["arms"].items():  # the trained arms' checkpoints as they lie after the stage, in results too
        saved = json.loads((base.path("results").parent / f"{arm}.results.json").read_text())
        assert Path(r["checkpoint"]).exists() and saved["model"]["checkpoint"] == r["checkpoint"], arm
    main = json.loads((records["phase1"].file("run") / "recipe.json").read_text())
    for arm in ("ce-seed0", "kd-seed1", "ce-seed1"):
        recipe = json.loads((base.file(arm) / "recipe.json").read_text())
        assert recipe["objective"]["kind"] == ("CE" if arm.startswith("ce") else "KD"), recipe["objective"]
        assert recipe["seed"] == int(arm[-1])
        for key in ("seq_len", "global_batch_rows", "domain_weights", "student"):
            assert recipe[key] == main[key], key
        assert recipe["train"]["steps"] == main["train"]["steps"]
    assert base.data["tokens"] == 3 * m["tokens_per_arm"] == 3 * records["phase1"].data["tokens"]
    for seed in ("seed0", "seed1"):
        c = m["kd_vs_ce"][seed]
        kd, ce = m["arms"][f"kd-{seed}"], m["arms"][f"ce-{seed}"]
        assert c["held_out_loss"]["a"] == kd["held_out_loss"] and c["held_out_loss"]["b"] == ce["held_out_loss"]
        diffs = [b - a for a, b in zip(kd["held_out_batches"], ce["held_out_batches"])]
        assert c["held_out_loss"]["diff"] == pytest.approx(sum(diffs) / len(diffs))
        assert c["tasks"] and c["tasks"][0]["task"] == "arc_easy" and "stderr" in c["tasks"][0]
    assert [e["how"] for e in base.data["lineage"]] == [f"phase 1 baseline arm: {a}" for a in
                                                         ("ce, seed 0", "kd, seed 1", "ce, seed 1")]
    text = write_report(plan, out, list(records)).read_text()
    assert "## Knowledge distillation against its baseline" in text and "report-figures/kd-vs-ce.png" in text
    for arm, r in m["arms"].items():
        assert f"| {arm} | {r['held_out_loss']:.4f} | {r['held_out_perplexity']:.4f} |" in text
    assert f"| seed1 | held-out loss | {m['kd_vs_ce']['seed1']['held_out_loss']['a']:.4f} |" in text


def run_tiny_process(inputs_root, out):
    return subprocess.Popen([sys.executable, "-m", "tests.pipeline_helpers", str(inputs_root), str(out)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


@pytest.mark.slow
def test_a_run_killed_at_a_random_point_restarts_and_ends_with_the_same_final_weights(inputs, tmp_path):
    inputs_root = Path(inputs["tokenizer"]).parent
    whole = tmp_path / "whole"
    start = time.perf_counter()
    assert run_tiny_process(inputs_root, whole).wait() == 0
    seconds = time.perf_counter() - start
    killed = tmp_path / "killed"
    process = run_tiny_process(inputs_root, killed)
    time.sleep(random.Random().uniform(0.3, 0.9) * seconds)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    partial = sorted(p.name for p in killed.glob("*.partial"))
    started = [name for name in partial if (killed / name / "key.json").exists()]  # past its first instant
    assert run_tiny_process(inputs_root, killed).wait() == 0
    assert not list(killed.glob("*.partial"))
    for name in started:  # the stage it was in resumed in its partial folder
        assert read_record(killed / name.removesuffix(".partial")).data["resumed"], name
    for stage, output in (("merge", "checkpoint"), ("qat", "int4"), ("dpo", "checkpoint"), ("export", "int4")):
        a, b = read_record(whole / stage).path(output), read_record(killed / stage).path(output)
        # The weights (merge.json names its run's own paths; resume/ holds process RNG states)
        weights = sorted(p.relative_to(a) for p in a.glob("*.safetensors"))
        assert weights and weights == sorted(p.relative_to(b) for p in b.glob("*.safetensors"))
        assert [content_hash(a / w) for w in weights] == [content_hash(b / w) for w in weights], (stage, partial)


@pytest.mark.slow
def test_nproc_per_node_2_runs_each_training_stage_under_torchrun_and_matches_one_process(inputs, tmp_path):
    import torch
    from safetensors.torch import load_file

    inputs_root = Path(inputs["tokenizer"]).parent
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MOBILELLM_TINY_INPUTS": str(inputs_root), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "mobilellm.cli", "pipeline", "--recipe",
                           "tests.pipeline_helpers:env_tiny_plan", "--out", str(out), "--nproc-per-node", "2"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    trains = [s.name for s in build_stages(tiny_plan(inputs)) if s.trains]
    assert trains == ["phase1", "phase2", "specialists", "qat", "sft", "dpo"]
    for name in ORDER:
        record = read_record(out / name)
        assert record.data["processes"] == (2 if name in trains else 1), name
        assert (f"[pipeline] {name}: " + "torch.distributed.run --standalone --nproc-per-node 2") in done.stdout \
            if name in trains else f"[pipeline] {name}: running in" in done.stdout
    assert "final int4 model" in done.stdout and "> the quick" in done.stdout and (out / "report.html").exists()
    single, _ = run(tiny_plan(inputs), tmp_path / "one", until="phase1")  # the same stage in one process
    a = load_file(read_record(out / "phase1").path("checkpoint") / "model.safetensors")
    b = load_file(single["phase1"].path("checkpoint") / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:  # the same global batches, split over 2 processes: the same weights up to summation order
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-4, msg=key)


def test_pro_1b_dry_run_states_each_stage_budget_and_its_compute(capsys, tmp_path):
    assert cli(["pipeline", "--recipe", "pro-1b", "--dry-run"]) == 0
    text = capsys.readouterr().out
    phase1 = next(line for line in text.splitlines() if line.startswith("phase1 "))
    assert "1,342,177,280,000" in phase1 and "H100-hours" in text and "40% MFU" in text
    assert next(line for line in text.splitlines() if line.startswith("phase2 ")).split()[3] == "19,660,800,000"
    assert cli(["pipeline", "--from", "nonsense", "--out", str(tmp_path / "x")]) == 2
    assert "--from nonsense: no such stage" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_every_named_plan_builds_and_the_kd_tiers_end_phase1_with_the_baseline():
    """Each plan of recipes/pipeline.py builds its stages and dry-run plan; the KD tiers add the baseline after
    phase 1, at the same phase-1 recipe as the main run, the starter's tier with its subcloned start."""
    from mobilellm.pipeline import dry_run_text
    from recipes.pipeline import PLANS, get_plan

    for name in PLANS:
        plan = get_plan(name)
        stages = build_stages(plan)
        names = [s.name for s in stages]
        assert dry_run_text(plan, stages).startswith(f"pipeline {name}:")
        has_baseline = name in ("starter-kd", "starter-experiment")
        assert ("phase1-baseline" in names) == has_baseline, name
        if has_baseline:
            assert names[names.index("phase1") + 1] == "phase1-baseline"
    starter, kd = get_plan("starter"), get_plan("starter-kd")
    assert kd.phase1 == starter.phase1 and kd.phase1.summary()["inherit"] and kd.baseline.seeds == (0, 1)
