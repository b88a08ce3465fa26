"""The demo pipeline and its report: every stage, rerun skipping, and the page in a real browser."""

import shutil
import subprocess
import sys

import pytest

from critbatch.cli import main
from critbatch.io import read_json

pytestmark = pytest.mark.slow


def test_quick_demo_runs_every_stage(quick_demo):
    demo = read_json(quick_demo / "demo.json")
    assert set(demo["stages"]) == {"prepare", "base", "sweep", "gns", "schedule", "autobatch", "compare", "report"}
    assert all(s["done"] and s["seconds"] >= 0 for s in demo["stages"].values())
    s = read_json(quick_demo / "summary.json")
    assert [p["tokens"] for p in s["points"]] == [5_120, 20_480]  # the requested points, on step boundaries
    assert all(p["noise_scale_seqs"] is not None for p in s["points"])
    assert s["schedule"]["phases"][0]["batch_seqs"] == 8
    cl = s["closed_loop"]
    assert [d["requested_tokens"] for d in cl["decisions"]] == [15_000, 30_000]
    # the closed loop is compared beside the warmup when it changed the batch; with neither changing it,
    # nothing is compared and the report says so
    changed = len(s["schedule"]["phases"]) > 1 or cl["raises"]
    if changed:
        assert set(s["comparison"]["runs"]) == {"warmup", "small", "large"} | ({"closed-loop"} if cl["raises"] else set())
    else:
        assert "comparison" not in s and any(c.startswith("No comparison: neither") for c in s["conclusions"])
    assert any(c.startswith("The closed loop (one run probing its own CBS at 2 points") for c in s["conclusions"])
    assert s["conclusions"] and all(isinstance(c, str) and c for c in s["conclusions"])
    # the curve's cost: the base run kept the checkpoints before each k = 1 branch's cooldown, so those
    # branches read that part from it (issue 15)
    sc = s["sweep_cost"]
    assert sc["tokens_from_base"] > 0 and sc["branch_tokens_over_base"] == sc["branch_tokens"] / sc["base_tokens"]
    cost = next(c for c in s["conclusions"] if c.startswith("The curve cost"))
    assert f"{sc['tokens_from_base']:,} more read from the base run's own continuation" in cost
    md = (quick_demo / "summary.md").read_text()
    assert md.startswith("# critbatch report") and "## What was found" in md
    html = (quick_demo / "report.html").read_text()
    assert html.count("<figure") == len(s["figures"]) >= 3
    assert "id='closed-loop'" in html and "## Closed loop" in md
    import re

    # self-contained: nothing is loaded from anywhere (namespace URIs are names, not fetched)
    assert re.findall(r'(?:src|href)\s*=\s*["\'](?:https?:|//)', html) == []
    assert "<script" not in html and "<link" not in html and "url(http" not in html


def test_rerun_skips_finished_stages(quick_demo, capsys):
    before = read_json(quick_demo / "demo.json")["stages"]
    assert main(["demo", "--quick", "--out", str(quick_demo)]) == 0
    err = capsys.readouterr().err
    for stage in ("prepare", "base", "sweep", "gns", "schedule", "autobatch", "compare"):
        assert f"{stage}: done earlier" in err
    after = read_json(quick_demo / "demo.json")["stages"]
    assert {k: v["seconds"] for k, v in before.items()} == {k: v["seconds"] for k, v in after.items()}


