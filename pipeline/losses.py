"""Distillation losses: small pure tensor functions, float32 math, masked means over valid positions.

Three families, combined by weight with hard-label cross-entropy (``combine``):

- **Response-based** on the cache's top-k teacher log-probs (``response_kd``; ``ce_and_response_terms`` computes
  the student's full-vocabulary log_softmax once and shares it between the CE and KD terms), its options one
  frozen ``ResponseOptions`` checked when built. The per-position terms are what ``pipeline.lm_head`` sums chunk
  by chunk over positions and what evaluation's KL metric is made of, so train and eval compute the same thing.
- **Sampled targets** (``sampled_kd``, ``ce_and_sampled_kd``, ``head_and_sampled_tail``): cross-entropy of the
  student's full softmax against tokens drawn from the teacher (``pipeline.sampling``), unbiased for the gradient of
  the full-vocabulary forward KL (Anshumann et al., ACL 2025); the same function on dense targets (k = V) is the
  online teacher's full-vocabulary KD.
- **Feature-based** on hidden states through learned projectors (``FeatureProjectors``, ``feature_distance``).
- **Relation-based** on pooled sequence embeddings (``rkd_distance``, ``rkd_angle``, ``pairwise_relation``,
  ``relation_loss``), optionally over the global batch (``gather_across_ranks``).

Conventions: token losses take a ``mask`` (1 = valid position) and return the mean over valid positions — never a
sum that grows with the sequence length — and exactly 0 (still attached to the graph) when nothing is valid.
Config names map to functions through the explicit dicts ``DIVERGENCES``, ``FEATURE_METRICS``,
``PAIRWISE_METRICS``.

Temperature and the tail (response KD). The cache stores ``log p_c(v) = z_v/τ_c − logsumexp(z/τ_c)`` for the
teacher's top-k ids at the capture temperature ``τ_c`` and the exact remaining mass ``log(1 − Σ_k p_c)``.

- ``tail="tail_bucket"``: k+1 classes (top-k + one lumped tail). The lumped tail is exact only at ``τ_c``: the
  tempered tail Σ_{v∉k} exp(z_v/τ)/Z cannot be recovered from the lumped mass, so tempering it is wrong. ``τ``
  must therefore equal ``τ_c``; the student is tempered with the same ``τ`` over its full vocabulary.
- ``tail="renormalize"``: the k classes only, both sides renormalised over the teacher's top-k ids. Here any
  ``τ`` is exact: within the top-k set ``z_v/τ = (τ_c/τ)·log p_c(v) + const``, so the teacher's stored log-probs
  are rescaled by ``τ_c/τ`` and renormalised; the student's logits are divided by ``τ``.

Every divergence is multiplied by ``τ²`` (Hinton et al., 2015) so gradient magnitudes stay comparable across τ.

Empty slots (a student with another tokenizer, ``pipeline.xtok``): a top-k id of -1 is a teacher token the student
has no token for. The slot is masked on both sides (log-probability ``LOG_FLOOR``: nothing in either side's top-k
mass, nothing in the divergence, no gradient) and ``unmapped`` decides where the teacher's mass on it goes:

- ``tail_bucket`` (default): into the tail, p_T(tail) = p_T(outside the top-k) + Σ_empty p_T (with
  ``tail="renormalize"`` it is dropped with the tail); the student's tail is 1 − Σ_mapped q. Both distributions stay
  complete, and the student learns how much mass the teacher puts on text it has no single token for. Measured on
  the cross-tokenizer demo (README, "Cross-tokenizer distillation"): 2.499 held-out bits per byte against 2.502 for
  ``uld`` and 2.519 for CE alone, at no extra cost; the default.
- ``uld``: the same plus ``uld_distance`` per position (GOLD's hybrid: exact matches by divergence, the rest by
  ULD's sorted-probability distance), which also shapes how the student spreads the unmapped mass; one more
  [..., V] pass (~13 % slower steps on the demo), no better there.

With no empty slot (the same tokenizer) both are today's loss to the last bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LOG_FLOOR = -100.0  # exp(-100) ~ 4e-44: zero probability for every purpose, without -inf arithmetic (inf-inf = nan)
TAIL_CEIL = -1e-6  # log of the largest top-k mass a student may hold; fp32 logsumexp of O(10) values resolves ~1e-6
TAIL_MODES = ("tail_bucket", "renormalize")
UNMAPPED_RULES = ("tail_bucket", "uld")  # where the teacher's mass on empty slots (top-k id -1) goes


# ---------------------------------------------------------------------------------------------------- helpers
def masked_sum(values: Tensor, mask: Tensor) -> Tensor:
    """Float32 sum of ``values`` over positions where ``mask`` is true (0, attached to the graph, when none is).

    ``torch.where`` rather than multiplication, so non-finite values at masked positions cannot leak in as nan.
    """
    return torch.where(mask.to(torch.bool), values.float(), values.new_zeros((), dtype=torch.float32)).sum()


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` over positions where ``mask`` is true; 0 (attached to the graph) when none is."""
    return masked_sum(values, mask) / mask.to(torch.bool).sum().clamp(min=1)


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 − exp(x))`` for ``x < 0``, accurate at both ends (Mächler 2012); ``x`` is clamped to ``TAIL_CEIL``."""
    x = x.clamp(max=TAIL_CEIL)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def logsumexp_fp32(logits: Tensor, temperature: float = 1.0, chunk_rows: int = 4096) -> Tensor:
    """``logsumexp(logits / τ, -1)`` in float32, upcasting ``chunk_rows`` rows at a time.

    A bf16 logits tensor of [B·T, V] is never copied to float32 whole (that copy is the memory peak of a KD step
    on a 128k vocabulary). Shapes: logits [..., V] -> [...].
    """
    flat = logits.reshape(-1, logits.shape[-1])
    parts = [torch.logsumexp(block.float() / temperature, dim=-1) for block in flat.split(chunk_rows)]
    return torch.cat(parts).reshape(logits.shape[:-1])


# ----------------------------------------------------------------------------------------------- divergences
# Each takes log-probabilities over the same classes (last dim) and returns one value per position ([...]).
def forward_kl(student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    """KL(p_T‖p_S) = Σ_c p_T(c)·(log p_T(c) − log p_S(c)); mode-covering (Hinton et al., 2015)."""
    s, t = student_logp.clamp(min=LOG_FLOOR), teacher_logp.clamp(min=LOG_FLOOR)
    return (t.exp() * (t - s)).sum(-1)


def reverse_kl(student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    """KL(p_S‖p_T) = Σ_c p_S(c)·(log p_S(c) − log p_T(c)); mode-seeking (Gu et al., 2024, MiniLLM)."""
    s, t = student_logp.clamp(min=LOG_FLOOR), teacher_logp.clamp(min=LOG_FLOOR)
    return (s.exp() * (s - t)).sum(-1)


def generalized_jsd(student_logp: Tensor, teacher_logp: Tensor, beta: float = 0.5) -> Tensor:
    """JSD(β) = β·KL(p_T‖m) + (1−β)·KL(p_S‖m), m = β·p_T + (1−β)·p_S (Agarwal et al., 2024, GKD).

    β in (0, 1); at either end m equals one side and the divergence vanishes (use forward_kl/reverse_kl there).
    β = 0.5 is the symmetric Jensen–Shannon divergence (bounded by log 2).
    """
    if not 0.0 < beta < 1.0:
        raise ValueError(f"jsd beta: expected a value in (0, 1), got {beta}")
    s, t = student_logp.clamp(min=LOG_FLOOR), teacher_logp.clamp(min=LOG_FLOOR)
    m = torch.logsumexp(torch.stack([t + math.log(beta), s + math.log1p(-beta)]), dim=0)
    return beta * forward_kl(m, t) + (1.0 - beta) * forward_kl(m, s)


def total_variation(student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    """TV(p_T, p_S) = ½·Σ_c |p_T(c) − p_S(c)| (in [0, 1])."""
    return 0.5 * (teacher_logp.exp() - student_logp.exp()).abs().sum(-1)


DIVERGENCES: dict[str, Callable[..., Tensor]] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": generalized_jsd,
    "tvd": total_variation,
}


# ------------------------------------------------------------------------------------------- response-based
@dataclass(frozen=True)
class ResponseOptions:
    """How response KD compares the student with the cached teacher; checked once, when constructed.

    divergence: a ``DIVERGENCES`` name. temperature: τ (the loss is multiplied by τ²). tail: the classes compared
    (``TAIL_MODES``, module docstring). capture_temperature: τ_c, the temperature the cache stored its log-probs at.
    jsd_beta: β of the generalized JSD (only read by ``jsd``). unmapped: where the teacher's mass on empty slots goes
    (``UNMAPPED_RULES``, module docstring). An impossible combination is a ValueError that starts with the option's
    name and says what to change (``pipeline.validate`` prefixes the config key path).
    """

    divergence: str = "forward_kl"
    temperature: float = 1.0
    tail: str = "tail_bucket"
    capture_temperature: float = 1.0
    jsd_beta: float = 0.5
    unmapped: str = "tail_bucket"

    def __post_init__(self) -> None:
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence: expected one of {', '.join(DIVERGENCES)}, got {self.divergence!r}")
        if self.tail not in TAIL_MODES:
            raise ValueError(f"tail: expected one of {', '.join(TAIL_MODES)}, got {self.tail!r}")
        if self.temperature <= 0 or self.capture_temperature <= 0:
            raise ValueError(f"temperature: expected > 0, got {self.temperature} (capture {self.capture_temperature})")
        if self.tail == "tail_bucket" and not math.isclose(self.temperature, self.capture_temperature, rel_tol=1e-6):
            raise ValueError(
                f"temperature: tail_bucket needs the capture temperature of the cache ({self.capture_temperature}), "
                f"got {self.temperature}; a lumped tail cannot be re-tempered (use tail=renormalize, or re-cache at "
                f"τ={self.temperature})"
            )
        if self.divergence == "jsd" and not 0.0 < self.jsd_beta < 1.0:
            raise ValueError(f"jsd_beta: expected a value in (0, 1) for divergence jsd, got {self.jsd_beta}")
        if self.unmapped not in UNMAPPED_RULES:
            raise ValueError(f"unmapped: expected one of {', '.join(UNMAPPED_RULES)}, got {self.unmapped!r}")

    @property
    def scale(self) -> float:
        """τ², the factor on the mean divergence (Hinton et al., 2015)."""
        return self.temperature**2

    @property
    def needs_tempered_lse(self) -> bool:
        """Whether the student's full-vocabulary logsumexp at τ is needed beyond its log_softmax at 1."""
        return self.tail == "tail_bucket" and self.temperature != 1.0


