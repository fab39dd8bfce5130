"""Teacher-relative next-token metrics on the held-out cache, as pure tensor functions plus an exact accumulator.

Shapes: ``B`` sequences, ``T`` positions, ``V`` student vocabulary, ``k`` cached teacher ids per position.
Alignment (the cache's): ``topk_*[:, t]`` and ``tail_logmass[:, t]`` describe the teacher's distribution of the token
at ``t + 1`` given tokens ``0..t``, exactly like ``student_logits[:, t]``. A position ``t`` counts when both ``t`` and
``t + 1`` are real tokens, so the label ``input_ids[:, t + 1]`` exists (``lm_head.causal_targets``' CE mask).

Every metric is reduced over counted positions of the whole held-out set (sums accumulated batch by batch, divided
once at the end), so the result does not depend on the batch size.

=====================  =================  ===============================================================
name                   higher_is_better   definition
=====================  =================  ===============================================================
heldout_ppl            False              exp(mean NLL of the true next token under the student)
top1_agreement         True               mean[argmax_v q(v) == teacher top-1 id]
kl_teacher_student     False              mean KL(p_T || q) over k+1 buckets (teacher top-k + tail), as trained
ece                    False              expected calibration error of the student's top-1 prediction
=====================  =================  ===============================================================
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from pipeline import losses
from pipeline.lm_head import TEACHER_COLUMNS, causal_targets


@dataclass(frozen=True)
class MetricInfo:
    """What a metric means and which direction is better (used by evaluate and report alike)."""

    name: str
    higher_is_better: bool
    doc: str


INTRINSIC_METRICS: dict[str, MetricInfo] = {
    m.name: m
    for m in (
        MetricInfo("heldout_ppl", False, "perplexity of the true next token on the held-out cache"),
        MetricInfo("top1_agreement", True, "fraction of positions where the student's argmax is the teacher's top-1"),
        MetricInfo("kl_teacher_student", False, "KL(teacher || student) in nats over teacher top-k + tail bucket"),
        MetricInfo("ece", False, "expected calibration error of the student's top-1 next-token prediction"),
    )
}


def nll_and_kl(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    teacher_tail_logmass: torch.Tensor,
    counted: torch.Tensor,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position [...] float32: (−log q(label), KL(p_T || q_τ) over k + 1 buckets: the teacher's top-k ids and
    "everything else").

    Both come from the training loss's own functions (``losses.ce_and_response_terms``: forward KL, tail bucket,
    same clamps), so evaluation and training measure the same divergence: p_T(i) = exp(topk_logprobs_i),
    p_T(tail) = exp(tail_logmass), q_τ = softmax(student_logits / τ), q_τ(tail) = 1 − Σ_i q_τ(id_i),
    KL = Σ_b p_T(b) (log p_T(b) − log q_τ(b)), without the loss's τ² factor. τ is the cache's capture temperature,
    so both distributions are compared at the temperature the teacher's were stored at. Bucketing the tail makes
    this a lower bound of the full-vocabulary KL (data processing inequality) that is exact when the teacher's tail
    mass is zero. Shapes: student_logits [..., V], labels [...], teacher_topk_* [..., k], teacher_tail_logmass and
    counted [...] (values at positions not counted are finite and meaningless).
    """
    options = losses.ResponseOptions("forward_kl", temperature, "tail_bucket", temperature)
    return losses.ce_and_response_terms(
        student_logits, labels, teacher_topk_ids, teacher_topk_logprobs, teacher_tail_logmass, counted, options
    )


def top1_agreement(student_logits: torch.Tensor, teacher_topk_ids: torch.Tensor) -> torch.Tensor:
    """[...] bool: the student's argmax equals the teacher's top-1 id (``topk_ids[..., 0]``, sorted descending)."""
    return student_logits.argmax(dim=-1) == teacher_topk_ids[..., 0].long()


