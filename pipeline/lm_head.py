"""The student's last layer chunk by chunk: LM head, cross-entropy and response KD without whole [N, V] logits.

A training step used to hold the student's logits for the whole micro-batch, [B, T, V], a float32 log_softmax of
the same size and the gradients of both: for an 8B student (V = 128,256) at 2 x 4096 positions that is ~2 GB of bf16
logits plus ~4 GB of fp32 log-probs plus as much again in gradients, the peak of the step. Here the final hidden
state [N, H] (N = B·T) is cut into chunks of ``chunk`` positions; each chunk runs the head, the float32
log_softmax and the per-position terms of :mod:`pipeline.losses` (CE, and response KD for every divergence and
target form) and returns their masked sums. Each chunk runs under ``torch.utils.checkpoint`` (non-reentrant): its
[c, V] tensors are freed after the forward and recomputed in the backward, one chunk at a time, so the step's extra
memory is a few [c, V] blocks. Gradients reach the hidden state and the head's parameters through ordinary autograd
(one graph, each parameter's gradient accumulated once), which is what DDP's and FSDP's hooks expect.

The head is the model's own output module (``get_output_embeddings()``), called on each chunk rather than its
``.weight`` read out: a tied embedding, a LoRA-wrapped head and FSDP's unsharded parameter are then exactly what the
student's own forward would use. Models that transform their logits after the head (Gemma-2's soft-capping, ...)
would be scored wrongly; ``post_head_transform`` names them so ``pipeline.validate`` refuses chunking for them.

Written by hand: Liger-Kernel's fused linear cross-entropy and fused KD losses do this with Triton kernels (GPU
only) and compare full distributions, not a cached top-k + tail; torchtune's chunked CE chunks logits the head has
already made whole. Evaluation's intrinsic metrics use :func:`logits_in_chunks` (the same chunking, no gradient).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from pipeline import losses

TEACHER_COLUMNS = ("topk_ids", "topk_logprobs", "tail_logmass")  # cache columns response KD reads
# Config keys of transforms models apply to their logits after the LM head (Gemma-2/3 soft-capping, Cohere's
# logit_scale, Granite's logits_scaling): calling the head module alone would skip them.
POST_HEAD_KEYS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


@dataclass(frozen=True)
class HeadTargets:
    """What the student's next-token distributions are scored against, position by position.

    labels [...] long (next token), ce_mask [...] and kd_mask [...] bool, teacher: the cache's ``TEACHER_COLUMNS``
    ([..., k], [..., k], [...]) when ``response`` is ``ResponseOptions``; ``target_weights`` [..., m] and, for a
    sparse target, ``target_ids`` [..., m] when it is ``SampledOptions`` (sampled, head + sampled tail, or the
    online teacher's dense [..., V] distribution); empty without response KD. ``ce_grad`` False: CE is only logged,
    so it builds no graph (a variant without CE or response weight).
    """

    labels: Tensor
    ce_mask: Tensor
    kd_mask: Tensor
    teacher: dict[str, Tensor] = field(default_factory=dict)
    response: losses.ResponseOptions | losses.SampledOptions | None = None
    ce_grad: bool = True

    @property
    def needs_grad(self) -> bool:
        return self.response is not None or self.ce_grad

    def flat(self) -> HeadTargets:
        """The same targets with the position dims flattened to one ([N], [N, k])."""
        dims = self.labels.dim()
        flat = {k: v.reshape(-1, *v.shape[dims:]) for k, v in self._tensors().items()}
        return self._with(flat)

    def rows(self, start: int, stop: int) -> HeadTargets:
        """Positions ``start:stop`` of flat targets."""
        return self._with({k: v[start:stop] for k, v in self._tensors().items()})

    def _tensors(self) -> dict[str, Tensor]:
        return {"labels": self.labels, "ce_mask": self.ce_mask, "kd_mask": self.kd_mask, **self.teacher}

    def _with(self, tensors: dict[str, Tensor]) -> HeadTargets:
        teacher = {k: tensors[k] for k in self.teacher}
        return dataclasses.replace(
            self, labels=tensors["labels"], ce_mask=tensors["ce_mask"], kd_mask=tensors["kd_mask"], teacher=teacher
        )


def causal_targets(input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(labels, ce_mask, kd_mask), all [B, T].

    Position t predicts token t+1: labels[t] = input_ids[t+1], valid where both are real tokens (the last position
    has no label). The teacher's distribution at t is a target wherever t is a real token (the cache stores it at
    every position, including the last real one).
    """
    labels = torch.zeros_like(input_ids)
    labels[:, :-1] = input_ids[:, 1:]
    ce_mask = torch.zeros_like(attention_mask, dtype=torch.bool)
    ce_mask[:, :-1] = attention_mask[:, :-1].bool() & attention_mask[:, 1:].bool()
    return labels, ce_mask, attention_mask.bool()


def _sums(logits: Tensor, targets: HeadTargets) -> Tensor:
    """[Σ_{ce_mask} −log p_S(y), Σ_{kd_mask} D(p_T ‖ p_S)] (float32 [2]) of one block of positions (D = 0 without
    response KD): sums, so blocks add up to the masked means of the whole batch."""
    if targets.response is None:
        ce = losses.token_cross_entropy(logits, targets.labels)
        return torch.stack([losses.masked_sum(ce, targets.ce_mask), ce.new_zeros(())])
    t = targets.teacher
    if isinstance(targets.response, losses.SampledOptions):
        ce, kd = losses.ce_and_sampled_terms(
            logits, targets.labels, t.get("target_ids"), t["target_weights"], targets.kd_mask, targets.response
        )
        return torch.stack([losses.masked_sum(ce, targets.ce_mask), losses.masked_sum(kd, targets.kd_mask)])
    ce, kd = losses.ce_and_response_terms(
        logits, targets.labels, t["topk_ids"], t["topk_logprobs"], t["tail_logmass"], targets.kd_mask,
        targets.response,
    )  # fmt: skip
    return torch.stack([losses.masked_sum(ce, targets.ce_mask), losses.masked_sum(kd, targets.kd_mask)])


def _means(sums: Tensor, targets: HeadTargets) -> dict[str, Tensor]:
    """{ce, kd_response}: the sums over the masked counts (0 when nothing counts), KD times τ²."""
    scores = {"ce": sums[0] / targets.ce_mask.sum().clamp(min=1)}
    if targets.response is not None:
        scores["kd_response"] = sums[1] / targets.kd_mask.sum().clamp(min=1) * targets.response.scale
    return scores


def _head_sums(head: nn.Module, hidden: Tensor, targets: HeadTargets) -> Tensor:
    return _sums(head(hidden), targets)


def scores_from_logits(logits: Tensor, targets: HeadTargets) -> dict[str, Tensor]:
    """{ce, kd_response (with response KD)} from whole logits [..., V] (the unchunked path, ``logits_chunk: 0``);
    equal to ``losses.cross_entropy`` / ``losses.ce_and_response_kd``."""
    with torch.set_grad_enabled(torch.is_grad_enabled() and targets.needs_grad):
        return _means(_sums(logits, targets), targets)


def chunked_scores(hidden: Tensor, head: nn.Module, targets: HeadTargets, chunk: int) -> dict[str, Tensor]:
    """{ce, kd_response} of ``head(hidden)`` computed ``chunk`` positions at a time; equal to
    ``scores_from_logits(head(hidden), targets)`` up to float rounding, without the [N, V] logits.

    hidden [..., H] (the body's final, normed hidden state), targets over the same positions [...]. With gradients
    each chunk is checkpointed: its logits and log-probs are recomputed in the backward pass instead of kept.
    """
    flat_hidden, flat = hidden.reshape(-1, hidden.shape[-1]), targets.flat()
    grad = torch.is_grad_enabled() and targets.needs_grad
    total = None
    with torch.set_grad_enabled(grad):
        for start, block in zip(range(0, flat_hidden.shape[0], chunk), flat_hidden.split(chunk), strict=True):
            part = flat.rows(start, start + block.shape[0])
            if grad:
                sums = checkpoint(_head_sums, head, block, part, use_reentrant=False)
            else:
                sums = _head_sums(head, block, part)
            total = sums if total is None else total + sums
    return _means(total, flat)


def logits_in_chunks(hidden: Tensor, head: nn.Module, chunk: int) -> Iterator[tuple[slice, Tensor]]:
    """(rows, float32 logits [c, V]) for consecutive chunks of the flat positions of ``hidden`` [..., H]."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    for start in range(0, flat.shape[0], chunk):
        rows = slice(start, min(start + chunk, flat.shape[0]))
        yield rows, head(flat[rows]).float()


def body_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(the decoder that returns the final hidden state, the LM head module) of a transformers causal LM (a peft
    model answers for its base model)."""
    return model.get_decoder(), model.get_output_embeddings()


def post_head_transform(model_config: Any) -> str | None:
    """The config key of a transform the model applies to its logits after the LM head, None when the head's
    output is the logits (what chunking assumes)."""
    for key in POST_HEAD_KEYS:
        value = getattr(model_config, key, None)
        if value is not None and value != 1.0:
            return key
    return None
