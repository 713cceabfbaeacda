"""One setup path for every stage: a recipe that starts from a checkpoint, applies a transform and resumes
bit-identically after a kill (1 and 2 processes); QAT through the recipe equals the `qat()` loop call; the
global batch split; step hooks."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mobilellm.cli import build_parser, main as cli
from mobilellm.data import MixtureLoader, Source, TokenDataset, tokenize_to_shards
from mobilellm.hf import load_pretrained, save_pretrained
from mobilellm.infer.sampling import SamplingConfig
from mobilellm.model import build_model
from mobilellm.quant import QuantConfig
from mobilellm.quant.checkpoint import load_quantized
from mobilellm.quant.api import convert
from mobilellm.quant.qat import load_prepared, qat
from mobilellm.tokenizer import Tokenizer
from mobilellm.train.hooks import StepHook
from mobilellm.train.loop import TrainConfig, train
from mobilellm.train.losses import CrossEntropy
from mobilellm.train.objectives import CE, KD, SelfDistillation
from mobilellm.train.optim import OptimConfig, Schedule
from mobilellm.train.recipe import Recipe, run_recipe
from recipes.qat import qat as qat_recipe
from tests.data_helpers import make_texts, tiny_tokenizer, write_jsonl
from tests.train_common import TINY, one_thread, single_thread, tiny_setup  # noqa: F401 (autouse fixture)

ROOT = Path(__file__).resolve().parents[1]


def metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def logged_losses(run_dir):
    return [(r["step"], r["loss"]) for r in metrics(run_dir) if "loss" in r]


def make_shards(folder: Path, tokenizer: Tokenizer) -> Path:
    docs = {"prose": [Source(write_jsonl(folder / "prose.jsonl", make_texts(60, seed=1, min_words=20)))],
            "lists": [Source(write_jsonl(folder / "lists.jsonl", make_texts(60, seed=2, max_words=15)))]}
    tokenize_to_shards(docs, tokenizer, folder / "shards", val_fraction=0.1, progress=False)
    return folder / "shards"


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A random tiny model with its own tokenizer, saved as a checkpoint folder, and shards in that tokenizer."""
    root = tmp_path_factory.mktemp("tiny")
    tokenizer = tiny_tokenizer(root / "ckpt")
    save_pretrained(build_model(TINY.replace(vocab_size=tokenizer.vocab_size), seed=3), root / "ckpt")
    tokenizer.save(root / "ckpt")
    return root / "ckpt", make_shards(root, tokenizer)


# ---- the global batch is the truth ---------------------------------------------------------------------

def split_recipe(global_rows, cap=None):
    return Recipe(name="split", train=TrainConfig(1, Schedule(1e-3, 1)), seq_len=8, global_batch_rows=global_rows,
                  shards="s", student=TINY, micro_batch_rows=cap)


@pytest.mark.parametrize("global_rows, cap, world, micro, expected", [
    (4, 4, 1, None, (4, 1)),
    (4, 4, 2, None, (2, 1)),  # the README's starter under torchrun on 2 processes
    (512, 4, 8, None, (4, 16)),  # pro-1b on 8 GPUs
    (12, 5, 1, None, (4, 3)),  # the largest micro-batch under the cap that divides the rows
    (12, None, 2, None, (6, 1)),
    (12, 4, 2, 3, (3, 2)),  # an exact micro-batch
])
def test_the_global_batch_splits_over_processes_and_micro_batches(global_rows, cap, world, micro, expected):
    assert split_recipe(global_rows, cap).batch_split(world, micro) == expected


def test_a_batch_that_cannot_split_names_the_problem():
    with pytest.raises(ValueError, match="global batch of 5 rows does not split over 2 processes"):
        split_recipe(5).batch_split(2)
    with pytest.raises(ValueError, match=r"\(6 each\) does not split into micro-batches of 4 rows"):
        split_recipe(12).batch_split(2, micro_batch=4)


def test_a_recipe_names_where_its_weights_start():
    with pytest.raises(ValueError, match="exactly one of a student config"):
        split_recipe(4).replace(init="somewhere").validate(1)
    with pytest.raises(ValueError, match="config_changes apply to an init checkpoint"):
        split_recipe(4).replace(config_changes={"rope_theta": 1e6}).validate(1)


# ---- a recipe from a checkpoint --------------------------------------------------------------------------

