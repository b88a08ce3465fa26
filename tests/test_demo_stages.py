"""The demo's training stages overlap with worker processes (``critbatch.demo._overlap``): each starts
as soon as what it needs has finished, a failing stage stops the others and raises its own error,
and a rerun trains only what is missing. Planted stages (no training) stand in for the real ones."""

import json
import time
from pathlib import Path

import pytest

from critbatch.demo import NEEDS, DemoConfig, _overlap, _Stages
from demo_planted import exits, planted, schedule

INLINE = {"schedule": schedule}


def events(out: Path) -> dict:
    got: dict = {}
    for line in (out / "log.jsonl").read_text().splitlines():
        r = json.loads(line)
        got.setdefault((r["stage"], r["event"]), []).append(r["t"])
    return got


def test_stages_start_when_what_they_need_is_done_and_a_failure_stops_the_rest(tmp_path):
    cfg = DemoConfig(out=str(tmp_path))
    (tmp_path / "fail-sweep").touch()
    t0 = time.time()
    with pytest.raises(ValueError, match="planted failure of sweep"):
        _overlap(_Stages(tmp_path, cfg), cfg, work=planted, inline=INLINE)
    assert time.time() - t0 < 30
    ev = events(tmp_path)
    # the closed loop trains beside the base run; the sweep waited for the base run
    assert ev[("autobatch", "start")][0] < ev[("base", "end")][0]
    assert ev[("sweep", "start")][0] >= ev[("base", "end")][0]
    # the sweep's failure stopped the closed loop before it finished; nothing unfinished is marked done
    assert ("autobatch", "end") not in ev
    stages = json.loads((tmp_path / "demo.json").read_text())["stages"]
    assert set(stages) == {"base"} or set(stages) == {"base", "gns"}

    (tmp_path / "fail-sweep").unlink()
    (tmp_path / "log.jsonl").unlink()
    (tmp_path / "fast").touch()
    _overlap(_Stages(tmp_path, cfg), cfg, work=planted, inline=INLINE)
    ev = events(tmp_path)
    assert ("base", "start") not in ev  # finished earlier: not trained again
    assert all(len(ev[(n, "end")]) == 1 for n in NEEDS if n not in ("base", "schedule") and n not in stages)
    # the schedule (inline) after the sweep; the comparison after the schedule and the closed loop,
    # with what they handed on; the noise scale did not hold it up
    assert ev[("schedule", "start")][0] >= ev[("sweep", "end")][0]
    assert ev[("compare", "start")][0] >= max(ev[("schedule", "start")][0], ev[("autobatch", "end")][0])
    assert ("compare saw {'sweep_dir': 'base/sweeps/x', 'schedule_from': 'base/sweeps/x'}", "note") in ev
    # the noise scale, on no stage's path but the report's, yields the cores to the others
    nice = {n: next(int(k.rsplit(" ", 1)[1]) for k, _ in ev if k.startswith(f"{n} niceness"))
            for n in ("autobatch", "sweep", "gns", "compare")}
    assert nice["gns"] == nice["sweep"] + 10 and nice["autobatch"] == nice["sweep"] == nice["compare"]
    state = json.loads((tmp_path / "demo.json").read_text())
    assert all(state["stages"][n]["done"] for n in NEEDS)
    assert state["artifacts"]["sweep_dir"] == "base/sweeps/x"


def test_a_stage_process_that_dies_is_named(tmp_path):
    cfg = DemoConfig(out=str(tmp_path))
    with pytest.raises(Exception, match="demo stage base ended with exit code 3 and no result"):
        _overlap(_Stages(tmp_path, cfg), cfg, work=exits, inline=INLINE)


def test_the_report_states_the_time_from_start_to_end_where_stages_overlapped():
    from critbatch.report.html import _wall_row

    assert _wall_row({"total_seconds": 600.0, "wall_seconds": 350.0}) == [["from start to end (stages overlap)", "350.0"]]
    # one after another the sum is the time: no second figure
    assert _wall_row({"total_seconds": 600.0, "wall_seconds": 601.0}) == []
    assert _wall_row({"total_seconds": 600.0}) == []


def test_a_stage_process_sends_its_result_or_its_error(tmp_path):
    """The real target of the stage processes, called here: a comparison with nothing to compare
    sends its artifact; a sweep of a base run that is not there sends the error the demo raises."""
    import multiprocessing
    from dataclasses import asdict

    import torch

    from critbatch.demo import _stage_process
    from critbatch.errors import DataError

    cfg = DemoConfig(out=str(tmp_path), closed_loop=False)
    (tmp_path / "schedule.json").write_text(json.dumps({"phases": [{"start_tokens": 0, "batch_seqs": 2}]}))
    threads = torch.get_num_threads()
    try:
        recv, send = multiprocessing.Pipe(duplex=False)
        _stage_process("compare", asdict(cfg), {}, send)
        status, secs, cpu, art = recv.recv()
        assert status == "ok" and secs >= 0 and cpu >= 0 and "nothing to compare" in art["compare_skipped"]
        assert torch.get_num_threads() == 1  # a stage process trains on one thread
        _stage_process("sweep", asdict(cfg), {}, send)
        status, err = recv.recv()
        assert status == "error" and isinstance(err, DataError) and "parent run" in str(err)
    finally:
        torch.set_num_threads(threads)
