"""Sampled teacher targets: the draws (pipeline.sampling), the losses on them (pipeline.losses.sampled_kd and
friends) against direct float64 math, and the bias probe: averaged over many sampling seeds, the sampled loss's
gradient equals the full-vocabulary forward-KL gradient within a confidence interval computed here, while the
top-k + tail loss's gradient is off by a bias of known form."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import cache, losses, sampling
from pipeline import cache_format as cf
from pipeline.config import ModelConfig
from pipeline.config import load as load_config
from pipeline.modeling import load_causal_lm
from pipeline.rundir import PipelineError
from tests.conftest import REPO, SMALL_MANIFEST, write_config

V, P = 16, 3  # vocabulary and positions of the probes


def teacher_logits(seed: int = 0, scale: float = 1.5) -> torch.Tensor:
    return torch.randn(P, V, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def uniforms(seed: int, positions: int, draws: int) -> torch.Tensor:
    return torch.from_numpy(sampling.row_uniforms(seed, 7, [0], positions, draws)[0])


# ------------------------------------------------------------------------------------------------------ draws
def test_counts_are_unique_ids_with_weights_summing_to_one_and_padding_last():
    logp = torch.log_softmax(teacher_logits(), -1).float()
    ids, w = sampling.draw(logp, uniforms(0, P, 16))
    assert ids.shape == w.shape == (P, 16) and ids.dtype == torch.int64
    for row_ids, row_w in zip(ids, w, strict=True):
        real = row_w > 0
        assert len(set(row_ids[real].tolist())) == int(real.sum())  # distinct
        assert torch.all(row_ids[~real] == 0) and not real[int(real.sum()) :].any()  # padding at the end
        assert torch.all(row_w[real][:-1] >= row_w[real][1:])  # heaviest first
        assert float(row_w.sum()) == 1.0  # counts/16: exact in float32 (and in fp16)
        assert torch.all((row_w * 16) == (row_w * 16).round())


def test_draws_follow_the_inverse_cdf_and_depend_only_on_the_uniforms():
    p = torch.tensor([[0.5, 0.25, 0.0, 0.25]])
    u = torch.tensor([[0.0, 0.49, 0.5, 0.74, 0.75, 0.999999]])
    ids, w = sampling.draw(p.log(), u)
    real = w[0] > 0
    got = dict(zip(ids[0][real].tolist(), w[0][real].tolist(), strict=True))
    assert got == pytest.approx({0: 2 / 6, 1: 2 / 6, 3: 2 / 6})  # never the 0-mass token 2
    again = sampling.draw(p.log(), u.clone())
    assert torch.equal(again[0], ids) and torch.equal(again[1], w)


def test_row_uniforms_do_not_depend_on_how_rows_are_batched():
    whole = sampling.row_uniforms(3, sampling.shard_key("ab" * 32), range(0, 6), 5, 4)
    parts = [sampling.row_uniforms(3, sampling.shard_key("ab" * 32), range(a, b), 5, 4) for a, b in ((0, 2), (2, 6))]
    assert np.array_equal(whole, np.concatenate(parts))
    other_shard = sampling.row_uniforms(3, sampling.shard_key("cd" * 32), range(0, 6), 5, 4)
    assert not np.array_equal(whole, other_shard)


def test_tail_draws_avoid_the_head_and_carry_the_tail_mass():
    logp = torch.log_softmax(teacher_logits(), -1).float()
    top = logp.topk(4, -1).indices
    ids, w = sampling.draw(logp, uniforms(1, P, 8), exclude=top)
    tail_mass = 1 - logp.exp().gather(-1, top).sum(-1)
    for row in range(P):
        real = w[row] > 0
        assert not set(ids[row][real].tolist()) & set(top[row].tolist())
        assert float(w[row].sum()) == pytest.approx(float(tail_mass[row]), rel=1e-5)


def test_empty_support_gives_only_padding():
    logp = torch.log_softmax(teacher_logits()[:1], -1).float()
    ids, w = sampling.draw(logp, uniforms(0, 1, 4), exclude=torch.arange(V).unsqueeze(0))
    assert torch.all(ids == 0) and torch.all(w == 0)


# ------------------------------------------------------------------------------------------------------ losses
def reference_ce(p: torch.Tensor, s: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0) -> float:
    """τ² · mean over valid positions of −Σ_v p(v) log softmax(s/τ)(v), float64."""
    per_pos = -(p * torch.log_softmax(s.double() / temperature, -1)).sum(-1)
    valid = mask.bool()
    return float(per_pos[valid].mean()) * temperature**2 if valid.any() else 0.0


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_dense_targets_give_the_full_cross_entropy_and_sparse_equals_dense(temperature):
    z, s = teacher_logits(), teacher_logits(1)
    p = torch.softmax(z / temperature, -1)
    mask = torch.tensor([1, 0, 1])
    dense = losses.sampled_kd(s.float(), None, p.float(), mask, temperature=temperature)
    assert float(dense) == pytest.approx(reference_ce(p, s, mask, temperature), rel=1e-5)
    ids = torch.arange(V).expand(P, V)
    sparse = losses.sampled_kd(s.float(), ids, p.float(), mask, temperature=temperature)
    assert float(sparse) == pytest.approx(float(dense), rel=1e-6)
    # the CE minus the teacher's entropy is the forward KL of the existing loss on k = V classes
    entropy = float(-(p * p.log()).sum(-1)[mask.bool()].mean()) * temperature**2
    options = losses.ResponseOptions(temperature=temperature, tail="renormalize", capture_temperature=temperature)
    kl = losses.response_kd(s.float(), ids, p.log().float(), torch.full((P,), -1e4), mask, options)
    assert float(dense) - entropy == pytest.approx(float(kl), rel=1e-4, abs=1e-6)


def test_all_masked_is_zero_and_attached_and_one_position_works():
    s = teacher_logits(1).float().requires_grad_()
    ids, w = sampling.draw(torch.log_softmax(teacher_logits(), -1).float(), uniforms(0, P, 8))
    w[0, 0] = float("nan")  # garbage at a masked position must not leak
    zero = losses.sampled_kd(s, ids, w, torch.zeros(P))
    assert float(zero.detach()) == 0.0 and zero.requires_grad
    zero.backward()
    assert torch.all(s.grad == 0)
    only_first = (ids[:1] == ids[0, 0]).float()  # the whole target on one token
    one = losses.sampled_kd(s[:1].detach(), ids[:1], only_first, torch.ones(1))
    assert float(one) == pytest.approx(-float(torch.log_softmax(s[0].detach(), -1)[ids[0, 0]]), rel=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_ce_and_sampled_kd_equal_the_separate_losses(temperature):
    s = teacher_logits(1).float()
    ids, w = sampling.draw(torch.log_softmax(teacher_logits(), -1).float(), uniforms(2, P, 8))
    labels, ce_mask, kd_mask = torch.tensor([3, 5, 0]), torch.tensor([1, 1, 0]), torch.tensor([1, 0, 1])
    ce, kd = losses.ce_and_sampled_kd(s, labels, ce_mask, ids, w, kd_mask, temperature=temperature)
    assert float(ce) == pytest.approx(float(losses.cross_entropy(s, labels, ce_mask)), rel=1e-6)
    want = losses.sampled_kd(s, ids, w, kd_mask, temperature=temperature)
    assert float(kd) == pytest.approx(float(want), rel=1e-6)


def test_head_and_sampled_tail_drops_full_support_draws_inside_the_head():
    logp = torch.log_softmax(teacher_logits(), -1).float()
    top_logp, top = logp.topk(4, -1)
    ids, w = sampling.draw(logp, uniforms(3, P, 16))
    t_ids, t_w = losses.head_and_sampled_tail(top, top_logp, ids, w, support="full")
    assert t_ids.shape == t_w.shape == (P, 20)
    assert torch.allclose(t_w[:, :4], top_logp.exp())
    tail_w, tail_ids = t_w[:, 4:], t_ids[:, 4:]
    in_head = (tail_ids.unsqueeze(-1) == top.unsqueeze(-2)).any(-1)
    assert torch.all(tail_w[in_head] == 0) and torch.equal(tail_w[~in_head], w[~in_head])
    with pytest.raises(ValueError, match="support"):
        losses.head_and_sampled_tail(top, top_logp, ids, w, support="head")


def test_check_sampled_options_names_what_to_change():
    losses.check_sampled_options("forward_kl", 1.0, 1.0)
    with pytest.raises(ValueError, match="divergence: sampled and online targets are distilled with the forward KL"):
        losses.check_sampled_options("reverse_kl", 1.0, 1.0)
    with pytest.raises(ValueError, match=r"temperature: .*capture temperature of the cache \(1.0\), got 2.0"):
        losses.check_sampled_options("forward_kl", 2.0, 1.0)


# ------------------------------------------------------------------------------------------------- bias probe
SEEDS, DRAWS = 4000, 8
FAMILY_ALPHA = 1e-3  # chance that an unbiased estimator fails the probe anywhere (Bonferroni over P·V entries)


def full_kl_gradient(z: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """∂/∂s of mean_t KL(p_t‖softmax(s_t)) = (softmax(s) − p) / P, float64."""
    return (torch.softmax(s, -1) - torch.softmax(z, -1)) / P


def seed_gradients(z: torch.Tensor, s: torch.Tensor, targets) -> torch.Tensor:
    """[SEEDS, P, V] gradients of the loss on ``targets(logp, uniforms)`` (one per sampling seed) w.r.t. ``s``.

    The seeds are stacked as extra positions of one batch: the mean over SEEDS·P positions, times SEEDS, has as
    gradient w.r.t. each copy of ``s`` exactly that seed's own gradient of its mean over P positions."""
    logp = torch.log_softmax(z, -1).float().repeat(SEEDS, 1)
    u = torch.from_numpy(np.concatenate([sampling.row_uniforms(seed, 11, [0], P, DRAWS)[0] for seed in range(SEEDS)]))
    ids, w = targets(logp, u)
    copies = s.float().repeat(SEEDS, 1).requires_grad_()
    (losses.sampled_kd(copies, ids, w, torch.ones(SEEDS * P)) * SEEDS).backward()
    return copies.grad.double().view(SEEDS, P, V)


