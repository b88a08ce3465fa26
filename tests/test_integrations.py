"""Handing a schedule to the trainers people use, tested against the real packages: Hugging Face
Trainer, OLMo-core's BatchSizeSchedulerCallback, Megatron's ramp-up calculator."""

import json
import math

import pytest
import torch

from critbatch.errors import ConfigError
from critbatch.schedules import BatchSchedule
from critbatch.schedules.export import schedule_document, to_megatron_rampup

T = 16


# ---- Hugging Face Trainer ----------------------------------------------------------------------

def _hf_run(tmp_path, spec, steps, noise_scale=False, n_seqs=512, attach=False, **args_over):
    transformers = pytest.importorskip("transformers")
    from critbatch.integrations.hf_trainer import BatchScheduleCallback

    torch.manual_seed(0)
    cfg = transformers.AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, vocab_size=257,
                                            max_position_embeddings=T, bos_token_id=None, eos_token_id=None,
                                            pad_token_id=None)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": x, "labels": x} for x in torch.randint(0, 257, (n_seqs, T), generator=g)]

    seen = {"batches": [], "lrs": [], "micro": 0}

    class Observe(transformers.TrainerCallback):
        """The Trainer's own view, independent of the schedule callback's bookkeeping."""

        def on_substep_end(self, args, state, control, **kw):
            seen["micro"] += 1

        def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kw):
            seen["lrs"].append(optimizer.param_groups[0]["lr"])

        def on_step_end(self, args, state, control, **kw):
            seen["batches"].append((seen["micro"] + 1) * args.per_device_train_batch_size)
            seen["micro"] = 0

    args = transformers.TrainingArguments(**{
        "output_dir": str(tmp_path / "hf"), "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1,
        "max_steps": steps, "learning_rate": 1e-3, "lr_scheduler_type": "constant", "warmup_steps": 0, "report_to": [],
        "save_strategy": "no", "logging_strategy": "no", "use_cpu": True, "max_grad_norm": 0.0,
        "dataloader_drop_last": True, "disable_tqdm": True, **args_over})
    cb = BatchScheduleCallback(BatchSchedule.parse(spec, T), noise_scale=noise_scale)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=([] if attach else [cb]) + [Observe()])
    if attach:
        cb.attach(trainer)
    trainer.train()
    return cb, seen, trainer


def test_hf_trainer_through_two_doublings(tmp_path):
    """2 -> 4 at 128 tokens -> 8 at 384 (both thresholds at step boundaries where the micro-batches so
    far divide the new accumulation): the batch and the LR of every step follow the schedule."""
    cb, seen, trainer = _hf_run(tmp_path, "0:2,128:4,384:8", 12, noise_scale=True)
    assert seen["batches"] == [2] * 4 + [4] * 4 + [8] * 4 and not cb.delays
    sched = BatchSchedule.parse("0:2,128:4,384:8", T)
    tokens = 0
    for b, lr, h in zip(seen["batches"], seen["lrs"], cb.history):
        assert b == sched.batch_seqs_at(tokens) == h["batch_seqs"] and h["tokens"] == tokens
        assert lr == pytest.approx(1e-3 * math.sqrt(b / 2), rel=1e-9)  # the sqrt rule, applied by the callback
        tokens += b * T
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)  # restored after each step
    logged = [r["gns/b_simple"] for r in trainer.state.log_history if "gns/b_simple" in r]
    assert len(logged) == 8 and all(math.isfinite(x) and x >= 0 for x in logged)  # steps with 2+ micro-batches


def test_hf_trainer_waits_for_an_aligned_step(tmp_path):
    """A threshold after 3 steps of batch 2: the Trainer counts micro-batches modulo the accumulation,
    so the doubling waits one step (3 micro-batches are not a multiple of 2) and says so."""
    cb, seen, _ = _hf_run(tmp_path, "0:2,96:4", 6)
    assert seen["batches"] == [2, 2, 2, 2, 4, 4]
    assert cb.delays == [{"tokens": 96, "accumulation": 2, "micro_batches_in_epoch": 3}]


def test_hf_callback_refuses_a_trainer_that_does_not_match(tmp_path):
    pytest.importorskip("transformers")
    with pytest.raises(ConfigError, match="not the schedule's first batch of 4"):
        _hf_run(tmp_path, "0:4,128:8", 2)
    with pytest.raises(ConfigError, match="falls from 4 to 2 sequences at 64 tokens"):  # epochs are counted at 2
        _hf_run(tmp_path, "0:2,32:4,64:2", 2)


