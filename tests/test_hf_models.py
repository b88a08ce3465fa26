"""Models people pretrain, from Hugging Face transformers configs (OLMo-2, Llama): everything the
built-in GPT does — train, exact branches, accumulation, the √k LR, the noise scale, a sweep, FSDP."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from conftest import small_cfg  # noqa: E402
from critbatch.branch import SweepConfig, plan_sweep, run_branch_dir, run_sweep  # noqa: E402
from critbatch.branch import branch_spec, ensure_branch  # noqa: E402
from critbatch.cli import main  # noqa: E402
from critbatch.errors import ConfigError  # noqa: E402
from critbatch.io import read_json, read_jsonl  # noqa: E402
from critbatch.model import build_model, count_params, flops_per_token  # noqa: E402
from critbatch.train import kept_checkpoints, train  # noqa: E402

TINY = {
    "olmo2": {"model_type": "olmo2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 2, "num_key_value_heads": 2},
    "llama": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2},
}


def hf_cfg(data_dir, arch, **over):
    base = dict(model={"family": "hf", "hf": TINY[arch], "seq_len": 16}, batch_seqs=4, total_tokens=4096,
                checkpoint_tokens=[1024], eval_seqs=32, lr_schedule={"kind": "constant", "warmup_tokens": 256})
    return small_cfg(data_dir, **{**base, **over})


@pytest.fixture(scope="module", params=["olmo2", "llama"])
def parent(request, data_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp(request.param) / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as branch workers run: float sums depend on the thread count
    try:
        train(hf_cfg(data_dir, request.param), run, progress=False)
    finally:
        torch.set_num_threads(threads)
    return run


def test_k1_branch_is_the_base_runs_own_continuation(parent):
    res = run_sweep(SweepConfig(run=str(parent), at=[1024], k=[1, 2], window_tokens=3072, cooldown_fraction=0,
                                launcher="inprocess"), progress=False)
    base = read_json(parent / "result.json")
    assert res.curve["points"][0]["losses"]["eval"][0] == [base["final_eval_loss"]]  # bit for bit


def test_micro_batches_and_the_sqrt_lr(parent, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(parent, run, ignore=shutil.ignore_patterns("branches", "sweeps"))
    out = {}
    for micro in (2, 8):
        plan = plan_sweep(SweepConfig(run=str(run), at=[1024], k=[1, 2], window_tokens=512, micro_batch_seqs=micro,
                                      cooldown_fraction=0, launcher="inprocess"))
        spec = branch_spec(plan, plan.points[0], 2, 0)  # 8 sequences a step
        d = ensure_branch(run, spec)
        out[micro] = run_branch_dir(d)
        steps = [r for r in read_jsonl(d / "metrics.jsonl") if "train/loss" in r]
        ratio = [r["optim/lr"] for r in steps][0] / plan.points[0].base_lr
        assert ratio == pytest.approx(math.sqrt(2), rel=1e-12)  # the sqrt rule on an HF model too
    assert out[2]["final_eval_loss"] == pytest.approx(out[8]["final_eval_loss"], abs=1e-5)


def test_noise_scale_and_a_sweep(parent, tmp_path):
    import shutil

    from critbatch.gns.checkpoints import GNSConfig, gns_at_checkpoints

    run = tmp_path / "run"
    shutil.copytree(parent, run, ignore=shutil.ignore_patterns("branches", "sweeps"))
    g = gns_at_checkpoints(GNSConfig(run=str(run), b_big=8, n_batches=2), progress=False)
    p = g["points"][0]
    assert p["method"] in ("vmap", "loop") and p["b_simple_seqs"] is not None  # says which estimator ran
    res = run_sweep(SweepConfig(run=str(run), at=[1024], k=[0.5, 1, 2, 4], window_tokens=1024, launcher="inprocess",
                                eval_seqs=32), progress=False)
    pt = res.curve["points"][0]
    assert pt["ks"] == [0.5, 1, 2, 4] and pt["status"][0] == "pass" and "cbs_low_seqs" in pt
    assert (res.sweep_dir / "cbs.json").is_file()


def test_flops_and_params_come_from_the_models_own_shape(data_dir):
    cfg = hf_cfg(data_dir, "olmo2").model
    cfg.vocab_size = 257
    torch.manual_seed(0)
    m = build_model(cfg)
    n = sum(p.numel() for p in m.parameters())
    assert count_params(cfg) == n
    emb = m.inner.get_input_embeddings().weight.numel()
    head = m.inner.get_output_embeddings().weight.numel()  # OLMo-2 does not tie them
    assert count_params(cfg, embeddings=False) == n - emb - head
    assert flops_per_token(cfg) == 6 * (n - emb - head + 257 * 32) + 12 * 2 * 32 * 16
    assert len(m.fsdp_units()) == 2  # one FSDP unit per decoder layer


def test_preset_olmo2_1b_has_olmo2s_real_dimensions():
    from critbatch import presets

    c = presets.get("olmo2-1b").model
    assert c.family == "hf" and c.hf["model_type"] == "olmo2"
    assert (c.hf["hidden_size"], c.hf["num_hidden_layers"], c.hf["num_attention_heads"], c.hf["intermediate_size"],
            c.hf["vocab_size"], c.seq_len) == (2048, 16, 16, 8192, 100352, 4096)
    assert 1.4e9 < count_params(c) < 1.6e9  # OLMo-2 1B: 1.48B parameters with its untied 100k vocabulary


def test_local_config_dir_and_weights(data_dir, tmp_path):
    """A local model directory (config.json + safetensors) is read; the run starts from its weights."""
    from safetensors.torch import save_file

    cfg = hf_cfg(data_dir, "llama", total_tokens=512, checkpoint_tokens=[])
    cfg.model.vocab_size = 257
    torch.manual_seed(123)
    m = build_model(cfg.model)
    d = tmp_path / "llama-local"
    d.mkdir()
    m.inner.config.to_json_file(str(d / "config.json"))
    save_file({k: v.contiguous() for k, v in m.inner.state_dict().items()}, str(d / "model.safetensors"))
    cfg.model.hf, cfg.model.hf_weights = str(d), str(d)
    torch.manual_seed(0)  # another seed: the weights must come from the files
    m2 = build_model(cfg.model)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))
    assert train(cfg, tmp_path / "r", progress=False)["final_eval_loss"] > 0


@pytest.mark.parametrize("hf,needle", [
    ("allenai/OLMo-2-0425-1B", "never downloads: fetch it where there is network"),
    ('{"model_type": "no_such_model", "hidden_size": 32}', "cannot build a 'no_such_model' config"),
    ('{"hidden_size": 32}', "needs a model_type"),
])
def test_bad_model_configs_are_one_line_and_write_nothing(data_dir, tmp_path, capsys, hf, needle):
    code = main(["train", "--preset", "tiny", "--data", str(data_dir), "--out", str(tmp_path / "r"),
                 "--model.family", "hf", "--model.hf", hf, "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and needle in err, err
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_fsdp_wraps_decoder_layers_and_equals_one_process(data_dir, tmp_path):
    """Two ranks under DDP, and under FSDP2 (one unit per decoder layer), train the HF model as one
    process does."""
    worker = Path(__file__).parent / "dist_worker.py"
    over = {"model": {"family": "hf", "hf": TINY["olmo2"], "seq_len": 16}, "batch_seqs": 8, "micro_batch_seqs": 2,
            "total_tokens": 1024}
    import dist_worker

    dist_worker.run(str(data_dir), tmp_path / "ddp", over)  # the one-process reference in this process
    runs = [[str(tmp_path / par), {**over, "parallel": parallel}, None] for par, parallel in (("ddp2", "ddp"), ("fsdp", "fsdp"))]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(worker),
           str(data_dir), json.dumps(runs)]  # both two-rank runs in one launch
    r = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    outs = {par: [x["train/loss"] for x in read_jsonl(tmp_path / par / "metrics.jsonl") if "train/loss" in x]
            for par in ("ddp", "ddp2", "fsdp")}
    assert len(outs["ddp"]) == 8 and outs["ddp"] == pytest.approx(outs["fsdp"], rel=1e-4)
    assert outs["ddp"] == pytest.approx(outs["ddp2"], rel=1e-4)  # DDP over two ranks too


def test_checkpoints_record_the_hf_config(parent):
    from critbatch.config import ModelConfig
    from critbatch.model.hf import hf_config

    ck = kept_checkpoints(parent)[0]
    assert ck.meta["model"]["family"] == "hf" and ck.meta["model"]["hf"]["model_type"] in TINY
    short = {**TINY["olmo2"], "max_position_embeddings": 16}
    assert hf_config(ModelConfig(family="hf", hf=short, seq_len=16, vocab_size=257)).vocab_size == 257
    with pytest.raises(ConfigError, match="exceeds the model's max_position_embeddings 16"):
        hf_config(ModelConfig(family="hf", hf=short, seq_len=32, vocab_size=257))


def test_compare_and_report_on_an_hf_model(data_dir, tmp_path):
    from critbatch.warmup import CompareConfig, run_compare
    from critbatch.report import build_report

    cfg_file = tmp_path / "olmo2.json"
    cfg_file.write_text(json.dumps({"model": {"family": "hf", "hf": TINY["olmo2"], "seq_len": 16}, "eval_seqs": 16,
                                    "lr_schedule": {"kind": "constant", "warmup_tokens": 256}}))
    comp = run_compare(CompareConfig(out=str(tmp_path / "cmp"), schedule="0:2,1024:4", config=str(cfg_file),
                                     data=str(data_dir), total_tokens=2048, anneal_tokens=256, launcher="inprocess"),
                       progress=False)
    assert comp["runs"]["warmup"]["optimizer_steps"] < comp["runs"]["small"]["optimizer_steps"]
    run = tmp_path / "run"
    train(hf_cfg(data_dir, "olmo2", total_tokens=2048), run, progress=False)
    html = build_report(run).read_text()
    assert "olmo2 model from transformers (2 layers, d=32)" in html


def test_a_model_with_dropout_never_starts_a_branch_at_a_later_checkpoint(data_dir):
    """Dropout draws depend on where a run started, so the parent's steps are not the branch's."""
    from critbatch.branch import agreeing_steps
    from critbatch.model import dropout_probabilities

    plain = hf_cfg(data_dir, "llama")
    assert dropout_probabilities(plain.model) == {}
    assert agreeing_steps(plain, plain, 1024, 2048, 64) != []
    drop = hf_cfg(data_dir, "llama", model={"family": "hf", "hf": {**TINY["llama"], "attention_dropout": 0.1}, "seq_len": 16})
    assert dropout_probabilities(drop.model) == {"attention_dropout": 0.1}
    assert agreeing_steps(drop, drop, 1024, 2048, 64) == []
    gpt2 = hf_cfg(data_dir, "llama", model={"family": "hf", "seq_len": 16,
                                            "hf": {"model_type": "gpt2", "n_embd": 32, "n_layer": 1, "n_head": 2}})
    assert {"attn_pdrop", "embd_pdrop", "resid_pdrop"} <= set(dropout_probabilities(gpt2.model))
    assert dropout_probabilities(small_cfg(data_dir).model) == {}  # the built-in GPT has none


def test_the_transformers_config_is_recorded_and_paths_resolved(data_dir, tmp_path, monkeypatch, capsys):
    """Issue 24 item 3: a run records the transformers config it trained (not the path to a file that
    can change), so an edited config.json changes neither its branches nor a resume; data and weights
    paths are recorded absolute, so a sweep started from another directory finds them."""
    import shutil

    hf = tmp_path / "my_olmo2.json"
    hf.write_text(json.dumps({**TINY["olmo2"], "rope_theta": 10000.0}))
    shutil.copytree(data_dir, tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    args = ["train", "--preset", "olmo2-tiny", "--model.hf", "my_olmo2.json", "--data", "data", "--out", "run",
            "--total-tokens", "2048", "--checkpoint-tokens", "1024", "--model.seq-len", "16", "--eval-seqs", "16",
            "--no-progress"]
    assert main(args) == 0
    saved = read_json(tmp_path / "run" / "config.json")
    assert saved["model"]["hf"]["rope_theta"] == 10000.0 and saved["data"]["path"] == str(tmp_path / "data")
    hf.write_text(json.dumps({**TINY["olmo2"], "rope_theta": 500.0}))  # edited after the run
    assert main(args[:-1] + ["--total-tokens", "2048"]) == 2  # the same command now means another model
    assert "model.hf.rope_theta: 10000.0 vs 500.0" in capsys.readouterr().err
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    res = run_sweep(SweepConfig(run=str(tmp_path / "run"), at=[1024], k=[1, 2], window_tokens=512,
                                launcher="inprocess", eval_seqs=16), progress=False)
    branch_cfg = read_json(next((tmp_path / "run" / "branches").glob("*/config.json")))
    assert branch_cfg["model"]["hf"]["rope_theta"] == 10000.0 and res.curve["points"][0]["status"]
