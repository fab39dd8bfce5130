"""Teacher parallelism for the cache stage: data-parallel replicas of tensor-parallel teachers under torchrun, and the
exact vocabulary-parallel top-k that lets each rank compute logits for its own slice of the vocabulary only.

Layout. torchrun starts G processes on a node (``WORLD_SIZE``; G = GPUs per node on Slurm, ``--nproc-per-node``
locally). ``teacher.tensor_parallel`` = T groups them into R = G / T replicas, ranks ``r*T .. r*T + T-1`` forming
replica ``r``. T = 1 is plain data parallelism: every rank loads a whole teacher on its own GPU. T > 1 loads each
replica with transformers' tensor parallelism (the model's ``base_model_tp_plan``; weights are DTensor shards on the
replica's ``tp`` sub-mesh of a (dp_replicate, tp) device mesh), so every GPU of a replica works on every layer at
once, unlike ``device_map: auto``, which runs one GPU at a time. Replicas split the pending shards round-robin and
TP rank 0 of each replica writes them.

Two pieces are written here by hand, because no library does them:

- ``_replicas_of_tp``: transformers 5.x builds its mesh from ``DistributedConfig(tp_size, dp_replicate_size)`` over the
  whole world, which is exactly the (dp_replicate, tp) mesh R replicas need, but it then applies FSDP2 over the
  replicate axis whenever ``dp_size > 1``. Inference replicas have nothing to shard or reduce (and FSDP2's hooks fail
  under ``torch.inference_mode``), so the subclass keeps the mesh and reports ``dp_size`` 1: TP is applied on the
  ``tp`` sub-mesh, nothing else. ``tests/test_teacher_parallel.py`` checks the resulting logits against a
  single-process teacher, so a transformers upgrade that changes this contract fails there.
- :func:`vocab_parallel_topk`: the model's own plan for the LM head (``colwise_gather_output``) all-gathers the
  [positions, V] logits onto every rank. Instead each rank computes its [chunk, V/T] slice, its local top-k, its
  log-normaliser and the exact mass outside its local top-k; a gather of k + 2 numbers per position and rank then
  gives the global top-k log-probs and the exact tail (Megatron's vocab-parallel cross-entropy merges normalisers
  the same way, but computes a loss, not top-k + tail). The peak memory stays one [chunk, V/T] fp32 block per rank.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
from typing import Any

import torch
import torch.distributed as dist

from pipeline import modeling as mdl
from pipeline.config import ConfigError, TeacherConfig
from pipeline.rundir import PipelineError

# Control collectives (pending-shard list, stop flags, the end-of-task barrier) wait for the slowest replica, which
# may be a whole shard (minutes to an hour for a 70B teacher) behind: gloo with a long timeout, not NCCL's watchdog.
CONTROL_TIMEOUT = dt.timedelta(hours=6)
# Loading a 70B teacher's shards can skew ranks by tens of minutes (transformers uses 2 h too): the TP collectives'
# group must not time out during the load, and a real hang is still caught within hours, not days.
GROUP_TIMEOUT = dt.timedelta(hours=2)


# ------------------------------------------------------------------------------------------------------ layout
@dataclasses.dataclass
class Layout:
    """Where this process sits: global rank of ``world``, and its replica of ``tensor_parallel`` ranks."""

    world: int = 1
    rank: int = 0
    tensor_parallel: int = 1
    control: Any = None  # gloo group over every rank (None: single process)
    replica_group: Any = None  # gloo group over this replica's ranks (None when T = 1)

    @property
    def replicas(self) -> int:
        return self.world // self.tensor_parallel

    @property
    def replica(self) -> int:
        return self.rank // self.tensor_parallel

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tensor_parallel

    @property
    def writer(self) -> bool:
        """TP rank 0 of each replica writes its shards and records; the other ranks only compute."""
        return self.tp_rank == 0

    def describe(self) -> str:
        if self.world == 1:
            return "1 process"
        return f"{self.world} processes = {self.replicas} replica(s) x tensor_parallel {self.tensor_parallel}"


def setup(tensor_parallel: int, on: torch.device) -> Layout:
    """The layout of this process (initialising torch.distributed under torchrun); PipelineError when T does not
    divide the number of processes."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world % tensor_parallel:
        raise PipelineError(
            f"teacher.tensor_parallel: {tensor_parallel} does not divide the {world} processes of this task "
            "(--nproc-per-node / slurm.stages.cache.gpus_per_node); every replica needs exactly that many ranks"
        )
    if world == 1:
        return Layout()
    if not dist.is_initialized():
        if on.type == "cuda":
            torch.cuda.set_device(on)
        # TP collectives on the GPU through NCCL, control collectives on CPU tensors through gloo
        backend = "cuda:nccl,cpu:gloo" if on.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=GROUP_TIMEOUT)
    rank = dist.get_rank()
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    replica_group = None
    if tensor_parallel > 1:
        groups = [list(range(r, r + tensor_parallel)) for r in range(0, world, tensor_parallel)]
        replica_group, _ = dist.new_subgroups_by_enumeration(groups, backend="gloo", timeout=CONTROL_TIMEOUT)
    return Layout(world, rank, tensor_parallel, control, replica_group)


