"""Experiment trackers (``--log-to tensorboard,wandb``), tested with the real packages: what they hold,
read back from TensorBoard's event files and W&B's offline run, equals metrics.jsonl (a run) and
cbs.json (a sweep). Nothing reaches the network: W&B runs offline in temporary directories."""

import json
import struct
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import fresh_parent, small_cfg
from critbatch.cli import main
from critbatch.config import defining_hash, merge
from critbatch.dist import DistInfo
from critbatch.errors import ConfigError
from critbatch.io import read_json, read_jsonl
from critbatch.train import train

pytest.importorskip("tensorboard")
pytest.importorskip("wandb")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from critbatch.train.trackers import TensorBoardTracker, numbers  # noqa: E402

NEEDED = {"train/loss", "eval/loss", "eval/loss_se", "train/batch_seqs", "train/batch_tokens", "optim/lr",
          "perf/tokens_per_s", "tokens"}


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    """W&B offline, every directory it writes in the test's own temporary directory."""
    for var, sub in (("WANDB_DIR", "dir"), ("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache"),
                     ("WANDB_DATA_DIR", "data")):
        (tmp_path / "wandb-env" / sub).mkdir(parents=True)
        monkeypatch.setenv(var, str(tmp_path / "wandb-env" / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})  # 0: keep every event
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def wandb_history(run_file: Path) -> dict[int, dict]:
    """The history rows of an offline W&B run (``run-*.wandb``: LevelDB-log records of W&B's protobuf
    ``Record``), by step."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    pos, buf, rows = 7, b"", {}
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768  # records never straddle a 32 KiB block's 7-byte trailer
        if left < 7:
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and n == 0:  # the block's zero padding
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
        buf = chunk if kind in (1, 2) else buf + chunk  # full, first / middle, last
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            if rec.WhichOneof("record_type") == "history":
                row = {it.key or "/".join(it.nested_key): json.loads(it.value_json) for it in rec.history.item}
                rows[rec.history.step.num] = row
    return rows


def expected_by_tag(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list] = {}
    for r in records:
        for k, v in numbers(r).items():
            out.setdefault(k, []).append((r["step"], v))
    return out


def expected_by_step(records: list[dict]) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for r in records:
        out.setdefault(r["step"], {}).update(numbers(r))
    return out


def assert_wandb_rows(rows: dict[int, dict], expected: dict[int, dict]) -> None:
    assert sorted(rows) == sorted(expected)
    for step, values in expected.items():
        got = {k: v for k, v in rows[step].items() if not k.startswith("_")}
        assert set(got) == set(values), step
        assert got == pytest.approx(values, rel=1e-12), step


def offline_runs(directory: Path) -> list[Path]:
    return sorted(directory.glob("wandb/offline-run-*/run-*.wandb"))


def test_a_run_logs_what_metrics_jsonl_holds(data_dir, tmp_path, wandb_offline, capsys):
    run = tmp_path / "run"
    code = main(["train", "--preset", "tiny", "--data", str(data_dir), "--out", str(run), "--total-tokens", "4k",
                 "--eval-seqs", "16", "--eval-interval-tokens", "1k", "--log-interval-steps", "2", "--no-progress",
                 "--log-to", "tensorboard,wandb"])
    assert code == 0, capsys.readouterr().err
    records = read_jsonl(run / "metrics.jsonl")
    expected = expected_by_tag(records)
    assert NEEDED <= set(expected)
    tb = tensorboard_scalars(run / "tb")
    assert set(tb) == set(expected)
    for tag, points in expected.items():  # every value at its step, in order (float32 in the event files)
        assert [s for s, _ in tb[tag]] == [s for s, _ in points], tag
        assert [v for _, v in tb[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag
    (wb,) = offline_runs(run)
    assert_wandb_rows(wandb_history(wb), expected_by_step(records))
    assert read_json(run / "config.json")["log_to"] == ["tensorboard", "wandb"]


def test_log_to_is_a_how_setting_and_a_resumed_run_logs_the_rest(data_dir, tmp_path):
    """log_to changes no content address. A run paused, then resumed with a killed session's events
    beyond its checkpoint in tb/ (written here by hand): TensorBoard holds metrics.jsonl's values (the
    resumed session hides the earlier events from its first step on)."""
    cfg = small_cfg(data_dir, total_tokens=2048, log_to=["tensorboard"])
    assert defining_hash(cfg) == defining_hash(merge(cfg, {"log_to": []}))
    run = tmp_path / "run"
    assert train(cfg, run, progress=False, stop_after_tokens=1024) is None
    from torch.utils.tensorboard import SummaryWriter

    paused_at = max(r["step"] for r in read_jsonl(run / "metrics.jsonl"))
    w = SummaryWriter(str(run / "tb"))
    for s in range(paused_at + 1, paused_at + 4):
        w.add_scalar("train/loss", 99.0, global_step=s)
    w.close()
    train(cfg, run, progress=False)
    expected = expected_by_tag(read_jsonl(run / "metrics.jsonl"))
    tb = tensorboard_scalars(run / "tb")
    assert tb["train/loss"] == [(s, pytest.approx(v, rel=1e-6)) for s, v in expected["train/loss"]]


def test_only_the_main_rank_logs(data_dir, tmp_path):
    cfg = small_cfg(data_dir)
    for rank, writes in ((1, False), (0, True)):
        out = tmp_path / f"rank{rank}"
        out.mkdir()
        trainer = SimpleNamespace(out_dir=out, dist=DistInfo(rank, 2), cfg=cfg, state=SimpleNamespace(step=0),
                                  resume_from=None)
        cb = TensorBoardTracker()
        cb.on_train_start(trainer)
        cb.on_log(trainer, {"step": 1, "tokens": 128, "train/loss": 5.0})
        cb.on_train_end(trainer, {})
        assert (out / "tb").is_dir() == writes
        if writes:
            assert tensorboard_scalars(out / "tb")["train/loss"] == [(1, 5.0)]


@pytest.mark.parametrize("package", ["tensorboard", "wandb"])
def test_a_missing_package_is_refused_naming_the_extra(package, data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, package, None)  # as if not installed
    code = main(["train", "--preset", "tiny", "--data", str(data_dir), "--out", str(tmp_path / "r"),
                 "--total-tokens", "2k", "--no-progress", "--log-to", package])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert f"--log-to {package} needs the {package} package: pip install 'critbatch[trackers]'" in err
    assert not (tmp_path / "r").exists()
    code = main(["train", "--preset", "tiny", "--data", str(data_dir), "--out", str(tmp_path / "r"),
                 "--total-tokens", "2k", "--no-progress", "--log-to", "tensorboard,nope"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--log-to 'nope' is not one of gns, tensorboard, wandb" in err, err
    with pytest.raises(ConfigError, match="log_to='nope' is not one of"):
        train(small_cfg(data_dir, log_to=["nope"]), tmp_path / "r")


def test_a_sweep_logs_its_curve(shared_parent, tmp_path, wandb_offline, capsys):
    """cbs.json's points (CBS interval and geometric mean in tokens, noise scale) at their tokens, in
    both sinks; its branches log nowhere though the parent's config names a tracker; a finished sweep
    run again rewrites TensorBoard's events and makes a new W&B run; a sink that cannot log a curve,
    or whose package is missing, is refused before anything runs."""
    run = fresh_parent(shared_parent, tmp_path)
    cfg = read_json(run / "config.json")
    (run / "config.json").write_text(json.dumps({**cfg, "log_to": ["tensorboard"]}))  # a how field: same run
    assert main(["gns", "--run", str(run), "--b-big", "4", "--batches", "4", "--no-progress"]) == 0
    args = ["branch", "--run", str(run), "--at", "1024,4096", "--k", "1,2", "--window-tokens", "512",
            "--launcher", "inprocess", "--no-progress"]
    for bad, needle in ((["--log-to", "gns"], "--log-to gns cannot log a sweep's curve; a sweep logs to tensorboard, wandb"),
                        (["--log-to", "nope"], "'nope' is not one of")):
        assert main([*args, *bad]) == 2
        assert needle in capsys.readouterr().err
    assert not (run / "sweeps").exists()
    assert main([*args, "--log-to", "tensorboard,wandb"]) == 0
    (sweep,) = (run / "sweeps").iterdir()
    points = read_json(sweep / "cbs.json")["points"]
    keys = {"cbs/low_tokens": "cbs_low_tokens", "cbs/high_tokens": "cbs_high_tokens",
            "cbs/geomean_tokens": "cbs_geomean_tokens", "tokens": "tokens"}
    expected = {tag: [(p["tokens"], float(p[key])) for p in points if p.get(key) is not None] for tag, key in keys.items()}
    expected["gns/b_simple_tokens"] = [(p["tokens"], p["noise_scale"]["b_simple_tokens"]) for p in points]
    expected = {k: v for k, v in expected.items() if v}
    assert {"cbs/low_tokens", "gns/b_simple_tokens", "tokens"} <= set(expected)

    def check():
        tb = tensorboard_scalars(sweep / "tb")
        assert set(tb) == set(expected)
        for tag, pts in expected.items():
            assert tb[tag] == [(s, pytest.approx(v, rel=1e-6)) for s, v in pts], tag
        rows = wandb_history(offline_runs(sweep)[-1])
        assert_wandb_rows(rows, {s: {t: dict(pts)[s] for t, pts in expected.items() if s in dict(pts)}
                                 for s in (p["tokens"] for p in points)})

    check()
    assert not list((run / "branches").glob("*/tb")) and not list((run / "branches").glob("*/wandb"))
    assert all(read_json(j)["config"]["log_to"] == [] for j in (run / "branches").glob("*/job.json"))
    assert main([*args, "--log-to", "tensorboard,wandb"]) == 0  # nothing to train: logged once more
    check()
    assert len(offline_runs(sweep)) == 2
