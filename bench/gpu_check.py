"""One-GPU throughput check: tokens/s per GPU and MFU of plain PyTorch loops beside critbatch's Trainer.

Measured side by side, each in this one process, one after the other:

* the ``small`` preset's shape (10.8M parameters at vocabulary 8192: d=384, 6 layers, sequence 256) at
  32 and at 256 sequences a step:
    - ``plain_eager``: a minimal loop written here (``build_model`` + ``loss_sum`` + ``torch.optim.AdamW``
      with default options, bf16 autocast on CUDA, fp32 on CPU, random tokens already on the device);
    - ``plain_compiled_fused``: the same with ``torch.compile(model)`` and ``AdamW(fused=True)`` (CUDA
      only). The compiled loop calls the compiled module's forward and takes the same summed
      cross-entropy as ``loss_sum`` outside it, as the Trainer does: ``compiled.loss_sum`` would run the
      original, uncompiled forward;
    - ``trainer_eager`` / ``trainer_compiled``: ``critbatch.train.Trainer`` on the SOTU corpus in bytes
      (``critbatch.data.prepare``), with no evaluation or checkpoint inside the run (one 8-sequence
      evaluation after it), compile off and on (on: CUDA only). Its model's vocabulary is the data's,
      257 (``model.vocab_size`` left None), unless ``--trainer-vocab match`` gives it the plain loops'
      (8192; 50257 for GPT-2): then the two run the same model, tokens/s compare directly, and the
      Trainer's compile is the plain loop's graph again, served by Inductor's cache (seconds, not a
      second full compile). Its ``result.json`` holds ``tokens_per_s`` over the
      whole training loop, warm-up and compilation included (it has no MFU field), so the check also
      times the steps after the warm-up with a callback; ``tokens_per_s_per_gpu`` and ``mfu`` are those,
      ``result_json`` holds what result.json says (and the MFU that is);
* ``small_b32_trainer_stacked8``: critbatch's path for a sweep's branches of one shape, 8 Trainers at 32
  sequences a step (each its own seed and stream window) stepped together as one stacked model
  (``critbatch.train.stacked``: one vmapped forward and backward, each run's own AdamW); tokens/s of
  the 8 together;
* the GPT-2 small shape (124M parameters: d=768, 12 layers, sequence 1024, vocabulary 50257) at 32
  sequences a step: plain eager, plain compiled + fused AdamW, and the Trainer compiled when the
  budget allows;
* ``sweep_branch_tokens_over_base``: a short base run of the ``tiny`` preset with two kept checkpoints
  and an adaptive branch sweep from them (k from 0.5 to 8, in process): the sweep's branch tokens over
  the base run's tokens.

MFU is tokens/s x training FLOPs per token (``critbatch.model.flops_per_token``) over the GPU's dense
bf16 peak (``critbatch.perf.peak_flops``; ``CRITBATCH_PEAK_FLOPS`` overrides); on CPU over the fp32
matmul rate measured here (``peak_source`` says which). Each measurement warms up for a few steps
(the first compiles when compiled) and then times steps for ``--measure-s`` seconds. Measurements run
in order of importance; one whose estimated cost (compilation included) would take the script past
``--budget-s`` is skipped and listed under ``skipped``. The JSON (``--out``) is rewritten after every
measurement, so a killed run leaves what it measured (``status`` and ``in_progress`` say where it
stopped); a measurement that fails is listed under ``errors`` and the script exits 1 at the end.

On one CUDA GPU (under 4 minutes: ``--budget-s``, default 230, bounds it; the compiles take most of it):

    python bench/gpu_check.py                                  # -> runs/gpu-check/gpu_check.json
    python bench/gpu_check.py --trainer-vocab match            # the Trainer on the plain loops' model
    python bench/gpu_check.py --only gpt2 --out runs/gpu-check/gpt2.json   # a second pass: what was skipped

On CPU only as a smoke test, with shrunk models (2 layers, d=64, sequence 32 or 64, batches 4, 16 and
2) and no compilation (~20 s on one thread):

    OMP_NUM_THREADS=1 python bench/gpu_check.py --quick --device cpu --out /tmp/gpu_check.json
"""