def confidence_halfwidth(grads: torch.Tensor) -> torch.Tensor:
    """Half-width of simultaneous confidence intervals of the mean gradient, per entry (normal, Bonferroni)."""
    z = statistics.NormalDist().inv_cdf(1 - FAMILY_ALPHA / (2 * P * V))
    return z * grads.std(0) / SEEDS**0.5


PROBES = {
    "counts (q = p)": lambda logp, u: sampling.draw(logp, u),
    "importance (q ∝ p^(1/2))": lambda logp, u: sampling.draw(logp, u, proposal_temperature=2.0),
    "head + tail draws": lambda logp, u: losses.head_and_sampled_tail(
        *reversed(logp.topk(4, -1)), *sampling.draw(logp, u, exclude=logp.topk(4, -1).indices), support="tail"
    ),
    "head + full draws": lambda logp, u: losses.head_and_sampled_tail(
        *reversed(logp.topk(4, -1)), *sampling.draw(logp, u), support="full"
    ),
}


@pytest.mark.parametrize("name", list(PROBES))
def test_bias_probe_sampled_gradient_is_unbiased_for_the_full_forward_kl(name):
    z, s = teacher_logits(), teacher_logits(1, scale=1.0)
    grads = seed_gradients(z, s, PROBES[name])
    error = (grads.mean(0) - full_kl_gradient(z, s)).abs()
    # entries with no variance (the head's when the tail draws carry exactly the tail mass) must be exact
    halfwidth = confidence_halfwidth(grads) + 1e-7
    worst = float((error / halfwidth).max())
    assert worst <= 1.0, f"{name}: mean gradient off by {worst:.2f} CI half-widths (error max {error.max():.2e})"


