"""Every rule a config must satisfy beyond its per-key types and ranges, in one place.

The schema (``pipeline.config``) checks each key alone: type, range, required. This module holds the rules that
span keys or need the models' configs, so that one call refuses a config before anything is written or queued:

- :func:`check_config` — light rules decidable from the config alone (variant weights, a relation variant needing
  ``cache.embed_layer``, reserved names, Slurm limits, ...). ``config.load`` runs it, so no code ever holds a config
  that breaks them, and it imports nothing heavy (``slurm status`` and ``cancel`` load configs on a login node).
- :func:`check` — :func:`check_config` plus the rules of a whole run: at least one data source, the response-KD
  options (the tail-bucket temperature against the cache's capture temperature ``cache.temperature``, through the
  loss's own check, which needs torch), chunked LM heads only for models whose head output is the logits, and
  everything decidable from the teacher's and the student's
  ``config.json`` and tokenizer files (no weights are loaded): every hidden-state index in range for its model,
  ``seq_len`` within both models' context, ``cache.top_k`` within the vocabulary, fast (offset-mapping) tokenizers,
  the student's output rows covering the ids it reads, LoRA target modules present in the student, lm-eval task
  names that exist, the package of each experiment tracker installed. Every stage runs it at start
  (``rundir.stage_main``), and so do the local executor (``pipeline.run``) and ``slurm submit`` (with or without
  ``--dry-run``) before anything starts: a config any stage would refuse never reaches the queue.

A student whose tokenizer differs from the teacher's (another vocabulary) learns from the same cache through
``pipeline.xtok``: its rows are the manifest's text re-tokenized, response KD runs at the aligned positions, a
feature variant compares hidden states at the aligned positions too (both models have read the same text there), and
a relation variant pools each model over its own tokens of the same rows; so every variant works with another
tokenizer, and what is refused is what cannot: a slow tokenizer (no offsets), a student tokenizer without EOS, and
``response.unmapped: uld`` for a student that shares the teacher's vocabulary (nothing is ever unmapped there).

A broken rule raises :class:`~pipeline.config.ConfigError` naming the key path (exit code 2); a model whose config
cannot be read at all is an input problem (:class:`~pipeline.rundir.PipelineError`, exit code 1).

Hidden-state indices follow ``output_hidden_states``: 0 is the embeddings, ``i`` the output of decoder block ``i``,
negative indices count from the end. :func:`hidden_index` is the one normaliser; cache, train and the cache reader
all use it, so ``-1`` and ``L`` name the same column everywhere and an out-of-range index is never passed through.
"""

from __future__ import annotations

import re
from typing import Any

from pipeline import definition
from pipeline.config import CANONICAL_FIELDS, Config, ConfigError, LossConfig, slurm_time_s
from pipeline.jsonlog import SECRET_NAME

RESERVED_UNITS = (definition.TEACHER, "tasks")  # evaluate's unit for the teacher and its offline-task directory


# ------------------------------------------------------------------------------------------------ hidden index
def num_hidden_states(model_config: Any) -> int:
    """Entries of ``hidden_states`` for a model config: its decoder blocks plus the embeddings."""
    return int(model_config.num_hidden_layers) + 1


def hidden_index(index: int, count: int, key: str, model: str = "the model") -> int:
    """``index`` as the non-negative ``hidden_states`` index of a model with ``count`` entries, or a ConfigError
    naming ``key`` when it is out of range (valid: ``-count .. count - 1``)."""
    if not -count <= index < count:
        raise ConfigError(
            f"{key}: hidden-state index {index} out of range for {model} with {count - 1} layers "
            f"(valid: {-count}..{count - 1}; 0 = embeddings, i = output of block i)"
        )
    return index % count