def broadcast(obj: Any, layout: Layout) -> Any:
    """Rank 0's ``obj`` on every rank (one decision, e.g. which shards are pending, taken once)."""
    if layout.control is None:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0, group=layout.control)
    return holder[0]


def any_rank(flag: bool, group: Any) -> bool:
    """True on every rank of ``group`` when ``flag`` is true on any (None: this process alone)."""
    if group is None:
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int64)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    return bool(value.item())


def sum_over_ranks(values: dict[str, float], layout: Layout) -> dict[str, float]:
    """Per-key sums over every rank (float64 on the control group)."""
    if layout.control is None:
        return dict(values)
    keys = sorted(values)
    packed = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(packed, group=layout.control)
    return dict(zip(keys, packed.tolist(), strict=True))


def barrier(layout: Layout) -> None:
    if layout.control is not None:
        dist.barrier(group=layout.control)


# ------------------------------------------------------------------------------------------------ loading
def check_tensor_parallel(teacher_config: Any, tensor_parallel: int) -> None:
    """Decidable from the teacher's config.json: a TP plan exists and T divides the attention and KV heads."""
    if tensor_parallel == 1:
        return
    arch = (getattr(teacher_config, "architectures", None) or [type(teacher_config).__name__])[0]
    if not getattr(teacher_config, "base_model_tp_plan", None):
        raise ConfigError(
            f"teacher.tensor_parallel: {tensor_parallel} needs a tensor-parallel plan, and {arch} has none "
            "(config.base_model_tp_plan); use teacher.tensor_parallel: 1 with teacher.device_map: auto instead"
        )
    heads = {
        "num_attention_heads": getattr(teacher_config, "num_attention_heads", None),
        "num_key_value_heads": getattr(teacher_config, "num_key_value_heads", None),
    }
    for name, count in heads.items():
        if count is not None and count % tensor_parallel:
            raise ConfigError(
                f"teacher.tensor_parallel: {tensor_parallel} does not divide the teacher's {name} ({count}); "
                f"pick a divisor of {count}"
            )


def _replicas_of_tp(tensor_parallel: int, replicas: int) -> Any:
    """``DistributedConfig`` for R replicas of T tensor-parallel ranks and no FSDP (see the module docstring)."""
    from transformers.distributed import DistributedConfig

    @dataclasses.dataclass
    class ReplicasOfTP(DistributedConfig):
        @property
        def dp_size(self) -> int:  # replicas share nothing: no FSDP over the dp_replicate axis
            return 1

    return ReplicasOfTP(tp_size=tensor_parallel, dp_replicate_size=replicas)