def test_bias_probe_topk_tail_gradient_is_biased_by_the_students_tail_shape():
    """The top-k + tail-bucket loss sees one tail class: on a tail token v its gradient is q_v·(1 − p_tail/q_tail)
    (q = the student), where the full KL's is q_v − p_v. The bias p_v − q_v·p_tail/q_tail replaces the teacher's
    shape of the tail with the student's, and the probe that passes the sampled estimators detects it."""
    z, s = teacher_logits(), teacher_logits(1, scale=1.0)
    p, q = torch.softmax(z, -1), torch.softmax(s, -1)
    top_logp, top = torch.log_softmax(z, -1).topk(4, -1)
    tail = losses.log1mexp(torch.logsumexp(top_logp, -1))
    s_param = s.clone().requires_grad_()
    losses.response_kd(s_param, top, top_logp, tail, torch.ones(P)).backward()
    bias = s_param.grad - full_kl_gradient(z, s)
    in_tail = torch.ones(P, V, dtype=torch.bool).scatter_(-1, top, False)
    p_tail = (p * in_tail).sum(-1, keepdim=True)
    q_tail = (q * in_tail).sum(-1, keepdim=True)
    expected = torch.where(in_tail, p - q * p_tail / q_tail, 0.0) / P
    assert torch.allclose(bias, expected, atol=1e-6)
    halfwidth = confidence_halfwidth(seed_gradients(z, s, PROBES["counts (q = p)"]))
    assert float((bias.abs() / halfwidth).max()) > 3.0, "the bias is far outside the sampled estimator's CI"