def test_report_rebuilds_from_the_directory_alone(quick_demo, tmp_path):
    copy = tmp_path / "moved"
    shutil.copytree(quick_demo, copy)
    for f in ("report.html", "summary.json", "summary.md"):
        (copy / f).unlink()
    shutil.rmtree(copy / "figures")
    r = subprocess.run([sys.executable, "-m", "critbatch", "report", str(copy)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    a, b = read_json(quick_demo / "summary.json"), read_json(copy / "summary.json")
    strip = lambda s: {k: v for k, v in s.items() if k != "generated"}  # noqa: E731
    assert strip(a) == strip(b)
    # a plain run directory gets a report of what it has
    assert main(["report", str(quick_demo / "base")]) == 0
    assert (quick_demo / "base" / "report.html").is_file()
    assert main(["report", str(tmp_path / "nothing")]) == 2


def test_demo_refuses_a_directory_of_another_configuration(quick_demo, capsys):
    code = main(["demo", "--out", str(quick_demo)])  # the full demo into the quick one's directory
    assert code == 2 and "different configuration" in capsys.readouterr().err


# ---- the browser ---------------------------------------------------------------------------------


def _png_nonblank_fraction(png: bytes) -> float:
    """Share of pixels that are not (near) white (Pillow comes with matplotlib)."""
    from io import BytesIO

    from PIL import Image

    img = Image.open(BytesIO(png)).convert("L")
    hist = img.histogram()
    total = sum(hist)
    return 1 - sum(hist[245:]) / total


def _chrome():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("no Chromium here: install Debian's chromium and chromium-driver (.ci/run does) to run the browser check")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (it is a dev dependency: make test installs it)")
    return chromium, driver, webdriver, Options, Service


def test_report_in_headless_chromium(quick_demo, tmp_path):
    chromium, driver_path, webdriver, Options, Service = _chrome()
    from selenium.webdriver.common.by import By

    opts = Options()
    opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,1000"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    drv = webdriver.Chrome(service=Service(driver_path), options=opts)
    try:
        drv.get((quick_demo / "report.html").as_uri())
        assert "critbatch" in drv.title
        errors = [e for e in drv.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
        assert errors == [], errors
        figures = drv.find_elements(By.CSS_SELECTOR, "figure")
        expected = read_json(quick_demo / "summary.json")["figures"]
        assert len(figures) == len(expected) >= 3
        for f in figures:
            drv.execute_script("arguments[0].scrollIntoView()", f)
            assert f.is_displayed()
            svg = f.find_element(By.TAG_NAME, "svg")
            assert svg.rect["width"] > 300 and svg.rect["height"] > 150, (f.get_attribute("id"), svg.rect)
            shot = f.screenshot_as_png
            assert _png_nonblank_fraction(shot) > 0.02, f.get_attribute("id")  # something is drawn
        page = drv.get_screenshot_as_png()
        (tmp_path / "page.png").write_bytes(page)
        assert _png_nonblank_fraction(page) > 0.01
    finally:
        drv.quit()


def test_a_schedule_without_a_doubling_is_explained_not_compared():
    from critbatch.report.html import _comparison_conclusions

    s = {"compare_skipped": "the derived schedule has no batch change within the run: nothing to compare",
         "schedule": {"notes": ["no warmup: the measured CBS (lower bound) never reaches 1 x 16 sequences before 1M tokens"]}}
    out = _comparison_conclusions(s)
    assert out[0].startswith("No comparison: the derived schedule has no batch change")
    assert "stays at the start batch (no warmup: the measured CBS" in out[1]
    assert "docs/LOG.md" in out[1]
    # a skipped comparison for another reason gets no warmup explanation
    assert len(_comparison_conclusions({"compare_skipped": "x", "schedule": {"notes": []}})) == 1


def test_a_warmup_without_a_change_is_called_the_small_control():
    from critbatch.report.html import _comparison_conclusions

    run = lambda sched, loss: {"batch_schedule": sched, "final_eval_loss": loss, "steps_saved_pct": 0.0,  # noqa: E731
                               "gap_to_small": {"final_eval_loss": {"mean": loss - 1.70, "se": None}}}
    c = {"runs": {"warmup": run([[0, 8]], 1.70), "small": run([[0, 8]], 1.70), "large": run([[0, 16]], 2.10)},
         "seeds": [0], "anneal_tokens": 0}
    s = {"comparison": c, "schedule": {"notes": ["no warmup: the measured CBS never reaches 16"]}}
    out = _comparison_conclusions(s)
    assert out[0].startswith("The derived warmup has no batch change within the run, so its run is the small-batch")
    assert "large-batch control at 16 sequences reached 2.1000" in out[0]
    assert out[1].startswith("The derived schedule stays at the start batch (no warmup")
    assert not any(o.startswith("Batch-size warmup reached") for o in out)


def test_the_closed_loops_batch_line_runs_to_the_runs_end(tmp_path, monkeypatch):
    """A loop that stopped probing early (points left out) still ran to its end at its last batch: the
    figure's step line goes on to the run's end, not to twice its last probe point."""
    import matplotlib.axes

    from critbatch.report.plots import plot_cbs_curve

    lines = []
    real = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda self, *a, **kw: lines.append((a, kw)) or real(self, *a, **kw))
    curve = {"seq_len": 64, "points": [], "fit": None, "decide_by": "eval", "rule": "eps"}
    ds = [{"tokens": 62_500, "batch_before": 2, "batch_after": 2, "probe": None},
          {"tokens": 125_000, "batch_before": 2, "batch_after": 4, "probe": None}]
    plot_cbs_curve(curve, tmp_path / "with_end", decisions=ds, run_end=1_000_000)
    step = [a for a, kw in lines if str(kw.get("label", "")).startswith("closed loop")]
    assert step[0][0][-1] == 1_000_000 and step[0][1][-1] == 4 * 64
    lines.clear()
    plot_cbs_curve(curve, tmp_path / "without", decisions=ds)
    assert [a for a, kw in lines if str(kw.get("label", "")).startswith("closed loop")][0][0][-1] == 250_000
