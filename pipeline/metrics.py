"""Teacher-relative next-token metrics on the held-out cache, as pure tensor functions plus an exact accumulator.

Shapes: ``B`` sequences, ``T`` positions, ``V`` student vocabulary, ``k`` cached teacher ids per position.
Alignment (the cache's): ``topk_*[:, t]`` and ``tail_logmass[:, t]`` describe the teacher's distribution of the token
at ``t + 1`` given tokens ``0..t``, exactly like ``student_logits[:, t]``. A position ``t`` counts when both ``t`` and
``t + 1`` are real tokens, so the label ``input_ids[:, t + 1]`` exists (see :func:`next_token_mask`).

Every metric is reduced over counted positions of the whole held-out set (sums accumulated batch by batch, divided
once at the end), so the result does not depend on the batch size.

=====================  =================  ===============================================================
name                   higher_is_better   definition
=====================  =================  ===============================================================
heldout_ppl            False              exp(mean NLL of the true next token under the student)
top1_agreement         True               mean[argmax_v q(v) == teacher top-1 id]
kl_teacher_student     False              mean KL(p_T || q) over k+1 buckets (teacher top-k + tail)
ece                    False              expected calibration error of the student's top-1 prediction
bits_per_byte          False              Σ NLL / (ln 2 · Σ UTF-8 bytes of the predicted tokens)
char_ppl               False              exp(Σ NLL / Σ characters of the predicted tokens)
aligned_fraction       True               student positions aligned with a teacher position (other tokenizer)
mapped_mass_fraction   True               teacher top-k mass on ids the student has (other tokenizer)
=====================  =================  ===============================================================

Per-token numbers only compare models that share a tokenizer; bits per byte and per-character perplexity divide
the same total NLL by the text it predicted instead, so they compare every model of a run, whatever its tokenizer
(the bytes and characters of each predicted token come with the batch, ``next_bytes``/``next_chars``, from the
manifest's row text; see ``pipeline.xtok``). For a student with another tokenizer (``pipeline.xtok.XtokDataset``
batches) the teacher-relative metrics (top-1 agreement, KL) count its aligned positions only, its top-k ids are
student ids and an id with no student counterpart (-1) joins the tail bucket, as in training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


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
        MetricInfo("bits_per_byte", False, "held-out bits per UTF-8 byte of text: comparable across tokenizers"),
        MetricInfo("char_ppl", False, "held-out perplexity per character: comparable across tokenizers"),
        MetricInfo("aligned_fraction", True, "student positions aligned with a teacher position (other tokenizer)"),
        MetricInfo("mapped_mass_fraction", True, "teacher top-k mass on ids the student has (other tokenizer)"),
    )
}


def next_token_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: position ``t`` has a real token and a real next token (the last position never counts)."""
    real = attention_mask.bool()
    out = torch.zeros_like(real)
    out[:, :-1] = real[:, :-1] & real[:, 1:]
    return out


def token_nll(student_logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] float32: −log q(input_ids[:, t+1]) at position t (0 at the last position, which has no label)."""
    logp = torch.log_softmax(student_logits.float(), dim=-1)
    nll = torch.zeros(input_ids.shape, dtype=torch.float32, device=student_logits.device)
    nll[:, :-1] = -logp[:, :-1].gather(-1, input_ids[:, 1:].unsqueeze(-1).long()).squeeze(-1)
    return nll


def top1_agreement(student_logits: torch.Tensor, teacher_topk_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: the student's argmax equals the teacher's top-1 id (``topk_ids[..., 0]``, sorted descending)."""
    return student_logits.argmax(dim=-1) == teacher_topk_ids[..., 0].long()