# -------------------------------------------------------------------------------------------- config alone
def check_config(cfg: Config) -> None:
    """Rules that span several keys; decidable from the config alone."""
    if not cfg.run_name or "/" in cfg.run_name:
        raise ConfigError(f'run_name: expected a non-empty name without "/", got "{cfg.run_name}"')
    if cfg.manifest.sources and sum(s.weight for s in cfg.manifest.sources) <= 0:
        raise ConfigError("manifest.sources: expected weights summing to a positive number, got all zero")
    for i, src in enumerate(cfg.manifest.sources):
        for canon in src.fields:
            if canon not in CANONICAL_FIELDS:
                known = ", ".join(CANONICAL_FIELDS)
                raise ConfigError(f"manifest.sources.{i}.fields.{canon}: unknown field (expected one of: {known})")
    if cfg.cache.hidden_fraction is not None and cfg.cache.hidden_every_n > 1:
        raise ConfigError("cache.hidden_fraction: set either hidden_fraction or hidden_every_n > 1, not both")
    train = cfg.train
    if train.baseline_variant not in train.variants:
        raise ConfigError(
            f"train.baseline_variant: expected one of the variants ({', '.join(train.variants)}), "
            f'got "{train.baseline_variant}"'
        )
    if len(train.betas) != 2 or not all(0 <= b < 1 for b in train.betas):
        raise ConfigError(f"train.betas: expected two floats in [0, 1), got {train.betas}")
    if train.lora.enabled and not train.lora.target_modules:
        raise ConfigError("train.lora.target_modules: expected at least one module name when train.lora.enabled")
    _check_teacher_parallel(cfg)
    for name, loss in train.variants.items():
        if name in RESERVED_UNITS:
            raise ConfigError(f'train.variants.{name}: the name "{name}" is reserved by the evaluate stage')
        _check_variant(cfg, f"train.variants.{name}", loss)
    _check_slurm(cfg)


def _check_teacher_parallel(cfg: Config) -> None:
    """How the cache runs the teacher: tensor-parallel replicas must fill the processes the cache job starts."""
    tensor_parallel, device_map = cfg.teacher.tensor_parallel, cfg.teacher.device_map
    if tensor_parallel > 1 and cfg.cache.targets != "topk":
        raise ConfigError(
            f'cache.targets: "{cfg.cache.targets}" draws from the whole vocabulary on one process, but '
            f"teacher.tensor_parallel {tensor_parallel} splits it over ranks (vocabulary-parallel sampling is not "
            "implemented); use tensor_parallel 1 (device_map auto for a teacher too big for one GPU)"
        )
    if tensor_parallel > 1 and device_map:
        raise ConfigError(
            f"teacher.tensor_parallel: {tensor_parallel} shards every layer over that many ranks, "
            f'teacher.device_map "{device_map}" spreads whole layers over one process\'s GPUs; '
            "set one of them (device_map: null for tensor parallelism)"
        )
    cache_res = cfg.slurm.stages.cache
    procs = cache_res.nproc_per_node or max(cache_res.gpus_per_node, 1)  # what the cache job launches per node
    if device_map and procs > 1:
        raise ConfigError(
            f'teacher.device_map: "{device_map}" spreads one teacher over the node\'s GPUs from one process, but the '
            f"cache job starts {procs} per node; set slurm.stages.cache.nproc_per_node: 1 (or "
            "teacher.tensor_parallel with device_map: null)"
        )
    if procs % tensor_parallel:
        raise ConfigError(
            f"teacher.tensor_parallel: {tensor_parallel} does not divide the cache's {procs} process(es) per node "
            "(slurm.stages.cache.nproc_per_node, else gpus_per_node); every replica needs that many ranks"
        )