def test_a_recipe_from_a_checkpoint_applies_config_changes_and_a_transform(tmp_path, tiny_checkpoint):
    ckpt, shards = tiny_checkpoint
    recipe = qat_recipe(str(ckpt), str(shards), steps=2, batch_rows=2, seq_len=16)
    recipe = recipe.replace(config_changes={"rope_theta": 123456.0, "max_seq_len": 4096})
    result = run_recipe(recipe, tmp_path / "run")
    assert result.model.config.rope_theta == 123456.0 and result.model.config.max_seq_len == 4096
    assert type(result.model.layers[0].mlp.up_proj).__name__ == "FakeQuantLinear"
    saved = json.loads((tmp_path / "run" / "recipe.json").read_text())
    assert saved["init"] == str(ckpt) and saved["transforms"][0]["kind"] == "QATPrepare"
    assert saved["config_changes"] == {"rope_theta": 123456.0, "max_seq_len": 4096}
    assert (result.checkpoint / "tokenizer.json").exists()  # the init checkpoint's tokenizer travels on


def test_a_config_change_that_alters_shapes_is_refused(tmp_path, tiny_checkpoint):
    ckpt, shards = tiny_checkpoint
    recipe = qat_recipe(str(ckpt), str(shards), steps=1).replace(config_changes={"ffn_dim": 96})
    with pytest.raises(ValueError, match="shape mismatches"):
        run_recipe(recipe, tmp_path / "run")


def test_a_quantized_start_is_refused(tmp_path, tiny_checkpoint):
    ckpt, shards = tiny_checkpoint
    assert cli(["quantize", str(ckpt), "--scheme", "cpu", "--out", str(tmp_path / "int4")]) == 0
    with pytest.raises(ValueError, match="a quantized checkpoint: training starts from full-precision"):
        run_recipe(qat_recipe(str(tmp_path / "int4"), str(shards), steps=1), tmp_path / "run")


