"""Sampled teacher targets: draws from the teacher's distribution stored as unique token ids with weights.

Random-sampling KD (Anshumann et al., "Sparse Logit Sampling: Accelerating Knowledge Distillation in LLMs",
ACL 2025, arXiv 2503.16870). At each position the cache draws n tokens x_1..x_n from a proposal q over a support S
and stores every distinct token v with the weight

    w_v = (c_v / n) · p(v) / q(v),        c_v = #{j : x_j = v}

Since E[c_v / n] = q(v), E[w_v] = p(v) for every v in S: the sparse vector w is an unbiased estimate of the
teacher's distribution on S, and so the cross-entropy of the student's full softmax against w has, in
expectation, the gradient of the full-vocabulary forward KL (``pipeline.losses.sampled_kd`` gives the formula).

- Support ``full`` (``cache.targets: sampled``): S = the vocabulary. With q = p (``proposal_temperature`` 1) the
  weights are plain counts c_v / n, exactly representable in fp16 when n is a power of two.
- Support ``tail`` (``cache.targets: topk+sampled``): S = the tokens outside the exact top-k head, q = the
  teacher's tail renormalised, so w_v = (c_v / n) · tail_mass; head and tail together estimate p without bias and
  with less variance than full-support draws (the head's large probabilities are exact).
- ``proposal_temperature`` t ≠ 1: q ∝ p^(1/t) on S (t > 1 flattens it and reaches further into the tail); the
  ratio p/q is stored in the weights. The paper self-normalises these weights (Σ w = 1, biased by O(1/n)); here they
  are kept unnormalised, which is exactly unbiased: the loss does not need Σ w = 1 (its gradient is
  (Σ w)·softmax − w, whose mean is softmax − p).

Determinism: every draw is the inverse CDF of the proposal at a uniform from numpy's ``default_rng([seed, shard
key, row])`` (:func:`row_uniforms`), so a shard's draws depend on the seed, the manifest shard's content and the
row only, never on the batch size, the device's RNG or how many shards were done before a kill -9 and a resume.

Written here because no KD library stores sampled targets (DistillKit, Megatron and axolotl cache top-k; TRL and
torchtune distil online); ``torch.multinomial`` would tie the draws to the device's generator.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

SUPPORTS = ("full", "tail")


def shard_key(manifest_sha256: str) -> int:
    """A 60-bit integer of a manifest shard's checksum: the shard's part of the draw seed."""
    return int(manifest_sha256[:15], 16)


def row_uniforms(seed: int, key: int, rows: range | list[int], seq_len: int, draws: int) -> np.ndarray:
    """[len(rows), seq_len, draws] float32 uniforms in [0, 1), one generator per row (``[seed, key, row]``)."""
    out = np.empty((len(rows), seq_len, draws), dtype=np.float32)
    for i, row in enumerate(rows):
        out[i] = np.random.default_rng([seed, key, int(row)]).random((seq_len, draws), dtype=np.float32)
    return out


def draw(
    logp: Tensor,
    uniforms: Tensor,
    *,
    proposal_temperature: float = 1.0,
    exclude: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Draw ``n`` tokens per position and return them as (unique ids, weights), both [N, n].

    logp [N, V]: the teacher's log-probs (full distribution at the capture temperature; not modified).
    uniforms [N, n]: uniforms in [0, 1) (:func:`row_uniforms`); draw j is the inverse CDF of q at uniforms[:, j].
    exclude [N, k]: ids outside the support (the exact top-k head for support ``tail``); None: the whole vocabulary.
    Returns ids int64 and weights float32 (w_v = c_v/n · p(v)/q(v), module docstring), distinct ids ordered by
    weight (descending, ties by id) and padded with id 0 / weight 0 up to n. Positions whose support has no mass
    (every token excluded) get only padding. Memory: one [N, V] fp32 block besides ``logp``.
    """
    n = uniforms.shape[-1]
    logp = logp.float()
    if proposal_temperature == 1.0:
        q = logp.exp()  # the one [N, V] block: q ∝ p, becomes its running sum in place
    else:
        scaled = logp / proposal_temperature
        shift = scaled.amax(-1, keepdim=True)
        q = scaled.sub_(shift).exp_()  # q ∝ p^(1/t), its largest entry 1
    if exclude is not None:
        q.scatter_(-1, exclude, 0.0)
    cdf = q.cumsum_(-1)  # [N, V], unnormalised
    total = cdf[:, -1:]  # Σ over the support of the unnormalised q (0: nothing to draw)
    # u·total < total, so the first cdf entry above it exists and belongs to a token with q > 0
    target = torch.minimum(uniforms.to(cdf) * total, torch.nextafter(total, torch.zeros_like(total)))
    ids = torch.searchsorted(cdf, target.contiguous(), right=True).clamp_(max=logp.shape[-1] - 1)
    if proposal_temperature == 1.0 and exclude is None:
        ratio = torch.ones_like(target)  # q = p: the weights are exact counts / n
    elif proposal_temperature == 1.0:
        ratio = total.expand_as(target)  # q = p / tail mass on the tail: p/q is the tail mass (summed above)
    else:  # log p − log q, with log q = log p / t − shift − log total
        picked = logp.gather(-1, ids)
        ratio = (picked - (picked / proposal_temperature - shift - total.log())).exp()
    ratio = torch.where(total > 0, ratio, 0.0)
    del cdf, q
    return _unique_weighted(ids, ratio / n)


def _unique_weighted(ids: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """Merge repeated ids per row (summing their weights), order by weight descending then id, pad with 0 / 0."""
    ids, order = ids.sort(dim=-1, stable=True)
    weights = weights.gather(-1, order)
    first = torch.ones_like(ids, dtype=torch.bool)
    first[:, 1:] = ids[:, 1:] != ids[:, :-1]
    slot = first.long().cumsum(-1) - 1  # [N, n] the distinct id's slot, ascending by id
    merged = torch.zeros_like(weights).scatter_add_(-1, slot, weights)
    unique = torch.zeros_like(ids).scatter_(-1, slot, ids)
    merged, order = merged.sort(dim=-1, descending=True, stable=True)
    return torch.where(merged > 0, unique.gather(-1, order), 0), merged