def response_class_logprobs(
    student_topk_logits: Tensor,
    student_lse: Tensor,
    teacher_topk_logprobs: Tensor,
    tail_logmass: Tensor,
    options: ResponseOptions,
) -> tuple[Tensor, Tensor]:
    """(student, teacher) log-probs over the classes the divergence compares: [..., k+1] or [..., k].

    student_topk_logits [..., k]: the student's raw logits at the teacher's top-k ids.
    student_lse [...]: ``logsumexp(student_logits / τ)`` over the full vocabulary (read by tail_bucket only;
    passing log-probs as ``student_topk_logits`` with ``student_lse = 0`` is the same at τ = 1).
    teacher_topk_logprobs [..., k], tail_logmass [...]: the cache's columns (log-probs at ``capture_temperature``).
    """
    tau, tau_c = options.temperature, options.capture_temperature
    s_logits = student_topk_logits.float() / tau
    t_logp = teacher_topk_logprobs.float()
    if options.tail == "renormalize":
        return torch.log_softmax(s_logits, -1), torch.log_softmax(t_logp * (tau_c / tau), -1)
    s_topk = s_logits - student_lse.float().unsqueeze(-1)
    s_tail = log1mexp(torch.logsumexp(s_topk, -1))
    t_tail = torch.nan_to_num(tail_logmass.float(), nan=LOG_FLOOR).clamp(min=LOG_FLOOR)
    # log_softmax over the k+1 teacher classes absorbs the cache's fp16 rounding (Σ p = 1 exactly).
    teacher = torch.log_softmax(torch.cat([t_logp.clamp(min=LOG_FLOOR), t_tail.unsqueeze(-1)], -1), -1)
    return torch.cat([s_topk, s_tail.unsqueeze(-1)], -1), teacher


