"""The closed loop's raise policy as pure functions: planted verdicts in, the batch out — no training."""

import pytest

from critbatch.closed_loop import AutoBatchConfig, decide_raise, futile_point, next_point, probe_gap, raise_streak
from critbatch.records import probe_decision, unconfirmed_raise


def evidence(gap: float = 0.005) -> dict:
    return {"ks": [1.0, 2.0], "eval_losses": [[2.0, 2.0], [2.0 + gap, 2.0 + gap]]}


def run_policy(verdicts_by_point: list[dict], a: AutoBatchConfig, B0: int = 4, gap: float = 0.005) -> list[dict]:
    """Drive the policy over a sequence of points as the loop does: each point's branch probe allows
    2B when its verdict says raise."""
    decisions: list[dict] = []
    B = B0
    for i, v in enumerate(verdicts_by_point):
        branch_after = 2 * B if v.get("branch") == "raise" else B
        if a.max_batch_seqs is not None and branch_after > a.max_batch_seqs:
            branch_after = B
        d = decide_raise(B, v, branch_after, evidence(gap), decisions, a)
        rec = {"point": i, "tokens": 1000 * (i + 1), "batch_before": B, "batch_after": d.batch_after,
               "verdicts": v, "acted_on": d.acted_on, "cost": {}}
        for key in ("confirmations", "eps_budget", "eps_spent"):
            if getattr(d, key) is not None:
                rec[key] = getattr(d, key)
        decisions.append(rec)
        B = d.batch_after
    return decisions


RAISE, STAY = {"branch": "raise"}, {"branch": "stay"}


def test_confirmation_needs_consecutive_raises_at_the_same_batch():
    ds = run_policy([RAISE, STAY, RAISE, RAISE, RAISE, RAISE], AutoBatchConfig(confirm=2))
    assert [d["batch_after"] for d in ds] == [4, 4, 4, 8, 8, 16]
    assert [d.get("confirmations") for d in ds] == [
        {"seen": 1, "needed": 2}, None, {"seen": 1, "needed": 2}, {"seen": 2, "needed": 2},
        {"seen": 1, "needed": 2}, {"seen": 2, "needed": 2}]  # a new batch starts a new streak
    assert [unconfirmed_raise(d) for d in ds] == [True, False, True, False, True, False]
    assert [d["batch_after"] for d in run_policy([RAISE, STAY, RAISE], AutoBatchConfig(confirm=1))] == [8, 8, 16]


def test_streak_counts_only_the_acting_trigger_at_this_batch():
    prev = [{"batch_before": 4, "verdicts": {"branch": "raise", "norm": "stay"}, "acted_on": "branch"},
            {"batch_before": 4, "verdicts": {"branch": "stay", "norm": "raise"}, "acted_on": "norm"},
            {"batch_before": 4, "verdicts": {"branch": "raise"}, "acted_on": "branch"}]
    assert raise_streak(4, prev) == 4  # this point and three before it (the norm trigger acted at one)
    assert raise_streak(8, prev) == 1
    assert raise_streak(4, prev + [{"batch_before": 4, "verdicts": {"branch": "stay"}, "acted_on": "branch"}]) == 1


def test_a_cheaper_trigger_acts_only_when_it_has_a_verdict_and_never_past_the_cap():
    a = AutoBatchConfig(act_on="gns", confirm=1, max_batch_seqs=8)
    ds = run_policy([{"branch": "stay", "gns": None}, {"branch": "stay", "gns": "raise"},
                     {"branch": "raise", "gns": "raise"}], a)
    assert [d["acted_on"] for d in ds] == ["branch", "gns", "gns"]  # uncalibrated gns: the branch probe acts
    assert [d["batch_after"] for d in ds] == [4, 8, 8]  # 16 would pass the cap


def test_the_eps_budget_is_spent_by_the_gaps_of_the_raises_taken():
    ds = run_policy([RAISE, RAISE, RAISE], AutoBatchConfig(confirm=1, eps_budget=0.012), gap=0.006)
    assert [d["batch_after"] for d in ds] == [8, 16, 16]
    assert [d.get("eps_spent") for d in ds] == [pytest.approx(0.006), pytest.approx(0.006), None]
    assert ds[2]["eps_budget"] == {"spent_before": pytest.approx(0.012), "gap": pytest.approx(0.006), "budget": 0.012}
    assert probe_gap(evidence(-0.003), 2.0) == 0.0  # a larger batch ahead spends nothing
    assert probe_gap(evidence(), 4.0) is None  # not probed


