"""Each loss against an independent computation (full softmax in float64, explicit loops) on tiny tensors."""

from __future__ import annotations

import itertools
import math
import os
import socket

import pytest
import torch
import torch.nn.functional as F

from pipeline import losses

V, K = 11, 4


def teacher_cache(z: torch.Tensor, k: int, capture_temperature: float = 1.0):
    """What the cache stores for teacher logits ``z``: top-k ids and log-probs at τ_c and log(1 − Σ top-k p)."""
    p = torch.softmax(z.double() / capture_temperature, -1)
    top_p, ids = p.topk(k, -1)
    tail = torch.log1p(-top_p.sum(-1))
    return ids, top_p.log().float(), tail.float()


def reference_divergence(p: torch.Tensor, q: torch.Tensor, name: str, beta: float = 0.5) -> torch.Tensor:
    """Divergence between probability vectors (float64, last dim), written out from the definitions."""
    if name == "forward_kl":
        return (p * (p.log() - q.log())).sum(-1)
    if name == "reverse_kl":
        return (q * (q.log() - p.log())).sum(-1)
    if name == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * (p * (p / m).log()).sum(-1) + (1 - beta) * (q * (q / m).log()).sum(-1)
    if name == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    raise AssertionError(name)


def reference_classes(z, s, ids, tail_mode, temperature, capture_temperature):
    """(teacher, student) probabilities over the compared classes, computed from the FULL distributions."""
    if tail_mode == "tail_bucket":
        p_full = torch.softmax(z.double() / capture_temperature, -1)
        q_full = torch.softmax(s.double() / temperature, -1)
        p_top, q_top = p_full.gather(-1, ids), q_full.gather(-1, ids)
        p = torch.cat([p_top, (1 - p_top.sum(-1, keepdim=True))], -1)
        q = torch.cat([q_top, (1 - q_top.sum(-1, keepdim=True))], -1)
        return p, q
    p_top = torch.softmax(z.double() / temperature, -1).gather(-1, ids)
    q_top = torch.softmax(s.double() / temperature, -1).gather(-1, ids)
    return p_top / p_top.sum(-1, keepdim=True), q_top / q_top.sum(-1, keepdim=True)


def reference_response(z, s, ids, mask, name, tail_mode, temperature, capture_temperature, beta=0.5):
    p, q = reference_classes(z, s, ids, tail_mode, temperature, capture_temperature)
    per_pos = reference_divergence(p, q, name, beta)
    valid = mask.bool()
    if not valid.any():
        return 0.0
    return float(per_pos[valid].mean() * temperature**2)


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd", "tvd"])
@pytest.mark.parametrize(
    "tail_mode,temperature,capture",
    [("tail_bucket", 1.0, 1.0), ("tail_bucket", 2.0, 2.0), ("renormalize", 1.0, 1.0), ("renormalize", 2.0, 1.0),
     ("renormalize", 0.5, 1.5)],
)  # fmt: skip
def test_response_kd_matches_full_softmax(name, tail_mode, temperature, capture):
    z, s = torch.randn(2, 5, V) * 2, torch.randn(2, 5, V) * 2
    ids, logp, tail = teacher_cache(z, K, capture)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 1, 1, 1]])
    options = losses.ResponseOptions(name, temperature, tail_mode, capture, 0.3 if name == "jsd" else 0.5)
    got = losses.response_kd(s, ids, logp, tail, mask, options)
    want = reference_response(z, s, ids, mask, name, tail_mode, temperature, capture, 0.3 if name == "jsd" else 0.5)
    assert got.item() == pytest.approx(want, rel=1e-4, abs=1e-6)


def test_temperature_scales_by_tau_squared():
    z, s = torch.randn(3, V), torch.randn(3, V)
    ids, logp, tail = teacher_cache(z, K)
    mask = torch.ones(3)
    at2 = losses.response_kd(s, ids, logp, tail, mask, losses.ResponseOptions(temperature=2.0, tail="renormalize"))
    p, q = reference_classes(z, s, ids, "renormalize", 2.0, 1.0)
    assert at2.item() == pytest.approx(4.0 * float(reference_divergence(p, q, "forward_kl").mean()), rel=1e-4)


