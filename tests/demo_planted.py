"""Planted stages for tests/test_demo_stages.py, in a module of their own so that the processes the
demo spawns for them import nothing heavy (no torch): each logs when it started and ended, sleeps,
and fails or dies where a marker file in the demo's directory says so."""

import json
import os
import time
from pathlib import Path

SLEEP = {"base": 0.5, "autobatch": 60.0, "sweep": 0.1, "gns": 0.1, "compare": 0.1}
"""The closed loop outlasts the failing sweep by far: the failure must stop it."""


def log(out: Path, name: str, event: str) -> None:
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps({"stage": name, "event": event, "t": time.time()}) + "\n")


def planted(name: str, config: dict, artifacts: dict, conn) -> None:
    out = Path(config["out"])
    log(out, name, "start")
    log(out, f"{name} niceness {os.nice(0)}", "note")
    if (out / f"fail-{name}").exists():
        conn.send(("error", ValueError(f"planted failure of {name}")))
        return
    time.sleep(SLEEP[name] if not (out / "fast").exists() else 0.05)
    log(out, name, "end")
    if name == "compare":  # what the stages before it handed on reaches it
        log(out, f"compare saw {artifacts}", "note")
    conn.send(("ok", SLEEP[name], 0.0, {"sweep_dir": "base/sweeps/x"} if name == "sweep" else {}))


def schedule(cfg, threads, artifacts: dict) -> dict:
    """The inline stage, in the demo's own process: it reads the sweep's artifact."""
    log(Path(cfg.out), "schedule", "start")
    return {"schedule_from": artifacts["sweep_dir"]}


def exits(name: str, config: dict, artifacts: dict, conn) -> None:
    if name == "autobatch":
        time.sleep(5)
    os._exit(3)