def load_teacher(settings: TeacherConfig, layout: Layout, on: torch.device) -> torch.nn.Module:
    """This rank's teacher: whole (T = 1, on ``on`` or spread by ``device_map``) or its tensor-parallel shards."""
    if layout.tensor_parallel == 1:
        if settings.device_map and layout.world > 1:
            raise PipelineError(
                f"teacher.device_map: {settings.device_map!r} spreads one teacher over every GPU of the process, but "
                f"this task runs {layout.world} processes; use teacher.tensor_parallel (device_map: null) or run "
                "one process per node"
            )
        model = mdl.load_causal_lm(settings, "teacher", on)
    else:
        distributed = _replicas_of_tp(layout.tensor_parallel, layout.replicas)
        model = mdl.load_causal_lm(settings, "teacher", on, distributed_config=distributed)
    model.eval()
    return model


# ------------------------------------------------------------------------------------------- vocab-parallel top-k
def vocab_sharded(lm_head: torch.nn.Module) -> bool:
    """Whether the LM head's weight is split over the vocabulary (a DTensor sharded on dim 0)."""
    from torch.distributed.tensor import DTensor, Shard

    weight = getattr(lm_head, "weight", None)
    return isinstance(weight, DTensor) and tuple(weight.placements) == (Shard(0),)


def _gather(tensor: torch.Tensor, group: Any, size: int) -> torch.Tensor:
    """[size, *tensor.shape]: ``tensor`` from every rank of ``group`` in rank order."""
    out = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(out, tensor.contiguous(), group=group)
    return torch.stack(out)


