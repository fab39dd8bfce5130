"""Training stage on the tiny fixtures: every variant, LoRA, resume after kill -9, preemption, 2-process DDP,
non-finite losses, a student vocabulary its rows cannot hold, config errors. A session fixture runs the real manifest
and cache stages once; each test trains into its own run directory holding a copy of that cache."""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, write_config

from pipeline import bench, train
from pipeline import config as config_mod

BASE = {"manifest.max_samples": 90, "train.threads": 1}


@pytest.fixture(scope="session")
def tiny_cache(tiny_assets, tmp_path_factory) -> Path:
    """runs/tiny/cache (+ manifest) built by the real manifest and cache stages."""
    from pipeline import cache, manifest

    root = tmp_path_factory.mktemp("train_cache")
    path = write_config(root, tiny_assets, BASE)
    assert manifest.main(["--config", str(path)]) == 0
    assert cache.main(["--config", str(path)]) == 0
    return root / "runs" / "tiny"


def make_run(tmp: Path, assets: dict, cache_run: Path, overrides: dict | None = None) -> Path:
    """A config under ``tmp`` whose run directory already holds the shared manifest and cache; returns its path."""
    tmp.mkdir(parents=True, exist_ok=True)
    path = write_config(tmp, assets, {**BASE, **(overrides or {})})
    for stage in ("manifest", "cache"):
        shutil.copytree(cache_run / stage, tmp / "runs" / "tiny" / stage)
    return path