def test_hf_trainer_across_epochs(tmp_path):
    """42 sequences = 21 micro-batches of 2 an epoch. The Trainer plans its epochs at the first
    accumulation (21 steps each); at batch 4 an epoch takes fewer. A run it would end before
    max_steps is refused, naming the max_steps it reaches; that one runs to its end, and the last
    step of each epoch (one micro-batch left: 2 sequences) gets the LR of 2 sequences, not of 4."""
    with pytest.raises(ConfigError, match=r"stop after 24 of max_steps=30 .* set max_steps=24, or give it more data"):
        _hf_run(tmp_path, "0:2,128:4", 30, n_seqs=42)
    cb, seen, trainer = _hf_run(tmp_path, "0:2,128:4", 24, n_seqs=42)
    assert trainer.state.global_step == 24
    assert seen["batches"] == [2] * 4 + [4] * 8 + [2] + [4] * 10 + [2]  # epoch 1: 4 + 8 + 1 steps; epoch 2: 10 + 1
    assert [h["batch_seqs"] for h in cb.history] == seen["batches"]
    assert seen["lrs"] == pytest.approx([1e-3 * math.sqrt(b / 2) for b in seen["batches"]], rel=1e-9)
    assert cb.tokens == 2 * 42 * T == sum(seen["batches"]) * T