def response_divergence(
    student_topk_logits: Tensor,
    student_lse: Tensor,
    teacher_topk_logprobs: Tensor,
    tail_logmass: Tensor,
    valid: Tensor,
    options: ResponseOptions,
    mapped: Tensor | None = None,
) -> Tensor:
    """D(p_T,t ‖ p_S,t) per position [...] over the top-k (+ tail) classes (no τ², no mean; see ``response_kd``).

    Positions where ``valid`` is false get a finite value that callers mask out: padded positions may hold anything
    in the cache, and neutral values keep nan out of the backward pass too. ``mapped`` [..., k] (default: every slot)
    false marks empty slots: masked on both sides, their teacher mass in the tail (module docstring).
    """
    valid = valid.to(torch.bool)
    teacher_topk_logprobs = torch.where(valid.unsqueeze(-1), teacher_topk_logprobs.float(), -1.0)
    tail_logmass = torch.where(valid, tail_logmass.float(), -1.0)
    if mapped is not None:
        empty_mass = torch.logsumexp(teacher_topk_logprobs.masked_fill(mapped, -math.inf), -1)
        tail_logmass = torch.logaddexp(tail_logmass, empty_mass)  # exactly the tail when no slot is empty
        teacher_topk_logprobs = torch.where(mapped, teacher_topk_logprobs, LOG_FLOOR)
        # divided by τ inside, an empty student slot is LOG_FLOOR: probability 0, and a constant (no gradient)
        student_topk_logits = torch.where(mapped, student_topk_logits, LOG_FLOOR * options.temperature)
    student, teacher = response_class_logprobs(
        student_topk_logits, student_lse, teacher_topk_logprobs, tail_logmass, options
    )
    fn = DIVERGENCES[options.divergence]
    return fn(student, teacher, options.jsd_beta) if options.divergence == "jsd" else fn(student, teacher)


