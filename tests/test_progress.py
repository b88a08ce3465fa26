"""Progress off a terminal (under nohup, Slurm, a pipe): plain lines on stderr at an interval, for a
training run and for a sweep; a tqdm bar on a terminal."""

import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import critbatch
from critbatch.cli import main
from critbatch.errors import ConfigError
from critbatch.progress import Progress, duration, progress_mode


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_the_mode_follows_the_stream():
    assert progress_mode(None, io.StringIO()) == "lines"
    assert progress_mode(None, _Tty()) == "bar"
    assert progress_mode(True, io.StringIO()) == "bar"  # forced
    assert progress_mode(False, _Tty()) == "off"
    assert [duration(s) for s in (0.4, 42, 185, 3720)] == ["0s", "42s", "3m05s", "1h02m"]


def test_lines_at_the_interval_with_rate_and_eta():
    out = io.StringIO()
    p = Progress(1000, desc="run", unit="tokens", enabled=None, interval_s=3600, stream=out, initial=100)
    p.update(100)
    p.set_postfix(step=2, loss="2.500")
    assert out.getvalue() == ""  # the interval has not passed
    t = p.t0 + 10.0
    line = p.line(t)  # 100 tokens of this session in 10 s; the 100 before it count in the total only
    assert line == "run: 200/1,000 tokens (20%) | 10 tokens/s | step 2, loss 2.500 | elapsed 10s | ETA 1m20s"
    p.close()  # the last count is printed once when it closes
    assert out.getvalue().count("\n") == 1 and out.getvalue().startswith("run: 200/1,000 tokens (20%)")
    p.update(5)
    assert out.getvalue().count("\n") == 1  # closed


def test_a_sweep_line_skips_branches_found_done_and_beats_without_news():
    out = io.StringIO()
    p = Progress(None, desc="sweep x", unit="branches", enabled=None, interval_s=0.05, rate=False,
                 heartbeat=True, stream=out)
    try:
        p.add_total(4)
        p.skip(1)  # finished by an earlier sweep: counted, not in the ETA
        deadline = time.time() + 5
        while out.getvalue().count("\n") < 2 and time.time() < deadline:
            time.sleep(0.02)
    finally:
        p.close()
    lines = out.getvalue().splitlines()
    assert len(lines) >= 2 and all(ln.startswith("sweep x: 1/4 branches (25%) | elapsed ") for ln in lines)
    assert "ETA" not in lines[0] and "/s" not in lines[0]  # nothing trained yet: no rate to go by
    p.update(0)
    n = len(out.getvalue().splitlines())
    time.sleep(0.15)
    assert len(out.getvalue().splitlines()) == n  # closed: the heartbeat stopped


def test_a_terminal_gets_the_bar_and_no_lines():
    out = _Tty()
    p = Progress(100, desc="run", unit="tokens", enabled=None, interval_s=0, stream=out)
    p.update(50)
    p.close()
    assert "run:" in out.getvalue() and " | elapsed" not in out.getvalue()  # tqdm's bar, not a plain line


def test_a_negative_interval_is_refused(data_dir, tmp_path, capsys):
    code = main(["train", "--preset", "tiny", "--data", str(data_dir), "--out", str(tmp_path / "r"),
                 "--total-tokens", "2k", "--progress-interval-s", "-1"])
    err = capsys.readouterr().err
    assert code == 2 and "progress_interval_s=-1.0 must be >= 0" in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()
    with pytest.raises(ConfigError, match="must be >= 0"):
        from conftest import small_cfg
        from critbatch.train import train

        train(small_cfg(data_dir, progress_interval_s=-0.5), tmp_path / "r2")


def _cli(*args, cwd):
    """``python -m critbatch ARGS`` with stderr a pipe (not a terminal), as under nohup or Slurm."""
    env = {**os.environ, "PYTHONPATH": str(Path(critbatch.__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "critbatch", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


LINE = re.compile(r"^r: ([\d,]+)/8,000 tokens \(\d+%\) \| [\d,]+ tokens/s \| step (\d+), loss \d+\.\d{3} \| "
                  r"elapsed \d+s( \| ETA \d+s)?$")


def test_train_and_branch_print_plain_lines_off_a_terminal(data_dir, tmp_path):
    """Run through the command line with stderr piped: training prints a line at every step with
    --progress-interval-s 0 (tokens, tokens/s, step, loss, ETA), the sweep one per branch
    (branches done of total, elapsed, ETA); --no-progress prints none."""
    r = _cli("train", "--preset", "tiny", "--data", data_dir, "--out", "r", "--total-tokens", "8k", "--eval-seqs", "16",
             "--checkpoint-tokens", "4k", "--progress-interval-s", "0", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("r: ")]
    assert lines and all(LINE.match(ln) for ln in lines), r.stderr
    tokens = [int(LINE.match(ln).group(1).replace(",", "")) for ln in lines]
    assert tokens == sorted(tokens) and tokens[-1] == 8000 and len(lines) >= 8  # one a step, the last at the end
    assert "ETA" in lines[0]
    r = _cli("branch", "--run", "r", "--at", "4k", "--k", "1,2", "--window-tokens", "1k", "--launcher", "inprocess",
             "--eval-seqs", "16", "--progress-interval-s", "0", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    sweep = [ln for ln in r.stderr.splitlines() if ln.startswith("sweep ")]
    assert [ln.split(" | ")[0].split(": ")[1] for ln in sweep] == ["1/2 branches (50%)", "2/2 branches (100%)"], r.stderr
    assert re.search(r"\| elapsed \d+s \| ETA \d+s$", sweep[0]), sweep
    r = _cli("train", "--preset", "tiny", "--data", data_dir, "--out", "q", "--total-tokens", "2k", "--eval-seqs", "16",
             "--no-progress", "--progress-interval-s", "0", cwd=tmp_path)
    assert r.returncode == 0 and "tokens/s |" not in r.stderr, r.stderr