from __future__ import annotations

import time

T_START = time.perf_counter()  # the script's wall time counts imports and CUDA start-up too

import argparse  # noqa: E402
import contextlib  # noqa: E402
import gc  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

# The shapes measured, and the shrunk ones of --quick (CPU-sized).
SMALL_BATCHES, QUICK_SMALL_BATCHES = (32, 256), (4, 16)
GPT2_BATCH, QUICK_GPT2_BATCH = 32, 2
QUICK_SHAPES = {"small": {"n_layer": 2, "n_head": 2, "d_model": 64, "seq_len": 32},
                "gpt2-small": {"n_layer": 2, "n_head": 2, "d_model": 64, "seq_len": 64}}
VOCAB = {"small": 8192, "gpt2-small": 50257}
WARMUP_STEPS = 3  # the first step of a compiled loop compiles it
MIN_TIMED_STEPS = 3

# Estimated seconds a measurement needs beyond --measure-s (build, warm-up; compilation on a GPU),
# for the budget check; compile estimates follow what the first compile of this run took.
SETUP_EST = {"plain": 4.0, "trainer": 6.0, "stacked": 12.0}
STACK = 8  # runs stacked into one model by the stacked measurement (critbatch.train.stacked; a sweep's default on CUDA)
COMPILE_EST = {"small": 45.0, "gpt2-small": 75.0}
GPT2_OVER_SMALL_COMPILE = 1.5  # GPT-2 small's compile over the small model's, once that one was timed
CACHED_COMPILE_FRACTION = 0.3  # a graph compiled before in the run: Dynamo traces it again, Inductor's cache has it
SWEEP_EST = 30.0
BYTES_VOCAB = 257  # the prepared bytes' vocabulary: the Trainer's model's with --trainer-vocab data


def plan(quick: bool) -> list[dict]:
    """The measurements, most important first (the budget check skips from wherever it runs out)."""
    b1, b2 = QUICK_SMALL_BATCHES if quick else SMALL_BATCHES
    g = QUICK_GPT2_BATCH if quick else GPT2_BATCH

    def m(model, batch, loop, compiled):
        short = "gpt2" if model == "gpt2-small" else model
        kind = {("plain", False): "plain_eager", ("plain", True): "plain_compiled_fused",
                ("trainer", False): "trainer_eager", ("trainer", True): "trainer_compiled"}[loop, compiled]
        return {"name": f"{short}_b{batch}_{kind}", "model": model, "batch_seqs": batch, "loop": loop,
                "compile": compiled}

    stacked = {"name": f"small_b{b1}_trainer_stacked{STACK}", "model": "small", "batch_seqs": b1, "loop": "stacked",
               "compile": False}
    return [m("small", b1, "plain", False), m("small", b2, "plain", False),
            m("small", b1, "trainer", False), stacked, m("small", b2, "trainer", False),
            m("gpt2-small", g, "plain", False),
            {"name": "sweep", "loop": "sweep", "compile": False},
            m("small", b1, "plain", True), m("small", b1, "trainer", True),
            m("gpt2-small", g, "plain", True),
            m("small", b2, "plain", True), m("small", b2, "trainer", True),
            m("gpt2-small", g, "trainer", True)]  # optional: last


def trainer_vocab_size(arg: str, model: str) -> int | None:
    """The Trainer model's ``vocab_size`` for ``--trainer-vocab``: None (the data's), the plain loops', or a number."""
    return None if arg == "data" else VOCAB[model] if arg == "match" else int(arg)


def model_config(name: str, quick: bool, vocab: int | None):
    """The preset's model config (shrunk with --quick) with ``vocab`` set."""
    from critbatch import presets
    from critbatch.config import merge

    return merge(presets.get(name).model, {**(QUICK_SHAPES[name] if quick else {}), "vocab_size": vocab})


