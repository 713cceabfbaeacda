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
from mobilellm.pipeline import build_stages, content_hash, read_record, run_pipeline, write_report
from tests.pipeline_helpers import make_inputs, tiny_plan
from tests.train_common import one_thread  # noqa: F401 (autouse fixture)

ROOT = Path(__file__).resolve().parents[1]
ORDER = ["corpus", "tokenize", "mix", "phase1", "phase2", "specialists", "merge", "qat", "sft", "dpo", "eval", "export"]


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
    assert set(ev["models"]) == {"full precision", "PTQ int4", "QAT int4", "final int4"}
    assert ev["vs_full_precision"]["PTQ int4"]["tasks"][0]["task"] == "arc_easy"
    assert records["export"].data["metrics"]["pte"].startswith(("model.pte", "skipped: ExecuTorch"))

    report = write_report(plan, out, list(records))
    text, page = report.read_text(), (out / "report.html").read_text()
    for section in ("Environment", "Summary", "Loss curves", "Data mix", "Long context", "Merge",
                    "Full precision vs PTQ vs QAT", "The final int4 model", "Lineage of every checkpoint"):
        assert f"## {section}" in text and section in page
    assert page.count("data:image/png;base64,") >= 5 and "report-figures/losses.png" in text
    weights = records["mix"].data["metrics"]["weights"]
    assert f"| count | {records['mix'].data['metrics']['utilities']['count']:.4f} | {weights['count']:.4f}" in text

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
    assert run_tiny_process(inputs_root, killed).wait() == 0
    assert not list(killed.glob("*.partial"))
    for stage, output in (("merge", "checkpoint"), ("qat", "int4"), ("dpo", "checkpoint"), ("export", "int4")):
        a, b = read_record(whole / stage).path(output), read_record(killed / stage).path(output)
        # The weights (merge.json names its run's own paths; resume/ holds process RNG states)
        weights = sorted(p.relative_to(a) for p in a.glob("*.safetensors"))
        assert weights and weights == sorted(p.relative_to(b) for p in b.glob("*.safetensors"))
        assert [content_hash(a / w) for w in weights] == [content_hash(b / w) for w in weights], (stage, partial)


def test_pro_1b_dry_run_states_each_stage_budget_and_its_compute(capsys, tmp_path):
    assert cli(["pipeline", "--recipe", "pro-1b", "--dry-run"]) == 0
    text = capsys.readouterr().out
    phase1 = next(line for line in text.splitlines() if line.startswith("phase1 "))
    assert "1,342,177,280,000" in phase1 and "H100-hours" in text and "40% MFU" in text
    assert next(line for line in text.splitlines() if line.startswith("phase2 ")).split()[3] == "19,660,800,000"
    assert cli(["pipeline", "--from", "nonsense", "--out", str(tmp_path / "x")]) == 2
    assert "--from nonsense: no such stage" in capsys.readouterr().err and not (tmp_path / "x").exists()