def calibration_bins(
    confidence: torch.Tensor, correct: torch.Tensor, n_bins: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-bin (count, Σ confidence, Σ correct) over equal-width bins of [0, 1]; bin b holds (b/n, (b+1)/n],
    with confidence 0 in bin 0. Inputs are 1-D over counted positions; outputs are float64 [n_bins]."""
    conf = confidence.detach().double().flatten()
    idx = (torch.ceil(conf * n_bins).long() - 1).clamp(0, n_bins - 1)
    count = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx.cpu(), torch.ones_like(conf).cpu())
    conf_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx.cpu(), conf.cpu())
    corr_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx.cpu(), correct.detach().double().cpu())
    return count, conf_sum, corr_sum


def ece_from_bins(count: torch.Tensor, conf_sum: torch.Tensor, corr_sum: torch.Tensor) -> float:
    """ECE = Σ_b (n_b / N) · |acc_b − conf_b| = Σ_b |Σcorrect_b − Σconf_b| / N (Guo et al., 2017); NaN if N = 0."""
    total = float(count.sum())
    if total == 0:
        return float("nan")
    return float((corr_sum - conf_sum).abs().sum() / total)


def expected_calibration_error(confidence: torch.Tensor, correct: torch.Tensor, n_bins: int) -> float:
    """ECE of predictions with the given confidences and correctness (1-D tensors of equal length)."""
    return ece_from_bins(*calibration_bins(confidence, correct, n_bins))


class IntrinsicAccumulator:
    """Sums the four metrics over batches; :meth:`result` divides once, so batching never changes the numbers."""

    def __init__(self, ece_bins: int, temperature: float = 1.0) -> None:
        self.ece_bins = ece_bins
        self.temperature = temperature
        self.tokens = 0
        self.nll_sum = 0.0
        self.agree_sum = 0.0
        self.kl_sum = 0.0
        self.bins = [torch.zeros(ece_bins, dtype=torch.float64) for _ in range(3)]

    def update(self, student_logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        """Add one batch from whole logits [B, T, V] and the cache batch (input_ids, attention_mask, topk_ids,
        topk_logprobs, tail_logmass)."""
        self.update_chunks(batch, [(slice(None), student_logits.reshape(-1, student_logits.shape[-1]))])

    def update_chunks(self, batch: dict[str, torch.Tensor], chunks: Iterable[tuple[slice, torch.Tensor]]) -> None:
        """Add one batch from its logits chunk by chunk: ``chunks`` yields (rows, logits [c, V]) over the batch's
        B·T positions flattened (``lm_head.logits_in_chunks``), so [B, T, V] never exists."""
        labels, counted, _ = causal_targets(batch["input_ids"], batch["attention_mask"])
        flat = {"labels": labels, "counted": counted, **{k: batch[k] for k in TEACHER_COLUMNS}}
        flat = {k: v.reshape(-1, *v.shape[2:]) for k, v in flat.items()}
        for rows, logits in chunks:
            part = {k: v[rows].to(logits.device) for k, v in flat.items()}
            self._add(logits.float(), part)

    def _add(self, logits: torch.Tensor, t: dict[str, torch.Tensor]) -> None:
        mask = t["counted"]
        ids = t["topk_ids"]
        nll, kl = nll_and_kl(logits, t["labels"], ids, t["topk_logprobs"], t["tail_logmass"], mask, self.temperature)
        agree = top1_agreement(logits, ids)
        confidence, predicted = torch.softmax(logits, dim=-1).max(dim=-1)
        correct = predicted == t["labels"]
        self.tokens += int(mask.sum())
        self.nll_sum += float(nll[mask].double().sum())
        self.agree_sum += float(agree[mask].double().sum())
        self.kl_sum += float(kl[mask].double().sum())
        for acc, part in zip(self.bins, calibration_bins(confidence[mask], correct[mask], self.ece_bins), strict=True):
            acc += part

    def result(self) -> dict[str, float]:
        """The metrics over everything added (NaN when no position counted) plus the token count."""
        n = self.tokens
        nan = float("nan")
        return {
            "heldout_ppl": float(torch.tensor(self.nll_sum / n, dtype=torch.float64).exp()) if n else nan,
            "top1_agreement": self.agree_sum / n if n else nan,
            "kl_teacher_student": self.kl_sum / n if n else nan,
            "ece": ece_from_bins(*self.bins),
            "heldout_tokens": float(n),
        }
