"""Loading teachers, students and tokenizers the same way in every stage, plus their fingerprints.

Names and paths are interchangeable: ``name_or_path`` is a hub name (``meta-llama/Llama-3.1-70B-Instruct``) on a
cluster, a local directory in tests and the demo. Offline (``HF_HUB_OFFLINE=1``) a hub name that is not in the
local cache fails with one clear error naming the config key.

Hidden-state indexing convention (shared by cache, train and evaluate): index ``i`` means
``model(..., output_hidden_states=True).hidden_states[i]`` — 0 is the embedding output, ``i`` in 1..L the output
of decoder block ``i``; for Llama-family models transformers applies the final norm to the last entry, so
``hidden_states[L]`` is post-norm. Negative indices count from the end as in Python.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import torch

from pipeline.config import ModelConfig
from pipeline.rundir import PipelineError

HIDDEN_INDEX_CONVENTION = "hf_hidden_states: 0=embeddings, i=output of decoder block i (last is post-norm)"


def device() -> torch.device:
    """The accelerator of this process (its local rank's GPU under a launcher), else the CPU."""
    if torch.cuda.is_available():
        import os

        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def synchronize(on: torch.device) -> None:
    """Wait for the kernels queued on ``on`` (nothing to wait for on the CPU). CUDA runs asynchronously, so a timer
    read without this stops before the work does."""
    if on.type == "cuda":
        torch.cuda.synchronize(on)


def resolve_dtype(name: str, on: torch.device) -> torch.dtype:
    """``auto`` is bf16 on GPU and fp32 on CPU (bf16 matmul on CPU runs ~500x slower than fp32 here)."""
    if name == "auto":
        return torch.bfloat16 if on.type == "cuda" else torch.float32
    return getattr(torch, name)


def _describe_load_error(key: str, settings: ModelConfig, err: Exception) -> PipelineError:
    where = settings.name_or_path
    if not Path(where).exists() and "/" not in where.strip("./"):
        hint = "no such local directory"
    elif Path(where).exists():
        hint = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    else:
        hint = "not a local directory and not loadable from the hub cache (offline?)"
    return PipelineError(f"{key}.name_or_path: cannot load {where!r} ({hint})")


def load_model_config(settings: ModelConfig, key: str) -> Any:
    """The model's ``config.json`` through ``AutoConfig`` (no weights): sizes for the config rules and plans, and the
    hub commit for fingerprints. The one loader of model configs; ``key`` (teacher/student) names the config key in
    the error."""
    from transformers import AutoConfig

    kwargs: dict[str, Any] = {"revision": settings.revision, "trust_remote_code": settings.trust_remote_code}
    if settings.gguf_file:
        kwargs["gguf_file"] = settings.gguf_file
    try:
        return AutoConfig.from_pretrained(settings.name_or_path, **kwargs)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PipelineError(
            f"{key}.name_or_path: cannot load the config of {settings.name_or_path!r} ({first})"
        ) from None


def load_tokenizer(settings: ModelConfig, key: str = "teacher") -> Any:
    """The tokenizer of ``settings`` (``settings.tokenizer`` when set)."""
    from transformers import AutoTokenizer

    source = settings.tokenizer or settings.name_or_path
    kwargs: dict[str, Any] = {"revision": settings.revision, "trust_remote_code": settings.trust_remote_code}
    if settings.gguf_file and not settings.tokenizer:
        kwargs["gguf_file"] = settings.gguf_file
    try:
        return AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as err:
        raise _describe_load_error(key, settings, err) from None


def load_causal_lm(
    settings: ModelConfig, key: str, on: torch.device | None = None, distributed_config: Any = None
) -> torch.nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` with the config's dtype and placement.

    With ``device_map`` set (e.g. ``auto`` for a teacher spread over a node's GPUs) accelerate places the layers and
    ``on`` is ignored; with ``distributed_config`` (tensor parallelism, see ``pipeline.teacher_parallel``)
    transformers loads each rank's shards onto its local rank's device; otherwise the model is moved to ``on``.
    """
    import transformers
    from transformers import AutoModelForCausalLM

    if not sys.stderr.isatty():  # its "Loading weights" bar is hundreds of carriage returns in a Slurm .out file
        transformers.utils.logging.disable_progress_bar()
    on = on or device()
    kwargs: dict[str, Any] = {
        "revision": settings.revision,
        "dtype": resolve_dtype(settings.dtype, on),
        "trust_remote_code": settings.trust_remote_code,
    }
    if settings.gguf_file:
        kwargs["gguf_file"] = settings.gguf_file
    if settings.attn_implementation:
        kwargs["attn_implementation"] = settings.attn_implementation
    if settings.device_map:
        kwargs["device_map"] = settings.device_map
    if distributed_config is not None:
        kwargs["distributed_config"] = distributed_config
    try:
        model = AutoModelForCausalLM.from_pretrained(settings.name_or_path, **kwargs)
    except (OSError, ValueError) as err:
        raise _describe_load_error(key, settings, err) from None
    if not settings.device_map and distributed_config is None:
        model.to(on)
    return model


def vocab_hash(tokenizer: Any) -> str:
    """Hash of the token -> id mapping (added tokens included): equal hashes mean interchangeable ids."""
    vocab = tokenizer.get_vocab()
    blob = json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def vocab_size(tokenizer: Any) -> int:
    return len(tokenizer.get_vocab())


def weights_fingerprint(settings: ModelConfig, key: str) -> str:
    """Cheap identity of a checkpoint: for a local directory its config and weight files' sizes plus the first MiB of
    each (reading every byte of a 140 GB teacher to fingerprint it is not worth it), for a hub name the commit its
    revision resolves to in the local cache (``config.json`` only)."""
    digest = hashlib.sha256()
    digest.update(settings.name_or_path.encode())
    root = Path(settings.name_or_path)
    if root.is_dir():
        names = ("config.json", settings.gguf_file or "")
        files = sorted(p for p in root.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf") or p.name in names)
        for path in files:
            digest.update(path.name.encode())
            digest.update(str(path.stat().st_size).encode())
            with open(path, "rb") as fh:
                digest.update(fh.read(1 << 20))
    else:
        commit = getattr(load_model_config(settings, key), "_commit_hash", None)
        digest.update(str(commit or settings.revision or "").encode())
    return digest.hexdigest()[:16]
