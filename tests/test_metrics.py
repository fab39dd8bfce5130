"""Teacher-relative metrics against hand computation on small tensors."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline import lm_head, losses
from pipeline.metrics import (
    INTRINSIC_METRICS,
    IntrinsicAccumulator,
    calibration_bins,
    expected_calibration_error,
    nll_and_kl,
    top1_agreement,
)


def next_token_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    return lm_head.causal_targets(torch.zeros_like(attention_mask), attention_mask)[1]


def kl_topk_tail(logits, ids, logp, tail, temperature=1.0):
    """The KL alone, at every position (labels 0: the NLL half is not looked at)."""
    labels = torch.zeros(logits.shape[:-1], dtype=torch.long)
    return nll_and_kl(logits, labels, ids, logp, tail, torch.ones_like(labels, dtype=torch.bool), temperature)[1]


def test_every_metric_declares_direction():
    assert set(INTRINSIC_METRICS) == {"heldout_ppl", "top1_agreement", "kl_teacher_student", "ece"}
    assert INTRINSIC_METRICS["top1_agreement"].higher_is_better is True
    assert not any(INTRINSIC_METRICS[m].higher_is_better for m in ("heldout_ppl", "kl_teacher_student", "ece"))


def test_next_token_mask_needs_a_real_next_token():
    mask = next_token_mask(torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]))
    assert mask.tolist() == [[True, True, False, False], [True, True, True, False]]


def test_token_nll_by_hand():
    logits = torch.tensor([[[0.0, math.log(3.0)], [math.log(4.0), 0.0], [0.0, 0.0]]])  # q = [1/4, 3/4], [4/5, 1/5]
    ids = torch.tensor([[0, 1, 0]])
    labels, counted, _ = lm_head.causal_targets(ids, torch.ones_like(ids))
    teacher = torch.zeros(1, 3, 1, dtype=torch.long), torch.zeros(1, 3, 1), torch.full((1, 3), -math.inf)
    nll, _ = nll_and_kl(logits, labels, *teacher, counted)
    assert nll[0, 0].item() == pytest.approx(-math.log(3 / 4))  # label at t=0 is ids[1] = 1
    assert nll[0, 1].item() == pytest.approx(-math.log(4 / 5))  # label at t=1 is ids[2] = 0
    assert counted.tolist() == [[True, True, False]]  # the last position has no label


def test_top1_agreement():
    logits = torch.tensor([[[0.1, 2.0, 0.3], [5.0, 0.0, 1.0]]])
    ids = torch.tensor([[[1, 0], [2, 0]]])
    assert top1_agreement(logits, ids).tolist() == [[True, False]]


def test_kl_topk_tail_by_hand():
    # student q over 4 tokens; teacher top-2 ids (2, 0) with p = 0.5, 0.3 and tail 0.2
    q = torch.tensor([0.1, 0.2, 0.6, 0.1])
    logits = q.log().view(1, 1, 4) + 7.0  # a shift must not matter
    ids = torch.tensor([[[2, 0]]])
    logp = torch.tensor([[[math.log(0.5), math.log(0.3)]]])
    tail = torch.tensor([[math.log(0.2)]])
    expected = 0.5 * math.log(0.5 / 0.6) + 0.3 * math.log(0.3 / 0.1) + 0.2 * math.log(0.2 / 0.3)
    assert kl_topk_tail(logits, ids, logp, tail).item() == pytest.approx(expected, rel=1e-5)


def test_kl_is_zero_for_identical_distributions_and_handles_zero_tail():
    q = torch.tensor([0.7, 0.3, 0.0 + 1e-30])
    logits = q.log().view(1, 1, 3)
    ids = torch.tensor([[[0, 1]]])
    logp = torch.tensor([[[math.log(0.7), math.log(0.3)]]])
    kl = kl_topk_tail(logits, ids, logp, torch.tensor([[float("-inf")]]))
    assert torch.isfinite(kl).all()
    assert kl.item() == pytest.approx(0.0, abs=1e-5)


def test_kl_is_the_training_loss_without_tau_squared():
    """Eval's KL is the forward-KL response loss at the capture temperature (same clamps, same tail handling)."""
    g = torch.Generator().manual_seed(3)
    logits, teacher = torch.randn(2, 5, 13, generator=g), torch.randn(2, 5, 13, generator=g)
    top, ids = torch.log_softmax(teacher / 2.0, -1).topk(4, -1)
    tail = losses.log1mexp(torch.logsumexp(top, -1))
    mask = torch.ones(2, 5)
    options = losses.ResponseOptions(temperature=2.0, capture_temperature=2.0)
    loss = losses.response_kd(logits, ids, top, tail, mask, options)
    assert kl_topk_tail(logits, ids, top, tail, 2.0).mean().item() == pytest.approx(loss.item() / 4.0, rel=1e-6)


