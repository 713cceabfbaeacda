"""BIG-bench JSON tasks are formatted as BIG-bench's zero-shot default_format_fn does."""

import pytest

from mobilellm.eval.tasks.bigbench import bigbench_dir, load_bigbench
from tests.eval_helpers import FIXTURES


def test_choices_are_appended_in_bigbench_seeded_order_and_duplicates_dropped():
    items = load_bigbench("toy_task", root=FIXTURES / "bigbench")
    assert len(items) == 2  # two identical examples -> one, plus the subtask's one
    item = items[0]
    # RandomState(42).permutation of the 3 sorted choices keeps them in order (of 5 it gives 1, 4, 2, 0, 3).
    assert item.contexts == ("\nQ: Tracy didn't go home that evening and resisted Riley's attacks. What does Tracy need "
                             "to do before this? \n  choice: Find somewhere to go\n  choice: Go home and see Riley"
                             "\n  choice: Make a new plan\nA: ",)
    assert item.continuations == ("Make a new plan", "Go home and see Riley", "Find somewhere to go")
    assert item.gold == (2,)


def test_task_prefix_and_custom_prefixes_of_a_subtask():
    item = load_bigbench("toy_task", root=FIXTURES / "bigbench")[1]
    assert item.contexts == ("Please answer the following questions about which words certain pronouns refer to.\n\n"
                             "The city councilmen refused the demonstrators a permit because they feared violence."
                             "\nThe above reasoning is ",)
    assert item.continuations == ("correct", "incorrect") and item.gold == (0,)


def test_the_extracted_real_tasks_when_cached():
    if not (bigbench_dir() / "social_iqa" / "task.json").exists():
        pytest.skip("BIG-bench tasks not extracted yet (mobilellm eval --tasks bigbench_social_iqa fetches them)")
    items = load_bigbench("social_iqa")
    assert len(items) == 1935  # 1,954 examples less BIG-bench's duplicates
    assert all(len(i.gold) == 1 and len(i.continuations) in (2, 3) for i in items)