def kl_topk_tail(
    student_logits: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    teacher_tail_logmass: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """[B, T] float32: KL(p_T || q) over k + 1 buckets, the teacher's top-k ids and "everything else".

    p_T(i) = exp(topk_logprobs_i), p_T(tail) = exp(tail_logmass); q(i) = softmax(student_logits / τ)[id_i],
    q(tail) = 1 − Σ_i q(i). KL = Σ_b p_T(b) (log p_T(b) − log q(b)), with 0·log 0 = 0. τ is the cache's capture
    temperature, so both distributions are compared at the temperature the teacher's were stored at. Bucketing the
    tail makes this a lower bound of the full-vocabulary KL (data processing inequality) that is exact when the
    teacher's tail mass is zero. An id of -1 (a teacher id with no counterpart in another tokenizer's student) is no
    bucket of its own: its mass joins the tail. Computed in float32.
    """
    logq = torch.log_softmax(student_logits.float() / temperature, dim=-1)  # [B, T, V]
    mapped = teacher_topk_ids >= 0
    logq_top = logq.gather(-1, teacher_topk_ids.long().clamp(min=0)).masked_fill(~mapped, -torch.inf)  # [B, T, k]
    # log(1 − Σ q_top) through log1p(−exp(logsumexp)), clamped so a student putting all mass on the top-k is finite
    mass_top = torch.logsumexp(logq_top, dim=-1).exp().clamp(max=1.0 - 1e-7)
    logq_tail = torch.log1p(-mass_top)
    teacher = teacher_topk_logprobs.float()
    logp_top = teacher.masked_fill(~mapped, -torch.inf)
    logp_tail = torch.logaddexp(
        teacher_tail_logmass.float(), torch.logsumexp(teacher.masked_fill(mapped, -torch.inf), -1)
    )
    kl_top = torch.where(mapped, torch.special.xlogy(logp_top.exp(), logp_top.exp()) - logp_top.exp() * logq_top, 0.0)
    p_tail = logp_tail.exp()
    kl_tail = torch.special.xlogy(p_tail, p_tail) - p_tail * logq_tail
    return kl_top.sum(-1) + kl_tail


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
        self.kd_tokens = 0  # positions the teacher-relative metrics count (aligned ones for another tokenizer)
        self.bytes = 0
        self.chars = 0
        self.nll_sum = 0.0
        self.agree_sum = 0.0
        self.kl_sum = 0.0
        self.bins = [torch.zeros(ece_bins, dtype=torch.float64) for _ in range(3)]

    def update(self, student_logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        """Add one batch: ``student_logits`` [B, T, V] and the cache batch (input_ids, attention_mask, topk_ids,
        topk_logprobs, tail_logmass; optional next_bytes/next_chars [B, T] and, for a student with another
        tokenizer, xtok_aligned [B, T])."""
        mask = next_token_mask(batch["attention_mask"]).to(student_logits.device)
        aligned = batch.get("xtok_aligned")
        kd_mask = mask if aligned is None else mask & aligned.to(mask.device)
        input_ids = batch["input_ids"].to(student_logits.device)
        topk_ids = batch["topk_ids"].to(student_logits.device)
        logits = student_logits.float()
        nll = token_nll(logits, input_ids)
        agree = top1_agreement(logits, topk_ids)
        kl = kl_topk_tail(
            logits,
            topk_ids,
            batch["topk_logprobs"].to(logits.device),
            batch["tail_logmass"].to(logits.device),
            self.temperature,
        )
        probs = torch.softmax(logits, dim=-1)
        confidence, predicted = probs.max(dim=-1)
        labels = torch.zeros_like(input_ids)
        labels[:, :-1] = input_ids[:, 1:]
        correct = predicted == labels
        self.tokens += int(mask.sum())
        self.kd_tokens += int(kd_mask.sum())
        if "next_bytes" in batch:
            self.bytes += int(batch["next_bytes"].to(mask.device)[mask].sum())
            self.chars += int(batch["next_chars"].to(mask.device)[mask].sum())
        self.nll_sum += float(nll[mask].double().sum())
        self.agree_sum += float(agree[kd_mask].double().sum())
        self.kl_sum += float(kl[kd_mask].double().sum())
        for acc, part in zip(self.bins, calibration_bins(confidence[mask], correct[mask], self.ece_bins), strict=True):
            acc += part

    def result(self) -> dict[str, float]:
        """The metrics over everything added (NaN when no position counted) plus the token count."""
        n, kd = self.tokens, self.kd_tokens
        nan = float("nan")
        out = {
            "heldout_ppl": float(torch.tensor(self.nll_sum / n, dtype=torch.float64).exp()) if n else nan,
            "top1_agreement": self.agree_sum / kd if kd else nan,
            "kl_teacher_student": self.kl_sum / kd if kd else nan,
            "ece": ece_from_bins(*self.bins),
            "heldout_tokens": float(n),
        }
        if self.bytes:  # the batches carried each predicted token's text
            out["bits_per_byte"] = self.nll_sum / (math.log(2) * self.bytes)
            out["char_ppl"] = math.exp(self.nll_sum / self.chars)
            out.update(heldout_bytes=float(self.bytes), heldout_chars=float(self.chars))
        return out
