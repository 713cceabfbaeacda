"""`mobilellm eval` and `mobilellm eval-compare`: benchmark a checkpoint, compare two result files."""

from __future__ import annotations

from pathlib import Path

from ..eval.lm import EvalLM, parse_dtype
from ..eval.report import compare_table, load_results, results_table, run_tasks, save_results
from ..eval.tasks import TASKS

def split_names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError("--tasks names no task")
    return names


def run_eval(checkpoint: Path, *, tasks: str, limit: int | None = None, out: Path | None = None,
             data_dir: Path | None = None, tokenizer: Path | None = None, dtype: str = "float32",
             batch_tokens: int = 2048) -> None:
    """Evaluate a checkpoint on benchmark tasks; print a table and write the results as JSON.

    Tasks: hellaswag, boolq, piqa, social_iqa, arc_easy, arc_challenge, winogrande, openbookqa
    (multiple choice, acc and acc_norm), triviaqa, nq_open (exact match), perplexity, humaneval
    (pass@1: each program runs in the namespace sandbox, refused where none can be made unless
    MOBILELLM_UNSAFE_NO_SANDBOX=1), bigbench_social_iqa, bigbench_winowhy, bigbench_strategyqa, bigbench_elementary_math_qa.

    Args:
        checkpoint: checkpoint folder, full precision or quantized (mobilellm quantize)
        tasks: comma-separated task names
        limit: evaluate only the first N items of each task
        out: results JSON to write
        data_dir: folder with the local task files (<task>.jsonl or the original release's files)
        tokenizer: folder with tokenizer.json when the checkpoint has none (a quantized one)
        dtype: float32 or bfloat16
        batch_tokens: tokens per scoring batch (memory vs speed)
    """
    names = split_names(tasks)
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(TASKS)}")
    lm = EvalLM.load(checkpoint, dtype=parse_dtype(dtype), tokenizer=tokenizer, batch_tokens=batch_tokens)
    results = run_tasks(lm, names, data_dir=data_dir, limit=limit)
    print(results_table(results))
    if out is not None:
        save_results(results, out)
        print(f"results written to {out}")


def eval_compare(a: Path, b: Path) -> None:
    """Compare two `mobilellm eval` result files (e.g. full precision vs int4): each metric and B - A.

    Args:
        a: the reference results JSON
        b: the results JSON compared with it
    """
    print(compare_table(load_results(a), load_results(b), label_a=Path(a).stem, label_b=Path(b).stem))