def test_full_vocabulary_topk_equals_plain_kl_and_its_gradient():
    """k = V: the tail is empty (log 0 = -inf in the cache) and the loss is the ordinary KL with gradient q − p."""
    z, s = torch.randn(4, V), torch.randn(4, V, requires_grad=True)
    ids, logp, _ = teacher_cache(z, V)
    tail = torch.full((4,), -math.inf)
    loss = losses.response_kd(s, ids, logp, tail, torch.ones(4))
    p, q = torch.softmax(z.double(), -1), torch.softmax(s.detach().double(), -1)
    assert loss.item() == pytest.approx(float((p * (p.log() - q.log())).sum(-1).mean()), rel=1e-4, abs=1e-6)
    loss.backward()
    assert torch.allclose(s.grad.double(), (q - p) / 4, atol=1e-5)


def test_all_masked_is_zero_with_zero_gradient_even_with_garbage_at_padding():
    s = torch.randn(2, 3, V, requires_grad=True)
    ids = torch.zeros(2, 3, K, dtype=torch.long)
    logp = torch.full((2, 3, K), math.nan)
    tail = torch.full((2, 3), math.nan)
    for tail_mode in losses.TAIL_MODES:
        for name in losses.DIVERGENCES:
            options = losses.ResponseOptions(name, tail=tail_mode)
            loss = losses.response_kd(s, ids, logp, tail, torch.zeros(2, 3), options)
            loss.backward()
            assert loss.item() == 0.0
            assert torch.equal(s.grad, torch.zeros_like(s.grad))
    assert losses.cross_entropy(s, ids[..., 0], torch.zeros(2, 3)).item() == 0.0


def test_padding_garbage_does_not_leak_into_valid_positions():
    z, s = torch.randn(1, 4, V), torch.randn(1, 4, V, requires_grad=True)
    ids, logp, tail = teacher_cache(z, K)
    mask = torch.tensor([[1, 1, 0, 0]])
    clean = losses.response_kd(s, ids, logp, tail, mask)
    logp[0, 2:], tail[0, 2:] = math.nan, math.inf
    dirty = losses.response_kd(s, ids, logp, tail, mask)
    dirty.backward()
    assert dirty.item() == pytest.approx(clean.item(), rel=1e-6)
    assert torch.isfinite(s.grad).all()


def test_single_position_sequences():
    z, s = torch.randn(3, 1, V), torch.randn(3, 1, V)
    ids, logp, tail = teacher_cache(z, K)
    mask = torch.ones(3, 1)
    got = losses.response_kd(s, ids, logp, tail, mask).item()
    assert got == pytest.approx(reference_response(z, s, ids, mask, "forward_kl", "tail_bucket", 1.0, 1.0), rel=1e-4)


def test_loss_is_a_mean_not_a_sum_over_positions():
    z, s = torch.randn(1, 3, V), torch.randn(1, 3, V)
    ids, logp, tail = teacher_cache(z, K)
    once = losses.response_kd(s, ids, logp, tail, torch.ones(1, 3)).item()
    tiled = losses.response_kd(*(x.repeat(1, 4, *[1] * (x.dim() - 2)) for x in (s, ids, logp, tail)), torch.ones(1, 12))
    assert tiled.item() == pytest.approx(once, rel=1e-5)