def variant_dir(cfg_path: Path, variant: str) -> Path:
    return cfg_path.parent / "runs" / "tiny" / "train" / variant


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def final_state(cfg_path: Path, variant: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(variant_dir(cfg_path, variant) / "final" / "model.safetensors")


def launch(cfg_path: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pipeline.train", "--config", str(cfg_path), *args]
    return subprocess.Popen(cmd, env=env, cwd=cfg_path.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"process ended early ({proc.returncode}): {proc.stdout.read().decode()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.005)


# ------------------------------------------------------------------------------------------------ pure parts
def test_lr_schedule_warms_up_decays_and_never_rises_after_the_end():
    cfg = config_mod.TrainConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=4, max_steps=20)
    lrs = [train.lr_at(s, cfg) for s in range(30)]
    assert all(a < b for a, b in itertools.pairwise(lrs[:5]))
    assert lrs[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(lrs[4:]))
    assert lrs[19] > 0.1 and all(v == pytest.approx(0.1) for v in lrs[20:])


def test_no_weight_decay_on_norms_biases_and_embeddings():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    decay, no_decay = train.param_groups(model, 0.1)
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert len(no_decay["params"]) == 4 and no_decay["weight_decay"] == 0.0


def test_causal_targets_shift_and_mask():
    ids, am = torch.tensor([[5, 6, 7, 8]]), torch.tensor([[1, 1, 1, 0]])
    labels, ce_mask, kd_mask = train.causal_targets(ids, am)
    assert labels[0, :3].tolist() == [6, 7, 8]
    assert ce_mask.tolist() == [[True, True, False, False]]
    assert kd_mask.tolist() == [[True, True, True, False]]


@pytest.mark.parametrize("variant", ["ce", "kd", "feature", "relation", "ce_unweighted"])
def test_loss_step_computes_exactly_the_components_the_recipe_names(tiny_assets, tiny_config, variant):
    """The step's metrics are all-reduced by name in one collective whose names come from ``LossRecipe.components``:
    ``_loss_step`` must return those components and no other."""
    from transformers import AutoModelForCausalLM

    cfg = config_mod.load(tiny_config())
    relation_only = config_mod.LossConfig(ce_weight=0.0, relation=config_mod.RelationKDConfig(weight=1.0))
    loss = cfg.train.variants.get(variant) or relation_only  # CE is computed (and logged) at weight 0 too
    student = AutoModelForCausalLM.from_pretrained(tiny_assets["student"])
    meta = {"temperature": 1.0, "hidden_layers": [1, 3], "num_hidden_states": 4}
    recipe = train.resolve_recipe(variant, loss, meta, student.config)
    projectors = train.losses.FeatureProjectors(recipe.feature_pairs, 32, 64) if recipe.feature_pairs else None
    vocab = int(student.get_output_embeddings().weight.shape[0])
    batch = bench.synthetic_batch(vocab, 2, 8, 4, 64, (3,))
    _, components, normalisers = train._loss_step(train.Distillee(student, projectors), batch, recipe, gather=False)
    assert tuple(components) == recipe.components and set(normalisers) >= set(components)
    assert recipe.components[0] == "ce"


# ----------------------------------------------------------------------------------------------- stage runs
def test_every_variant_trains_with_finite_losses_and_writes_its_outputs(tmp_path, tiny_assets, tiny_cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = make_run(tmp_path, tiny_assets, tiny_cache)
    assert train.main(["--config", str(cfg)]) == 0
    for variant, component in [("ce", None), ("kd", "kd_response"), ("feature", "kd_feature"),
                               ("relation", "kd_relation")]:  # fmt: skip
        out = variant_dir(cfg, variant)
        rows = read_jsonl(out / "metrics.jsonl")
        train_rows = [r for r in rows if r["split"] == "train"]
        assert [r["step"] for r in train_rows] == list(range(1, 7))
        assert all(math.isfinite(r["loss"]) and math.isfinite(r["ce"]) for r in rows)
        if component:
            assert all(math.isfinite(r[component]) for r in rows)
        assert {r["step"] for r in rows if r["split"] == "val"} == {3, 6}
        assert all(r["tokens_per_s"] > 0 and r["mem_gb"] > 0 and r["grad_norm"] >= 0 for r in train_rows)
        summary = json.loads((out / "summary.json").read_text())
        assert summary["steps"] == 6 and math.isfinite(summary["val_ce"])
        assert (out / "_COMPLETE.json").exists()
        assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step_0000003", "step_0000006"]
        AutoModelForCausalLM.from_pretrained(out / "final")
        AutoTokenizer.from_pretrained(out / "final")
    before = final_state(cfg, "kd")
    assert train.main(["--config", str(cfg), "--variant", "kd"]) == 0  # complete: skipped, untouched
    assert torch.equal(final_state(cfg, "kd")["lm_head.weight"], before["lm_head.weight"])


def test_lora_saves_adapter_and_merged_model(tmp_path, tiny_assets, tiny_cache):
    from transformers import AutoModelForCausalLM

    cfg = make_run(tmp_path, tiny_assets, tiny_cache, {"train.lora.enabled": True, "train.lora.r": 4,
                                                        "train.max_steps": 3, "train.lr": 0.01})  # fmt: skip
    assert train.main(["--config", str(cfg), "--variant", "kd"]) == 0
    out = variant_dir(cfg, "kd")
    assert (out / "adapter" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out / "final")
    base = AutoModelForCausalLM.from_pretrained(tiny_assets["student"])
    q_merged = merged.model.layers[0].self_attn.q_proj.weight
    assert not torch.allclose(q_merged, base.model.layers[0].self_attn.q_proj.weight)
    assert torch.equal(merged.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)


@pytest.mark.slow
def test_lora_checkpoints_hold_only_trainable_weights_and_resume_exactly(tmp_path, tiny_assets, tiny_cache):
    from transformers import AutoModelForCausalLM

    lora = {"train.lora.enabled": True, "train.lora.r": 4, "train.lr": 0.01, "train.max_steps": 12,
            "train.checkpoint_every": 4, "train.eval_every": 100}  # fmt: skip
    reference = make_run(tmp_path / "reference", tiny_assets, tiny_cache, lora)
    assert train.main(["--config", str(reference), "--variant", "feature"]) == 0  # LoRA + a feature projector
    ckpts = variant_dir(reference, "feature") / "checkpoints"
    saved = torch.load(ckpts / "step_0000008" / "pytorch_model.bin", weights_only=True)
    base = AutoModelForCausalLM.from_pretrained(tiny_assets["student"])
    # the adapter and the feature projector, not the frozen base: a small fraction of the model's bytes
    assert saved and all("lora_" in k or k.startswith("projectors.") for k in saved)
    assert any(k.startswith("projectors.") for k in saved)
    assert sum(v.numel() for v in saved.values()) < 0.2 * sum(p.numel() for p in base.parameters())

    cfg = make_run(tmp_path / "resumed", tiny_assets, tiny_cache, lora)
    assert train.main(["--config", str(cfg), "--variant", "feature"]) == 0
    out = variant_dir(cfg, "feature")  # as if it had died after step 8's checkpoint
    for path in (out / "checkpoints" / "step_0000012", out / "final", out / "adapter"):
        shutil.rmtree(path)
    (out / "_COMPLETE.json").unlink()
    assert train.main(["--config", str(cfg), "--variant", "feature"]) == 0
    log = (tmp_path / "resumed" / "logs" / "tiny" / "train" / "rank_00000.jsonl").read_text()
    assert "feature: from step_0000008" in log
    got, want = final_state(cfg, "feature"), final_state(reference, "feature")
    assert got.keys() == want.keys()
    for name in want:
        assert torch.allclose(got[name], want[name], rtol=0, atol=1e-6), name


def test_tensorboard_tracker_receives_every_logged_metric_offline(tmp_path, tiny_assets, tiny_cache):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = make_run(tmp_path, tiny_assets, tiny_cache, {"train.trackers": ["tensorboard"], "train.max_steps": 4})
    assert train.main(["--config", str(cfg), "--variant", "kd"]) == 0
    run = tmp_path / "logs" / "tiny" / "train" / "trackers" / "kd" / "tiny"  # <variant>/<run_name>
    assert len(list(run.rglob("events.out.tfevents.*"))) == 2  # the metrics, and the hyperparameters in a sub-run
    board = EventAccumulator(str(run))
    board.Reload()
    rows = read_jsonl(variant_dir(cfg, "kd") / "metrics.jsonl")
    for split in ("train", "val"):
        for name in ("loss", "ce", "kd_response") + (("lr", "grad_norm") if split == "train" else ()):
            logged = [(r["step"], r[name]) for r in rows if r["split"] == split]
            scalars = [(e.step, e.value) for e in board.Scalars(f"{split}/{name}")]
            assert [s for s, _ in scalars] == [s for s, _ in logged] and logged
            assert [v for _, v in scalars] == pytest.approx([v for _, v in logged], rel=1e-6)  # stored as float32


def test_a_tracker_whose_package_is_missing_is_refused_before_training(tmp_path, tiny_assets, tiny_cache, capsys,
                                                                        monkeypatch):  # fmt: skip
    from pipeline import validate

    monkeypatch.setitem(validate.TRACKER_PACKAGES, "wandb", "wandb_not_installed_here")
    cfg = make_run(tmp_path, tiny_assets, tiny_cache, {"train.trackers": ["wandb"]})
    assert train.main(["--config", str(cfg), "--variant", "kd"]) == 2
    assert "train.trackers.0" in capsys.readouterr().err
    assert not variant_dir(cfg, "kd").exists()


# --------------------------------------------------------------------------------------- resume, preemption
RESUME = {"train.max_steps": 24, "train.checkpoint_every": 4, "train.eval_every": 8, "train.log_every": 4}


@pytest.fixture(scope="module")
def uninterrupted(tiny_assets, tiny_cache, tmp_path_factory) -> Path:
    cfg = make_run(tmp_path_factory.mktemp("reference"), tiny_assets, tiny_cache, RESUME)
    assert train.main(["--config", str(cfg), "--variant", "kd"]) == 0
    return cfg


def assert_same_run(cfg: Path, reference: Path) -> None:
    got, want = final_state(cfg, "kd"), final_state(reference, "kd")
    assert got.keys() == want.keys()
    for name in want:
        assert torch.allclose(got[name], want[name], rtol=0, atol=1e-6), name
    samples = "samples/rank_00000.jsonl"
    assert read_jsonl(variant_dir(cfg, "kd") / samples) == read_jsonl(variant_dir(reference, "kd") / samples)
    ours = [r for r in read_jsonl(variant_dir(cfg, "kd") / "metrics.jsonl") if r["split"] == "train"]
    theirs = [r for r in read_jsonl(variant_dir(reference, "kd") / "metrics.jsonl") if r["split"] == "train"]
    assert [(r["step"], r["loss"], r["lr"]) for r in ours] == [(r["step"], r["loss"], r["lr"]) for r in theirs]


@pytest.mark.slow
def test_kill_9_then_rerun_gives_the_uninterrupted_weights_and_samples(tmp_path, tiny_assets, tiny_cache,
                                                                       uninterrupted):  # fmt: skip
    cfg = make_run(tmp_path, tiny_assets, tiny_cache, RESUME)
    ckpts = variant_dir(cfg, "kd") / "checkpoints"
    proc = launch(cfg, "--variant", "kd")
    wait_for(lambda: (ckpts / "step_0000008").is_dir(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (variant_dir(cfg, "kd") / "_COMPLETE.json").exists()
    assert train.main(["--config", str(cfg), "--variant", "kd"]) == 0
    assert_same_run(cfg, uninterrupted)
    assert not list(ckpts.glob(".tmp-*"))


@pytest.mark.slow
def test_sigusr1_checkpoints_exits_cleanly_and_the_rerun_continues(tmp_path, tiny_assets, tiny_cache, uninterrupted):
    cfg = make_run(tmp_path, tiny_assets, tiny_cache, RESUME)
    out = variant_dir(cfg, "kd")
    proc = launch(cfg, "--variant", "kd")
    samples = out / "samples" / "rank_00000.jsonl"
    wait_for(lambda: samples.exists() and len(samples.read_text().splitlines()) >= 2, proc)
    proc.send_signal(signal.SIGUSR1)
    output = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == 0, output[-3000:]
    assert "preempted" in output
    steps = [int(p.name.split("_")[1]) for p in (out / "checkpoints").glob("step_*")]
    assert steps and max(steps) < 24 and max(steps) % 4 != 0  # saved at the signal, not on the schedule
    assert not (out / "_COMPLETE.json").exists() and not (out / "final").exists()
    assert train.main(["--config", str(cfg), "--variant", "kd"]) == 0
    assert_same_run(cfg, uninterrupted)


@pytest.mark.slow
def test_two_process_ddp_sees_each_sample_once_with_the_single_process_lr(tmp_path, tiny_assets, tiny_cache):
    from pipeline.cache_format import list_cache_shards, read_cache_meta

    rows = sum(read_cache_meta(p)["rows"] for p in list_cache_shards(tiny_cache / "cache", "train"))
    steps = math.ceil(rows / 4) // 2  # one epoch on each of 2 ranks at 4 sequences per micro-batch
    variants = {"ce": {}, "relation": {"relation": {"weight": 1.0}}}
    over = {"train.max_steps": steps, "train.warmup_steps": 2, "train.checkpoint_every": 100,
            "train.eval_every": 100, "train.variants": variants}  # fmt: skip
    cfg = make_run(tmp_path / "ddp", tiny_assets, tiny_cache, over)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pipeline.train", "--config", str(cfg), "--nproc-per-node", "2"]  # launches torchrun
    proc = subprocess.Popen(cmd, env=env, cwd=cfg.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    try:
        output = proc.communicate(timeout=180)[0].decode()
    finally:
        if proc.poll() is None:  # a hung collective: take the launcher and both ranks down
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, output[-4000:]
    assert "pipeline.launch --nproc-per-node=2 --standalone" in output  # pipeline.launch's line
    for variant in ("ce", "relation"):
        seen = []
        for rank in (0, 1):
            for rec in read_jsonl(variant_dir(cfg, variant) / "samples" / f"rank_{rank:05d}.jsonl"):
                assert rec["epoch"] == [0]
                seen += rec["sample_ids"]
        assert len(seen) == len(set(seen)) == min(rows, steps * 2 * 4)
        assert json.loads((variant_dir(cfg, variant) / "summary.json").read_text())["world_size"] == 2
    single = make_run(tmp_path / "single", tiny_assets, tiny_cache, over)
    assert train.main(["--config", str(single), "--variant", "ce"]) == 0
    lrs = [(r["step"], r["lr"]) for r in read_jsonl(variant_dir(cfg, "ce") / "metrics.jsonl") if r["split"] == "train"]
    ref = [
        (r["step"], r["lr"]) for r in read_jsonl(variant_dir(single, "ce") / "metrics.jsonl") if r["split"] == "train"
    ]
    assert lrs == ref and len(lrs) == steps
    loaded = config_mod.load(cfg)
    assert [lr for _, lr in lrs] == pytest.approx([train.lr_at(s, loaded.train) for s in range(steps)])


# ----------------------------------------------------------------------------------------------------- FSDP
def torchrun_train(cfg_path: Path, *args: str) -> subprocess.Popen:
    """``python -m pipeline.train --nproc-per-node 2`` (torchrun, gloo; own session, so a hang can take the group
    down)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pipeline.train", "--config", str(cfg_path), "--nproc-per-node", "2", *args]
    return subprocess.Popen(cmd, env=env, cwd=cfg_path.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip


def finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    try:
        output = proc.communicate(timeout=timeout)[0].decode()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, output[-4000:]
    return output


def assert_close_weights(cfg: Path, reference: Path, variant: str, atol: float) -> None:
    got, want = final_state(cfg, variant), final_state(reference, variant)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.allclose(got[name], want[name], rtol=0, atol=atol), (name, (got[name] - want[name]).abs().max())


def test_fsdp_shards_decoder_blocks_and_one_process_fsdp_equals_plain_training(tmp_path, tiny_assets, tiny_cache):
    """The FSDP2 path runs in one process too (the one-GPU check): full weights and a LoRA adapter both end where
    unsharded training does, final/ loads with from_pretrained, and the single-rank process group is gone after."""
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from pipeline.fsdp import shard_units

    student = AutoModelForCausalLM.from_pretrained(tiny_assets["student"])
    assert [type(m).__name__ for m in shard_units(student)] == ["LlamaDecoderLayer"] * 2
    short = {"train.max_steps": 3, "train.eval_every": 3}
    for name, extra in (("full", {}), ("lora", {"train.lora.enabled": True, "train.lora.r": 4, "train.lr": 0.01})):
        plain = make_run(tmp_path / f"{name}_plain", tiny_assets, tiny_cache, {**short, **extra})
        assert train.main(["--config", str(plain), "--variant", "kd"]) == 0
        sharded = make_run(tmp_path / f"{name}_fsdp", tiny_assets, tiny_cache,
                           {**short, **extra, "train.distributed": "fsdp"})  # fmt: skip
        assert train.main(["--config", str(sharded), "--variant", "kd"]) == 0
        assert not dist.is_initialized()
        assert_close_weights(sharded, plain, "kd", 1e-6)
        ckpt = variant_dir(sharded, "kd") / "checkpoints" / "step_0000003"
        assert (ckpt / "sharded" / "__0_0.distcp").is_file() and not (ckpt / "pytorch_model.bin").exists()
        AutoModelForCausalLM.from_pretrained(variant_dir(sharded, "kd") / "final")


@pytest.mark.slow
def test_two_process_fsdp_reaches_the_ddp_weights_and_resumes_exactly_after_kill_9(tmp_path, tiny_assets,
                                                                                   tiny_cache):  # fmt: skip
    """2 gloo processes: FSDP2 ends within 1e-5 of DDP (fp32); kill -9 of one rank after a sharded checkpoint and a
    rerun end with the uninterrupted FSDP run's weights, samples and losses."""
    ddp = make_run(tmp_path / "ddp", tiny_assets, tiny_cache, RESUME)
    finish(torchrun_train(ddp, "--variant", "kd"))
    fsdp = {**RESUME, "train.distributed": "fsdp"}
    uninterrupted = make_run(tmp_path / "fsdp", tiny_assets, tiny_cache, fsdp)
    finish(torchrun_train(uninterrupted, "--variant", "kd"))
    assert_close_weights(uninterrupted, ddp, "kd", 1e-5)
    ckpt = variant_dir(uninterrupted, "kd") / "checkpoints" / "step_0000024"
    assert sorted(p.name for p in (ckpt / "sharded").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]

    cfg = make_run(tmp_path / "killed", tiny_assets, tiny_cache, fsdp)
    proc = torchrun_train(cfg, "--variant", "kd")
    wait_for(lambda: (variant_dir(cfg, "kd") / "checkpoints" / "step_0000008").is_dir(), proc, timeout=180)
    import psutil

    rank1 = next(c for c in psutil.Process(proc.pid).children(recursive=True) if c.environ().get("RANK") == "1")
    rank1.kill()
    proc.communicate(timeout=120)
    assert proc.returncode != 0 and not (variant_dir(cfg, "kd") / "_COMPLETE.json").exists()
    output = finish(torchrun_train(cfg, "--variant", "kd"))
    assert "kd: from step_" in output
    assert_close_weights(cfg, uninterrupted, "kd", 1e-6)
    for rank in (0, 1):
        samples = f"samples/rank_{rank:05d}.jsonl"
        assert read_jsonl(variant_dir(cfg, "kd") / samples) == read_jsonl(variant_dir(uninterrupted, "kd") / samples)
    ours = [r for r in read_jsonl(variant_dir(cfg, "kd") / "metrics.jsonl") if r["split"] == "train"]
    theirs = [r for r in read_jsonl(variant_dir(uninterrupted, "kd") / "metrics.jsonl") if r["split"] == "train"]
    assert [(r["step"], r["loss"]) for r in ours] == [(r["step"], r["loss"]) for r in theirs]


# ----------------------------------------------------------------------------------------------- failures
def test_non_finite_loss_stops_naming_step_and_component_and_keeps_the_checkpoint(tmp_path, tiny_assets, tiny_cache,
                                                                                    capsys):  # fmt: skip
    diverge = {"train.lr": 1e30, "train.warmup_steps": 0, "train.checkpoint_every": 1, "train.max_grad_norm": 1e30}
    cfg = make_run(tmp_path, tiny_assets, tiny_cache, diverge)
    assert train.main(["--config", str(cfg), "--variant", "kd"]) == 1
    err = capsys.readouterr().err
    assert "non-finite" in err and "at step 2" in err and "ce" in err
    ckpts = sorted((variant_dir(cfg, "kd") / "checkpoints").iterdir())
    assert [p.name for p in ckpts] == ["step_0000001"]
    state = torch.load(ckpts[0] / "pytorch_model.bin", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state.values())
    assert not (variant_dir(cfg, "kd") / "_COMPLETE.json").exists()


def test_student_whose_rows_miss_its_own_tokenizers_ids_is_refused_before_step_1(tmp_path, tiny_assets, tiny_cache,
                                                                                    capsys):  # fmt: skip
    """Another vocabulary is a cross-tokenizer student (pipeline.xtok, tests/test_xtok.py); one with an id past the
    student's output rows cannot train."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_assets["tokenizer"])
    tok.add_tokens(["<extra_token>"])
    tok.save_pretrained(tmp_path / "other_tokenizer")
    cfg = make_run(tmp_path, tiny_assets, tiny_cache, {"student.tokenizer": str(tmp_path / "other_tokenizer")})
    assert train.main(["--config", str(cfg), "--variant", "ce"]) == 2  # a config rule: submit refuses it too
    err = capsys.readouterr().err
    assert "student.name_or_path: the student has 384 output rows but its own tokenizer's token ids go up to 384" in err
    assert not variant_dir(cfg, "ce").exists()


@pytest.mark.parametrize(
    "overrides,needle",
    [
        ({"train.variants.kd.response.temperature": 2.0}, "train.variants.kd.response.temperature"),
        ({"train.variants.kd.response.divergence": "jsd", "train.variants.kd.response.jsd_beta": 0.0}, "jsd_beta"),
    ],
)
def test_invalid_response_settings_are_config_errors(tmp_path, tiny_assets, tiny_cache, capsys, overrides, needle):
    cfg = make_run(tmp_path, tiny_assets, tiny_cache, overrides)
    assert train.main(["--config", str(cfg), "--variant", "kd"]) == 2
    assert needle in capsys.readouterr().err


def test_unknown_variant_is_a_config_error(tmp_path, tiny_assets, tiny_cache, capsys):
    cfg = make_run(tmp_path, tiny_assets, tiny_cache)
    assert train.main(["--config", str(cfg), "--variant", "nope"]) == 2
    assert "--variant" in capsys.readouterr().err
