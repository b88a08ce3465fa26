"""Proxy -> target transfer (issue 23): the censored fit recovers planted exponents, the band covers
where measurements fall, leave-one-size-out, and the command's refusals and cost statement."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import fresh_parent
from critbatch.analysis.transfer import Observation, fit_transfer, leave_one_size_out, overlaps
from critbatch.errors import ConfigError, CritbatchError, DataError


def planted(alpha=0.4, beta=0.0, sigma=0.15, sizes=(3e4, 1e5, 3e5), tokens=(2e4, 6e4, 2e5, 6e5, 1.6e6), seed=0,
            grid=2.0 ** np.arange(5, 14)):
    """Intervals read off a planted curve B* = 300·(t/1e5)^alpha·(N/1e5)^beta·exp(sigma·z) (tokens) on a
    doubling grid of probed batches, as a sweep reads them (the bracketing grid values)."""
    rng = np.random.default_rng(seed)
    out = []
    for n in sizes:
        for t in tokens:
            b = 300 * (t / 1e5) ** alpha * (n / 1e5) ** beta * math.exp(sigma * rng.standard_normal())
            below, above = grid[grid <= b], grid[grid > b]
            out.append(Observation(n, t, float(below[-1]) if below.size else 0.0,
                                   float(above[0]) if above.size else None, f"{n:g}"))
    return out


def test_the_fit_recovers_planted_exponents_from_censored_intervals():
    f = fit_transfer(planted(alpha=0.4, beta=0.0), bootstrap=60)
    lo, hi = f.interval("alpha")
    assert lo < 0.4 < hi and abs(f.alpha - 0.4) < 0.1
    blo, bhi = f.interval("beta")
    assert blo < 0 < bhi and "not distinguishable from zero" in f.size_effect()
    g = fit_transfer(planted(alpha=0.4, beta=0.5, sigma=0.05), bootstrap=60)
    assert "distinguishable from zero: beta in [+" in g.size_effect() and abs(g.beta - 0.5) < 0.15


def test_the_band_covers_where_a_new_measurement_falls():
    f = fit_transfer(planted(seed=1), bootstrap=60)
    fresh = planted(seed=2)  # the same curve measured again: new scatter
    lo = np.concatenate([f.band([o.tokens], o.size)[0] for o in fresh])
    hi = np.concatenate([f.band([o.tokens], o.size)[1] for o in fresh])
    share = np.mean([overlaps(a, b, o.low, o.high) for a, b, o in zip(lo, hi, fresh)])
    assert share >= 0.9
    clo, chi = f.band([1e5], 1e5, scatter=False)  # the curve's own band is narrower
    plo, phi = f.band([1e5], 1e5)
    assert plo[0] < clo[0] < 300 < chi[0] < phi[0]


def test_one_size_holds_beta_at_zero_and_says_so():
    """One size cannot measure beta: its point value is 0, and the band for another size widens with
    the distance in size by the prior's spread (at the proxy's own size the prior does not act)."""
    from critbatch.analysis.transfer import BETA_PRIOR_SD

    f = fit_transfer(planted(sizes=(1e5,)), bootstrap=60)
    assert f.beta == 0 and not f.beta_measured and "one model size" in f.size_effect()
    lo, hi = f.interval("beta")
    edge = 1.645 * BETA_PRIOR_SD  # the prior's 90% interval
    assert lo == pytest.approx(-edge, abs=0.06) and hi == pytest.approx(edge, abs=0.06)
    widths = [float(np.log(b / a)[0]) for a, b in (f.band([1e5], n, scatter=False) for n in (1e5, 1e6, 1e7))]
    assert widths[0] < widths[1] < widths[2]
    same = f.band([1e5], 1e5, scatter=False)
    f.boot[:, 2] = 0  # without the prior the proxy's own size is unchanged
    assert np.allclose(same, f.band([1e5], 1e5, scatter=False))


def test_leave_one_size_out_reports_each_held_out_size():
    rows = leave_one_size_out(planted(), bootstrap=30)
    assert [r["size"] for r in rows] == [3e4, 1e5, 3e5]
    assert all(0 <= r["overlap_fraction"] <= 1 and len(r["points"]) == 5 for r in rows)
    assert sum(r["overlap_fraction"] for r in rows) / 3 >= 0.8


def test_a_single_point_is_refused():
    with pytest.raises(ConfigError, match="at 2 or more token counts"):
        fit_transfer([Observation(1e5, 1e5, 256, 512)])


# ---- the command, on real proxy sweeps --------------------------------------------------------------

@pytest.fixture(scope="module")
def proxies(shared_parent, tmp_path_factory, data_dir):
    """Two proxy sizes on the same data: the shared parent (d=32) and a wider one (d=64), each swept at
    two points."""
    from conftest import small_cfg
    from critbatch.branch import SweepConfig, run_sweep
    from critbatch.train import train

    root = tmp_path_factory.mktemp("proxies")
    a = fresh_parent(shared_parent, root / "a")
    b = root / "b" / "run"
    train(small_cfg(data_dir, model={"d_model": 64, "n_head": 2}, total_tokens=8192, batch_seqs=4,
                    checkpoint_tokens=[1024, 4096], lr_schedule={"kind": "cosine", "warmup_tokens": 512}), b,
          progress=False)
    sweeps = []
    for run in (a, b):
        res = run_sweep(SweepConfig(run=str(run), at=[1024, 4096], k=[0.5, 1, 2, 4], window_tokens=512,
                                    launcher="inprocess", eval_seqs=16), progress=False)
        sweeps.append(str(res.sweep_dir))
    return sweeps


def target_file(tmp_path, **over) -> str:
    cfg = {"model": {"n_layer": 2, "n_head": 2, "d_model": 96, "seq_len": 16}, "batch_seqs": 2,
           "lr_schedule": {"kind": "cosine", "warmup_tokens": 512}, **over}
    p = tmp_path / "target.json"
    p.write_text(json.dumps(cfg))
    return str(p)


@pytest.mark.slow
def test_transfer_on_the_command_line_states_the_cost_first(proxies, tmp_path, capsys):
    from critbatch.cli import main

    out = tmp_path / "s.json"
    assert main(["transfer", "--sweeps", ",".join(proxies), "--config", target_file(tmp_path), "--total-tokens", "16k",
                 "--decay-tokens", "2k", "--bootstrap", "30", "--out", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[1].startswith("proxy compute: ") and "of the target run's (parameters x tokens" in printed[1]
    doc = json.loads(out.read_text())
    assert doc["transfer"]["fit"]["beta_measured"] and len(doc["transfer"]["band"]) == 2
    assert doc["phases"][0]["batch_seqs"] == 2 and doc["derived_from"]["assumption"].startswith("the target's LR")
    assert any(n.startswith("extrapolation: the target runs to 16,000 tokens") for n in doc["notes"])
    c = doc["transfer"]["compute"]
    assert c["params_x_tokens_ratio"] == pytest.approx(c["proxy_params_x_tokens"] / c["target_params_x_tokens"])


@pytest.mark.slow
def test_the_confirming_probe_moves_a_doubling_it_shows_worse(proxies, tmp_path, data_dir, monkeypatch):
    """A planted failing probe: the first doubling moves to the next point and the schedule says so."""
    from critbatch import transfer
    from critbatch.transfer import TransferConfig, run_transfer

    cfg = TransferConfig(sweeps=proxies, out=str(tmp_path / "s.json"), config=target_file(tmp_path, batch_seqs=1),
                         total_tokens=16_000, bootstrap=30, level=0.5)
    doc = run_transfer(cfg)
    plan = doc["transfer"]["confirm_plan"]
    assert plan is not None and plan["probe_tokens"] == 2 * 2 * plan["window_tokens"]
    import dataclasses

    for verdict, moves, said in (("stay", True, "worse than eps: the first doubling moves to the next point"),
                                 ("undetermined", False, "could not settle"), ("raise", False, "is confirmed")):
        monkeypatch.setattr(transfer, "confirm", lambda c, p, v=verdict: {"tokens": p["tokens"], "verdict": v,
                                                                         "mean_eval_loss": [3.0, 3.1]})
        got = run_transfer(dataclasses.replace(cfg, out=str(tmp_path / f"{verdict}.json"), confirm_run="x"))
        assert (got["phases"][1]["start_tokens"] > doc["phases"][1]["start_tokens"]) == moves, verdict
        assert any(said in n for n in got["notes"]), verdict


@pytest.mark.slow
def test_proxies_on_other_data_are_refused(proxies, tmp_path):
    from critbatch.io import read_json, write_json_atomic
    from critbatch.transfer import TransferConfig, run_transfer

    other = tmp_path / "other"
    run = json.loads((Path(proxies[1]) / "cbs.json").read_text())["run"]
    shutil.copytree(run, other / "run")
    data = tmp_path / "data-copy"
    cfg = read_json(other / "run" / "config.json")
    shutil.copytree(cfg["data"]["path"], data)
    meta = read_json(data / "meta.json")
    meta["splits"]["train"]["shards"][0]["sha256"] = "0" * 64
    write_json_atomic(data / "meta.json", meta)
    cfg["data"]["path"] = str(data)
    write_json_atomic(other / "run" / "config.json", cfg)
    sweep = other / "run" / "sweeps" / next(iter((other / "run" / "sweeps").iterdir())).name
    c = json.loads((sweep / "cbs.json").read_text())
    c["run"] = str(other / "run")
    (sweep / "cbs.json").write_text(json.dumps(c))
    with pytest.raises(DataError, match="measured on other training data"):
        run_transfer(TransferConfig(sweeps=[proxies[0], str(sweep)], out=str(tmp_path / "s.json"),
                                    config=target_file(tmp_path), total_tokens=8192, bootstrap=20))


@pytest.mark.parametrize("over,needle", [
    ({"model": {"n_layer": 2, "n_head": 2, "d_model": 32, "seq_len": 16, "vocab_size": 300}}, "vocabulary of 300"),
    ({"model": {"n_layer": 2, "n_head": 2, "d_model": 32, "seq_len": 128}}, "more than 4x the proxies' longest"),
])
@pytest.mark.slow
def test_a_target_the_proxies_cannot_speak_for_is_refused(proxies, tmp_path, over, needle):
    from critbatch.transfer import TransferConfig, run_transfer

    with pytest.raises(CritbatchError, match=needle):
        run_transfer(TransferConfig(sweeps=proxies, out=str(tmp_path / "s.json"), config=target_file(tmp_path, **over),
                                    total_tokens=8192, bootstrap=20))
    assert not (tmp_path / "s.json").exists()


@pytest.mark.slow
def test_a_target_outside_what_the_proxies_varied_is_told_so(proxies, tmp_path):
    """Size far past the proxies', another sequence length, another peak LR: each a note (the LOG's
    validation predicted a target at another sequence length and LR poorly); a target inside what the
    proxies varied gets none of them."""
    from critbatch.transfer import TransferConfig, run_transfer

    def notes(**over):
        return run_transfer(TransferConfig(sweeps=proxies, out=str(tmp_path / "s.json"), total_tokens=8192,
                                           config=target_file(tmp_path, **over), bootstrap=20))["notes"]

    inside = notes(model={"n_layer": 2, "n_head": 2, "d_model": 48, "seq_len": 16}, optim={"lr": 3e-3}, batch_seqs=4)
    assert not [n for n in inside if n.startswith("size extrapolation") or "sequences of" in n or "peak LR" in n]
    out = notes(model={"n_layer": 4, "n_head": 2, "d_model": 256, "seq_len": 32}, optim={"lr": 3e-2}, batch_seqs=4)
    assert any(n.startswith("size extrapolation: the target (") and "x more non-embedding parameters than the largest "
               "proxy" in n and "the band carries the fitted size exponent's uncertainty" in n for n in out), out
    assert any("sequences of 32 tokens differ from the proxies' (16)" in n for n in out), out
    assert any(n.startswith("the target's peak LR (0.03 at 4 sequences) is ") for n in out), out
    from critbatch.config import merge
    from critbatch.transfer import _stretched, read_proxies, target_config

    big = merge(target_config(TransferConfig(sweeps=proxies, out="x", total_tokens=8192, config=target_file(tmp_path))),
                {"model": {"n_layer": 4, "d_model": 256}})
    one = _stretched(big, read_proxies(proxies[:1]))  # one proxy size: beta is not measured
    assert any("with one proxy size the size dependence is not measured: the band carries a prior on it" in n
               for n in one), one


@pytest.mark.slow
def test_the_confirming_probe_runs_on_the_target_at_its_stated_cost(proxies, tmp_path, data_dir):
    """The target trained to its first doubling, then the probe: B and 2B over two paired replicates,
    exactly the tokens stated in advance."""
    import dataclasses

    from conftest import small_cfg
    from critbatch.config import merge
    from critbatch.train import train
    from critbatch.transfer import TransferConfig, run_transfer

    cfg = TransferConfig(sweeps=proxies, out=str(tmp_path / "s.json"), config=target_file(tmp_path, batch_seqs=1),
                         total_tokens=16_000, bootstrap=30, level=0.5, launcher="inprocess")
    plan = run_transfer(cfg)["transfer"]["confirm_plan"]
    t1 = plan["tokens"]
    target = merge(small_cfg(data_dir, model={"d_model": 96}, batch_seqs=1, total_tokens=t1, checkpoint_tokens=[t1]),
                   {"lr_schedule": {"kind": "cosine", "warmup_tokens": 512, "horizon_tokens": 16_000}})
    train(target, tmp_path / "confirm", progress=False)
    doc = run_transfer(dataclasses.replace(cfg, out=str(tmp_path / "c.json"), confirm_run=str(tmp_path / "confirm")))
    c = doc["transfer"]["confirmed"]
    assert c["tokens"] == t1 and c["verdict"] in ("raise", "stay", "undetermined") and c["rule"] == "noninf"
    assert c["branch_tokens"] == plan["probe_tokens"]