def test_invalid_combinations_are_refused_once_with_a_reason():
    with pytest.raises(ValueError, match="^temperature: tail_bucket needs the capture temperature"):
        losses.ResponseOptions(temperature=2.0, tail="tail_bucket")
    with pytest.raises(ValueError, match="^jsd_beta"):
        losses.ResponseOptions(divergence="jsd", jsd_beta=1.0)
    with pytest.raises(ValueError, match="^divergence"):
        losses.ResponseOptions(divergence="kl")
    with pytest.raises(ValueError, match="^tail"):
        losses.ResponseOptions(tail="drop")
    with pytest.raises(ValueError, match="^temperature: expected > 0"):
        losses.ResponseOptions(temperature=0.0, tail="renormalize")
    options = losses.ResponseOptions(temperature=2.0, capture_temperature=2.0)
    assert options.scale == 4.0 and options.needs_tempered_lse
    with pytest.raises(AttributeError):  # frozen: checked once, never changed after
        options.temperature = 3.0


def test_cross_entropy_matches_torch():
    s, labels = torch.randn(2, 5, V), torch.randint(0, V, (2, 5))
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    want = F.cross_entropy(s[mask.bool()], labels[mask.bool()])
    assert losses.cross_entropy(s, labels, mask).item() == pytest.approx(want.item(), rel=1e-6)


@pytest.mark.parametrize("tail_mode,temperature", [("tail_bucket", 1.0), ("tail_bucket", 2.0), ("renormalize", 2.0)])
def test_shared_logsumexp_equals_separate_losses(tail_mode, temperature):
    z = torch.randn(2, 6, V)
    s1 = torch.randn(2, 6, V, requires_grad=True)
    s2 = s1.detach().clone().requires_grad_(True)
    ids, logp, tail = teacher_cache(z, K)
    labels, ce_mask, kd_mask = torch.randint(0, V, (2, 6)), torch.ones(2, 6), torch.ones(2, 6)
    ce_mask[:, -1] = 0
    opts = losses.ResponseOptions(temperature=temperature, tail=tail_mode, capture_temperature=temperature)
    ce, kd = losses.ce_and_response_kd(s1, labels, ce_mask, ids, logp, tail, kd_mask, opts)
    ce_ref, kd_ref = losses.cross_entropy(s2, labels, ce_mask), losses.response_kd(s2, ids, logp, tail, kd_mask, opts)
    assert (ce.item(), kd.item()) == pytest.approx((ce_ref.item(), kd_ref.item()), rel=1e-6)
    (ce + kd).backward()
    (ce_ref + kd_ref).backward()
    assert torch.allclose(s1.grad, s2.grad, atol=1e-6)


def test_mixing_endpoints_and_weighted_sum():
    ce, kd = torch.tensor(2.0), torch.tensor(0.5)
    assert losses.combine({"ce": ce, "kd": kd}, {"ce": 1.0, "kd": 0.0}).item() == 2.0
    assert losses.combine({"ce": ce, "kd": kd}, {"ce": 0.0, "kd": 1.0}).item() == 0.5
    assert losses.combine({"ce": ce, "kd": kd}, {"ce": 0.25, "kd": 0.75}).item() == pytest.approx(0.875)
    with pytest.raises(ValueError):
        losses.combine({"ce": ce}, {"ce": 0.0})


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd", "tvd"])
def test_gradient_step_moves_student_toward_teacher(name):
    z, s = torch.randn(4, V) * 3, torch.randn(4, V)
    ids, logp, tail = teacher_cache(z, K)
    s.requires_grad_(True)
    options = losses.ResponseOptions(name)
    before = losses.response_kd(s, ids, logp, tail, torch.ones(4), options)
    before.backward()
    top1 = ids[:, 0]
    # The teacher's most likely token: the student is pushed up there wherever it under-predicts it.
    q = torch.softmax(s.detach(), -1).gather(-1, top1[:, None]).squeeze(-1)
    p = logp[:, 0].exp()
    under = q < p
    assert (s.grad.gather(-1, top1[:, None]).squeeze(-1)[under] < 0).all()
    with torch.no_grad():
        after = losses.response_kd(s - 0.5 * s.grad, ids, logp, tail, torch.ones(4), options)
    assert after.item() < before.item()


