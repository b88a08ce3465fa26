"""A schedule for the whole run (issue 22): start-batch advice and the decay rules, on planted curves."""

import pytest

from critbatch.analysis.schedule import advise_start
from critbatch.analysis.whole_run import seesaw_phases, whole_run_schedule
from critbatch.errors import ConfigError

T = 64


def curve(points, window=98_304):
    """A planted cbs.json: (tokens, low, high) intervals in sequences."""
    return {"seq_len": T, "lr_rule": "sqrt", "decide_by": "eval", "rule": "eps", "fit": None, "window_tokens": window,
            "points": [{"tokens": t, "cbs_low_seqs": lo, "cbs_high_seqs": hi, "base_batch_seqs": 8}
                       for t, lo, hi in points]}


DEMO = curve([(20_000, 0, 6), (60_000, 6, 8), (200_000, 8, 12), (600_000, 6, 16)])  # the LOG's demo curve
GROWING = curve([(20_000, 2, 4), (60_000, 4, 8), (200_000, 8, 16), (600_000, 16, 32)])


def test_the_demos_start_is_above_its_early_cbs_and_the_advice_halves_it_twice():
    a = advise_start(DEMO, 8, until_tokens=1_000_000)
    assert a.position == "above" and a.above_at == [(20_000, 6.0)] and a.room_doublings == 0
    assert a.steps_saved_pct == 0
    assert a.recommended_seqs == 2  # 4 is below 6 (20k's bound) but leaves no doubling under the plateau of 6
    assert a.recommended_steps_saved_pct > 0 and "Start at 2 sequences" in a.message()


def test_a_start_at_the_plateau_sits_at_the_cbs():
    a = advise_start(curve([(20_000, 8, 16), (200_000, 8, 16)]), 8, until_tokens=1_000_000)
    assert a.position == "at" and a.room_doublings == 0 and a.recommended_seqs == 4
    assert "sits at the measured CBS" in a.message() and "A start at 4 sequences" in a.message()


def test_a_curve_that_shows_nothing_safe_recommends_no_start():
    """Only the smallest probed batch passed at every point (lower bounds 0): no start is recommended."""
    a = advise_start(curve([(10_000, 0, 16), (30_000, 0, 32)]), 4, until_tokens=100_000)
    assert a.position == "at" and a.recommended_seqs == 4
    assert "leaves room" not in a.message() and "shows no smaller start with room" in a.message()
    assert "--k-min" in a.message()


def test_a_start_below_the_cbs_has_room_and_says_what_the_warmup_saves():
    a = advise_start(GROWING, 2, until_tokens=1_000_000)
    assert a.position == "below" and a.room_doublings == 3 and a.plateau_low_seqs == 16
    assert a.steps_saved_pct > 50  # 2 -> 4 @20k... -> 16 @600k
    assert a.recommended_seqs == 2 and "below the measured CBS" in a.message()


def test_a_start_below_the_cbs_names_no_other_start_that_saves_less():
    """The demo's case: from 2, the advice's other start (3) would save a smaller share of its steps;
    the message does not offer it."""
    a = advise_start(curve([(20_000, 6, 8), (600_000, 8, 12)]), 2, until_tokens=1_000_000)
    assert a.position == "below" and a.recommended_seqs == 3
    assert a.recommended_steps_saved_pct < a.steps_saved_pct and "from 3 sequences" not in a.message()


def test_a_start_above_the_cbs_is_a_warning_with_numbers():
    a = advise_start(GROWING, 32, until_tokens=1_000_000)
    assert a.position == "above" and [t for t, _ in a.above_at] == [20_000, 60_000, 200_000]
    assert a.message().startswith("warning: the start batch of 32 sequences is above the measured CBS at 20,000 tokens "
                                  "(CBS <= 4)") and a.recommended_seqs == 2


def test_seesaw_doubles_where_the_decaying_lr_halves():
    assert seesaw_phases(8, 900_000, 100_000, 64, 3) == [(950_016, 16), (975_040, 32), (987_520, 64)]
    assert seesaw_phases(8, 900_000, 100_000, 64, 3, max_seqs=32) == [(950_016, 16), (975_040, 32)]


def test_whole_run_decays():
    base = whole_run_schedule(GROWING, 2, 1_000_000, decay_tokens=100_000)
    assert base.schedule.phases == ((0, 2), (60_032, 4), (200_000, 8), (600_000, 16))  # the anneal: nothing added
    ss = whole_run_schedule(GROWING, 2, 1_000_000, decay_tokens=100_000, decay="seesaw", decay_doublings=2)
    assert ss.schedule.phases[:len(base.schedule.phases)] == base.schedule.phases
    assert ss.schedule.phases[len(base.schedule.phases):] == ((950_016, 32), (975_040, 64))
    late = whole_run_schedule(GROWING, 2, 1_000_000, decay_tokens=100_000, decay="late-switch")
    assert late.schedule.phases == ((0, 2), (900_032, 16))


def test_reach_keeps_raises_for_the_run_a_probe_can_vouch_for():
    w = whole_run_schedule(GROWING, 2, 1_000_000, decay_tokens=100_000, reach=4)  # 900k - 4 x 98,304 = 506,784
    assert w.not_before == 506_784
    assert w.schedule.phases[0] == (0, 2) and all(t >= 506_784 for t, _ in w.schedule.phases[1:])
    assert w.schedule.phases == ((0, 2), (506_816, 8), (600_000, 16))  # 200k allowed 8: taken at the next sequence
    assert any("vouches for" in n for n in w.notes)


@pytest.mark.parametrize("kw,needle", [
    ({"decay": "cosine"}, "decay='cosine' is not one of anneal, seesaw, late-switch"),
    ({"decay": "seesaw", "decay_tokens": 0}, "decay=seesaw needs the LR decay's length"),
    ({"decay": "seesaw", "decay_tokens": 100, "rule": "linear"}, "alpha >= sqrt\\(beta\\)"),
    ({"decay_tokens": 2_000_000}, "decay_tokens=2000000 must be in"),
    ({"reach": 0}, "reach=0 must be a number > 0"),
])
def test_bad_whole_run_options(kw, needle):
    with pytest.raises(ConfigError, match=needle):
        whole_run_schedule(GROWING, 2, 1_000_000, **kw)


def test_schedule_for_the_whole_run_on_the_command_line(tmp_path, capsys):
    import json

    from critbatch.cli import main
    from critbatch.io import read_json

    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "cbs.json").write_text(json.dumps(GROWING))
    out = tmp_path / "s.json"
    assert main(["schedule", "--sweep", str(sweep), "--out", str(out), "--start-seqs", "2", "--total-tokens", "1M",
                 "--decay-tokens", "100k", "--decay", "seesaw", "--reach", "4"]) == 0
    doc = read_json(out)
    assert [[p["start_tokens"], p["batch_seqs"]] for p in doc["phases"]] == [
        [0, 2], [506_816, 8], [600_000, 16], [950_016, 32], [975_040, 64]]
    assert doc["derived_from"]["decay"] == "seesaw" and doc["derived_from"]["reach"] == 4
    assert doc["exports"]["megatron_step_batch_size_schedule"]  # expressible: thresholds in tokens
    printed = capsys.readouterr().out
    assert "seesaw: the batch doubles where the decaying LR has halved" in printed and "vouches for" in printed
    assert main(["schedule", "--sweep", str(sweep), "--out", str(tmp_path / "t.json"), "--decay", "seesaw"]) == 2
    assert "give total_tokens" in capsys.readouterr().err