def test_kl_with_temperature_tempers_the_student():
    logits = torch.tensor([[[2.0, 0.0, -1.0]]])
    tau = 2.0
    q = torch.softmax(logits[0, 0] / tau, -1)
    p = torch.tensor([0.6, 0.25, 0.15])
    ids = torch.tensor([[[0, 1]]])
    got = kl_topk_tail(logits, ids, p[:2].log().view(1, 1, 2), p[2].log().view(1, 1), temperature=tau)
    expected = float((p * (p.log() - torch.stack([q[0], q[1], q[2]]).log())).sum())
    assert got.item() == pytest.approx(expected, rel=1e-3)


def test_ece_by_hand():
    conf = torch.tensor([0.95, 0.9, 0.55, 0.6, 0.2])
    correct = torch.tensor([1, 0, 1, 1, 0])
    # 5 bins: (0.8,1]: conf 0.925 acc 0.5 (n=2); (0.4,0.6]: conf 0.575 acc 1 (n=2); (0.0,0.2]: conf 0.2 acc 0 (n=1)
    expected = (2 * abs(0.5 - 0.925) + 2 * abs(1 - 0.575) + 1 * abs(0 - 0.2)) / 5
    assert expected_calibration_error(conf, correct, 5) == pytest.approx(expected)
    count, _, _ = calibration_bins(torch.tensor([0.0, 0.19, 0.21, 1.0]), torch.zeros(4), 5)
    assert count.tolist() == [2, 1, 0, 0, 1]  # 0 joins the first bin, 1 the last


def test_accumulator_is_batch_size_invariant_and_matches_direct_math():
    g = torch.Generator().manual_seed(0)
    B, T, V, k = 4, 6, 11, 3
    logits = torch.randn(B, T, V, generator=g)
    input_ids = torch.randint(0, V, (B, T), generator=g)
    attention = torch.ones(B, T, dtype=torch.long)
    attention[3, 4:] = 0
    teacher = torch.log_softmax(torch.randn(B, T, V, generator=g), -1)
    top_lp, top_ids = teacher.topk(k, dim=-1)
    tail = torch.log1p(-top_lp.exp().sum(-1))
    batch = dict(
        input_ids=input_ids, attention_mask=attention, topk_ids=top_ids, topk_logprobs=top_lp, tail_logmass=tail
    )

    whole = IntrinsicAccumulator(ece_bins=4)
    whole.update(logits, batch)
    split = IntrinsicAccumulator(ece_bins=4)
    for rows in (slice(0, 1), slice(1, 4)):
        split.update(logits[rows], {key: v[rows] for key, v in batch.items()})
    chunked = IntrinsicAccumulator(ece_bins=4)  # the LM head's chunks (7 positions each) over the flat batch
    flat = logits.reshape(B * T, V)
    chunked.update_chunks(batch, ((slice(i, i + 7), flat[i : i + 7]) for i in range(0, B * T, 7)))
    a, b = whole.result(), split.result()
    for key in a:
        assert a[key] == pytest.approx(b[key], rel=1e-9)
        assert a[key] == pytest.approx(chunked.result()[key], rel=1e-9)

    # direct math over the counted positions
    mask = next_token_mask(attention)
    labels = input_ids[:, 1:]
    logq = torch.log_softmax(logits, -1)[:, :-1]
    nll = -logq.gather(-1, labels.unsqueeze(-1)).squeeze(-1)[mask[:, :-1]]
    assert a["heldout_tokens"] == mask.sum().item() == 4 * 5 - 2
    assert a["heldout_ppl"] == pytest.approx(math.exp(nll.mean().item()), rel=1e-5)
    agree = (logits.argmax(-1) == top_ids[..., 0])[mask].float().mean().item()
    assert a["top1_agreement"] == pytest.approx(agree)
    conf, pred = torch.softmax(logits, -1)[:, :-1].max(-1)
    correct = (pred == labels)[mask[:, :-1]]
    assert a["ece"] == pytest.approx(expected_calibration_error(conf[mask[:, :-1]], correct, 4))
    assert a["kl_teacher_student"] > 0


def test_accumulator_empty_is_nan():
    res = IntrinsicAccumulator(ece_bins=3).result()
    assert math.isnan(res["heldout_ppl"]) and math.isnan(res["ece"]) and res["heldout_tokens"] == 0