# ---------------------------------------------------------------------------------------------- features
def test_feature_mse_and_cosine_against_hand_computation():
    proj = losses.FeatureProjectors([(2, 3)], student_dim=5, teacher_dim=7)
    hs, ht = torch.randn(2, 4, 5), torch.randn(2, 4, 7) * 10 + 3
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    out = proj(2, 3, hs)
    assert out.shape == (2, 4, 7)

    def ln(x):
        return (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)

    valid = mask.bool()
    want_mse = ((ln(out) - ln(ht)) ** 2).mean(-1)[valid].mean()
    want_cos = (1 - (out * ht).sum(-1) / (out.norm(dim=-1) * ht.norm(dim=-1)))[valid].mean()
    assert losses.feature_distance(out, ht, mask, "mse").item() == pytest.approx(want_mse.item(), rel=1e-5)
    assert losses.feature_distance(out, ht, mask, "cosine").item() == pytest.approx(want_cos.item(), rel=1e-5)
    assert losses.feature_distance(out, ht, torch.zeros_like(mask), "mse").item() == 0.0


def test_feature_gradient_trains_the_projector():
    torch.manual_seed(0)
    proj = losses.FeatureProjectors([(1, 1)], 4, 6)
    hs, target = torch.randn(8, 3, 4), torch.randn(8, 3, 6)
    opt = torch.optim.SGD(proj.parameters(), lr=0.5)
    first = None
    for _ in range(20):
        loss = losses.feature_distance(proj(1, 1, hs), target, torch.ones(8, 3), "cosine")
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first


# ---------------------------------------------------------------------------------------------- relations
def _normalised_distances(x):
    n = len(x)
    d = {(i, j): float((x[i] - x[j]).norm()) for i in range(n) for j in range(n) if i != j}
    mu = sum(d.values()) / len(d)
    return {key: v / mu for key, v in d.items()}


def _smooth_l1(a, b):
    diff = abs(a - b)
    return 0.5 * diff**2 if diff < 1 else diff - 0.5


def test_rkd_distance_and_angle_against_loops():
    s, t = torch.randn(5, 3).double(), torch.randn(5, 8).double()
    ds, dt = _normalised_distances(s), _normalised_distances(t)
    want_d = sum(_smooth_l1(ds[k], dt[k]) for k in ds) / len(ds)

    def cos_at_j(x, i, j, k):
        a, b = x[i] - x[j], x[k] - x[j]
        return float(a @ b / (a.norm() * b.norm()))

    triplets = [(i, j, k) for i, j, k in itertools.permutations(range(5), 3)]
    want_a = sum(_smooth_l1(cos_at_j(s, *tr), cos_at_j(t, *tr)) for tr in triplets) / len(triplets)
    assert losses.rkd_distance(s.float(), t.float()).item() == pytest.approx(want_d, rel=1e-4)
    assert losses.rkd_angle(s.float(), t.float()).item() == pytest.approx(want_a, rel=1e-4)


def test_rkd_is_invariant_to_scale_and_translation_and_zero_for_tiny_batches():
    t = torch.randn(6, 4)
    assert losses.rkd_distance(3 * t + 1, t).item() == pytest.approx(0.0, abs=1e-6)
    assert losses.rkd_angle(3 * t + 1, t).item() == pytest.approx(0.0, abs=1e-6)
    assert losses.rkd_distance(torch.randn(1, 4), torch.randn(1, 5)).item() == 0.0
    assert losses.rkd_angle(torch.randn(2, 4), torch.randn(2, 5)).item() == 0.0