def test_qat_through_the_recipe_gives_the_losses_of_the_qat_loop_call(tmp_path, tiny_checkpoint):
    ckpt, shards = tiny_checkpoint
    steps, rows, seq, lr = 4, 2, 16, 1e-3
    via_recipe = run_recipe(qat_recipe(str(ckpt), str(shards), steps=steps, batch_rows=rows, seq_len=seq, lr=lr),
                            tmp_path / "recipe")
    dataset = TokenDataset(shards)  # what `mobilellm qat` built by hand before it became a recipe
    batches = MixtureLoader(dataset, {d: 1.0 for d in dataset.domains}, seq_len=seq, global_batch_size=rows)
    config = TrainConfig(steps, Schedule(lr, steps, warmup_steps=max(1, steps // 10)), OptimConfig(weight_decay=0.0))
    direct = qat(load_pretrained(ckpt), QuantConfig.from_scheme("cpu"), batches, config, tmp_path / "direct")
    assert via_recipe.losses == direct.losses  # exact: same seed, data, model and loss


def test_qat_command_resumes_and_writes_an_int4_checkpoint(tmp_path, tiny_checkpoint, capsys):
    ckpt, shards = tiny_checkpoint
    args = ["qat", str(ckpt), "--scheme", "cpu", "--data", str(shards), "--out", str(tmp_path / "int4"),
            "--batch-size", "2", "--seq-len", "16", "--save-every", "2", "--eval-every", "2"]
    assert cli(args + ["--steps", "4"]) == 0
    reference = logged_losses(tmp_path / "int4.run")
    assert [r["step"] for r in metrics(tmp_path / "int4.run") if "val_loss" in r] == [2, 4]
    model, config = load_quantized(tmp_path / "int4")
    assert config.scheme == "cpu" and Tokenizer.load(tmp_path / "int4").vocab_size <= model.config.vocab_size
    # The same run stopped after step 2 and resumed gives the same losses.
    import shutil
    run2 = ["--out", str(tmp_path / "b"), "--run-dir", str(tmp_path / "b.run")]
    assert cli(args + run2 + ["--steps", "4"]) == 0  # fresh
    shutil.rmtree(tmp_path / "b.run" / "checkpoints" / "step_0000004")  # as if killed after step 2's
    assert cli(args + run2 + ["--steps", "4", "--resume"]) == 0
    assert logged_losses(tmp_path / "b.run") == reference
    assert "QAT cpu: loss" in capsys.readouterr().out


def test_qat_command_under_torchrun_converts_the_sharded_run(tmp_path, tiny_checkpoint):
    """2 FSDP processes: the losses of 1 process, and rank 0 converts the final checkpoint's full weights."""
    ckpt, shards = tiny_checkpoint
    flags = ["--scheme", "cpu", "--data", str(shards), "--batch-size", "2", "--seq-len", "16", "--steps", "3"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "mobilellm.cli", "qat", str(ckpt), *flags, "--parallel", "fsdp", "--out",
                           str(tmp_path / "two")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert cli(["qat", str(ckpt), *flags, "--out", str(tmp_path / "one")]) == 0
    two, one = logged_losses(tmp_path / "two.run"), logged_losses(tmp_path / "one.run")
    assert [loss for _, loss in two] == pytest.approx([loss for _, loss in one], rel=1e-5)
    config = QuantConfig.from_scheme("cpu")
    final = tmp_path / "two.run" / "checkpoints" / "step_0000003"
    expected = convert(load_prepared(final, config).eval(), config).state_dict()
    saved, _ = load_quantized(tmp_path / "two")
    for name, tensor in saved.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_qat_help_lists_its_flags(capsys):
    with pytest.raises(SystemExit):
        cli(["qat", "--help"])
    out = capsys.readouterr().out
    assert "--resume" in out and "--parallel" in out and "10% warmup" in out


# ---- kill and resume, on 1 process and on 2 gloo processes ---------------------------------------------------

KILLED_CHILD = """
import os, signal, sys, torch
torch.set_num_threads(1)
from mobilellm.quant.qat import QATPrepare  # noqa: F401 (recipe transform)
from mobilellm.train.distributed import init_parallel
from mobilellm.train.hooks import StepHook
from mobilellm.train.recipe import run_recipe
from tests.test_train_stage_setup import stage_recipe

run_dir, shards, kill_at, strategy, init = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]

class Kill(StepHook):
    def begin(self, state):
        if state.step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

run_recipe(stage_recipe(shards, init), run_dir, resume=True, hooks=(Kill(),),
           parallel=init_parallel(None if strategy == "none" else strategy))
"""


def stage_recipe(shards, init="smollm2-135m"):
    """A checkpoint (the real SmolLM2-135M by default) prepared for the cpu int4 scheme and self-distilled for
    3 steps, a checkpoint every 2."""
    return qat_recipe(str(init), str(shards), steps=3, batch_rows=2, seq_len=32, lr=1e-4).replace_train(
        save_every=2, keep_last=1)


@pytest.fixture(scope="module")
def smollm2_shards(tmp_path_factory, smollm2_dir):
    root = tmp_path_factory.mktemp("smollm2-shards")
    return make_shards(root, Tokenizer.load(smollm2_dir))


def run_child(tmp_path, run_dir, shards, kill_at, strategy="none", processes=1, init="smollm2-135m"):
    script = tmp_path / "child.py"
    script.write_text(KILLED_CHILD)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
              if processes > 1 else [sys.executable])
    return subprocess.run([*launch, str(script), str(run_dir), str(shards), str(kill_at), strategy, str(init)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def smollm2_reference(tmp_path_factory, smollm2_shards):
    run_dir = tmp_path_factory.mktemp("smollm2-reference")
    with single_thread():
        result = run_recipe(stage_recipe(smollm2_shards), run_dir)
    yield run_dir, result
    shutil.rmtree(run_dir, ignore_errors=True)  # 2 GB of checkpoints and optimizer state


@pytest.mark.slow  # 6 GB of checkpoints at its peak (a 135M model's weights and Adam state, 3 runs); the tiny
# model's kill-and-resume tests (1 and 2 processes) cover the same code in the default suite
def test_a_smollm2_recipe_killed_mid_run_resumes_bit_identically(tmp_path, smollm2_shards, smollm2_reference):
    reference_dir, reference = smollm2_reference
    run_dir = tmp_path / "run"
    killed = run_child(tmp_path, run_dir, smollm2_shards, kill_at=2)  # dies at the start of step 3
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert logged_losses(run_dir) == logged_losses(reference_dir)[:2]
    with single_thread():
        resumed = run_recipe(stage_recipe(smollm2_shards), run_dir, resume=True)
    assert len(resumed.losses) == 1
    assert logged_losses(run_dir) == logged_losses(reference_dir)  # exact floats, every step
    for (name, a), b in zip(resumed.model.state_dict().items(), reference.model.state_dict().values()):
        assert torch.equal(a, b), name


def killed_and_resumed_on_two_processes(tmp_path, shards, init):
    """(losses of a 2-process FSDP run killed at the start of step 3 and resumed, of the same run uninterrupted)."""
    run_dir, whole = tmp_path / "run", tmp_path / "whole"
    killed = run_child(tmp_path, run_dir, shards, kill_at=2, strategy="fsdp", processes=2, init=init)
    assert killed.returncode != 0 and (run_dir / "checkpoints" / "step_0000002").is_dir(), killed.stderr[-2000:]
    assert len(logged_losses(run_dir)) == 2
    for folder in (run_dir, whole):
        done = run_child(tmp_path, folder, shards, kill_at=-1, strategy="fsdp", processes=2, init=init)
        assert done.returncode == 0, done.stderr[-3000:]
    return logged_losses(run_dir), logged_losses(whole)


def test_a_recipe_on_two_processes_killed_mid_run_resumes_bit_identically(tmp_path, tiny_checkpoint):
    ckpt, shards = tiny_checkpoint
    resumed, whole = killed_and_resumed_on_two_processes(tmp_path, shards, ckpt)
    assert resumed == whole and [s for s, _ in whole] == [1, 2, 3]
    with single_thread():
        one = run_recipe(stage_recipe(shards, ckpt), tmp_path / "one")
    # 2 processes sum in another order than 1: equal to float rounding, not bit for bit.
    assert [loss for _, loss in whole] == pytest.approx(one.losses, rel=1e-5)


@pytest.mark.slow
def test_a_smollm2_recipe_on_two_processes_killed_mid_run_resumes_bit_identically(tmp_path, smollm2_shards,
                                                                                 smollm2_reference):
    reference_dir, _ = smollm2_reference
    resumed, whole = killed_and_resumed_on_two_processes(tmp_path, smollm2_shards, "smollm2-135m")
    assert resumed == whole
    # Against 1 process: steps 1-2 agree to float rounding; from step 3 the int4 grid's rounding turns the
    # ~1e-7 weight differences of another summation order into whole quantization steps (measured 1.6% on
    # step 3; the same recipe without the QAT transform agrees to 3e-7 at every step).
    theirs = [loss for _, loss in logged_losses(reference_dir)]
    assert [loss for _, loss in whole][:2] == pytest.approx(theirs[:2], rel=1e-5)


# ---- the loop's step hooks ----------------------------------------------------------------------------------

class Recorder(StepHook):
    def __init__(self):
        self.calls = []

    def begin(self, state):
        self.calls.append(("begin", state.step, state.loss))

    def after_backward(self, state):
        grads = [p.grad for p in state.model.parameters()]
        self.calls.append(("after_backward", state.step, all(g is not None for g in grads)))

    def end(self, state):
        self.calls.append(("end", state.step, state.loss))


def test_step_hooks_run_in_step_order_with_the_gradients_in_hand(tmp_path):
    model, batches, config = tiny_setup(steps=2)
    hook = Recorder()
    result = train(model, batches, CrossEntropy(), config, tmp_path, hooks=[hook])
    assert [c[:2] for c in hook.calls] == [("begin", 0), ("after_backward", 0), ("end", 0),
                                           ("begin", 1), ("after_backward", 1), ("end", 1)]
    assert hook.calls[0][2] is None and hook.calls[1][2] is True
    assert [c[2] for c in hook.calls if c[0] == "end"] == result.losses


def test_a_hook_can_schedule_what_the_loss_reads(tmp_path):
    """A loss-weight schedule as a hook: the loss reads a value the hook sets at the start of each step."""
    class Scaled(CrossEntropy):
        weight = 1.0

        def __call__(self, model, batch):
            return super().__call__(model, batch) * self.weight

    class Halve(StepHook):
        def begin(self, state):
            state.loss_fn.weight = 0.5 ** state.step

    runs = {}
    for name, loss, hooks in (("plain", CrossEntropy(), []), ("scaled", Scaled(), [Halve()])):
        model, batches, config = tiny_setup(steps=3, clip_norm=None)
        runs[name] = train(model, batches, loss, config, tmp_path / name, hooks=hooks).losses
    # Adam's step hardly depends on the gradient's scale, so the weights stay alike: the loss is scaled.
    assert runs["scaled"][0] == runs["plain"][0]
    assert runs["scaled"][1] == pytest.approx(runs["plain"][1] * 0.5, rel=1e-6)
    assert runs["scaled"][2] == pytest.approx(runs["plain"][2] * 0.25, rel=1e-3)


def test_objectives_check_before_anything_is_loaded():
    with pytest.raises(ValueError, match="give a teacher checkpoint folder"):
        KD(teacher=None).check("r")
    CE().check("r")
    SelfDistillation().check("r")


# ---- the CLI expands dataclass parameters ---------------------------------------------------------------

def test_generate_and_chat_share_the_sampling_flags():
    parser, functions = build_parser()
    from mobilellm.cli import _collect
    for command in ("generate", "chat"):
        extra = ["--prompt", "x"] if command == "generate" else []
        ns = vars(parser.parse_args([command, "ckpt", *extra, "--top-k", "5", "--temperature", "0.7", "--seed", "3"]))
        ns.pop("command")
        assert _collect(ns, functions[command])["sampling"] == SamplingConfig(temperature=0.7, top_k=5, seed=3)


# ---- the README's scale-out command, as written (with a short run) ------------------------------------------

@pytest.mark.slow
def test_the_readme_torchrun_pretrain_command_runs(tmp_path, smollm2_dir):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = ["torchrun", "--nproc-per-node", "2", "-m", "mobilellm.cli", "pretrain", "--recipe", "starter",
           "--parallel", "fsdp", "--steps", "2", "--out", str(tmp_path / "run")]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r["step"] for r in metrics(tmp_path / "run") if "loss" in r] == [1, 2]
    assert (tmp_path / "run" / "checkpoints" / "step_0000002" / "model.safetensors").exists()
