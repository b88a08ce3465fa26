"""`critbatch gns` at checkpoints, and the noise scale beside the CBS curve."""

import shutil

import pytest

from conftest import small_cfg
from critbatch.cli import main
from critbatch.io import read_json
from critbatch.train import train


@pytest.fixture(scope="module")
def run(data_dir, tmp_path_factory):
    r = tmp_path_factory.mktemp("gnsrun") / "run"
    train(small_cfg(data_dir, total_tokens=8192, batch_seqs=4, checkpoint_tokens=[1024, 4096]), r, progress=False)
    return r


def copy(run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


@pytest.mark.slow
def test_gns_writes_points_and_attaches_to_sweeps(run, tmp_path, capsys):
    r = copy(run, tmp_path)
    assert main(["branch", "--run", str(r), "--at", "1024,4096", "--k", "0.5,1,2", "--window-tokens", "256",
                 "--eval-seqs", "16", "--launcher", "inprocess", "--no-progress"]) == 0
    assert main(["gns", "--run", str(r), "--b-small", "1", "--b-big", "16", "--batches", "16", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "B_simple =" in out
    g = read_json(r / "gns.json")
    assert [p["tokens"] for p in g["points"]] == [1024, 4096]
    for p in g["points"]:
        for f in ("tokens", "b_simple_seqs", "b_simple_tokens", "ci_low_seqs", "ci_high_seqs"):
            assert f in p
        assert p["b_simple_tokens"] == pytest.approx(p["b_simple_seqs"] * 16)
        assert p["ci_low_seqs"] <= p["b_simple_seqs"] <= p["ci_high_seqs"]
    cbs = read_json(next((r / "sweeps").iterdir()) / "cbs.json")
    assert [p["noise_scale"]["b_simple_seqs"] for p in cbs["points"]] == [p["b_simple_seqs"] for p in g["points"]]
    assert "b_simple_seqs" in (next((r / "sweeps").iterdir()) / "cbs.csv").read_text().splitlines()[0]
    # a later sweep picks the noise scale up by itself
    assert main(["branch", "--run", str(r), "--at", "4096", "--k", "1,2", "--window-tokens", "256",
                 "--eval-seqs", "16", "--launcher", "inprocess", "--no-progress"]) == 0
    for d in (r / "sweeps").iterdir():
        assert all(p.get("noise_scale") for p in read_json(d / "cbs.json")["points"])


def test_gns_rerun_keeps_measured_points(run, tmp_path, capsys):
    r = copy(run, tmp_path)
    assert main(["gns", "--run", str(r), "--at", "1024", "--b-big", "8", "--batches", "2", "--no-progress"]) == 0
    first = read_json(r / "gns.json")["points"][0]
    assert main(["gns", "--run", str(r), "--b-big", "8", "--batches", "2", "--no-progress"]) == 0
    pts = read_json(r / "gns.json")["points"]
    assert len(pts) == 2 and pts[0] == first
    # other settings: a new file, the old one kept beside it
    assert main(["gns", "--run", str(r), "--at", "1024", "--b-big", "16", "--batches", "2", "--no-progress"]) == 0
    assert len(list(r.glob("gns-*.json"))) == 1 and read_json(r / "gns.json")["settings"]["b_big"] == 16


@pytest.mark.parametrize("args,needle", [
    (["--b-small", "8", "--b-big", "8"], "b_big=8 must be larger than b_small=8"),
    (["--b-small", "3", "--b-big", "8"], "b_big=8 must be a multiple of b_small=3"),
    (["--batches", "0"], "n_batches=0 must be >= 1"),
    (["--at", "999"], "no kept checkpoint at 999 tokens"),
])
def test_gns_bad_input(run, tmp_path, capsys, args, needle):
    r = copy(run, tmp_path)
    code = main(["gns", "--run", str(r), "--no-progress", *args])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and err.count("\n") == 1
    assert not (r / "gns.json").exists()