@pytest.mark.parametrize("metric", ["cosine", "euclidean", "dot"])
def test_pairwise_relation_against_loops(metric):
    s, t = torch.randn(4, 3).double(), torch.randn(4, 6).double()

    def sims(x):
        n = len(x)
        if metric == "cosine":
            return [[float(x[i] @ x[j] / (x[i].norm() * x[j].norm())) for j in range(n)] for i in range(n)]
        if metric == "euclidean":
            d = [[float((x[i] - x[j]).norm()) for j in range(n)] for i in range(n)]
            mu = sum(d[i][j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
            return [[math.exp(-d[i][j] / mu) for j in range(n)] for i in range(n)]
        g = [[float(x[i] @ x[j]) for j in range(n)] for i in range(n)]
        return [[g[i][j] / math.sqrt(sum(v * v for v in g[i])) for j in range(n)] for i in range(n)]

    a, b = sims(s), sims(t)
    want = sum((a[i][j] - b[i][j]) ** 2 for i in range(4) for j in range(4) if i != j) / 12
    got = losses.pairwise_relation(s.float(), t.float(), metric).item()
    assert got == pytest.approx(want, rel=1e-4)


def test_relation_terms_add_and_each_moves_the_total_on_its_own():
    s, t = torch.randn(6, 4), torch.randn(6, 9)
    weights = {"distance_weight": 25.0, "angle_weight": 50.0, "pairwise_weight": 3.0}
    total, parts = losses.relation_loss(s, t, **weights, pairwise_metric="cosine")
    assert all(v.item() > 0 for v in parts.values())
    want = 25 * parts["distance"] + 50 * parts["angle"] + 3 * parts["pairwise"]
    assert total.item() == pytest.approx(want.item(), rel=1e-6)
    for name in ("distance", "angle", "pairwise"):
        alone = {k: (v if k == f"{name}_weight" else 0.0) for k, v in weights.items()}
        only, _ = losses.relation_loss(s, t, **alone)
        assert only.item() == pytest.approx(weights[f"{name}_weight"] * parts[name].item(), rel=1e-6)
        without = {k: (0.0 if k == f"{name}_weight" else v) for k, v in weights.items()}
        rest, _ = losses.relation_loss(s, t, **without)
        assert total.item() - rest.item() == pytest.approx(only.item(), rel=1e-4)


def test_relation_gradient_reduces_the_loss():
    torch.manual_seed(1)
    s, t = torch.randn(6, 4, requires_grad=True), torch.randn(6, 9)
    total, _ = losses.relation_loss(s, t, pairwise_weight=1.0)
    total.backward()
    with torch.no_grad():
        after, _ = losses.relation_loss(s - 1e-3 * s.grad, t, pairwise_weight=1.0)
    assert after.item() < total.item()


def test_pool_hidden_is_a_masked_mean():
    h = torch.arange(12.0).reshape(1, 4, 3)
    pooled = losses.pool_hidden(h, torch.tensor([[1, 1, 0, 0]]))
    assert torch.equal(pooled, h[0, :2].mean(0, keepdim=True))


def _gather_worker(rank: int, world: int, port: int, queue) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    full_s, full_t = torch.randn(7, 4), torch.randn(7, 6)
    rows = [range(0, 4), range(4, 7)][rank]  # uneven split across ranks
    local = full_s[list(rows)].clone().requires_grad_(True)
    gathered = losses.gather_across_ranks(local)
    loss, _ = losses.relation_loss(gathered, losses.gather_across_ranks(full_t[list(rows)]), pairwise_weight=1.0)
    loss.backward()
    grads = [torch.zeros(7, 4)]
    grads[0][list(rows)] = local.grad / world  # what DDP's averaging does to this rank's contribution
    dist.all_reduce(grads[0])
    queue.put((rank, loss.item(), grads[0]))
    dist.destroy_process_group()


@pytest.mark.slow
def test_gather_across_ranks_gives_the_global_batch_loss_and_gradient():
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    procs = [ctx.Process(target=_gather_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    torch.manual_seed(0)
    full_s, full_t = torch.randn(7, 4).requires_grad_(True), torch.randn(7, 6)
    want, _ = losses.relation_loss(full_s, full_t, pairwise_weight=1.0)
    want.backward()
    for _, value, grad in results:
        assert value == pytest.approx(want.item(), rel=1e-5)
        assert torch.allclose(grad, full_s.grad, atol=1e-6)
