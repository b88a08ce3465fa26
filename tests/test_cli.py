"""The CLI in-process: every bad input is one line on stderr, exit status 2, and nothing written."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from critbatch.cli import main

FAST = ["--eval-seqs", "16", "--no-progress"]


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def tiny_args(data_dir, out, *extra):
    return ["train", "--preset", "tiny", "--data", data_dir, "--out", out, "--total-tokens", "8k", *FAST, *extra]


def test_train_prints_result_and_resumes(data_dir, tmp_path, capsys):
    code, out, err = run_cli(tiny_args(data_dir, tmp_path / "r", "--checkpoint-tokens", "2k,4k"), capsys)
    assert code == 0, err
    assert "final_eval_loss=" in out
    res = json.loads((tmp_path / "r" / "result.json").read_text())
    assert res["tokens"] >= 8000
    # `train --out RUN` alone uses the saved config (finished: prints the same result)
    code, out2, err = run_cli(["train", "--out", tmp_path / "r", "--no-progress"], capsys)
    assert code == 0 and out2 == out


def test_stop_and_resume_via_cli(data_dir, tmp_path, capsys):
    code, out, err = run_cli(tiny_args(data_dir, tmp_path / "r", "--stop-after-tokens", "4k"), capsys)
    assert code == 0 and "paused at" in err
    assert not (tmp_path / "r" / "result.json").exists()
    code, out, err = run_cli(tiny_args(data_dir, tmp_path / "r"), capsys)
    assert code == 0 and (tmp_path / "r" / "result.json").exists()


def test_config_file_form(data_dir, tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'total_tokens = "4k"\neval_seqs = 16\nbatch_seqs = 4\n[data]\npath = "{data_dir}"\n'
                   '[model]\nd_model = 32\nn_head = 2\nn_layer = 1\nseq_len = 32\n')
    code, out, err = run_cli(["train", "--config", cfg, "--out", tmp_path / "r", "--no-progress", "--lr", "0.002"], capsys)
    assert code == 0, err
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert saved["model"]["d_model"] == 32 and saved["optim"]["lr"] == 0.002 and saved["batch_seqs"] == 4


def test_batch_schedule_flag(data_dir, tmp_path, capsys):
    sched = tmp_path / "s.json"
    sched.write_text(json.dumps({"0": 4, "4k": 8}))
    code, out, err = run_cli(tiny_args(data_dir, tmp_path / "r", "--batch-schedule", sched), capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "r" / "config.json").read_text())["batch_schedule"] == [[0, 4], [4000, 8]]


@pytest.fixture
def ckpt_of_other_model(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("other") / "r"
    assert main(["train", "--preset", "mini", "--data", str(data_dir), "--out", str(out), "--total-tokens", "2048",
                 "--checkpoint-tokens", "1024", "--eval-seqs", "8", "--no-progress"]) == 0
    return next(p for p in (out / "ckpt").iterdir() if p.name.startswith("tok_"))


def _corrupt_copy(data_dir, tmp):
    bad = tmp / "corrupt-data"
    shutil.copytree(data_dir, bad)
    raw = bytearray((bad / "train_000.bin").read_bytes())
    raw[12345] ^= 0xFF
    (bad / "train_000.bin").write_bytes(bytes(raw))
    return bad


def _small_data(tmp):
    from critbatch.data import prepare

    (tmp / "small.txt").write_text("tiny corpus line\n" * 2000)
    return prepare(tmp / "small-data", [tmp / "small.txt"], quiet=True)


BAD = {
    "batch not divisible": (lambda d, t: ["--batch-seqs", "6", "--micro-batch-seqs", "4"], "not divisible by micro-batch 4"),
    "schedule not increasing": (lambda d, t: ["--batch-schedule", "0:4,2000:8,1000:16"], "not increasing in tokens"),
    "schedule phase not divisible": (lambda d, t: ["--batch-schedule", "0:4,2000:6", "--micro-batch-seqs", "4"], "phase 1 (from 2000 tokens)"),
    "zero lr": (lambda d, t: ["--lr", "0"], "learning rate 0.0 must be a positive"),
    "negative lr": (lambda d, t: ["--lr", "-0.1"], "learning rate -0.1 must be a positive"),
    "zero tokens": (lambda d, t: ["--total-tokens", "0"], "total_tokens=0 must be positive"),
    "negative tokens": (lambda d, t: ["--total-tokens", "-5"], "is negative"),
    "bad count": (lambda d, t: ["--total-tokens", "lots"], "'lots' is not a count"),
    "too many tokens": (lambda d, t: ["--data", _small_data(t), "--total-tokens", "1M"], "pass --allow-repeat"),
    "missing data": (lambda d, t: ["--data", t / "nowhere"], "does not exist"),
    "corrupt data": (lambda d, t: ["--data", _corrupt_copy(d, t)], "sha256"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_exit_2_nothing_written(case, data_dir, tmp_path, capsys):
    make, needle = BAD[case]
    out = tmp_path / "run"
    extra = make(data_dir, tmp_path)
    args = tiny_args(data_dir, out) + [str(x) for x in extra]
    code, stdout, err = run_cli(args, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("critbatch: error: "), err
    assert needle in lines[0], lines[0]
    assert not out.exists()


def test_unknown_preset(tmp_path, capsys):
    code, _, err = run_cli(["train", "--preset", "gigantic", "--out", tmp_path / "r"], capsys)
    from critbatch import presets

    assert code == 2 and err.strip() == f"critbatch: error: unknown preset 'gigantic'; accepted: {', '.join(presets.PRESETS)}"
    assert "olmo2-1b" in err
    assert not (tmp_path / "r").exists()


def test_checkpoint_from_a_different_model(ckpt_of_other_model, data_dir, tmp_path, capsys):
    code, _, err = run_cli(tiny_args(data_dir, tmp_path / "r", "--init-from", ckpt_of_other_model), capsys)
    assert code == 2 and "from a different model config" in err and "d_model" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "r").exists()


def test_resume_with_a_different_config_is_refused(data_dir, tmp_path, capsys):
    assert run_cli(tiny_args(data_dir, tmp_path / "r", "--stop-after-tokens", "2k"), capsys)[0] == 0
    before = sorted(p.name for p in (tmp_path / "r").rglob("*"))
    code, _, err = run_cli(tiny_args(data_dir, tmp_path / "r", "--lr", "0.01"), capsys)
    assert code == 2 and "different config" in err and "optim.lr" in err
    assert sorted(p.name for p in (tmp_path / "r").rglob("*")) == before


def test_repeat_allowed_warns(tmp_path, capsys):
    from critbatch.cli import main as m

    small = _small_data(tmp_path)
    with pytest.warns(UserWarning, match="repeats data"):
        code = m(["train", "--preset", "tiny", "--data", str(small), "--out", str(tmp_path / "r"), "--total-tokens", "40k",
                  "--allow-repeat", "--eval-seqs", "4", "--no-progress"])
    assert code == 0
    assert json.loads((tmp_path / "r" / "result.json").read_text())["epochs"] > 1


def test_prepare_cli(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("hello world\n" * 500)
    code, out, err = run_cli(["prepare", "--out", tmp_path / "d", tmp_path / "a.txt"], capsys)
    assert code == 0 and "train_tokens=" in out
    code, out, err = run_cli(["prepare", "--out", tmp_path / "e", tmp_path / "missing.txt"], capsys)
    assert code == 2 and "does not exist" in err and not (tmp_path / "e").exists()
    code, out, err = run_cli(["prepare", "--out", tmp_path / "f", "--corpus", "nope"], capsys)
    assert code == 2 and "unknown corpus 'nope'" in err


def test_presets_listing(capsys):
    code, out, _ = run_cli(["presets"], capsys)
    assert code == 0 and "tiny" in out and "olmo-1b" in out


@pytest.mark.slow
def test_module_and_console_script(tmp_path):
    r = subprocess.run([sys.executable, "-m", "critbatch", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("critbatch ")
    exe = Path(sys.executable).parent / "critbatch"
    r = subprocess.run([str(exe), "train", "--preset", "nope", "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


@pytest.mark.slow
def test_train_stops_cleanly_on_sigterm_and_resumes(data_dir, tmp_path):
    import signal
    import time

    exe = str(Path(sys.executable).parent / "critbatch")
    args = [exe, "train", "--preset", "tiny", "--data", str(data_dir), "--out", str(tmp_path / "r"),
            "--total-tokens", "40k", "--save-interval-tokens", "5k", "--eval-seqs", "16", "--no-progress"]
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not list((tmp_path / "r" / "ckpt").glob("resume_tok_*/meta.json")):
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 128 + signal.SIGTERM, err
    assert err.strip().splitlines()[-1].startswith("stopped by SIGTERM at ") and "Traceback" not in err
    assert not (tmp_path / "r" / "result.json").exists()
    r = subprocess.run(args, capture_output=True, text=True)
    assert r.returncode == 0 and (tmp_path / "r" / "result.json").exists()


@pytest.mark.parametrize("extra,needle", [
    (["--launcher", "slurm", "--slurm", "{nope"], "neither a JSON/TOML file nor a JSON object"),
    (["--launcher", "slurm", "--slurm", "[1, 2]"], "must be a JSON object"),
    (["--launcher", "inprocess", "--nproc-per-job", "2"], "nproc"),
])
def test_branch_launch_options_bad_input(data_dir, tmp_path, capsys, extra, needle):
    assert main(["train", "--preset", "tiny", "--data", str(data_dir), "--out", str(tmp_path / "r"),
                 "--total-tokens", "4k", "--checkpoint-tokens", "2k", "--eval-seqs", "8", "--no-progress"]) == 0
    capsys.readouterr()
    code = main(["branch", "--run", str(tmp_path / "r"), "--at", "2k", "--k", "1,2", "--window-tokens", "2k",
                 "--no-progress", *extra])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and err.count("\n") == 1, err
    assert not (tmp_path / "r" / "sweeps").exists()


# ---- the command line is generated from the configs, and frozen ----------------------------------


def test_the_flag_set_is_frozen():
    """A flag added, renamed or removed is a deliberate change: update tests/cli_flags.json with it
    (python -c "...flag_names(make_parser())..." prints the new set)."""
    import json
    from pathlib import Path

    from critbatch.cli import make_parser
    from critbatch.clispec import flag_names

    frozen = json.loads((Path(__file__).parent / "cli_flags.json").read_text())
    assert flag_names(make_parser()) == frozen


def test_every_config_field_is_a_documented_flag():
    import dataclasses
    import typing

    from critbatch.branch import SweepConfig
    from critbatch.cli import COMMANDS, make_parser
    from critbatch.clispec import field_docs
    from critbatch.config import TrainConfig

    help_text = {c.name: make_parser()._subparsers._group_actions[0].choices[c.name].format_help() for c in COMMANDS}

    def fields(cls, prefix=""):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                yield from fields(hints[f.name], prefix + f.name + ".")
            else:
                yield cls, prefix + f.name, f.name

    for cls, path, name in fields(TrainConfig):
        flag = "--" + path.replace("_", "-")
        assert flag in help_text["train"], flag
        assert field_docs(cls).get(name), f"{path} has no docstring"
    for f in dataclasses.fields(SweepConfig):
        assert "--" + f.name.replace("_", "-") in help_text["branch"], f.name
    assert "Residual stream width" in help_text["train"]  # the field's docstring is its help


def test_nested_fields_and_aliases_set_the_config(tmp_path, data_dir, capsys):
    from critbatch.io import read_json

    code, _, err = run_cli(["train", "--preset", "tiny", "--data", data_dir, "--out", tmp_path / "r", "--total-tokens",
                            "2k", "--eval-seqs", "8", "--model.d-model", "32", "--model.n-head", "2", "--model.n-layer",
                            "1", "--optim.beta2", "0.99", "--optim.weight-decay", "0", "--lr", "0.002",
                            "--lr-schedule.kind", "constant", "--data.order-seed", "3", "--no-progress"], capsys)
    assert code == 0, err
    c = read_json(tmp_path / "r" / "config.json")
    assert (c["model"]["d_model"], c["model"]["n_head"], c["model"]["n_layer"]) == (32, 2, 1)
    assert (c["optim"]["beta2"], c["optim"]["weight_decay"], c["optim"]["lr"]) == (0.99, 0.0, 0.002)
    assert c["lr_schedule"]["kind"] == "constant" and c["data"]["order_seed"] == 3
    code, _, err = run_cli(["train", "--preset", "tiny", "--out", tmp_path / "s", "--model.d-model", "big"], capsys)
    assert code == 2 and err.count("\n") == 1 and "--model.d-model 'big' is not a count" in err
    code, _, err = run_cli(["branch", "--run", tmp_path / "r"], capsys)  # a missing required flag: one line too
    assert code == 2 and err.count("\n") == 1 and "required" in err


def test_train_keeps_the_checkpoints_a_later_sweep_continues_from(data_dir, tmp_path, capsys):
    """`train --branch-window-tokens W` keeps, beside each branch point, the checkpoint from which
    `branch --window-tokens W` reads its k = 1 branch: that branch trains only its cooldown."""
    code, out, err = run_cli(tiny_args(data_dir, tmp_path / "r", "--checkpoint-tokens", "2k",
                                       "--branch-window-tokens", "4k"), capsys)
    assert code == 0, err
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    step = saved["batch_seqs"] * saved["model"]["seq_len"]
    point = -(-2000 // step) * step
    assert saved["checkpoint_tokens"] == [2000, point + 3000 // step * step + step]  # the first step of the cooldown
    code, out, err = run_cli(["branch", "--run", tmp_path / "r", "--at", "2k", "--k", "1,2", "--window-tokens", "4k",
                              "--launcher", "inprocess", "--eval-seqs", "8", "--no-progress"], capsys)
    assert code == 0, err
    cbs = json.loads(next((tmp_path / "r" / "sweeps").glob("*/cbs.json")).read_text())
    assert cbs["cost"]["tokens_from_base"] == saved["checkpoint_tokens"][1] - point
    assert f"{cbs['cost']['tokens_from_base']:,} more read from the base run's own continuation" in out
    code = main([str(a) for a in tiny_args(data_dir, tmp_path / "r2", "--branch-window-tokens", "4k")])
    err = capsys.readouterr().err
    assert code == 2 and "give them with --checkpoint-tokens" in err and err.count("\n") == 1, err


def test_an_optional_number_flag_takes_none_to_turn_it_off():
    from critbatch.cli import _pick, make_parser
    from critbatch.demo import DemoConfig

    p = make_parser()

    def demo(*argv):
        ns = p.parse_args(["demo", *argv])
        return _pick(ns, ns.flags["cfg"], DemoConfig)

    assert demo().early_stop_gap == 0.02  # the demo stops settled branches early by default
    assert demo("--early-stop-gap", "none").early_stop_gap is None
    assert demo("--early-stop-gap", "0.03").early_stop_gap == 0.03
    assert demo("--auto-window-tokens", "None").auto_window_tokens is None
    assert demo("--auto-window-tokens", "8k").auto_window_tokens == 8000