def _check_variant(cfg: Config, key: str, loss: LossConfig) -> None:
    total = loss.ce_weight + loss.response.weight + loss.feature.weight + loss.relation.weight
    if total <= 0:
        raise ConfigError(f"{key}: expected at least one positive loss weight, got all zero")
    for i, pair in enumerate(loss.feature.layer_pairs):
        if len(pair) != 2:
            raise ConfigError(f"{key}.feature.layer_pairs.{i}: expected [student_layer, teacher_layer], got {pair}")
    if loss.feature.weight > 0 and not loss.feature.layer_pairs:
        raise ConfigError(f"{key}.feature.layer_pairs: expected at least one pair when feature.weight > 0")
    if loss.feature.weight > 0 and not cfg.cache.hidden_layers:
        raise ConfigError(f"{key}.feature.weight: needs cache.hidden_layers set (cached teacher hidden states)")
    if loss.relation.weight > 0 and cfg.cache.embed_layer is None:
        raise ConfigError(f"{key}.relation.weight: needs cache.embed_layer set (pooled teacher embeddings)")
    if loss.response.top_k is not None and loss.response.top_k > cfg.cache.top_k:
        raise ConfigError(
            f"{key}.response.top_k: expected <= cache.top_k ({cfg.cache.top_k}), got {loss.response.top_k}"
        )
    if loss.response.top_k is not None and loss.response.targets == "topk+sampled" and cfg.cache.targets != "sampled":
        raise ConfigError(
            f"{key}.response.top_k: a head shorter than the cached top-k needs draws from the whole distribution "
            "(the tail draws skip the cached top-k); set cache.targets: sampled"
        )
    targets, cached = loss.response.targets, cfg.cache.targets
    needs = {"sampled": ("sampled",), "topk+sampled": ("sampled", "topk+sampled")}.get(targets, ())
    if loss.response.weight > 0 and needs and cached not in needs:
        why = "draws from the whole distribution" if targets == "sampled" else "draws (from the tail or everywhere)"
        raise ConfigError(
            f'{key}.response.targets: "{targets}" needs {why} in the cache, cache.targets is "{cached}"; '
            f"set cache.targets: {' or '.join(needs)}"
        )


def _check_slurm(cfg: Config) -> None:
    """Slurm rules that span keys, so that submit refuses before anything is queued."""
    for stage in definition.PIPELINE:
        res = getattr(cfg.slurm.stages, stage.name)
        key = f"slurm.stages.{stage.name}"
        if res.nodes != 1 and not (stage.distributed and stage.slurm_jobs == "per_unit"):
            why = "the cache scales out with array_tasks" if stage.slurm_jobs == "array" else "it runs one process"
            raise ConfigError(f"{key}.nodes: expected 1 ({why}), got {res.nodes}")
        if stage.preemptible and cfg.slurm.signal_s >= slurm_time_s(res.time):
            raise ConfigError(
                f"slurm.signal_s: expected fewer seconds than {key}.time ({res.time} = {slurm_time_s(res.time)} s), "
                f"got {cfg.slurm.signal_s}: the warning would come as the job starts and it would requeue forever"
            )
        for where, env in ((key, res.env), ("slurm", cfg.slurm.env)):
            for name in env:
                if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                    raise ConfigError(f"{where}.env.{name}: expected a shell variable name")
                if SECRET_NAME.search(name):
                    raise ConfigError(
                        f"{where}.env.{name}: secrets do not belong in the config (the job scripts are kept under "
                        "logs/); export it where you submit: jobs inherit the environment"
                    )


# ------------------------------------------------------------------------------------- config + model configs
def check(cfg: Config) -> None:
    """Every rule of a run: :func:`check_config`, data sources, and the rules that need the models' configs and
    tokenizers (read without weights). Run by every stage at start and by ``slurm submit``."""
    check_config(cfg)
    if not cfg.manifest.sources:
        raise ConfigError("manifest.sources: expected at least one source")
    from pipeline import modeling  # transformers: imported only when a run is checked

    teacher = modeling.load_model_config(cfg.teacher, "teacher")
    student = modeling.load_model_config(cfg.student, "student")
    student_ids = _check_tokenizers(cfg, modeling)
    from pipeline.teacher_parallel import check_tensor_parallel

    check_tensor_parallel(teacher, cfg.teacher.tensor_parallel)
    _check_context(cfg, teacher, student, student_ids)
    _check_logits_chunk(cfg, teacher, student)
    cached = _check_cache_layers(cfg, teacher)
    for name, loss in cfg.train.variants.items():
        _check_response(cfg, f"train.variants.{name}.response", loss)
        if student_ids is None and loss.response.weight > 0 and loss.response.unmapped != "tail_bucket":
            raise ConfigError(
                f"train.variants.{name}.response.unmapped: {loss.response.unmapped} applies to a student with another "
                "tokenizer; this student shares the teacher's vocabulary, so no teacher id is ever unmapped"
            )
        if student_ids is not None and loss.response.weight > 0 and loss.response.targets != "topk":
            raise ConfigError(
                f"train.variants.{name}.response.targets: {loss.response.targets} targets are in the teacher's "
                "vocabulary; a student with another tokenizer distils on the mapped top-k (targets: topk)"
            )
        _check_variant_layers(f"train.variants.{name}", loss, teacher, student, cached)
    if cfg.train.lora.enabled:
        _check_lora_targets(cfg, student)
    if cfg.evaluate.tasks:
        _check_task_names(cfg)
    _check_trackers(cfg)