def shape_fields(mcfg) -> dict:
    from critbatch.model import count_params, flops_per_token

    return {"params": count_params(mcfg), "n_layer": mcfg.n_layer, "d_model": mcfg.d_model, "n_head": mcfg.n_head,
            "seq_len": mcfg.seq_len, "vocab_size": mcfg.vocab_size, "flops_per_token": flops_per_token(mcfg)}


def cleanup(torch, device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def plain_loop(torch, spec: dict, device, quick: bool, measure_s: float) -> dict:
    """A minimal training loop: random tokens on the device, AdamW, bf16 autocast on CUDA."""
    import torch.nn.functional as F

    from critbatch.model import build_model

    cuda = device.type == "cuda"
    mcfg = model_config(spec["model"], quick, VOCAB[spec["model"]])
    B, T, V = spec["batch_seqs"], mcfg.seq_len, mcfg.vocab_size
    t_setup = time.perf_counter()
    torch.manual_seed(0)
    model = build_model(mcfg).to(device)
    model.train()
    fused = spec["compile"] and cuda
    opt = torch.optim.AdamW(model.parameters(), **({"fused": True} if fused else {}))
    compiled = torch.compile(model, dynamic=False) if spec["compile"] else None
    data = [torch.randint(0, V, (B, T + 1), device=device) for _ in range(4)]
    n_tok = B * T

    def amp():
        return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    def step(i: int):
        seqs = data[i % len(data)]
        if compiled is None:
            with amp():
                loss = model.loss_sum(seqs)
        else:
            with amp():
                logits = compiled(seqs[:, :-1])
            loss = F.cross_entropy(logits.float().flatten(0, 1), seqs[:, 1:].flatten(), reduction="sum")
        (loss / n_tok).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t = time.perf_counter()
    step(0)
    sync()
    first_step_s = time.perf_counter() - t
    for i in range(1, WARMUP_STEPS):
        step(i)
    sync()
    setup_s = time.perf_counter() - t_setup
    n, t0 = 0, time.perf_counter()
    while True:
        loss = step(n)
        n += 1
        if n >= MIN_TIMED_STEPS and time.perf_counter() - t0 >= measure_s:
            break
    sync()
    dt = time.perf_counter() - t0
    out = {**shape_fields(mcfg), "batch_seqs": B, "tokens_per_step": n_tok,
           "precision": "bf16-autocast" if cuda else "fp32", "compile": bool(spec["compile"]), "fused_adamw": fused,
           "grad_clip": None, "data": "random tokens on the device",
           "warmup_steps": WARMUP_STEPS, "first_step_s": first_step_s, "setup_s": setup_s, "timed_steps": n,
           "timed_s": dt, "tokens_per_s_per_gpu": n * n_tok / dt, "final_loss": float(loss.item()) / n_tok}
    if cuda:
        out["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out  # the model, optimizer and data go with this frame


def trainer_loop(torch, spec: dict, device, quick: bool, measure_s: float, data_dir: Path, work: Path,
                 trainer_vocab: str, est_tokens_per_s: float | None) -> dict:
    """critbatch's Trainer on prepared data, without evaluation or checkpoints inside the run; steps
    after the warm-up are timed by a callback, which also ends the run after ``measure_s``."""
    from critbatch import presets
    from critbatch.config import merge
    from critbatch.io import read_json
    from critbatch.train import Callback, Trainer

    cuda = device.type == "cuda"

    class StepTimer(Callback):
        """Times the steps after the warm-up; once ``measure_s`` has passed it lowers the run's
        ``total_tokens`` to the tokens trained, so the loop stops at this boundary and finishes normally.
        No synchronisation of its own: every Trainer step reads its loss and gradient norm on the host
        before the optimizer step, so a step's end lags the GPU by at most one optimizer step, at the
        start of the timed span as at its end."""

        name = "gpu-check-timer"

        def __init__(self):
            self.steps, self.t0, self.tok0, self.t1, self.tok1 = 0, None, None, None, None
            self.stopped_by = "the safety cap on total_tokens"

        def on_step_end(self, trainer, record):
            self.steps += 1
            now = time.perf_counter()
            if self.steps == WARMUP_STEPS:
                self.t0, self.tok0 = now, trainer.tokens
            elif self.steps > WARMUP_STEPS:
                self.t1, self.tok1 = now, trainer.tokens
                if self.steps - WARMUP_STEPS >= MIN_TIMED_STEPS and now - self.t0 >= measure_s:
                    trainer.cfg.total_tokens = trainer.tokens
                    self.stopped_by = "time"

    base = presets.get(spec["model"])
    vocab = trainer_vocab_size(trainer_vocab, spec["model"])
    shape = QUICK_SHAPES[spec["model"]] if quick else {}
    B, T = spec["batch_seqs"], (shape.get("seq_len") or base.model.seq_len)
    # a safety cap in case the timer could not stop the run: 20x the steps the plain loop's rate
    # predicts (the Trainer's model may have the smaller vocabulary of the data, so run faster)
    est_steps = (est_tokens_per_s or 0) * measure_s / (B * T)
    cap_steps = WARMUP_STEPS + max(100, int(20 * est_steps) if est_steps else 20_000)
    cfg = merge(base, {
        "model": {**shape, "vocab_size": vocab},
        "data": {"path": str(data_dir), "allow_repeat": True},
        "total_tokens": cap_steps * B * T, "batch_seqs": B, "micro_batch_seqs": None, "batch_schedule": None,
        "checkpoint_tokens": [], "eval_seqs": 8, "eval_interval_tokens": 0, "save_interval_tokens": 10**15,
        "device": str(device), "precision": "auto", "compile": bool(spec["compile"]),
    })
    run_dir = work / spec["name"]
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a finished run directory would be returned as it is
    timer = StepTimer()
    t_setup = time.perf_counter()
    tr = Trainer(cfg, run_dir, callbacks=[timer], progress=False, quiet=True, eval_at_start=False,
                 keep_final_checkpoint=False)
    tr.run()
    res = read_json(run_dir / "result.json")
    if timer.t1 is None:
        raise RuntimeError(f"the run ended after {timer.steps} steps, before any timed step")
    dt, n = timer.t1 - timer.t0, timer.steps - WARMUP_STEPS
    mc = tr.cfg.model
    out = {**shape_fields(mc),
           "vocab_from": "data (model.vocab_size left None)" if vocab is None else f"--trainer-vocab {trainer_vocab}",
           "batch_seqs": B, "tokens_per_step": B * T, "precision": "bf16-autocast" if cuda else "fp32",
           "compile": bool(spec["compile"]), "fused_adamw": cuda and tr.cfg.optim.name == "adamw",
           "grad_clip": tr.cfg.optim.max_grad_norm, "data": f"{data_dir.name} (prepared, read by the Trainer's stream)",
           "warmup_steps": WARMUP_STEPS, "setup_s": (timer.t0 - t_setup), "timed_steps": n, "timed_s": dt,
           "stopped_by": timer.stopped_by,
           "tokens_per_s_per_gpu": (timer.tok1 - timer.tok0) / dt, "final_loss": res.get("final_train_loss_last_step"),
           "result_json": {k: res.get(k) for k in ("tokens", "steps", "wall_time_s", "tokens_per_s", "flops_per_token",
                                                    "params", "final_eval_loss")}}
    if cuda:
        out["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    del tr
    return out


def stacked_loop(torch, spec: dict, device, quick: bool, measure_s: float, data_dir: Path, work: Path,
                 trainer_vocab: str) -> dict:
    """critbatch's path for sweeps of a small model: STACK Trainers of one shape (each its own run,
    seed and stream window, as a sweep's replicates) stepped together as one stacked model by
    :class:`critbatch.train.stacked.Stack`; tokens/s of all of them together, steps after the warm-up."""
    from critbatch import presets
    from critbatch.config import merge
    from critbatch.train import Trainer
    from critbatch.train.stacked import Stack

    base = presets.get(spec["model"])
    vocab = trainer_vocab_size(trainer_vocab, spec["model"])
    shape = QUICK_SHAPES[spec["model"]] if quick else {}
    B, T = spec["batch_seqs"], (shape.get("seq_len") or base.model.seq_len)
    trainers = []
    t_setup = time.perf_counter()
    for i in range(STACK):
        cfg = merge(base, {
            "model": {**shape, "vocab_size": vocab}, "seed": i,
            "data": {"path": str(data_dir), "allow_repeat": True, "stream_shift_seqs": i * 4096},
            "total_tokens": 10**12, "batch_seqs": B, "micro_batch_seqs": None, "batch_schedule": None,
            "checkpoint_tokens": [], "eval_seqs": 8, "eval_interval_tokens": 0, "save_interval_tokens": 10**15,
            "device": str(device), "precision": "auto", "compile": False})
        run_dir = work / f"{spec['name']}_{i}"
        if run_dir.exists():
            shutil.rmtree(run_dir)
        tr = Trainer(cfg, run_dir, progress=False, quiet=True, eval_at_start=False, keep_final_checkpoint=False)
        tr.begin()
        trainers.append(tr)
    stack = Stack(trainers)
    steps, t0, tok0 = 0, None, 0
    while True:
        plans = [t.plan_step() for t in trainers]
        for t, plan, r in zip(trainers, plans, stack.step(plans)):
            t.after_step(plan, *r)
        steps += 1
        if steps == WARMUP_STEPS:
            t0, tok0 = time.perf_counter(), sum(t.tokens for t in trainers)
        elif steps > WARMUP_STEPS and steps - WARMUP_STEPS >= MIN_TIMED_STEPS and time.perf_counter() - t0 >= measure_s:
            break
    dt = time.perf_counter() - t0
    tokens = sum(t.tokens for t in trainers) - tok0
    mc = trainers[0].cfg.model
    out = {**shape_fields(mc), "runs_stacked": STACK, "batch_seqs": B, "tokens_per_step": STACK * B * T,
           "precision": "bf16-autocast" if device.type == "cuda" else "fp32", "compile": False,
           "fused_adamw": device.type == "cuda", "grad_clip": trainers[0].cfg.optim.max_grad_norm,
           "warmup_steps": WARMUP_STEPS, "setup_s": t0 - t_setup, "timed_steps": steps - WARMUP_STEPS, "timed_s": dt,
           "tokens_per_s_per_gpu": tokens / dt, "final_loss": trainers[0].state.last_loss}
    if device.type == "cuda":
        out["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    del stack, trainers
    return out


def sweep_ratio(torch, device, work: Path, data_dir: Path) -> dict:
    """A short tiny-preset base run with two kept checkpoints (and the two before its k = 1 branches'
    cooldowns, which those branches start from) and an adaptive branch sweep from them."""
    from critbatch import presets
    from critbatch.branch import SweepConfig, run_sweep
    from critbatch.branch import continuation_checkpoints
    from critbatch.config import merge
    from critbatch.train import train

    base_tokens, at, window = 16_384, [4096, 8192], 4096  # tiny: 8 x 64 = 512 tokens a step; k=8 is 64 seqs = 4096
    run = work / "sweep_base"
    if run.exists():
        shutil.rmtree(run)
    tiny = presets.get("tiny")
    keep = continuation_checkpoints(at, window, 0.25, tiny.batch_seqs * tiny.model.seq_len)
    cfg = merge(tiny, {"total_tokens": base_tokens, "checkpoint_tokens": at + keep, "eval_seqs": 64,
                       "eval_interval_tokens": 0, "save_interval_tokens": base_tokens,
                       "device": str(device), "data": {"path": str(data_dir)}})
    t = time.perf_counter()
    base = train(cfg, run, progress=False, quiet=True)
    base_s = time.perf_counter() - t
    t = time.perf_counter()
    res = run_sweep(SweepConfig(run=str(run), at=at, window_tokens=window, search="adaptive", k_min=0.5, k_max=8,
                                launcher="inprocess", device=str(device), eval_seqs=64), progress=False)
    sweep_s = time.perf_counter() - t
    cost = res.curve["cost"]
    return {"preset": "tiny", "base_tokens": base["tokens"], "base_batch_seqs": cfg.batch_seqs, "at": at,
            "window_tokens": res.curve["window_tokens"], "k_min": 0.5, "k_max": 8, "search": "adaptive",
            "launcher": "inprocess", "branches": cost["branches"], "branch_tokens": cost["branch_tokens"],
            "tokens_from_base": cost.get("tokens_from_base", 0),
            "full_grid_branch_tokens": cost.get("full_grid_branch_tokens"),
            "ks_probed": {str(p["tokens"]): p["ks"] for p in res.curve["points"]},
            "base_s": base_s, "sweep_s": sweep_s, "branch_tokens_over_base": cost["branch_tokens"] / base["tokens"],
            "stacking": cost.get("stacking"), "trained": cost.get("trained")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/gpu-check/gpu_check.json", help="the JSON written (parents are created)")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--quick", action="store_true", help="CPU-sized smoke run: shrunk models, no compile")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="wall seconds for the whole script; measurements that would pass it are skipped "
                         "(default 230 on a GPU, 90 with --quick)")
    ap.add_argument("--measure-s", type=float, default=None,
                    help="timed seconds per measurement after its warm-up (default 3; 0.5 with --quick)")
    ap.add_argument("--work", default=None, help="run directories and prepared data (default: WORK next to --out)")
    ap.add_argument("--trainer-vocab", default="data",
                    help="the Trainer model's vocabulary: 'data' (the prepared bytes', 257), 'match' (the plain "
                         "loops': 8192 small, 50257 GPT-2) or a number")
    ap.add_argument("--only", default=None,
                    help="comma-separated substrings of measurement names to run (e.g. 'gpt2,sweep')")
    a = ap.parse_args()

    import torch

    torch.set_flush_denormal(True)
    cuda_ok = torch.cuda.is_available()
    dev_name = "cuda" if a.device == "cuda" or (a.device == "auto" and cuda_ok) else "cpu"
    if dev_name == "cuda" and not cuda_ok:
        raise SystemExit("gpu_check: --device cuda, but torch sees no CUDA device")
    if dev_name == "cpu" and not a.quick:
        raise SystemExit("gpu_check: no GPU in use: this check needs a CUDA GPU, or --quick for a CPU smoke run")
    device = torch.device(dev_name)
    cuda = device.type == "cuda"

    from critbatch.data import prepare
    from critbatch.io import write_json_atomic
    from critbatch.perf import matmul_flops, peak_flops
    from critbatch.version import __version__

    budget = a.budget_s if a.budget_s is not None else (90.0 if a.quick else 230.0)
    measure_s = a.measure_s if a.measure_s is not None else (0.5 if a.quick else 3.0)
    if a.trainer_vocab not in ("data", "match") and not a.trainer_vocab.isdigit():
        raise SystemExit(f"gpu_check: --trainer-vocab {a.trainer_vocab!r} is not 'data', 'match' or a number")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(a.work) if a.work else out.parent / "work"
    work.mkdir(parents=True, exist_ok=True)

    def elapsed() -> float:
        return time.perf_counter() - T_START

    if cuda:
        torch.cuda.init()
        peak = peak_flops(device)
        source = f"dense bf16 peak of {torch.cuda.get_device_name(device)} (critbatch.perf.peak_flops)"
        if peak is None:
            peak, source = matmul_flops("cuda"), "measured fp32 2048^2 matmul (GPU not in critbatch.perf's table)"
    else:
        threads = torch.get_num_threads()
        peak = max(matmul_flops("cpu", threads) for _ in range(2))  # the better of two: other load only slows it
        source = (f"measured fp32 2048^2 matmul on {threads} CPU thread(s), best of 2 (critbatch.perf.matmul_flops; "
                  f"no vendor peak on CPU)")

    doc = {"script": "bench/gpu_check.py", "argv": sys.argv[1:], "quick": a.quick, "status": "running",
           "in_progress": None, "device": dev_name,
           "device_name": torch.cuda.get_device_name(device) if cuda else (platform.processor() or platform.machine()),
           "torch": torch.__version__, "cuda_version": torch.version.cuda, "critbatch": __version__,
           "torch_threads": torch.get_num_threads(), "peak_flops": peak, "peak_source": source,
           "budget_s": budget, "measure_s": measure_s, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "wall_s": elapsed(), "measurements": {}, "skipped": {}, "errors": {},
           "notes": ["tokens_per_s_per_gpu: one process on one device, steps after the warm-up only",
                     "mfu = tokens_per_s_per_gpu x flops_per_token / peak_flops",
                     "plain loops: no gradient clipping, no per-step host sync; the Trainer clips to "
                     "optim.max_grad_norm and reads the loss and the gradient norm on the host every step"]}

    def save() -> None:
        doc["wall_s"] = elapsed()
        write_json_atomic(out, doc)

    def on_term(signum, _frame):  # a run killed by its time limit still says where it was
        doc["status"] = f"killed by {signal.Signals(signum).name}"
        save()
        raise SystemExit(128 + signum)

    if cuda:
        doc["gpu_memory_gb"] = torch.cuda.get_device_properties(device).total_memory / 2**30
    signal.signal(signal.SIGTERM, on_term)
    save()
    print(f"gpu_check on {doc['device_name']} ({dev_name}), torch {torch.__version__}, critbatch {__version__}; "
          f"peak {peak / 1e12:.4g} TFLOP/s ({source}); budget {budget:.0f}s, {measure_s:g}s timed per measurement",
          flush=True)

    t = time.perf_counter()
    data_dir = prepare(work / "data" / "sotu-bytes", corpus="sotu", tokenizer="bytes", quiet=True)
    doc["data"] = {"path": str(data_dir), "corpus": "sotu", "tokenizer": "bytes", "prepare_s": time.perf_counter() - t}

    compile_seen: dict[str, float] = {}  # model -> the setup seconds of its first compiled measurement
    compiled_shapes: set[tuple] = set()  # (model, batch, vocabulary) compiled in this run

    def model_vocab(spec: dict) -> int:
        if spec["loop"] == "plain":
            return VOCAB[spec["model"]]
        return trainer_vocab_size(a.trainer_vocab, spec["model"]) or BYTES_VOCAB

    only = [s.strip() for s in a.only.split(",") if s.strip()] if a.only else None
    for spec in plan(a.quick):
        name = spec["name"]
        if only and not any(s in name for s in only):
            continue
        if spec["compile"] and not cuda:
            doc["skipped"][name] = "torch.compile is measured on CUDA only"
            continue
        if spec["loop"] == "sweep":
            est = SWEEP_EST if cuda else 20.0
        else:
            est = measure_s + SETUP_EST[spec["loop"]] * (3 if spec["model"] == "gpt2-small" else 1)
            if spec["compile"]:
                small = compile_seen.get("small")
                full = compile_seen.get(spec["model"]) or (
                    GPT2_OVER_SMALL_COMPILE * small if spec["model"] == "gpt2-small" and small
                    else COMPILE_EST[spec["model"]])
                # the same graph compiled before in this run comes from Inductor's on-disk cache
                same = (spec["model"], spec["batch_seqs"], model_vocab(spec)) in compiled_shapes
                est += CACHED_COMPILE_FRACTION * full if same else full
        left = budget - elapsed()
        if est > left:
            doc["skipped"][name] = f"budget: {left:.0f}s left, about {est:.0f}s needed"
            print(f"  skip {name}: {doc['skipped'][name]}", flush=True)
            save()
            continue
        doc["in_progress"] = name
        save()
        print(f"  {name} ...", flush=True)
        t = time.perf_counter()
        try:
            if spec["loop"] == "sweep":
                r = sweep_ratio(torch, device, work, data_dir)
                r["wall_s"], r["estimated_s"] = time.perf_counter() - t, est
                doc["sweep"] = r
                doc["sweep_branch_tokens_over_base"] = r["branch_tokens_over_base"]
            else:
                if spec["loop"] == "plain":
                    r = plain_loop(torch, spec, device, a.quick, measure_s)
                elif spec["loop"] == "stacked":
                    r = stacked_loop(torch, spec, device, a.quick, measure_s, data_dir, work, a.trainer_vocab)
                else:
                    eager = doc["measurements"].get(f"{name.rsplit('_trainer_', 1)[0]}_plain_eager", {})
                    r = trainer_loop(torch, spec, device, a.quick, measure_s, data_dir, work, a.trainer_vocab,
                                     eager.get("tokens_per_s_per_gpu"))
                r = {"model": spec["model"], "loop": spec["loop"], **r}
                r["mfu"] = r["tokens_per_s_per_gpu"] * r["flops_per_token"] / peak
                if "result_json" in r and r["result_json"].get("tokens_per_s"):
                    r["result_json"]["mfu"] = r["result_json"]["tokens_per_s"] * r["flops_per_token"] / peak
                r["wall_s"], r["estimated_s"] = time.perf_counter() - t, est
                if spec["compile"]:
                    if (spec["model"], spec["batch_seqs"], model_vocab(spec)) not in compiled_shapes:
                        compile_seen.setdefault(spec["model"], r["setup_s"])  # a full compile's time
                    compiled_shapes.add((spec["model"], spec["batch_seqs"], model_vocab(spec)))
                doc["measurements"][name] = r
        except Exception as e:  # noqa: BLE001 - one failure (OOM, a compile error) must not lose the others
            doc["errors"][name] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            print(f"  {name} FAILED: {doc['errors'][name]}", flush=True)
        finally:
            if spec["compile"]:
                torch._dynamo.reset()  # no automatic dynamic shapes or cache limits carried to the next one
            cleanup(torch, device)
        doc["in_progress"] = None
        save()

    doc["status"] = "complete"
    save()
    print(f"\n{'measurement':34s} {'batch':>5s} {'tok/s per GPU':>14s} {'MFU':>7s} {'steps':>6s} {'setup s':>8s} "
          f"{'wall s':>7s}")
    for name, r in doc["measurements"].items():
        print(f"{name:34s} {r['batch_seqs']:5d} {r['tokens_per_s_per_gpu']:14,.0f} {r['mfu']:7.2%} "
              f"{r['timed_steps']:6d} {r['setup_s']:8.1f} {r['wall_s']:7.1f}")
    if "sweep" in doc:
        s = doc["sweep"]
        print(f"sweep_branch_tokens_over_base: {s['branch_tokens']:,} / {s['base_tokens']:,} = "
              f"{s['branch_tokens_over_base']:.3g} ({s['branches']} branches, {s['wall_s']:.1f}s)")
    for name, why in doc["skipped"].items():
        print(f"skipped {name}: {why}")
    for name, why in doc["errors"].items():
        print(f"ERROR {name}: {why}")
    print(f"MFU against {peak / 1e12:.4g} TFLOP/s ({source}); total {doc['wall_s']:.1f}s -> {out}")
    if doc["errors"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
