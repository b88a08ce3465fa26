"""Extending critbatch from outside the package, as docs/guide.md ("Extending critbatch") shows: a
model family, a decision rule and a training callback, each registered in one call and then used by
the ordinary entry points (config validation, the trainer, a sweep, a job, the command line)."""

import dataclasses

import pytest
import torch
import torch.nn as nn

from conftest import fresh_parent, small_cfg
from critbatch.analysis.decision import PASS, RULES, DecisionRule, finish_decision
from critbatch.branch import SweepConfig, run_sweep
from critbatch.config import ModelConfig, validate
from critbatch.errors import ConfigError
from critbatch.io import read_json
from critbatch.launch import run_jobs, write_job
from critbatch.model import ModelFamily, count_params
from critbatch.model.losses import NextTokenLosses
from critbatch.registry import MODEL_FAMILIES, TRAINING_CALLBACKS
from critbatch.train import Callback, train


# ---- a model family: a bigram model (each token's logits from its embedding alone) ----------------

class Bigram(NextTokenLosses, nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.table = nn.Embedding(cfg.vocab_size, cfg.vocab_size)
        nn.init.normal_(self.table.weight, 0.0, cfg.init_std)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, vocab)
        return self.table(idx)

    def fsdp_units(self) -> list[nn.Module]:
        return []


def _bigram_params(cfg: ModelConfig, embeddings: bool = True) -> int:
    return cfg.vocab_size ** 2 if embeddings else 0


BIGRAM = ModelFamily(build=Bigram, count_params=_bigram_params,
                     flops_per_token=lambda cfg: 6 * cfg.vocab_size ** 2, describe=lambda cfg: "a bigram table")


# ---- a decision rule: a larger batch passes only when its mean loss is no higher at all ------------

def strict_rule(ks, losses, eps, confidence, *, diff_se=None, diff_sd=None):
    means = [sum(v) / len(v) for v in losses]
    status = [PASS] + ["pass" if all(m <= means[j] for j in range(i)) else "fail"
                       for i, m in enumerate(means) if i > 0]
    return finish_decision("strict", ks, status, means, [None] * len(ks), {"eps": 0.0})


# ---- a training callback: counts the steps it saw -------------------------------------------------

class StepCounter(Callback):
    name = "step-counter"
    seen: list[int] = []

    def on_step_end(self, trainer, record: dict) -> None:
        StepCounter.seen.append(record["step"])
        record["toy/steps_seen"] = len(StepCounter.seen)


@pytest.fixture
def registered():
    MODEL_FAMILIES.register("bigram", BIGRAM)
    RULES.register("strict", DecisionRule(strict_rule, description="no worse at all"))
    TRAINING_CALLBACKS.register("step-counter", StepCounter)
    yield
    MODEL_FAMILIES.unregister("bigram")
    RULES.unregister("strict")
    TRAINING_CALLBACKS.unregister("step-counter")


def test_a_model_family_registered_from_outside_trains(registered, data_dir, tmp_path):
    cfg = small_cfg(data_dir, model={"family": "bigram"}, total_tokens=1024)
    res = train(cfg, tmp_path / "run", progress=False)
    assert res["params"] == 257 ** 2 and res["flops_per_token"] == 6 * 257 ** 2
    assert res["final_eval_loss"] < 5.55  # below the uniform 5.55 nats of 257 ids: it learned
    assert count_params(ModelConfig(family="bigram", vocab_size=10)) == 100


def test_an_unregistered_family_is_refused_naming_the_registered_ones(data_dir):
    with pytest.raises(ConfigError, match=r"model.family='bigram' is not one of gpt, hf"):
        validate(small_cfg(data_dir, model={"family": "bigram"}))


def test_a_decision_rule_registered_from_outside_decides_a_sweep(registered, shared_parent, tmp_path):
    run = fresh_parent(shared_parent, tmp_path)
    res = run_sweep(SweepConfig(run=str(run), at=[1024], k=[0.5, 1, 2], window_tokens=512, launcher="inprocess",
                                eval_seqs=16, rule="strict"), progress=False)
    p = res.curve["points"][0]
    means = p["mean_loss"]["eval"]
    assert p["rule"] == res.curve["rule"] == "strict"
    assert p["status"][1:] == ["pass" if all(m <= x for x in means[:i]) else "fail" for i, m in enumerate(means) if i]
    with pytest.raises(ConfigError, match="rule='lenient' is not one of eps, noninf, strict"):
        run_sweep(dataclasses.replace(SweepConfig(run=str(run), at=[1024]), rule="lenient"), progress=False)


def test_a_callback_registered_from_outside_runs_in_a_named_job(registered, data_dir, tmp_path):
    StepCounter.seen = []
    d = write_job(tmp_path / "job", small_cfg(data_dir, total_tokens=1024), callbacks=["step-counter"])
    run_jobs([d], jobs=1, threads=1, launcher="inprocess")
    assert StepCounter.seen == list(range(1, 1024 // (8 * 16) + 1))
    assert read_json(d / "job.json")["callbacks"] == ["step-counter"]
    with pytest.raises(ConfigError, match="job callback='nope' is not one of gns, tensorboard, wandb, step-counter"):
        write_job(tmp_path / "bad", small_cfg(data_dir), callbacks=["nope"])


def test_the_command_line_takes_its_choices_from_the_registries(registered):
    from critbatch.cli import make_parser
    from critbatch.clispec import overrides

    args = ["branch", "--run", "x", "--at", "1k", "--window-tokens", "1k", "--rule"]
    ns = make_parser().parse_args([*args, "strict"])
    assert overrides(ns, ns.flags["cfg"])["rule"] == "strict"
    with pytest.raises(ConfigError, match="invalid choice: 'lenient'"):
        make_parser().parse_args([*args, "lenient"])
    train = ["train", "--preset", "tiny", "--out", "x", "--log-to"]  # a list of names: each one of the registry's
    ns = make_parser().parse_args([*train, "tensorboard,step-counter"])
    assert overrides(ns, ns.flags["cfg"])["log_to"] == ["tensorboard", "step-counter"]
    with pytest.raises(ConfigError, match="--log-to 'nope' is not one of gns, tensorboard, wandb, step-counter"):
        make_parser().parse_args([*train, "step-counter,nope"])