def test_next_point_confirms_an_unconfirmed_raise_sooner():
    a = AutoBatchConfig(confirm=2, confirm_factor=1.5)
    pending = {"batch_before": 4, "batch_after": 4, "confirmations": {"seen": 1, "needed": 2}}
    assert next_point(1000, [1000, 4000], 8000, pending, a) == 1500
    assert next_point(1000, [1000, 4000], 8000, {**pending, "confirmations": None}, a) == 4000
    assert next_point(1000, [1000, 1200], 8000, pending, a) == 1200  # the scheduled point comes first
    assert next_point(4000, [1000, 4000], 8000, None, a) == 8000
    assert next_point(1000, [1000, 4000], 8000, pending, AutoBatchConfig(confirm=2)) == 4000


def test_decisions_written_before_structured_confirmations_read_the_same():
    old = {"tokens": 30208, "batch_before": 8, "batch_after": 8, "verdicts": {"branch": "raise"}, "acted_on": "branch",
           "cost": {"probe_tokens": 1, "gns_tokens": 0}, "confirmations": "1 of 2"}
    d = probe_decision(old)
    assert d["confirmations"] == {"seen": 1, "needed": 2} and unconfirmed_raise(d)
    assert d["probe"] is None and d["eps_spent"] is None  # keys added since fill in


def test_a_point_is_futile_when_no_raise_can_follow_before_the_end():
    """confirm=2: a raise needs two consecutive points seeing it; the best case counts every later point."""
    pts, N = [1000, 2000, 4000, 8000], 16000
    a = AutoBatchConfig(confirm=2)
    assert futile_point(4000, 4, 0, pts, N, a) is None  # 4000 and 8000 remain
    assert "needs 2 more consecutive probe points seeing it (confirm=2) and 1 remain" in futile_point(8000, 4, 0, pts, N, a)
    assert futile_point(8000, 4, 1, pts, N, a) is None  # 4000 saw a raise at this batch: 8000 can confirm it
    assert futile_point(8000, 4, 0, pts, N, AutoBatchConfig(confirm=1)) is None
    assert futile_point(2000, 4, 0, pts, N, AutoBatchConfig(confirm=4)) is not None  # 3 remain of 4 needed
    assert futile_point(1000, 4, 0, pts, N, AutoBatchConfig(confirm=4)) is None
    # a confirmation point at 1.5 x the point comes before the end: 8000 can still be confirmed (at 12000)
    assert futile_point(8000, 4, 0, pts, N, AutoBatchConfig(confirm=2, confirm_factor=1.5)) is None
    assert futile_point(8000, 4, 0, pts, N, AutoBatchConfig(confirm=2, confirm_factor=2.5)) is not None
    # the cap: no probed k fits (k = 2 and 3 at batch 4 under 10: 8 fits; under 7 nothing)
    assert futile_point(1000, 4, 0, pts, N, AutoBatchConfig(probe_k=[1.0, 2.0, 3.0], max_batch_seqs=10)) is None
    assert "max_batch_seqs=7" in futile_point(1000, 4, 0, pts, N, AutoBatchConfig(max_batch_seqs=7))


def test_the_measurement_budget_makes_a_point_futile():
    """A point costs (here) a tenth of its tokens; a budget of 0.05 of a 16,000-token run (800) pays for
    the points at 1000 and 2000 (100 + 200) and not for 4000 (400 more: 700 in all) and 8000."""
    pts, N, cost = [1000, 2000, 4000, 8000], 16000, (lambda t: t // 10)
    a = AutoBatchConfig(confirm=2, measurement_budget=0.05)
    assert futile_point(1000, 4, 0, pts, N, a, 0, cost) is None
    assert futile_point(4000, 4, 1, pts, N, a, 300, cost) is None  # 700 <= 800, and it can confirm 2000's raise
    # 4000 as the first sighting: its confirmation at 8000 is past the budget
    assert "1 remain before the run's end within the measurement budget" in futile_point(4000, 4, 0, pts, N, a, 300, cost)
    why = futile_point(8000, 4, 1, pts, N, a, 700, cost)
    assert "from 700 to about 1,500 tokens, past the budget of 800 (0.05 of the run's tokens" in why
    # no budget, or no cost given: only the points count
    assert futile_point(8000, 4, 1, pts, N, AutoBatchConfig(measurement_budget=None), 700, cost) is None
    assert futile_point(8000, 4, 1, pts, N, a) is None