def test_bias_probe_sees_the_small_bias_of_self_normalised_importance_weights():
    """The paper self-normalises importance weights (Σ w = 1): consistent, but biased by O(1/n); at n = 8 the probe
    has the power to see it, which is why ``sampling.draw`` keeps them unnormalised."""
    z, s = teacher_logits(), teacher_logits(1, scale=1.0)

    def self_normalised(logp: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ids, w = sampling.draw(logp, u, proposal_temperature=2.0)
        return ids, w / w.sum(-1, keepdim=True)

    grads = seed_gradients(z, s, self_normalised)
    error = (grads.mean(0) - full_kl_gradient(z, s)).abs()
    assert float((error / confidence_halfwidth(grads)).max()) > 1.5


# ------------------------------------------------------------------------------------------------------- cache
@pytest.fixture
def run_config(tmp_path, tiny_assets, small_manifest):
    """``run_config(run_name, **overrides)`` -> config path whose run already holds the shared manifest."""

    def make(run_name: str = "tiny", **overrides) -> Path:
        shutil.copytree(small_manifest, tmp_path / "runs" / run_name / "manifest", dirs_exist_ok=True)
        sampled = {"cache.targets": "sampled", "cache.samples": 8, "cache.log_every_s": 0.01}
        return write_config(tmp_path, tiny_assets, {**SMALL_MANIFEST, **sampled, "run_name": run_name, **overrides})

    return make


def shard_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.parquet"))}


@pytest.mark.parametrize("support", ["full", "tail"])
def test_extraction_draws_equal_a_draw_on_the_full_logits(tiny_assets, support):
    """The chunked LM head hands each chunk's log-probs to ``sampling.draw``: the same draws as on the whole
    [B·T, V] log-softmax at the same uniforms, whatever the chunk size."""
    model = load_causal_lm(ModelConfig(name_or_path=str(tiny_assets["teacher"])), "teacher", torch.device("cpu"))
    ids = torch.randint(0, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    u = torch.from_numpy(sampling.row_uniforms(0, 5, range(2), 20, 16))
    with torch.inference_mode():
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1).reshape(40, -1)
    exclude = logp.topk(8, -1).indices if support == "tail" else None
    want_ids, want_w = sampling.draw(logp, u.reshape(40, 16), exclude=exclude)
    for chunk in (40, 7):
        extraction = cache.Extraction(8, 1.0, [], torch.float16, None, None, chunk, draws=16, support=support)
        got = cache.extract_batch(model, ids, mask, extraction, u)
        assert torch.equal(got["sampled_ids"].reshape(40, 16), want_ids)
        torch.testing.assert_close(got["sampled_weights"].reshape(40, 16), want_w, rtol=1e-5, atol=0)
        if support == "tail":
            in_head = (got["sampled_ids"].unsqueeze(-1) == got["topk_ids"].unsqueeze(-2)).any(-1)
            assert not in_head[got["sampled_weights"] > 0].any()
            torch.testing.assert_close(got["sampled_weights"].sum(-1), got["tail_logmass"].exp(), rtol=1e-4, atol=0)


def test_stage_stores_self_described_draws_that_the_reader_yields(run_config, tiny_assets):
    config = run_config()
    assert cache.main(["--config", str(config)]) == 0
    shards = cf.list_cache_shards(config.parent / "runs" / "tiny" / "cache", "train")
    meta = cf.read_cache_meta(shards[0])
    assert meta["targets"] == "sampled" and meta["format_version"] == cf.FORMAT_VERSION
    assert {k: meta["sampling"][k] for k in ("draws", "support", "proposal_temperature", "seed")} == {
        "draws": 8, "support": "full", "proposal_temperature": 1.0, "seed": 0,
    }  # fmt: skip
    assert "E[w_v] = p(v)" in meta["sampling"]["weights"] and "default_rng" in meta["sampling"]["uniforms"]
    ds = cf.CacheDataset(shards, batch_size=6, shuffle=False, columns=["sampled_ids", "sampled_weights"])
    batch = next(iter(ds))
    assert batch["sampled_ids"].shape == (6, 32, 8) and batch["sampled_ids"].dtype == torch.int32
    assert batch["sampled_weights"].dtype == torch.float16
    assert torch.all(batch["sampled_weights"].float().sum(-1) == 1.0)  # counts/8, exact in fp16
    # the draws are those of sampling.draw at the documented uniforms, on the teacher's log-probs of these rows
    model = load_causal_lm(ModelConfig(name_or_path=str(tiny_assets["teacher"])), "teacher", torch.device("cpu"))
    rows = cf.CacheDataset(shards[:1], batch_size=4, shuffle=False, columns=["input_ids"])
    first = cf.to_compute(next(iter(rows)), "cpu")["input_ids"]
    extraction, _ = cache.resolve_extraction(load_config(str(config)).cache, model.config, 32, 0)
    key = sampling.shard_key(meta["manifest_sha256"])
    u = torch.from_numpy(sampling.row_uniforms(0, key, range(4), 32, 8))
    ref = cache.extract_batch(model, first, torch.ones_like(first), extraction, u)
    assert torch.equal(batch["sampled_ids"][:4].long(), ref["sampled_ids"])
    vocab = {"vocab_hash": meta["vocab_hash"], "vocab_size": meta["vocab_size"]}
    cf.validate_for_student(meta, **vocab, need_sampled=["full"])
    with pytest.raises(PipelineError, match="draws from the tail support, the cache holds cache.targets 'sampled'"):
        cf.validate_for_student(meta, **vocab, need_sampled=["tail"])


def test_sampling_keys_and_seed_are_part_of_the_stage_identity(run_config):
    base = load_config(str(run_config()))
    signature = cache.shard_signature(base, "f", "s")
    for override in ("cache.samples=16", "cache.proposal_temperature=2.0", "cache.targets=topk+sampled", "seed=1"):
        assert cache.shard_signature(load_config(str(run_config()), [override]), "f", "s") != signature, override
    topk = load_config(str(run_config()), ["cache.targets=topk"])
    assert cache.shard_signature(load_config(str(run_config()), ["cache.targets=topk", "seed=1"]), "f", "s") == (
        cache.shard_signature(topk, "f", "s")
    ), "a top-k cache does not depend on the seed"


@pytest.mark.slow
def test_kill_9_mid_run_then_rerun_gives_identical_sampled_shards(run_config, tmp_path):
    """Draws depend on the seed, the shard and the row only: a resumed run writes the uninterrupted run's bytes."""
    reference = run_config("ref", **{"cache.batch_size": 2, "cache.targets": "topk+sampled"})
    assert cache.main(["--config", str(reference)]) == 0
    config = run_config(**{"cache.batch_size": 2, "cache.targets": "topk+sampled"})
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cache", "--config", str(config)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    out = tmp_path / "runs" / "tiny" / "cache"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(list((out / "_shards").glob("*.json"))) < 2:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "_COMPLETE.json").exists()
    assert cache.main(["--config", str(config)]) == 0
    ref_bytes = shard_bytes(tmp_path / "runs" / "ref" / "cache")
    assert shard_bytes(out) == ref_bytes and len(ref_bytes) > 2


# ------------------------------------------------------------------------------------------------------- train
VARIANTS = {
    "ce": {},
    "kd_sampled": {"ce_weight": 0.5, "response": {"weight": 0.5, "targets": "sampled"}},
    "kd_hybrid": {"ce_weight": 0.5, "response": {"weight": 0.5, "targets": "topk+sampled"}},
    "online": {"ce_weight": 0.5, "response": {"weight": 0.5, "targets": "online", "temperature": 2.0}},
}


def test_sampled_hybrid_and_online_students_train_and_online_depends_on_the_teacher(run_config, tmp_path):
    from pipeline import train
    from pipeline.rundir import RunDir, stage_spec, unit_state

    overrides = {"train.variants": VARIANTS, "train.max_steps": 3, "train.checkpoint_every": 3,
                 "train.eval_every": 3, "train.threads": 1}  # fmt: skip
    config = run_config(**overrides)
    assert cache.main(["--config", str(config)]) == 0
    assert train.main(["--config", str(config)]) == 0
    out = tmp_path / "runs" / "tiny" / "train"
    for name in ("kd_sampled", "kd_hybrid", "online"):
        summary = json.loads((out / name / "summary.json").read_text())
        assert summary["steps"] == 3 and math.isfinite(summary["final_train_kd_response"]), name
        assert summary["val_kd_response"] > 0, name  # a cross-entropy: H(p_T) + KL
    cfg = load_config(str(config))
    marker = json.loads((out / "online" / "_COMPLETE.json").read_text())
    assert "weights:teacher" in json.dumps(marker) and "weights:teacher" not in json.dumps(
        json.loads((out / "kd_sampled" / "_COMPLETE.json").read_text())
    )
    # another teacher makes the online student stale, not the cached ones (their teacher is the cache's)
    other = load_config(str(config), ["teacher.revision=other"])
    rd = RunDir.from_config(other)
    stage = stage_spec("train")
    assert unit_state(stage, cfg, RunDir.from_config(cfg), "online").complete
    assert "teacher" in unit_state(stage, other, rd, "online").reason
    # the online recipe reads no cached targets, the sampled ones the draws (and the head for the hybrid)
    meta = cf.read_cache_meta(cf.list_cache_shards(tmp_path / "runs" / "tiny" / "cache", "train")[0])
    student = load_causal_lm(ModelConfig(name_or_path=str(cfg.student.name_or_path)), "student", torch.device("cpu"))
    recipes = {n: train.resolve_recipe(n, v, meta, student.config) for n, v in cfg.train.variants.items()}
    assert recipes["online"].columns() == ["sample_id", "input_ids", "attention_mask"]
    assert recipes["kd_sampled"].columns()[3:] == list(cf.SAMPLED_COLUMNS)
    assert recipes["kd_hybrid"].columns()[3:] == ["topk_ids", "topk_logprobs", "tail_logmass", *cf.SAMPLED_COLUMNS]
    assert recipes["kd_hybrid"].sampled_support == "full"


def test_online_targets_are_the_teachers_full_distribution(run_config, tiny_assets):
    """``train.response_targets`` for online: the teacher run on the batch, softmax at the loss temperature, and the
    loss is the dense cross-entropy the sampled loss estimates (k = V)."""
    from pipeline import train

    cfg = load_config(str(run_config(**{"train.variants": VARIANTS})))
    teacher = load_causal_lm(cfg.teacher, "teacher", torch.device("cpu")).eval()
    meta = {"num_hidden_states": 4, "temperature": 1.0, "sampling": None}
    student = load_causal_lm(cfg.student, "student", torch.device("cpu"))
    recipe = train.resolve_recipe("online", cfg.train.variants["online"], meta, student.config)
    recipe = dataclasses.replace(recipe, teacher=teacher)
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    targets = train.response_targets(batch, recipe)
    with torch.no_grad():
        want = torch.softmax(teacher(input_ids=ids).logits / 2.0, -1)
    assert list(targets) == ["target_weights"] and torch.allclose(targets["target_weights"], want, atol=1e-6)
    _, comps, _ = train._loss_step(train.Distillee(student, None), batch, recipe, gather=False)
    logits = student(input_ids=ids).logits
    expected = losses.sampled_kd(logits, None, want, torch.ones_like(ids), temperature=2.0)
    assert float(comps["kd_response"].detach()) == pytest.approx(float(expected.detach()), rel=1e-5)


def test_a_truncated_topk_equals_the_smaller_cache():
    p = torch.softmax(teacher_logits(), -1)
    top_p, ids = p.topk(8, -1)
    ids4, logp4, tail4 = losses.truncate_topk(ids, top_p.log().float(), torch.log1p(-top_p.sum(-1)).float(), 4)
    assert torch.equal(ids4, ids[:, :4]) and torch.allclose(logp4.exp(), top_p[:, :4].float())
    torch.testing.assert_close(tail4.double(), torch.log1p(-top_p[:, :4].sum(-1)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dense", [False, True], ids=["sampled", "online"])
def test_the_chunked_lm_head_scores_sampled_and_dense_targets_like_whole_logits(dense):
    """``lm_head`` sums ``losses.ce_and_sampled_terms`` chunk by chunk: the same CE and KD (and gradients) as
    ``losses.ce_and_sampled_kd`` on the whole logits."""
    from pipeline import lm_head

    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(2, 6, 8, generator=gen, requires_grad=True)
    head = torch.nn.Linear(8, V, bias=False)
    teacher = torch.log_softmax(torch.randn(12, V, generator=gen) * 2, -1)
    labels, ce_mask, kd_mask = lm_head.causal_targets(torch.randint(0, V, (2, 6), generator=gen), torch.ones(2, 6))
    if dense:
        ids, weights = None, teacher.exp().view(2, 6, V)
        cached = {"target_weights": weights}
    else:
        ids, weights = (t.view(2, 6, -1) for t in sampling.draw(teacher, torch.rand(12, 8, generator=gen)))
        cached = {"target_ids": ids, "target_weights": weights}
    targets = lm_head.HeadTargets(labels, ce_mask, kd_mask, cached, losses.SampledOptions(2.0))
    chunked = lm_head.chunked_scores(hidden, head, targets, chunk=5)
    (chunked["ce"] + chunked["kd_response"]).backward()
    grad, hidden.grad = hidden.grad.clone(), None
    ce, kd = losses.ce_and_sampled_kd(head(hidden), labels, ce_mask, ids, weights, kd_mask, temperature=2.0)
    (ce + kd).backward()
    assert float(chunked["ce"]) == pytest.approx(float(ce), rel=1e-5)
    assert float(chunked["kd_response"]) == pytest.approx(float(kd), rel=1e-5)
    torch.testing.assert_close(grad, hidden.grad, rtol=1e-4, atol=1e-6)
