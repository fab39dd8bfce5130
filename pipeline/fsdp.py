"""FSDP2 for the student (``train.distributed: fsdp``): ``torch.distributed.fsdp.fully_shard``, one code path on CPU
(gloo) and GPU (NCCL), with sharded checkpoints through ``torch.distributed.checkpoint`` (DCP).

Why not accelerate's FSDP plugin: accelerate 1.15 turns FSDP on only for multi-GPU launches; a CPU launch stays
``MULTI_CPU`` and would silently train plain DDP, so the FSDP path could never run before a GPU job. FSDP2 itself
runs anywhere torch.distributed does. :class:`Fsdp2` therefore wraps the Accelerator and keeps it for what is the
same either way (process group, device, ``reduce``, ``wait_for_everyone``, the per-rank RNG files of
``save_state``), and answers the calls the training loop makes the FSDP2 way:

- ``prepare(model)``: ``fully_shard`` on every decoder block (the model's ``_no_split_modules``), then on the root;
  bf16 compute with fp32 gradient reduction (``MixedPrecisionPolicy``) when ``mixed_precision`` is bf16. The
  optimizer is built afterwards, on the sharded parameters (DTensors).
- ``no_sync``: ``set_requires_gradient_sync(False)`` for all but the last micro-batch of a step.
- ``clip_grad_norm_``: the total norm over DTensor gradients (a collective), then ``clip_grads_with_norm_``.
- ``save_state``/``load_state``: the sharded model and optimizer state through DCP (every rank writes its shards
  under ``sharded/``), plus accelerate's RNG streams per rank.
- ``get_state_dict``: the full (gathered) model state on rank 0, for ``final/`` via ``save_pretrained``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

SHARDED_DIR = "sharded"  # DCP files of the model and optimizer inside a checkpoint directory


def _ensure_process_group(on: torch.device) -> bool:
    """FSDP2 needs a process group even for one process (the one-GPU check): a single-rank one in memory.
    Returns whether it was created here (and is to be destroyed with :meth:`Fsdp2.free_memory`)."""
    if dist.is_initialized():
        return False
    backend = "nccl" if on.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return True


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules sharded one by one: instances of the classes a transformers model names in ``_no_split_modules``
    (its decoder blocks; peft models answer for their base model)."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


class Fsdp2:
    """An Accelerator whose model is sharded with FSDP2 (see the module docstring); anything not overridden here is
    the wrapped Accelerator's."""

    def __init__(self, accelerator: Any, mixed_precision: str) -> None:
        self._acc = accelerator
        self._bf16 = mixed_precision == "bf16"
        self._model: nn.Module | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._own_group = _ensure_process_group(accelerator.device)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._acc, name)

    # --------------------------------------------------------------------------------------------- setup
    def prepare(self, obj: Any) -> Any:
        """Shard a model in place (on this process's device) or register its optimizer; returns the object."""
        if isinstance(obj, torch.optim.Optimizer):
            self._optimizer = obj
            return obj
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(self._acc.device.type, (dist.get_world_size(),))
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if self._bf16 else None
        kwargs = {"mesh": mesh, **({"mp_policy": policy} if policy is not None else {})}
        for unit in shard_units(obj):
            fully_shard(unit, **kwargs)
        fully_shard(obj, **kwargs)
        self._model = obj
        return obj

    def free_memory(self) -> None:
        """Drop the references (and a single-rank process group made here, so a later stage starts clean)."""
        self._model = self._optimizer = None
        self._acc.free_memory()
        if self._own_group:
            dist.destroy_process_group()
            self._own_group = False

    def unwrap_model(self, model: nn.Module) -> nn.Module:
        return model  # fully_shard changes the module in place; there is no wrapper to remove

    # ---------------------------------------------------------------------------------------------- step
    @contextlib.contextmanager
    def no_sync(self, model: nn.Module) -> Iterator[None]:
        """Accumulate unsharded gradients locally; the last micro-batch of the step reduce-scatters them all."""
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)

    def clip_grad_norm_(self, parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
        """Total gradient norm over every rank's shards (as DDP's over full gradients), gradients scaled to it."""
        from torch.distributed.tensor import DTensor

        params = [p for p in parameters if p.grad is not None]
        total = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0)
        if isinstance(total, DTensor):
            total = total.full_tensor()
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return total

    # ------------------------------------------------------------------------------------------- state
    def _sharded_state(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self._model, self._optimizer)
        return {"model": model_state, "optimizer": optim_state}

    def save_state(self, output_dir: str, **kwargs: Any) -> None:
        """Every rank writes its shards of the model and optimizer, then its RNG streams (collective)."""
        import torch.distributed.checkpoint as dcp

        dcp.save(self._sharded_state(), checkpoint_id=str(Path(output_dir) / SHARDED_DIR))
        self._acc.save_state(output_dir, **kwargs)

    def load_state(self, input_dir: str) -> None:
        """Inverse of :meth:`save_state` (DCP reshards on load; the trainer still requires the same world size,
        because each rank's data position is its own)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = self._sharded_state()
        dcp.load(state, checkpoint_id=str(Path(input_dir) / SHARDED_DIR))
        set_state_dict(
            self._model, self._optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
        )
        self._acc.load_state(input_dir)

    def get_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The full model state as CPU tensors on rank 0 ({} elsewhere); every rank must call it (all-gathers)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(model, options=options)
