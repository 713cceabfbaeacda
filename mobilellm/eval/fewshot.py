"""k-shot prompts for the standard-file tasks, drawn as lm-evaluation-harness draws them.

lm-eval (api/samplers.py `ContextSampler`, api/task.py `fewshot_context`) keeps one `random.Random(seed)` per
task (seed 1234 unless `--fewshot_seed`), and for each evaluated document in order draws `rnd.sample(pool, k)`
from the few-shot split (the training split); for tasks without a test split (HellaSwag, PIQA, WinoGrande,
...) it draws k + 1 and keeps the first k that are not the document. When the shots come from the evaluated
split itself it does the same, so an item is never its own example. The prompt is the task description, the k solved
examples (question, target delimiter, gold answer) each followed by the few-shot delimiter, then the question.
With the same pool, seed and items, the requests here are the ones lm-eval builds (tests/test_eval_fewshot.py).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from ..errors import DataError


def draw_shots(rnd: random.Random, item, pool: Sequence, k: int, pass_item: bool) -> list:
    """lm-eval's `ContextSampler.sample(k, eval_doc=item if pass_item else None)`."""
    if not pass_item:
        return rnd.sample(pool, k)
    drawn = [x for x in rnd.sample(pool, k + 1) if x != item][:k]
    if len(drawn) < k:  # copies of the item in the pool were drawn: resample without any of them
        drawn = rnd.sample([x for x in pool if x != item], k)
    return drawn


def add_shots(items: Sequence, pool: Sequence, k: int, seed: int, fewshot, exclude_self: bool) -> list:
    """Each item with k solved examples from pool before it (`fewshot`: the task's delimiter and description)."""
    pass_item = exclude_self or fewshot.draws_one_more
    needed = k + 1 if pass_item else k
    if len(pool) < needed:
        raise DataError(f"{k} shots need {needed} examples to draw from, the task has {len(pool)}"
                        + (" (add its training file to --data-dir)" if exclude_self else ""))
    rnd = random.Random(seed)
    out = []
    for item in items:
        shots = draw_shots(rnd, item, pool, k, pass_item)
        text = "".join(s.shot().removeprefix(fewshot.description) + fewshot.delimiter for s in shots)
        out.append(item.with_shots(text, fewshot.description))
    return out