def token_cross_entropy(student_logits: Tensor, labels: Tensor) -> Tensor:
    """−log p_S(y_t) per position: logits [..., V] (any dtype; float32 log_softmax), labels [...] -> [...]."""
    logp = torch.log_softmax(student_logits.float(), -1)
    return -logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def ce_and_response_terms(
    student_logits: Tensor,
    labels: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    tail_logmass: Tensor,
    kd_valid: Tensor,
    options: ResponseOptions,
) -> tuple[Tensor, Tensor]:
    """Per position [...]: (−log p_S(y_t), D(p_T,t ‖ p_S,t)) from one float32 log_softmax and one gather.

    The log_softmax is the one cross-entropy computes anyway (``F.cross_entropy`` = log_softmax + gather); the
    label and top-k ids are gathered together, so the backward pass has one scatter. Only a tail bucket at τ ≠ 1
    needs a second full-vocabulary pass (the student tempered at τ). Computing the normaliser twice made a
    tail-bucket KD step ~25 % slower than CE on a 49k vocabulary. Shapes: student_logits [..., V], labels [...],
    topk_ids [..., k] (-1: an empty slot, module docstring), topk_logprobs [..., k], tail_logmass [...], kd_valid [...].
    """
    mapped = topk_ids >= 0
    slots = topk_ids.clamp(min=0)
    logp = torch.log_softmax(student_logits.float(), -1)  # [..., V]; float32 like HF's own causal-LM loss
    picked = logp.gather(-1, torch.cat([labels.unsqueeze(-1), slots], -1))
    if options.needs_tempered_lse:
        student_topk, lse = student_logits.gather(-1, slots), logsumexp_fp32(student_logits, options.temperature)
    else:  # log-probs are logits shifted by their logsumexp: lse 0; renormalising ignores the shift anyway
        student_topk, lse = picked[..., 1:], torch.zeros_like(picked[..., 0])
    kd = response_divergence(student_topk, lse, topk_logprobs, tail_logmass, kd_valid, options, mapped)
    if options.unmapped == "uld":
        kd = kd + uld_distance(logp, topk_ids, topk_logprobs)
    return -picked[..., 0], kd


def uld_distance(student_logp: Tensor, topk_ids: Tensor, teacher_topk_logprobs: Tensor) -> Tensor:
    """ULD's sorted-probability distance (Boizard et al., 2024) on what exact id matching leaves over, per position:

    Σ_{i<k} |sort↓(p_T on the empty slots)_i − sort↓(q outside the mapped ids)_i|: the teacher's probabilities of
    tokens the student has no token for against the student's k largest probabilities among ids no slot maps to (an
    optimal-transport distance between the two sorted lists; which token is which is ignored). Shapes: student_logp
    [..., V] log-probs, topk_ids [..., k] student ids (-1: empty), teacher_topk_logprobs [..., k] -> [...]. Costs one
    [..., V] copy and a top-k.
    """
    mapped = topk_ids >= 0
    k = topk_ids.shape[-1]
    teacher = torch.where(mapped, 0.0, teacher_topk_logprobs.float().exp()).sort(-1, descending=True).values
    claimed = torch.zeros_like(student_logp).scatter_add_(-1, topk_ids.clamp(min=0), mapped.float()) > 0
    student = student_logp.masked_fill(claimed, -math.inf).topk(k, dim=-1).values.exp()
    return (teacher - student).abs().sum(-1)


