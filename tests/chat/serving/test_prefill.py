"""The prefill scheduling policy on its own: shortest remaining first within a budget, one layer
for every group passed over, preemption between layers, no starvation."""

import random

import pytest

from glmgym.chat.serving.prefill import PrefillScheduler
from glmgym.errors import GlmgymError


def _step(sched, interrupt=None):
    ran: list[str] = []
    landed = sched.step(ran.append, interrupt)
    return ran, landed


def test_a_lone_group_runs_its_budget_of_layers_per_step():
    sched = PrefillScheduler(num_layers=8, chunk=100)
    sched.add("long", 300)  # 100 * 8 // 300: two layers a step
    assert [_step(sched) for _ in range(4)] == [(["long"] * 2, [])] * 3 + [(["long"] * 2, ["long"])]
    assert len(sched) == 0 and _step(sched) == ([], [])
    sched.add("huge", 10_000)  # wider than the budget: still one layer a step
    assert _step(sched) == (["huge"], [])


def test_the_shortest_goes_first_and_a_landed_group_is_not_held_back_by_a_long_one():
    sched = PrefillScheduler(num_layers=4, chunk=50)  # budget 200 token-layers
    sched.add("long", 60)
    sched.add("short", 5)
    # the short one lands (20); 180 are left, too few for the long one's 240: the step ends there
    assert _step(sched) == (["short"] * 4, ["short"])
    # the long one was passed over: its layer first, then more of it while the budget lasts
    assert _step(sched) == (["long"] * 3, [])
    assert _step(sched) == (["long"], ["long"])


def test_an_interrupt_ends_the_step_after_the_layer_in_progress():
    sched = PrefillScheduler(num_layers=6, chunk=60)
    sched.add("long", 60)  # six layers a step
    asked = []

    def interrupt():
        asked.append(1)
        return len(asked) == 2  # a request arrives during the second layer

    assert _step(sched, interrupt) == (["long"] * 2, [])
    sched.add("short", 3)
    assert _step(sched, lambda: True) == (["short"], [])  # the first layer always runs


def test_groups_passed_over_get_one_layer_each_longest_waiting_first():
    sched = PrefillScheduler(num_layers=4, chunk=10)  # budget 40
    for key, width in (("a", 30), ("b", 20), ("c", 10)):
        sched.add(key, width)
    assert _step(sched) == (["c"] * 4, ["c"])  # a and b passed over once
    sched.add("d", 1)
    # a and b run one layer each (earliest first on ties), past the budget; d waits one step
    assert _step(sched) == (["a", "b"], [])
    assert _step(sched) == (["d"] * 4, ["d"])  # due: d; then shortest first (a, b do not fit)


@pytest.mark.parametrize("seed", range(5))
def test_no_group_waits_two_steps_in_a_row_and_each_lands_within_twice_its_layers(seed):
    rng = random.Random(seed)
    layers = 6
    sched = PrefillScheduler(num_layers=layers, chunk=rng.choice([8, 64, 512]))
    arrived, done, last_ran = {}, {}, {}
    for step in range(400):
        for _ in range(rng.choice([0, 0, 1, 3])):  # bursts of arrivals, some steps none
            key = f"g{len(arrived)}"
            sched.add(key, rng.choice([3, 20, 200, 2000]))
            arrived[key], last_ran[key] = step, step - 1
        ran, landed = _step(sched, lambda: rng.random() < 0.3)
        for key in ran:
            last_ran[key] = step
        for key in set(arrived) - set(done):
            assert step - last_ran[key] <= 1, f"{key} passed over two steps in a row"
        for key in landed:
            done[key] = step
            assert step - arrived[key] < 2 * layers
    assert len(done) > len(arrived) // 2


def test_bad_sizes_are_refused():
    with pytest.raises(GlmgymError, match="at least 1"):
        PrefillScheduler(0, 8)
    with pytest.raises(GlmgymError, match="at least one token"):
        PrefillScheduler(2, 8).add("x", 0)
