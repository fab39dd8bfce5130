"""Sampled teacher targets: the draws (pipeline.sampling), the losses on them (pipeline.losses.sampled_kd and
friends) against direct float64 math, and the bias probe: averaged over many sampling seeds, the sampled loss's
gradient equals the full-vocabulary forward-KL gradient within a confidence interval computed here, while the
top-k + tail loss's gradient is off by a bias of known form."""

from __future__ import annotations

import statistics

import numpy as np
import pytest
import torch

from pipeline import losses, sampling

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
    kl = losses.response_kd(s.float(), ids, p.log().float(), torch.full((P,), -1e4), mask, tail="renormalize",
                            temperature=temperature, capture_temperature=temperature)  # fmt: skip
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
    with pytest.raises(ValueError, match="divergence: sampled targets estimate the forward KL only"):
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