def cross_entropy(student_logits: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
    """Hard-label CE = (1/|M|) Σ_{t∈M} −log p_S(y_t); shapes logits [..., V], labels [...], mask [...]."""
    return masked_mean(token_cross_entropy(student_logits, labels), mask)


def ce_and_response_kd(
    student_logits: Tensor,
    labels: Tensor,
    ce_mask: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    tail_logmass: Tensor,
    kd_mask: Tensor,
    options: ResponseOptions,
) -> tuple[Tensor, Tensor]:
    """(CE, response KD) as ``cross_entropy`` and ``response_kd`` give them, from one log_softmax
    (``ce_and_response_terms``)."""
    ce, kd = ce_and_response_terms(student_logits, labels, topk_ids, topk_logprobs, tail_logmass, kd_mask, options)
    return masked_mean(ce, ce_mask), masked_mean(kd, kd_mask) * options.scale


def response_kd(
    student_logits: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    tail_logmass: Tensor,
    mask: Tensor,
    options: ResponseOptions = ResponseOptions(),  # frozen: one shared default is safe
) -> Tensor:
    """Response-based KD on cached top-k teacher log-probs.

    loss = τ² · (1/|M|) Σ_{t∈M} D(p_T,t ‖ p_S,t), with D from ``DIVERGENCES`` over the top-k (+ tail) classes
    described in the module docstring; M = positions where ``mask`` is 1; 0 when M is empty.

    Shapes: student_logits [..., V] (any dtype; math in float32), topk_ids [..., k] long, topk_logprobs [..., k],
    tail_logmass [...], mask [...]. Reference: Hinton et al., "Distilling the Knowledge in a Neural Network" (2015);
    torchtune ``ForwardKLLoss`` (torchtune/modules/loss/kd_losses.py) for the full-vocabulary special case.
    """
    labels = torch.zeros_like(topk_ids[..., 0])
    _, kd = ce_and_response_terms(student_logits, labels, topk_ids, topk_logprobs, tail_logmass, mask, options)
    return masked_mean(kd, mask) * options.scale


# ------------------------------------------------------------------------ sampled targets (unbiased sparse KD)
def sparse_cross_entropy(student_logp: Tensor, target_ids: Tensor | None, target_weights: Tensor) -> Tensor:
    """H(w, p_S) = −Σ_j w_j · log p_S(id_j) per position: [...].

    student_logp [..., V]; target_ids [..., m] long with target_weights [..., m] (a sparse target: padding slots
    have weight 0), or target_ids None with target_weights [..., V'] (a dense target over ids 0..V'-1, k = V'; a
    student with more output rows than the teacher's vocabulary, V ≥ V', has no target on the extra ones).
    """
    if target_ids is None:
        dense = student_logp[..., : target_weights.shape[-1]].clamp(min=LOG_FLOOR)
        return -(target_weights.float() * dense).sum(-1)
    picked = student_logp.gather(-1, target_ids).clamp(min=LOG_FLOOR)
    return -(target_weights.float() * picked).sum(-1)


def sampled_kd(
    student_logits: Tensor, target_ids: Tensor | None, target_weights: Tensor, mask: Tensor, *, temperature: float = 1.0
) -> Tensor:
    """Sampled-target KD: τ² · (1/|M|) Σ_{t∈M} −Σ_j w_{t,j} · log softmax(z_t/τ)[id_{t,j}].

    With targets drawn from the teacher (``pipeline.sampling``: w_v = (c_v/n)·p(v)/q(v), so E[w_v] = p_τ(v)) this
    is the random-sampling KD estimator of Anshumann et al., "Sparse Logit Sampling: Accelerating Knowledge
    Distillation in LLMs" (ACL 2025, arXiv 2503.16870). Its gradient with respect to the student's logits is

        ∂/∂z_v = τ · ((Σ_j w_j) · softmax(z/τ)_v − w_v)     (per position, before the mean)

    whose expectation over the draws, τ · (softmax(z/τ)_v − p_τ(v)), is the gradient of the full-vocabulary forward
    KL(p_τ‖softmax(z/τ)) × τ²: the estimator is unbiased for that gradient, unlike a top-k cache, whose tail class
    only tells the student how much mass lies outside the head, not where (``response_kd``). The value is the
    cross-entropy H(p_τ, p_S) = KL + H(p_τ) (the teacher's entropy is a constant the draws do not give), so it is
    comparable with the same loss on dense targets (``target_ids`` None, k = V: the online teacher's exact
    distribution), whose value the sampled loss estimates, but not with ``response_kd``'s KL.

    The exact top-k head plus a sampled tail is the same function on the targets of ``head_and_sampled_tail``.
    Shapes: student_logits [..., V] (any dtype, float32 math); target_ids [..., m] long or None; target_weights
    [..., m] (or [..., V]); mask [...]. Padded positions may hold anything; the result is 0 when M is empty. τ must
    be the temperature the targets were drawn at (``check_sampled_options``).
    """
    labels = torch.zeros_like(mask, dtype=torch.long)
    _, kd = ce_and_sampled_terms(student_logits, labels, target_ids, target_weights, mask, SampledOptions(temperature))
    return masked_mean(kd, mask) * temperature**2


@dataclass(frozen=True)
class SampledOptions:
    """Sampled targets (or the online teacher's dense ones): τ, the temperature they were drawn at (the loss is
    multiplied by τ²); checked when constructed. Their divergence is the forward KL (``check_sampled_options``)."""

    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature: expected > 0, got {self.temperature}")

    @property
    def scale(self) -> float:
        return self.temperature**2


def ce_and_sampled_terms(
    student_logits: Tensor,
    labels: Tensor,
    target_ids: Tensor | None,
    target_weights: Tensor,
    kd_valid: Tensor,
    options: SampledOptions,
) -> tuple[Tensor, Tensor]:
    """Per position [...]: (−log p_S(y_t), −Σ_j w_{t,j} log p_S,τ(id_{t,j})), one float32 log_softmax when τ = 1.

    The per-position terms of ``sampled_kd`` (no τ², no mean), as ``ce_and_response_terms`` for the top-k: what
    ``pipeline.lm_head`` sums chunk by chunk. Positions where ``kd_valid`` is false get no target (their cached
    values may be anything). Shapes: student_logits [..., V], labels [...], target_ids [..., m] or None,
    target_weights [..., m] or [..., V], kd_valid [...].
    """
    logp = torch.log_softmax(student_logits.float(), -1)
    ce = -logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    if options.temperature != 1.0:
        logp = torch.log_softmax(student_logits.float() / options.temperature, -1)
    valid = kd_valid.to(torch.bool).unsqueeze(-1)
    weights = torch.nan_to_num(torch.where(valid, target_weights.float(), 0.0), nan=0.0, posinf=0.0, neginf=0.0)
    ids = None if target_ids is None else torch.where(valid, target_ids, 0)
    return ce, sparse_cross_entropy(logp, ids, weights)


def ce_and_sampled_kd(
    student_logits: Tensor,
    labels: Tensor,
    ce_mask: Tensor,
    target_ids: Tensor | None,
    target_weights: Tensor,
    kd_mask: Tensor,
    *,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """(CE, ``sampled_kd``) from ``ce_and_sampled_terms`` (as ``ce_and_response_kd`` for the top-k)."""
    options = SampledOptions(temperature)
    ce, kd = ce_and_sampled_terms(student_logits, labels, target_ids, target_weights, kd_mask, options)
    return masked_mean(ce, ce_mask), masked_mean(kd, kd_mask) * options.scale


def head_and_sampled_tail(
    topk_ids: Tensor, topk_logprobs: Tensor, sampled_ids: Tensor, sampled_weights: Tensor, *, support: str
) -> tuple[Tensor, Tensor]:
    """Targets of the hybrid estimator: the exact top-k head plus sampled weights for the tail, [..., k + m].

    target(v) = p(v) for v in the head (``topk_logprobs``), w_v for sampled v outside it. Unbiased for p either way:
    with ``support`` "tail" the draws came from the tail alone (weights already carry the tail mass); with "full"
    they came from the whole distribution and the draws that hit the head are dropped (E[w_v] = p(v) holds for each
    tail token by itself). Shapes: topk_ids/topk_logprobs [..., k], sampled_ids/sampled_weights [..., m].
    """
    if support not in ("full", "tail"):
        raise ValueError(f"support: expected full or tail, got {support!r}")
    weights = sampled_weights.float()
    if support == "full":
        in_head = (sampled_ids.unsqueeze(-1) == topk_ids.unsqueeze(-2)).any(-1)
        weights = torch.where(in_head, 0.0, weights)
    head = topk_logprobs.float().clamp(min=LOG_FLOOR).exp()
    return torch.cat([topk_ids, sampled_ids.long()], -1), torch.cat([head, weights], -1)


def truncate_topk(topk_ids: Tensor, topk_logprobs: Tensor, tail_logmass: Tensor, k: int) -> tuple[Tensor, ...]:
    """The cache's top-k cut to its first ``k`` entries (they are sorted, most probable first): (ids [..., k],
    log-probs [..., k], tail [...]) with the dropped entries' mass added to the exact tail,
    log(exp(tail) + Σ_{j≥k} p_j), so a top-32 cache trains a top-8 student exactly as a top-8 cache would."""
    dropped = topk_logprobs[..., k:].float()
    tail = torch.logsumexp(torch.cat([tail_logmass.float().unsqueeze(-1), dropped], -1), -1)
    return topk_ids[..., :k], topk_logprobs[..., :k], tail


def check_sampled_options(divergence: str, temperature: float, capture_temperature: float) -> None:
    """Sampled targets estimate the forward KL at the temperature they were drawn at (online targets: pass τ as the
    capture temperature); refuse anything else with a ValueError that says what to change."""
    if divergence != "forward_kl":
        raise ValueError(
            "divergence: sampled and online targets are distilled with the forward KL (its gradient is linear in the "
            f"target, so draws estimate it without bias), got {divergence!r}"
        )
    if not math.isclose(temperature, capture_temperature, rel_tol=1e-6):
        raise ValueError(
            f"temperature: sampled targets were drawn at the capture temperature of the cache ({capture_temperature})"
            f", got {temperature}; re-cache at cache.temperature={temperature}"
        )


def combine(components: dict[str, Tensor], weights: dict[str, float]) -> Tensor:
    """Σ_name weights[name] · components[name] over components with a positive weight (a weighted sum: the terms
    add, so each one moves the total on its own)."""
    terms = [weights[name] * value for name, value in components.items() if weights.get(name, 0.0) > 0]
    if not terms:
        raise ValueError(f"no component has a positive weight (components {sorted(components)}, weights {weights})")
    return torch.stack(terms).sum()


# -------------------------------------------------------------------------------------------- feature-based
class FeatureProjectors(nn.Module):
    """One learned ``nn.Linear(student width → teacher width)`` per (student layer, teacher layer) pair.

    Layer indices follow ``pipeline.modeling.HIDDEN_INDEX_CONVENTION`` (hidden_states[i]); keys are ``s{i}_t{j}``.
    Part of the trained state: in the optimizer, the schedule and every checkpoint.
    """

    def __init__(self, layer_pairs: list[tuple[int, int]], student_dim: int, teacher_dim: int) -> None:
        super().__init__()
        self.layer_pairs = [(int(s), int(t)) for s, t in layer_pairs]
        self.proj = nn.ModuleDict({self.key(s, t): nn.Linear(student_dim, teacher_dim) for s, t in self.layer_pairs})

    @staticmethod
    def key(student_layer: int, teacher_layer: int) -> str:
        return f"s{student_layer}_t{teacher_layer}"

    def forward(self, student_layer: int, teacher_layer: int, hidden: Tensor) -> Tensor:
        """[..., Hs] -> [..., Ht] in float32."""
        layer = self.proj[self.key(student_layer, teacher_layer)]
        return layer(hidden.to(layer.weight.dtype)).float()


def normalized_mse(student: Tensor, teacher: Tensor) -> Tensor:
    """mean_h (LN(s)_h − LN(t)_h)² per position, LN = layer norm without affine (zero mean, unit variance): keeps
    a teacher's few huge-magnitude channels from dominating the distance."""
    h = teacher.shape[-1]
    s, t = F.layer_norm(student.float(), (h,)), F.layer_norm(teacher.float(), (h,))
    return (s - t).pow(2).mean(-1)


def cosine_distance(student: Tensor, teacher: Tensor) -> Tensor:
    """1 − cos(s, t) per position (scale-free, in [0, 2])."""
    return 1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=-1, eps=1e-6)


FEATURE_METRICS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"mse": normalized_mse, "cosine": cosine_distance}