def test_hf_trainer_logs_the_applied_batch_and_lr_to_its_sinks(tmp_path):
    """With the callback attached first, every training log record, in state.log_history and in the
    report_to sinks (TensorBoard here), carries the LR the optimizer applied and the step's batch."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cb, seen, trainer = _hf_run(tmp_path, "0:2,128:4,384:8", 12, attach=True, report_to=["tensorboard"],
                                logging_strategy="steps", logging_steps=1)
    logged = [r for r in trainer.state.log_history if "loss" in r]
    assert [r["batch_seqs"] for r in logged] == seen["batches"] == [2] * 4 + [4] * 4 + [8] * 4
    assert [r["learning_rate"] for r in logged] == pytest.approx(seen["lrs"], rel=1e-9)
    assert [r["base_learning_rate"] for r in logged] == pytest.approx([1e-3] * 12)
    assert [r["batch_tokens"] for r in logged] == [b * T for b in seen["batches"]]
    (events,) = {p.parent for p in (tmp_path / "hf").rglob("events.out.tfevents.*")}
    acc = EventAccumulator(str(events))
    acc.Reload()
    by_step = lambda tag: [(e.step, e.value) for e in acc.Scalars(tag)]  # noqa: E731
    assert by_step("train/batch_seqs") == [(i + 1, b) for i, b in enumerate(seen["batches"])]
    assert [v for _, v in by_step("train/learning_rate")] == pytest.approx(seen["lrs"], rel=1e-6)
    with pytest.warns(UserWarning, match=r"attach\(trainer\)"):  # passed in callbacks=[...]: the sinks ran first
        _hf_run(tmp_path / "b", "0:2", 1, report_to=["tensorboard"])


# ---- OLMo-core ---------------------------------------------------------------------------------

def test_olmo_core_decodes_the_export_and_the_helper_builds_the_callback():
    pytest.importorskip("olmo_core")
    from olmo_core.config import decode
    from olmo_core.train.callbacks import BatchSizeSchedulerCallback
    from olmo_core.train.common import Duration

    from critbatch.integrations.olmo_core import callback, callback_config

    s = BatchSchedule.parse("0:1024,168B:2048,503B:4096", seq_len=4096)
    doc = json.loads(json.dumps(schedule_document(s)))  # as written to schedule.json
    cb = decode(BatchSizeSchedulerCallback, doc["exports"]["olmo_core_batch_size_scheduler"])  # OLMo-core's decoding
    assert isinstance(cb, BatchSizeSchedulerCallback)
    assert cb.batch_sizes == [1024 * 4096, 2048 * 4096, 4096 * 4096]
    assert cb.schedule == [Duration.tokens(0), Duration.tokens(168 * 10**9), Duration.tokens(503 * 10**9)]
    built = callback(s)  # the object itself, for configs built in Python
    assert isinstance(built, BatchSizeSchedulerCallback) and built.schedule == cb.schedule
    assert callback_config(s, with_class=True)["_CLASS_"] == "olmo_core.train.callbacks.BatchSizeSchedulerCallback"
    with pytest.raises(AttributeError):  # the plain export is data, not Durations: decode it, or use the helper
        BatchSizeSchedulerCallback(**doc["exports"]["olmo_core_batch_size_scheduler"])
    with pytest.raises(ConfigError, match="rescales the LR by sqrt"):
        callback(BatchSchedule.parse("0:8,100:16", seq_len=64, rule="linear"))


# ---- Megatron-LM ---------------------------------------------------------------------------------

def test_megatron_rampup_drives_the_real_calculator_to_the_schedule():
    pytest.importorskip("megatron.core")
    from critbatch.integrations.megatron import rampup_calculator

    for spec in ("0:8,51200:16", "0:8,64000:12,128000:16,192000:20"):  # one doubling; a linear ramp
        s = BatchSchedule.parse(spec, seq_len=64)
        calc = rampup_calculator(s, micro_batch_size=4)
        consumed = 0
        for _ in range(400):
            calc.update(consumed, consistency_check=True)
            b = calc.get_current_global_batch_size()
            assert b == s.batch_seqs_at(consumed * 64), (spec, consumed)
            consumed += b
    args, _ = to_megatron_rampup(BatchSchedule.parse("0:8,51200:16", seq_len=64))
    assert args == "--rampup-batch-size 8 8 800 --global-batch-size 16"


@pytest.mark.parametrize("spec,why", [
    ("0:8,64000:16,128000:32", "cannot be expressed"),  # two doublings: increments 8 and 16
    ("0:8,64000:16,100032:24", "equal intervals"),
])
def test_megatron_rampup_says_when_it_cannot(spec, why):
    args, reason = to_megatron_rampup(BatchSchedule.parse(spec, seq_len=64))
    assert args is None and why in reason
    doc = schedule_document(BatchSchedule.parse(spec, seq_len=64))
    assert doc["exports"]["megatron_rampup_batch_size"] is None and why in doc["exports"]["megatron_rampup_note"]
    assert "without --global-batch-size" in doc["exports"]["megatron_note"] and "0.18" in doc["exports"]["megatron_note"]


# ---- a schedule measured on a proxy, handed to the target ----------------------------------------

def test_rescale_to_the_target_sequence_length_and_granularity(tmp_path, capsys):
    s = BatchSchedule.parse("0:64,1M:128,4M:256", seq_len=64)  # measured at sequence 64
    r = s.rescaled(1024, granularity=4)
    assert r.phases == ((0, 4), (1_000_448, 8), (4_000_768, 16)) and r.seq_len == 1024
    assert [b * 1024 for _, b in r.phases] == [b * 64 for _, b in s.phases]  # the same tokens a step
    assert r.lr_multiplier_at(5_000_000) == s.lr_multiplier_at(5_000_000)
    with pytest.raises(ConfigError, match="not a multiple of the granularity 8"):
        s.rescaled(1024, granularity=8)
    with pytest.raises(ConfigError, match="not a whole number of 3000-token sequences"):
        s.rescaled(3000)
    from critbatch.cli import main

    sweep = tmp_path / "sw"
    sweep.mkdir()
    (sweep / "cbs.json").write_text(json.dumps({
        "seq_len": 64, "lr_rule": "sqrt", "decide_by": "eval", "rule": "eps", "fit": None,
        "points": [{"tokens": 1_000_000, "cbs_low_seqs": 128, "cbs_high_seqs": 256, "base_batch_seqs": 64}]}))
    assert main(["schedule", "--sweep", str(sweep), "--out", str(tmp_path / "s.json"), "--target-seq-len", "1024",
                 "--target-granularity", "4"]) == 0
    doc = json.loads((tmp_path / "s.json").read_text())
    assert doc["seq_len"] == 1024 and [p["batch_seqs"] for p in doc["phases"]] == [4, 8]
    assert main(["schedule", "--sweep", str(sweep), "--out", str(tmp_path / "t.json"), "--target-seq-len", "1024",
                 "--target-granularity", "3"]) == 2
    assert "granularity 3" in capsys.readouterr().err and not (tmp_path / "t.json").exists()
