"""The typed records and their readers: files written by the previous version (tests/data/format-2026-11,
from a quick demo of the commit before the records) read as today's, and damaged ones say what is missing."""

import json
import shutil
from pathlib import Path

import pytest

from critbatch.analysis.describe import describe_point, interval_text
from critbatch.branch import BranchSpec
from critbatch.errors import DataError
from critbatch.records import (cbs_curve, read_closed_loop_result, read_curve, read_decisions, read_run_result,
                               unconfirmed_raise)
from critbatch.warmup import ScheduleConfig, write_schedule

OLD = Path(__file__).parent / "data" / "format-2026-11"


def test_an_old_cbs_json_reads_and_describes():
    curve = read_curve(OLD / "cbs.json")
    assert [p["tokens"] for p in curve["points"]] == [5120, 20480]
    for p in curve["points"]:
        assert p["noise_scale"] is None or "b_simple_seqs" in p["noise_scale"]
        assert describe_point(p) and interval_text(p)
    assert interval_text(curve["points"][0]).startswith("≤ ")


def test_a_schedule_derives_from_an_old_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    shutil.copy(OLD / "cbs.json", sweep / "cbs.json")
    doc, _ = write_schedule(ScheduleConfig(sweep=str(sweep), out=str(tmp_path / "s.json")))
    assert doc["phases"][0]["batch_seqs"] == 8 and (tmp_path / "s.json").is_file()


def test_old_closed_loop_files_read_with_structured_confirmations():
    ds = read_decisions(OLD / "decisions.jsonl")
    assert ds[0]["confirmations"] == {"seen": 1, "needed": 2} and unconfirmed_raise(ds[0])
    assert all(d["eps_spent"] is None for d in ds)  # keys added since fill in
    r = read_closed_loop_result(OLD / "closed_loop_result.json")
    assert r["raises"] == 0 and r["main_run_leads"]["points"] == 2
    assert r["skipped_probe_points"] is None  # written before points were left out


def test_the_report_says_which_probe_points_were_left_out():
    from critbatch.report.html import _closed_loop_conclusions, _closed_loop_html, render_markdown

    cl = read_closed_loop_result(OLD / "closed_loop_result.json")
    cl = {**cl, "decisions": read_decisions(OLD / "decisions.jsonl"), "skipped_probe_points": {
        "from_tokens": 1_000_064, "points": [1_000_064], "batch_seqs": 4,
        "reason": "a raise from batch 4 needs 2 more consecutive probe points seeing it (confirm=2) and 1 remain"}}
    said = "no probe at 1,000,064 tokens (1 point left out): a raise from batch 4 needs 2 more"
    assert said in _closed_loop_conclusions({"closed_loop": cl}, None)[0]
    assert said[1:] in _closed_loop_html(cl)
    assert f"- {said}" in render_markdown({"conclusions": [], "closed_loop": cl})
    plain = {**cl, "skipped_probe_points": None}
    assert "no probe at" not in _closed_loop_conclusions({"closed_loop": plain}, None)[0] + _closed_loop_html(plain)


def test_old_run_result_and_branch_spec_read():
    r = read_run_result(OLD / "run_result.json")
    assert r["trained"] == "alone" and r["start_tokens"] == 0 and not r["diverged"]
    spec = BranchSpec.from_dict(json.loads((OLD / "branch.json").read_text()))
    assert spec.k == 1.0 and spec.batch_seqs == 8 and spec.train_config().model.seq_len == 64
    assert spec.to_dict() == json.loads((OLD / "branch.json").read_text())  # the same file, written back


def test_a_hand_written_curve_needs_only_what_a_schedule_reads():
    c = cbs_curve({"seq_len": 64, "points": [{"tokens": 10, "base_batch_seqs": 8, "cbs_low_seqs": 8,
                                                "cbs_high_seqs": None}]})
    p = c["points"][0]
    assert p["bounded_above"] is False and p["cbs_low_tokens"] == 512 and c["rule"] is None


@pytest.mark.parametrize("doc,missing", [({"points": []}, "seq_len"), ({"seq_len": 64}, "points"),
                                         ({"seq_len": 64, "points": [{"tokens": 1}]}, "base_batch_seqs")])
def test_a_damaged_curve_names_what_it_lacks(tmp_path, doc, missing):
    (tmp_path / "cbs.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match=f"has no '{missing}'"):
        read_curve(tmp_path)