def feature_distance(student_proj: Tensor, teacher: Tensor, mask: Tensor, metric: str = "mse") -> Tensor:
    """Masked mean over positions of ``FEATURE_METRICS[metric](projected student, teacher)``.

    Shapes: student_proj [B, T', Ht] (already projected and, when the cache subsamples positions, gathered at
    ``hidden_positions``), teacher [B, T', Ht], mask [B, T']. Reference: FitNets (Romero et al., 2015) hint loss
    with a learned regressor; normalisation as in TinyBERT/MiniLM-style layer distillation.
    """
    if metric not in FEATURE_METRICS:
        raise ValueError(f"feature metric: expected one of {', '.join(FEATURE_METRICS)}, got {metric!r}")
    valid = mask.to(torch.bool)
    teacher = torch.where(valid.unsqueeze(-1), teacher.float(), 1.0)  # padded rows may hold zeros/garbage
    return masked_mean(FEATURE_METRICS[metric](student_proj, teacher), valid)


# ------------------------------------------------------------------------------------------- relation-based
def pool_hidden(hidden: Tensor, mask: Tensor) -> Tensor:
    """Masked mean over positions: [B, T, H], [B, T] -> [B, H] float32 (the cache's ``embed`` pooling)."""
    weights = mask.to(torch.float32).unsqueeze(-1)
    return (hidden.float() * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def _offdiag(n: int, device: torch.device) -> Tensor:
    return ~torch.eye(n, dtype=torch.bool, device=device)


def _pdist(x: Tensor) -> Tensor:
    """Euclidean distances [N, N] with a finite gradient at the zero diagonal (sqrt'(0) = inf)."""
    sq = (x.unsqueeze(0) - x.unsqueeze(1)).pow(2).sum(-1)
    return sq.clamp(min=1e-12).sqrt() * _offdiag(x.shape[0], x.device)


def rkd_distance(student: Tensor, teacher: Tensor) -> Tensor:
    """RKD distance term: smooth-L1 between pairwise distances, each normalised by its mean over pairs i ≠ j.

    ψ_D(i, j) = ‖x_i − x_j‖ / μ, μ = mean_{i≠j} ‖x_i − x_j‖; loss = mean_{i≠j} smoothL1(ψ_D^S, ψ_D^T).
    Shapes: student [N, Ds], teacher [N, Dt] (widths may differ); 0 for N < 2.
    Reference: Park et al., "Relational Knowledge Distillation", CVPR 2019, eq. 5 (github.com/lenscloth/RKD).
    """
    n = student.shape[0]
    if n < 2:
        return student.float().sum() * 0.0
    off = _offdiag(n, student.device)
    with torch.no_grad():
        t = _pdist(teacher.float())
        t = t / t[off].mean().clamp(min=1e-12)
    s = _pdist(student.float())
    s = s / s[off].mean().clamp(min=1e-12)
    return F.smooth_l1_loss(s[off], t[off])


def _triplet_cosines(x: Tensor) -> Tensor:
    """cos∠(x_i, x_j, x_k) = <e_ji, e_jk> with e_ji = (x_i − x_j)/‖x_i − x_j‖: [N(j), N(i), N(k)]."""
    diff = F.normalize(x.unsqueeze(0) - x.unsqueeze(1), p=2, dim=-1, eps=1e-12)  # diff[j, i] = x_i − x_j
    return torch.bmm(diff, diff.transpose(1, 2))


def rkd_angle(student: Tensor, teacher: Tensor) -> Tensor:
    """RKD angle term: smooth-L1 between the cosines of the angle at x_j in every triplet of distinct i, j, k.

    ψ_A(i, j, k) = <(x_i − x_j)/‖x_i − x_j‖, (x_k − x_j)/‖x_k − x_j‖>; loss = mean smoothL1(ψ_A^S, ψ_A^T).
    Shapes: student [N, Ds], teacher [N, Dt]; 0 for N < 3. Reference: Park et al., CVPR 2019, eq. 7.
    """
    n = student.shape[0]
    if n < 3:
        return student.float().sum() * 0.0
    idx = torch.arange(n, device=student.device)
    distinct = (idx[:, None, None] != idx[None, :, None]) & (idx[:, None, None] != idx[None, None, :])
    distinct &= idx[None, :, None] != idx[None, None, :]
    with torch.no_grad():
        t = _triplet_cosines(teacher.float())
    s = _triplet_cosines(student.float())
    return F.smooth_l1_loss(s[distinct], t[distinct])


def cosine_similarities(x: Tensor) -> Tensor:
    """cos(x_i, x_j): [N, D] -> [N, N]."""
    x = F.normalize(x.float(), dim=-1, eps=1e-12)
    return x @ x.T


def euclidean_similarities(x: Tensor) -> Tensor:
    """exp(−‖x_i − x_j‖ / μ), μ the mean distance over i ≠ j: a similarity in (0, 1] that is width-agnostic."""
    d = _pdist(x.float())
    n = x.shape[0]
    return torch.exp(-d / d[_offdiag(n, x.device)].mean().clamp(min=1e-12))


def dot_similarities(x: Tensor) -> Tensor:
    """Row-L2-normalised Gram matrix G = X·Xᵀ (Tung & Mori, "Similarity-Preserving KD", ICCV 2019)."""
    g = x.float() @ x.float().T
    return F.normalize(g, p=2, dim=-1, eps=1e-12)


PAIRWISE_METRICS: dict[str, Callable[[Tensor], Tensor]] = {
    "cosine": cosine_similarities,
    "euclidean": euclidean_similarities,
    "dot": dot_similarities,
}


def pairwise_relation(student: Tensor, teacher: Tensor, metric: str = "cosine") -> Tensor:
    """mean_{i≠j} (S^S_ij − S^T_ij)², S = ``PAIRWISE_METRICS[metric]``; shapes [N, Ds], [N, Dt]; 0 for N < 2."""
    if metric not in PAIRWISE_METRICS:
        raise ValueError(f"pairwise metric: expected one of {', '.join(PAIRWISE_METRICS)}, got {metric!r}")
    n = student.shape[0]
    if n < 2:
        return student.float().sum() * 0.0
    off = _offdiag(n, student.device)
    with torch.no_grad():
        t = PAIRWISE_METRICS[metric](teacher)
    s = PAIRWISE_METRICS[metric](student)
    return (s[off] - t[off]).pow(2).mean()


def relation_loss(
    student: Tensor,
    teacher: Tensor,
    *,
    distance_weight: float = 25.0,
    angle_weight: float = 50.0,
    pairwise_weight: float = 0.0,
    pairwise_metric: str = "cosine",
) -> tuple[Tensor, dict[str, Tensor]]:
    """w_D·rkd_distance + w_A·rkd_angle + w_P·pairwise_relation (a sum: every term moves the total on its own).

    Shapes: student [N, Ds], teacher [N, Dt] pooled sequence embeddings. Returns (total, {distance, angle,
    pairwise}) with unweighted parts for logging. Defaults 25/50 from Park et al. (2019).
    """
    parts = {
        "distance": rkd_distance(student, teacher),
        "angle": rkd_angle(student, teacher),
        "pairwise": pairwise_relation(student, teacher, pairwise_metric),
    }
    weights = {"distance": distance_weight, "angle": angle_weight, "pairwise": pairwise_weight}
    total = sum((weights[k] * v for k, v in parts.items() if weights[k] > 0), student.float().sum() * 0.0)
    return total, parts


def _all_gather_rows(x: Tensor) -> tuple[Tensor, int]:
    """Concatenation of every rank's ``x`` [n_r, ...] (n_r may differ) and this rank's row offset in it."""
    import torch.distributed as dist

    world, rank = dist.get_world_size(), dist.get_rank()
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], dtype=torch.long, device=x.device))
    counts = [int(c.item()) for c in sizes]
    padded = torch.zeros((max(counts), *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x.detach()
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded)
    return torch.cat([block[:c] for block, c in zip(out, counts, strict=True)]), sum(counts[:rank])


class _GatherWithLocalGrad(torch.autograd.Function):
    """all_gather whose backward returns this rank's slice of the gradient, times the world size.

    Every rank computes the same loss from the same gathered tensor, so the true gradient of a rank's slice is the
    sum over ranks of identical copies = world_size × the local one; DDP then averages over ranks. Equal to
    all_gather's reduce-scatter backward without a collective (gloo has no reduce_scatter).
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        import torch.distributed as dist

        gathered, ctx.offset = _all_gather_rows(x)
        ctx.n, ctx.world = x.shape[0], dist.get_world_size()
        return gathered

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        return grad[ctx.offset : ctx.offset + ctx.n] * ctx.world


def gather_across_ranks(x: Tensor) -> Tensor:
    """Concatenate ``x`` [n_r, ...] from every rank into [Σ n_r, ...] (rank order), gradient flowing to the local
    rows only (see ``_GatherWithLocalGrad``); identity without torch.distributed."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    if not x.requires_grad:
        return _all_gather_rows(x)[0]
    return _GatherWithLocalGrad.apply(x)