def _check_response(cfg: Config, key: str, loss: LossConfig) -> None:
    """The loss's own option check (``losses.ResponseOptions``, which needs torch: kept out of ``check_config`` so
    that ``config.load`` stays light for status/cancel on a login node). The cache stores log-probs at
    ``cache.temperature``, and a cache made with another one is never read (lineage), so that is the capture
    temperature a tail bucket must match."""
    from pipeline import losses

    rc = loss.response
    if rc.weight > 0:
        # drawn targets estimate the forward KL at the capture temperature; the online teacher is exact at any τ
        capture = rc.temperature if rc.targets == "online" else cfg.cache.temperature
        try:
            if rc.targets == "topk":
                losses.ResponseOptions(rc.divergence, rc.temperature, rc.tail, capture, rc.jsd_beta, rc.unmapped)
            else:
                losses.check_sampled_options(rc.divergence, rc.temperature, capture)
        except ValueError as err:
            raise ConfigError(f"{key}.{err}") from None


def _check_tokenizers(cfg: Config, modeling: Any) -> int | None:
    """The teacher's tokenizer ends documents with EOS and gives offsets (the manifest keeps each token's byte end);
    a student with another vocabulary has a fast tokenizer with EOS too (``pipeline.xtok``). Returns None when the
    student reads the teacher's ids, else how many ids its own tokenizer has."""
    teacher_tok = modeling.load_tokenizer(cfg.teacher, "teacher")
    student_tok = modeling.load_tokenizer(cfg.student, "student")
    for key, spec, tok in (("teacher", cfg.teacher, teacher_tok), ("student", cfg.student, student_tok)):
        name = spec.tokenizer or spec.name_or_path
        if not getattr(tok, "is_fast", False):
            raise ConfigError(
                f"{key}.tokenizer: {name} is a slow (Python) tokenizer; the manifest and cross-tokenizer training "
                "need a fast tokenizer's offset mapping (tokenizer.json)"
            )
        if tok.eos_token_id is None:
            raise ConfigError(f"{key}.tokenizer: {name} has no EOS token; packing separates documents with EOS")
    teacher_vocab = modeling.vocab_size(teacher_tok)
    if cfg.cache.top_k > teacher_vocab:
        raise ConfigError(f"cache.top_k: expected <= the teacher's vocabulary ({teacher_vocab}), got {cfg.cache.top_k}")
    if modeling.vocab_hash(teacher_tok) == modeling.vocab_hash(student_tok):
        return None
    return len(student_tok)


def _check_context(cfg: Config, teacher: Any, student: Any, student_ids: int | None) -> None:
    """``seq_len`` within both models' context; the student's output rows cover every id it reads: the teacher's,
    or (``student_ids``) those of its own tokenizer."""
    seq_len = cfg.manifest.seq_len
    for key, model_config, settings in (("teacher", teacher, cfg.teacher), ("student", student, cfg.student)):
        limit = getattr(model_config, "max_position_embeddings", None)
        if limit is not None and seq_len > limit:
            raise ConfigError(
                f"manifest.seq_len: {seq_len} exceeds the {key}'s max_position_embeddings {limit} "
                f"({settings.name_or_path}); lower manifest.seq_len"
            )
    vocab = int(teacher.vocab_size) if student_ids is None else student_ids
    whose = "the teacher's" if student_ids is None else "its own tokenizer's"
    rows = getattr(student, "vocab_size", None)
    if rows is not None and int(rows) < vocab:
        raise ConfigError(
            f"student.name_or_path: the student has {rows} output rows but {whose} token ids go up to "
            f"{vocab - 1} ({cfg.student.name_or_path}); resize its embeddings or use another student"
        )