def local_candidates(logits: torch.Tensor, top_k: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One rank's share of the merge, from its tempered fp32 logits [c, V_r] (overwritten: no second [c, V_r] block).

    Returns (floats [c, k + 2]: the k largest logits z then m_r = logsumexp z and o_r = log sum of exp(z - m_r)
    outside those k; ids [c, k] global vocabulary ids). A slice narrower than k is padded with -inf logits so every
    rank contributes k candidates; o_r is -inf when the whole slice is among them."""
    positions, width = logits.shape
    k_local = min(top_k, width)
    norm = torch.logsumexp(logits, dim=-1)  # [c]
    top_z, top_i = torch.topk(logits, k_local, dim=-1)
    # the mass outside the local top-k, summed in place from normalised entries <= 0 (no overflow, tiny tails kept)
    logits.sub_(norm.unsqueeze(-1)).scatter_(-1, top_i, float("-inf")).exp_()
    outside = logits.sum(dim=-1).log_()
    pad = top_k - k_local
    top_z = torch.cat([top_z, top_z.new_full((positions, pad), float("-inf"))], dim=-1)
    top_i = torch.cat([top_i, top_i.new_zeros((positions, pad))], dim=-1)
    return torch.cat([top_z, norm[:, None], outside[:, None]], dim=-1), top_i + offset


def merge_candidates(
    floats: torch.Tensor, ids: torch.Tensor, top_k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every rank's :func:`local_candidates` ([T, c, k + 2], [T, c, k]) -> (log-probs [c, k], ids [c, k], tail [c]).

    With M = logsumexp_r m_r the full normaliser, the global top-k are the k largest of the T·k candidates (every
    member of the global top-k is in its own rank's top-k), their log-probs z - M, and the tail log-mass is
    log( sum_r exp(o_r + m_r - M) + sum_{candidates not selected} exp(z - M) ), exact up to fp32 rounding."""
    size, positions = floats.shape[:2]
    cand_z = floats[..., :top_k].permute(1, 0, 2).reshape(positions, size * top_k)
    cand_i = ids.permute(1, 0, 2).reshape(positions, size * top_k)
    norms, outsides = floats[..., top_k], floats[..., top_k + 1]  # [T, c]
    full_norm = torch.logsumexp(norms, dim=0)  # [c]
    sel_z, sel = torch.topk(cand_z, top_k, dim=-1)
    unselected = cand_z.scatter(-1, sel, float("-inf")) - full_norm[:, None]
    rest = (outsides + norms - full_norm).transpose(0, 1)  # [c, T]
    tail = torch.logsumexp(torch.cat([unselected, rest], dim=-1), dim=-1)
    return sel_z - full_norm[:, None], cand_i.gather(-1, sel), tail


@torch.inference_mode()
def vocab_parallel_topk(
    final_hidden: torch.Tensor, lm_head: torch.nn.Module, top_k: int, temperature: float, chunk: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as ``cache.topk_chunked`` for an LM head whose weight is sharded over the vocabulary.

    final_hidden: [N, H], identical on every rank of the TP group. Per chunk of ``chunk`` positions each rank
    computes the tempered logits of its vocabulary slice, reduces them to :func:`local_candidates`, and one gather of
    k + 2 floats and k ids per position and rank feeds :func:`merge_candidates`. Returns (values [N, k] fp32,
    ids [N, k] int64, tail [N] fp32), the same on every rank.
    """
    weight = lm_head.weight
    group, size = weight.device_mesh.get_group(), weight.device_mesh.size()
    local = weight.to_local()  # [V_r, H]: this rank's rows of the vocabulary, in rank order
    bias = getattr(lm_head, "bias", None)
    bias = bias.to_local() if bias is not None and hasattr(bias, "to_local") else bias
    rows = _gather(torch.tensor([local.shape[0]], device=local.device), group, size).flatten()
    offset = int(rows[: weight.device_mesh.get_local_rank()].sum())
    values, ids, tails = [], [], []
    for start in range(0, final_hidden.shape[0], chunk):
        logits = torch.nn.functional.linear(final_hidden[start : start + chunk], local, bias).float()  # [c, V_r]
        if temperature != 1.0:
            logits.div_(temperature)
        floats, cand = local_candidates(logits, top_k, offset)
        del logits
        value, index, tail = merge_candidates(_gather(floats, group, size), _gather(cand, group, size), top_k)
        values.append(value)
        ids.append(index)
        tails.append(tail)
    return torch.cat(values), torch.cat(ids), torch.cat(tails)


# ------------------------------------------------------------------------------------------------------ parity
def fp16_steps(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor | float = 2.0**-6) -> torch.Tensor:
    """|a - b| in fp16 spacings at the larger magnitude, magnitudes under ``scale`` counted as ``scale``: an entry
    computed as a sum of larger terms (a hidden-state component, a log-prob z - M) moves by the rounding of those
    terms, which is many fp16 steps of a value near zero yet far below the storage rounding of the whole."""
    a, b = a.float(), b.float()
    size = torch.maximum(torch.maximum(a.abs(), b.abs()), torch.as_tensor(scale, dtype=torch.float32))
    return (a - b).abs() / 2.0 ** (torch.floor(torch.log2(size)) - 10)


def compare_caches(got: Any, want: Any) -> dict[str, Any]:
    """How far the cache shards in directory ``got`` are from those in ``want`` (same file names), e.g. a
    tensor-parallel run against a single-process one.

    Stored top-k entries are matched by token id, since a reordered sum can swap two entries whose log-probs are
    equal in storage: per position the id sets must agree, or differ by one id at the k-th place (a near-tie at the
    boundary), and matched values must be within one fp16 step. Other float columns are compared element-wise (a
    vector's entries at the scale of its RMS).
    ``within_rounding`` says whether everything is; the counts and maxima say how close."""
    from pathlib import Path

    from pipeline import cache_format as cf

    counts = (
        "shards",
        "identical_shards",
        "positions",
        "reordered_positions",
        "boundary_swaps",
        "other_id_differences",
        "unequal_columns",
    )
    report: dict[str, Any] = {**dict.fromkeys(counts, 0), "max_abs": {}, "max_fp16_steps": 0.0}
    for path in sorted(Path(want).glob("*.parquet")):
        other = Path(got) / path.name
        report["shards"] += 1
        report["identical_shards"] += int(other.read_bytes() == path.read_bytes())
        a = next(iter(cf.CacheDataset([path], batch_size=1 << 30, shuffle=False)))
        b = next(iter(cf.CacheDataset([other], batch_size=1 << 30, shuffle=False)))
        real = a["attention_mask"].bool()
        ids_a, ids_b = a["topk_ids"][real], b["topk_ids"][real]  # [P, k]
        val_a, val_b = a["topk_logprobs"][real].float(), b["topk_logprobs"][real].float()
        found = (ids_a.unsqueeze(-1) == ids_b.unsqueeze(-2)).any(-1)  # [P, k]: a's id among b's
        missing = (~found).sum(-1)
        same = missing == 0
        report["positions"] += int(real.sum())
        report["reordered_positions"] += int((same & (ids_a != ids_b).any(-1)).sum())
        # one id swapped for another is a near-tie at the k-th place only if the lost entry ties with a's last value
        lost = torch.where(found, torch.inf, val_a).min(-1).values
        boundary = (missing == 1) & (fp16_steps(lost, val_a.min(-1).values) <= 1.0)
        report["boundary_swaps"] += int(boundary.sum())
        report["other_id_differences"] += int(((missing > 0) & ~boundary).sum())
        by_id_a = val_a.gather(-1, ids_a.argsort(-1))
        by_id_b = val_b.gather(-1, ids_b.argsort(-1))
        steps = [fp16_steps(by_id_a[same], by_id_b[same]).flatten(), fp16_steps(val_a[~same], val_b[~same]).flatten()]
        for column, value in a.items():
            if isinstance(value, torch.Tensor) and not value.is_floating_point() and column != "topk_ids":
                report["unequal_columns"] += int(not torch.equal(value, b[column]))  # tokens, mask, sample ids
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                report["max_abs"][column] = max(report["max_abs"].get(column, 0.0),
                                                float((value.float() - b[column].float()).abs().max()))  # fmt: skip
                if column != "topk_logprobs":  # vectors (hidden states, embeddings): their RMS is the scale
                    scale = value.float().pow(2).mean(-1, keepdim=True).sqrt() if value.ndim > 1 else 2.0**-6
                    steps.append(fp16_steps(value, b[column], scale).flatten())
        report["max_fp16_steps"] = max(report["max_fp16_steps"], float(torch.cat(steps).max()))
    exact = report["other_id_differences"] == report["unequal_columns"] == 0
    report["within_rounding"] = exact and report["max_fp16_steps"] <= 1.0
    return report


# ---------------------------------------------------------------------------------------------------- planning
@dataclasses.dataclass(frozen=True)
class Hardware:
    """Assumptions of the parallel plan (``cache --plan`` flags override them); defaults: 8 x H100/H200 SXM."""

    gpu_tflops: float = 989.0  # dense bf16 peak per GPU (data sheet)
    mfu: float = 0.4  # fraction of it a large teacher's forward reaches (measure yours: make gpu-check)
    gpu_memory_gb: float = 80.0
    allreduce_gb_s: float = 370.0  # NCCL ring all-reduce bus bandwidth within an NVLink node (nccl-tests)
    reserved_gb: float = 3.0  # CUDA context and NCCL buffers per GPU
    headroom: float = 0.9  # a layout fits when it needs at most this share of the GPU (fragmentation, bigger batches)


def teacher_shape(teacher_config: Any) -> dict[str, int]:
    """Sizes of a Llama-family decoder from its config.json, and its parameter count (embeddings, layers, head)."""
    hidden, layers = int(teacher_config.hidden_size), int(teacher_config.num_hidden_layers)
    heads = int(teacher_config.num_attention_heads)
    kv = int(getattr(teacher_config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(teacher_config, "head_dim", None) or hidden // heads)
    inter, vocab = int(teacher_config.intermediate_size), int(teacher_config.vocab_size)
    per_layer = hidden * head_dim * (2 * heads + 2 * kv) + 3 * hidden * inter + 2 * hidden
    tied = bool(getattr(teacher_config, "tie_word_embeddings", False))
    params = vocab * hidden * (1 if tied else 2) + layers * per_layer + hidden
    matmul = params - (0 if tied else vocab * hidden)  # the embedding lookup is no matmul; the LM head is
    return {"hidden": hidden, "layers": layers, "heads": heads, "kv_heads": kv, "head_dim": head_dim,
            "intermediate": inter, "vocab": vocab, "params": params, "matmul_params": matmul}  # fmt: skip


def plan_parallel(
    teacher_config: Any,
    *,
    seq_len: int,
    batch: int,
    logits_chunk: int,
    dtype_bytes: int,
    gpus_per_node: int,
    hw: Hardware,
) -> list[dict[str, Any]]:
    """Per-GPU memory and per-node throughput of the teacher pass for every tensor-parallel size T that divides the
    node's GPUs and the heads, plus ``device_map: auto`` (one copy over the node's GPUs, one GPU busy at a time).

    memory/rank = weights/T + activations of one batch (B*S positions x (4 hidden + q/k/v/T + 3 intermediate/T)
    values) + one LM-head chunk (chunk x V/T logits in the model dtype and fp32) + reserved.
    time/token  = FLOPs/token / (T x peak x MFU) + two all-reduces per layer of hidden x bytes at 2(T-1)/T / bandwidth
    (transformers' TP does not overlap them). FLOPs/token = 2 x matmul weights + 4 x layers x S x hidden (PaLM).
    A layout fits when it needs at most ``hw.headroom`` of the GPU's memory."""
    shape = teacher_shape(teacher_config)
    h, layers, inter, vocab = shape["hidden"], shape["layers"], shape["intermediate"], shape["vocab"]
    flops = 2.0 * shape["matmul_params"] + 4.0 * layers * seq_len * h
    positions = batch * seq_len
    rows = []
    sizes = [t for t in range(1, gpus_per_node + 1) if gpus_per_node % t == 0]
    for t in [t for t in sizes if shape["heads"] % t == 0 and shape["kv_heads"] % t == 0] + ["auto"]:
        tp = gpus_per_node if t == "auto" else t
        attention = shape["head_dim"] * (shape["heads"] + 2 * shape["kv_heads"]) / tp
        activations = positions * (4 * h + attention + 3 * inter / tp) * dtype_bytes
        head = logits_chunk * -(-vocab // tp) * (4 + dtype_bytes)
        weights = shape["params"] * dtype_bytes / tp
        memory = (weights + activations + head) / 1e9 + hw.reserved_gb
        compute = flops / ((1 if t == "auto" else tp) * hw.gpu_tflops * 1e12 * hw.mfu)
        comm = 0.0 if t in ("auto", 1) else 2 * layers * h * dtype_bytes * 2 * (tp - 1) / tp / (hw.allreduce_gb_s * 1e9)
        replicas = 1 if t == "auto" else gpus_per_node // tp
        node_tokens_s = replicas / (compute + comm)
        rows.append({
            "tensor_parallel": t, "replicas": replicas, "weights_gb": weights / 1e9, "memory_gb": memory,
            "fits": memory <= hw.headroom * hw.gpu_memory_gb, "comm_share": comm / (compute + comm),
            "node_tokens_per_s": node_tokens_s, "gpu_hours_per_1b_tokens": 1e9 / node_tokens_s * gpus_per_node / 3600,
        })  # fmt: skip
    return rows


def format_parallel_plan(
    rows: list[dict[str, Any]], tokens: int, nodes: int, gpus_per_node: int, configured: int, hw: Hardware
) -> str:
    """The plan as text: one line per layout, then the wall time of ``tokens`` on ``nodes`` nodes."""
    lines = [
        f"teacher pass on {nodes} node(s) x {gpus_per_node} GPUs ({hw.gpu_memory_gb:.0f} GB, {hw.gpu_tflops:.0f} "
        f"TFLOP/s at MFU {hw.mfu}, all-reduce {hw.allreduce_gb_s:.0f} GB/s); configured tensor_parallel {configured}",
        f"{'layout':<16}{'replicas':>9}{'GB/GPU':>9}{'fits':>6}{'comm':>7}{'tok/s/node':>14}{'GPU-h/1B tok':>14}"
        f"{'wall h':>9}",
    ]
    for r in rows:
        name = "device_map=auto" if r["tensor_parallel"] == "auto" else f"T={r['tensor_parallel']}"
        wall = tokens / (r["node_tokens_per_s"] * nodes) / 3600
        lines.append(
            f"{name:<16}{r['replicas']:>9}{r['memory_gb']:>9.1f}{'yes' if r['fits'] else 'NO':>6}"
            f"{r['comm_share']:>7.0%}{r['node_tokens_per_s']:>14,.0f}{r['gpu_hours_per_1b_tokens']:>14.4g}{wall:>9.3g}"
        )
    return "\n".join(lines)
