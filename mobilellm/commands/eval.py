"""`mobilellm eval` and `mobilellm eval-compare`: benchmark a checkpoint, compare two result files."""

from __future__ import annotations

from pathlib import Path

from ..eval.lm import EvalLM, parse_dtype
from ..eval.report import compare_table, load_results, results_table, run_tasks, save_results
from ..eval.tasks import get_task, list_tasks as task_list


def split_names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError("--tasks names no task")
    return names


def run_eval(checkpoint: Path | None = None, *, tasks: str | None = None, limit: int | None = None,
             num_fewshot: int = 0, fewshot_seed: int | None = None, out: Path | None = None,
             data_dir: Path | None = None, tokenizer: Path | None = None, dtype: str = "float32",
             batch_tokens: int = 2048, list_tasks: bool = False) -> None:
    """Evaluate a checkpoint on benchmark tasks; print a table (each metric with its standard error) and write
    the results as JSON.

    Tasks: hellaswag, boolq, piqa, social_iqa, arc_easy, arc_challenge, winogrande, openbookqa
    (multiple choice, acc and acc_norm), triviaqa, nq_open (exact match), perplexity, humaneval
    (pass@1: each program runs in the namespace sandbox, refused where none can be made unless
    MOBILELLM_UNSAFE_NO_SANDBOX=1), and every BIG-bench JSON task as bigbench_<task> or
    bigbench_<task>:<subtask> (multiple choice by log-likelihood, generative tasks by their own metrics).
    --list-tasks prints them all.

    Args:
        checkpoint: checkpoint folder, full precision or quantized (mobilellm quantize)
        tasks: comma-separated task names
        limit: evaluate only the first N items of each task
        num_fewshot: solved examples before each item: BIG-bench draws them from the (sub)task as BIG-bench
            does, the other tasks as lm-eval does (from <task>_train.jsonl in --data-dir, else from the task's
            own items); never the item itself
        fewshot_seed: seed of the shots (default: BIG-bench's 42, lm-eval's 1234)
        out: results JSON to write
        data_dir: folder with the local task files (<task>.jsonl or the original release's files)
        tokenizer: folder with tokenizer.json to use instead of the checkpoint's own (for a folder without one)
        dtype: float32 or bfloat16
        batch_tokens: tokens per scoring batch (memory vs speed)
        list_tasks: print every task name and what it is, then exit
    """
    if list_tasks:
        rows = task_list()
        width = min(max(len(name) for name, _ in rows), 48)
        print("\n".join(f"{name.ljust(width)}  {text}" for name, text in rows))
        return
    if checkpoint is None or not tasks:
        raise ValueError("give a checkpoint and --tasks (or --list-tasks)")
    names = split_names(tasks)
    for name in names:
        get_task(name)  # unknown names fail before the model loads
    lm = EvalLM.load(checkpoint, dtype=parse_dtype(dtype), tokenizer=tokenizer, batch_tokens=batch_tokens)
    results = run_tasks(lm, names, data_dir=data_dir, limit=limit, num_fewshot=num_fewshot, fewshot_seed=fewshot_seed)
    print(results_table(results))
    if out is not None:
        save_results(results, out)
        print(f"results written to {out}")


def eval_compare(a: Path, b: Path) -> None:
    """Compare two `mobilellm eval` result files (e.g. full precision vs int4) item by item.

    For each metric: both values, the difference B - A with its standard error and 95% interval (paired on the
    same items: per-item differences, or a paired bootstrap for BLEU and perplexity), the number of items whose
    answer changed, and a verdict: "within noise" when the interval holds 0.

    Args:
        a: the reference results JSON
        b: the results JSON compared with it
    """
    print(compare_table(load_results(a), load_results(b), label_a=Path(a).stem, label_b=Path(b).stem))