def _check_logits_chunk(cfg: Config, teacher: Any, student: Any) -> None:
    """A chunked LM head (``pipeline.lm_head``) calls the head module alone: a model that transforms its logits
    after the head (soft-capping, a logit scale) needs whole logits there."""
    from pipeline.lm_head import post_head_transform

    uses = [("train.logits_chunk", "student", student, cfg.student)]
    uses.append(("evaluate.logits_chunk", "student", student, cfg.student))
    if cfg.evaluate.include_teacher:
        uses.append(("evaluate.logits_chunk", "teacher", teacher, cfg.teacher))
    for key, who, model_config, spec in uses:
        section, name = key.split(".")
        transform = post_head_transform(model_config)
        if getattr(getattr(cfg, section), name) and transform:
            raise ConfigError(
                f"{key}: the {who} ({spec.name_or_path}) applies {transform} to its logits after the LM head, "
                f"which a chunked head would skip; set {key}: 0"
            )


def _check_cache_layers(cfg: Config, teacher: Any) -> set[int]:
    """The cached teacher indices, normalised; duplicates (``3`` and ``-1`` of a 3-layer teacher) are refused."""
    count, cached = num_hidden_states(teacher), {}
    for n, layer in enumerate(cfg.cache.hidden_layers):
        index = hidden_index(layer, count, f"cache.hidden_layers.{n}", "the teacher")
        if index in cached:
            raise ConfigError(
                f"cache.hidden_layers.{n}: {layer} names the same hidden state as cache.hidden_layers.{cached[index]}"
            )
        cached[index] = n
    if cfg.cache.embed_layer is not None:
        hidden_index(cfg.cache.embed_layer, count, "cache.embed_layer", "the teacher")
    return set(cached)


def _check_variant_layers(key: str, loss: LossConfig, teacher: Any, student: Any, cached: set[int]) -> None:
    s_count, t_count = num_hidden_states(student), num_hidden_states(teacher)
    for i, (s, t) in enumerate(loss.feature.layer_pairs):
        hidden_index(s, s_count, f"{key}.feature.layer_pairs.{i}.0", "the student")
        t_index = hidden_index(t, t_count, f"{key}.feature.layer_pairs.{i}.1", "the teacher")
        if loss.feature.weight > 0 and t_index not in cached:
            raise ConfigError(
                f"{key}.feature.layer_pairs.{i}: teacher layer {t} is not cached (cache.hidden_layers="
                f"{sorted(cached)} after normalising negative indices)"
            )
    hidden_index(loss.relation.student_layer, s_count, f"{key}.relation.student_layer", "the student")


def _check_lora_targets(cfg: Config, student: Any) -> None:
    """peft wraps a module whose name equals a target or ends with ``.<target>``; a target matching none fails
    only when training starts, so list the student's module names from an empty (meta-device) skeleton."""
    import torch
    from transformers import AutoModelForCausalLM

    targets = cfg.train.lora.target_modules
    if targets == ["all-linear"]:
        return
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(student, trust_remote_code=cfg.student.trust_remote_code)
    names = [name for name, _ in skeleton.named_modules() if name]
    for i, target in enumerate(targets):
        if not any(name == target or name.endswith(f".{target}") for name in names):
            leaves = sorted({name.rsplit(".", 1)[-1] for name in names if not name.rsplit(".", 1)[-1].isdigit()})
            raise ConfigError(
                f"train.lora.target_modules.{i}: no module named {target!r} in the student "
                f"({cfg.student.name_or_path}; module names end in: {', '.join(leaves)})"
            )


TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # train.trackers value -> module accelerate needs


def _check_trackers(cfg: Config) -> None:
    """Each experiment tracker's package is installed (accelerate would only fail at the first step otherwise)."""
    import importlib.util

    for i, name in enumerate(cfg.train.trackers):
        if importlib.util.find_spec(TRACKER_PACKAGES[name]) is None:
            raise ConfigError(
                f"train.trackers.{i}: {name!r} needs the {TRACKER_PACKAGES[name]} package (pip install it)"
            )


def _check_task_names(cfg: Config) -> None:
    """lm-eval task and group names exist (the offline ``kd_heldout*`` tasks are the project's own)."""
    from lm_eval.tasks import TaskManager

    wanted = [(i, t.name) for i, t in enumerate(cfg.evaluate.tasks) if not t.name.startswith("kd_heldout")]
    if not wanted:
        return
    known = set(TaskManager().all_tasks)
    for i, name in wanted:
        if name not in known:
            raise ConfigError(f"evaluate.tasks.{i}.name: unknown lm-eval task or group {name!r}")
