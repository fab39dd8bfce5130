"""One typed configuration schema for every stage.

A YAML file sets only what differs from the defaults below; ``key.path=value`` overrides on the command line are
applied on top (values parsed as YAML, so ``train.lr=3e-4`` is a float and ``cache.hidden_layers=[8,16]`` a list).
Validation is strict: an unknown key, a wrong type, a value outside its range or a missing required value raises
:class:`ConfigError` whose message is one line naming the key path, e.g.
``train.variants.kd.response.temperature: expected float > 0, got "hot"``.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

REQUIRED: Any = object()  # sentinel default for values every config must set


class ConfigError(ValueError):
    """A configuration problem; ``str(err)`` is a single line naming the key path."""


def _opt(default: Any = REQUIRED, doc: str = "", check: tuple[typing.Callable[[Any], bool], str] | None = None):
    """A schema field: its default, a one-line meaning and an optional (predicate, description) range check."""
    meta = {"doc": doc, "check": check}
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        snapshot = default
        return field(default_factory=lambda: _copy(snapshot), metadata=meta)
    if default is REQUIRED:
        return field(default=REQUIRED, metadata=meta)
    return field(default=default, metadata=meta)


def _copy(value: Any) -> Any:
    return copy.deepcopy(value)


POSITIVE = (lambda v: v > 0, "> 0")
NON_NEGATIVE = (lambda v: v >= 0, ">= 0")
FRACTION = (lambda v: 0 <= v < 1, "in [0, 1)")
UNIT = (lambda v: 0 <= v <= 1, "in [0, 1]")
OPEN_UNIT = (lambda v: 0 < v < 1, "in (0, 1)")


# --------------------------------------------------------------------------------------------------- models
@dataclass
class ModelConfig:
    name_or_path: str = _opt(doc="hub name (org/model) or local directory; both load with from_pretrained")
    revision: str | None = _opt(None, "hub revision (branch, tag or commit); ignored for local paths")
    gguf_file: str | None = _opt(None, "GGUF file inside name_or_path to dequantize on load")
    tokenizer: str | None = _opt(None, "tokenizer name or path when it differs from name_or_path")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _opt("auto", "auto: bf16 on GPU, fp32 on CPU")
    device_map: str | None = _opt(
        None,
        "'auto' spreads one model layer by layer over the visible GPUs (one busy at a time): the fallback "
        "for a teacher with no tensor-parallel plan",
    )
    attn_implementation: str | None = _opt(None, "e.g. sdpa or flash_attention_2; None lets transformers pick")
    trust_remote_code: bool = _opt(False, "allow custom modelling code from the hub")


@dataclass
class TeacherConfig(ModelConfig):
    tensor_parallel: int = _opt(
        1,
        "GPUs per teacher replica (transformers TP) when the cache runs under torchrun; 1: a whole teacher per GPU "
        "(it fits one); else the smallest divisor of the heads whose shards fit (cache --plan)",
        POSITIVE,
    )


# How a model is run, not which model it is: left out of the identities that decide whether outputs are stale, so
# re-running the cache with another tensor-parallel size reuses shards that are equal within storage rounding.
EXECUTION_ONLY_MODEL_KEYS = ("tensor_parallel",)


def model_identity(settings: ModelConfig) -> dict[str, Any]:
    """The model section as hashed into markers and shard signatures (execution-only keys left out)."""
    return {k: v for k, v in dataclasses.asdict(settings).items() if k not in EXECUTION_ONLY_MODEL_KEYS}


# ------------------------------------------------------------------------------------------------- manifest
SHAPE_FIELDS = {  # record shape -> its canonical fields (what manifest.sources.<i>.fields maps), in detection order
    "text": ("text",),
    "alpaca": ("instruction", "input", "output"),
    "prompt_response": ("prompt", "response"),
    "messages": ("messages",),
    "sharegpt": ("conversations",),
}
CANONICAL_FIELDS = tuple(dict.fromkeys(f for fields in SHAPE_FIELDS.values() for f in fields))


@dataclass
class SourceConfig:
    path: str = _opt(doc="datasets path: hub name, or a builder such as json/parquet with data_files")
    name: str | None = _opt(None, "dataset config name")
    data_files: str | list[str] | dict[str, str | list[str]] | None = _opt(None, "files for a local builder")
    split: str = _opt("train", "split to read")
    revision: str | None = _opt(None, "hub revision; recorded in the manifest")
    weight: float = _opt(1.0, "mixture weight: this source's share of the kept tokens (relative; see mixture)",
                         NON_NEGATIVE)  # fmt: skip
    streaming: bool = _opt(False, "stream instead of downloading the whole split")
    format: Literal["auto", "text", "alpaca", "prompt_response", "messages", "sharegpt"] = _opt(
        "auto", "record shape; auto recognises each record's shape"
    )
    fields: dict[str, str] = _opt({}, "map canonical field -> this source's column, e.g. {text: body}")


@dataclass
class ManifestConfig:
    sources: list[SourceConfig] = _opt([], "the dataset mixture")
    mixture: Literal["tokens", "documents"] = _opt(
        "tokens", "what the weights share out: kept tokens (as data-mixture papers mean), or documents read"
    )
    seq_len: int = _opt(2048, "tokens per packed sequence (>= 2: position t learns token t+1)",
                        (lambda v: v >= 2, ">= 2"))  # fmt: skip
    max_samples: int | None = _opt(None, "cap on kept documents, train + val (None: until a source runs out)", POSITIVE)
    max_tokens: int | None = _opt(None, "cap on kept tokens incl. EOS, train + val (None: no cap)", POSITIVE)
    min_chars: int = _opt(1, "drop documents shorter than this", NON_NEGATIVE)
    max_chars: int | None = _opt(None, "drop documents longer than this", POSITIVE)
    dedup: bool = _opt(True, "drop exact duplicates (hash of normalised text)")
    val_fraction: float = _opt(0.01, "fraction of documents held out for validation", FRACTION)
    rows_per_shard: int = _opt(1024, "packed sequences per Parquet shard", POSITIVE)
    num_proc: int = _opt(1, "processes for datasets.map tokenization", POSITIVE)
    chat_template: bool = _opt(True, "render chat-shaped records with the tokenizer's chat template if it has one")
    compression: Literal["zstd", "snappy", "none"] = _opt("zstd", "Parquet compression")


# ---------------------------------------------------------------------------------------------------- cache
@dataclass
class CacheConfig:
    top_k: int = _opt(32, "teacher log-probs kept per position", POSITIVE)
    temperature: float = _opt(1.0, "capture temperature of the stored log-probs", POSITIVE)
    targets: Literal["topk", "sampled", "topk+sampled"] = _opt(
        "topk",
        "teacher targets: top-k + tail; plus draws from the whole distribution (sampled); plus draws from the tail "
        "outside the top-k (topk+sampled); draws are unique ids with unbiased weights (pipeline.sampling)",
    )
    samples: int = _opt(32, "draws per position for sampled targets (a power of two keeps counts/n exact)", POSITIVE)
    proposal_temperature: float = _opt(
        1.0,
        "draws from q ~ p^(1/t): 1 = the teacher itself (weights counts/n), > 1 reaches further (weights p/q)",
        POSITIVE,
    )
    hidden_layers: list[int] = _opt([], "teacher hidden_states indices to store (0 = embeddings, i = block i out)")
    hidden_dtype: Literal["float16", "bfloat16"] = _opt("float16", "storage dtype of hidden states")
    hidden_every_n: int = _opt(1, "store hidden states at every n-th position", POSITIVE)
    hidden_fraction: float | None = _opt(None, "store a random fraction of positions (index stored)", UNIT)
    embed_layer: int | None = _opt(None, "hidden_states index masked-mean-pooled into a sequence embedding")
    batch_size: int = _opt(8, "sequences per teacher forward", POSITIVE)
    logits_chunk: int = _opt(1024, "positions per LM-head chunk (bounds peak logits memory)", POSITIVE)
    compression: Literal["zstd", "snappy", "none"] = _opt("zstd", "Parquet compression")
    compression_level: int | None = _opt(3, "codec level (zstd 1-22)")
    log_every_s: float = _opt(30.0, "seconds between progress log lines", POSITIVE)


# ---------------------------------------------------------------------------------------------------- train
@dataclass
class ResponseKDConfig:
    weight: float = _opt(0.0, "weight of the top-k response loss", NON_NEGATIVE)
    divergence: Literal["forward_kl", "reverse_kl", "jsd", "tvd"] = _opt("forward_kl", "divergence")
    temperature: float = _opt(1.0, "tau (loss x tau^2); tail_bucket needs cache.temperature, renormalize any", POSITIVE)
    tail: Literal["tail_bucket", "renormalize"] = _opt("tail_bucket", "k+1 classes with the exact tail, or over k")
    jsd_beta: float = _opt(0.5, "beta of the generalized JSD (0 and 1 make it vanish)", OPEN_UNIT)
    unmapped: Literal["tail_bucket", "uld"] = _opt(
        "tail_bucket",
        "student with another tokenizer: teacher top-k mass on ids it has no token for joins the tail class, or "
        "also the ULD sorted-probability distance (pipeline.xtok)",
    )
    top_k: int | None = _opt(None, "use the first k of the cached top-k (their dropped mass joins the tail); None: all",
                             POSITIVE)  # fmt: skip
    targets: Literal["topk", "sampled", "topk+sampled", "online"] = _opt(
        "topk",
        "what the student is distilled on: the cached top-k (+ tail); the cached draws (unbiased forward-KL "
        "gradient); the exact top-k head + sampled tail; or the teacher run in the loop on the full vocabulary",
    )


@dataclass
class FeatureKDConfig:
    weight: float = _opt(0.0, "weight of the hidden-state loss", NON_NEGATIVE)
    layer_pairs: list[list[int]] = _opt([], "[student hidden_states index, teacher hidden_states index] pairs")
    metric: Literal["mse", "cosine"] = _opt("mse", "distance on normalised features")


@dataclass
class RelationKDConfig:
    weight: float = _opt(0.0, "weight of the relation loss", NON_NEGATIVE)
    student_layer: int = _opt(-1, "student hidden_states index pooled for relations (-1: last)")
    distance_weight: float = _opt(25.0, "RKD distance term weight (Park et al. 2019)", NON_NEGATIVE)
    angle_weight: float = _opt(50.0, "RKD angle term weight (Park et al. 2019)", NON_NEGATIVE)
    pairwise_weight: float = _opt(0.0, "plain pairwise-similarity term weight", NON_NEGATIVE)
    pairwise_metric: Literal["cosine", "euclidean", "dot"] = _opt("cosine", "similarity of the pairwise term")
    gather_across_ranks: bool = _opt(True, "relations span the global batch")


@dataclass
class LossConfig:
    ce_weight: float = _opt(1.0, "hard-label cross-entropy weight", NON_NEGATIVE)
    response: ResponseKDConfig = _opt(ResponseKDConfig(), "response-based KD on cached top-k")
    feature: FeatureKDConfig = _opt(FeatureKDConfig(), "feature-based KD through learned projectors")
    relation: RelationKDConfig = _opt(RelationKDConfig(), "relation-based KD on pooled embeddings")


@dataclass
class LoraConfig:
    enabled: bool = _opt(False, "train a LoRA adapter instead of all weights")
    r: int = _opt(16, "adapter rank", POSITIVE)
    alpha: int = _opt(32, "adapter scaling numerator", POSITIVE)
    dropout: float = _opt(0.05, "adapter dropout", FRACTION)
    target_modules: list[str] = _opt(["q_proj", "k_proj", "v_proj", "o_proj"], "modules wrapped")


@dataclass
class TrainConfig:
    variants: dict[str, LossConfig] = _opt(
        {
            "ce": LossConfig(),
            "kd": LossConfig(ce_weight=0.5, response=ResponseKDConfig(weight=0.5)),
        },
        "students to train: name -> loss recipe",
    )
    baseline_variant: str = _opt("ce", "the CE-only variant deltas are reported against")
    max_steps: int = _opt(1000, "optimizer steps", POSITIVE)
    micro_batch_size: int = _opt(8, "sequences per rank per forward", POSITIVE)
    grad_accum_steps: int = _opt(1, "micro-batches per optimizer step", POSITIVE)
    lr: float = _opt(3e-4, "peak learning rate", POSITIVE)
    min_lr_ratio: float = _opt(0.1, "cosine floor as a fraction of lr", UNIT)
    warmup_steps: int = _opt(100, "linear warmup steps", NON_NEGATIVE)
    weight_decay: float = _opt(0.1, "AdamW decay (not on norms, biases or embeddings)", NON_NEGATIVE)
    betas: list[float] = _opt([0.9, 0.95], "AdamW betas")
    max_grad_norm: float = _opt(1.0, "gradient clipping norm", POSITIVE)
    checkpoint_every: int = _opt(200, "optimizer steps between checkpoints", POSITIVE)
    keep_checkpoints: int = _opt(2, "complete checkpoints kept", POSITIVE)
    eval_every: int = _opt(200, "optimizer steps between validations", POSITIVE)
    eval_batches: int | None = _opt(None, "validation micro-batches (None: whole held-out cache)", POSITIVE)
    log_every: int = _opt(10, "optimizer steps between log lines", POSITIVE)
    resume: Literal["auto", "never"] = _opt("auto", "auto: continue from the latest complete checkpoint")
    mixed_precision: Literal["auto", "no", "bf16"] = _opt("auto", "auto: bf16 on GPU, fp32 on CPU")
    distributed: Literal["ddp", "fsdp"] = _opt(
        "ddp", "ddp: full copy per rank; fsdp: FSDP2 shards weights, grads and AdamW state (student too big for one)"
    )
    gradient_checkpointing: bool = _opt(False, "trade compute for activation memory")
    logits_chunk: int = _opt(
        1024,
        "positions per student LM-head chunk: logits, CE and KD computed and recomputed chunk by chunk, never "
        "[B, T, V] whole (~1/6 of the step's peak at V=128k); 0: whole logits (the unchunked path)",
        NON_NEGATIVE,
    )
    lora: LoraConfig = _opt(LoraConfig(), "parameter-efficient fine-tuning")
    num_workers: int = _opt(0, "DataLoader workers per rank", NON_NEGATIVE)
    shuffle_buffer: int = _opt(256, "rows in the shuffle buffer", POSITIVE)
    threads: int | None = _opt(None, "torch CPU threads (None: torch default)", POSITIVE)
    trackers: list[Literal["tensorboard", "wandb"]] = _opt(
        [], "experiment trackers fed every logged metric through accelerate (logs/<run>/train/trackers/<variant>)"
    )


# ------------------------------------------------------------------------------------------------- evaluate
@dataclass
class EvalTaskConfig:
    name: str = _opt(doc="lm-eval task or group name")
    num_fewshot: int = _opt(0, "few-shot examples", NON_NEGATIVE)
    limit: int | None = _opt(None, "examples per task (tests and smoke runs only)", POSITIVE)


@dataclass
class EvaluateConfig:
    tasks: list[EvalTaskConfig] = _opt([], "lm-evaluation-harness tasks")
    local_tasks: bool = _opt(True, "register the project's offline tasks built from the held-out split")
    batch_size: int = _opt(8, "lm-eval batch size", POSITIVE)
    include_teacher: bool = _opt(True, "evaluate the teacher too (result reused while unchanged)")
    ece_bins: int = _opt(15, "bins of the expected calibration error", POSITIVE)
    intrinsic_batches: int | None = _opt(None, "held-out micro-batches for intrinsic metrics (None: all)", POSITIVE)
    logits_chunk: int = _opt(
        1024, "positions per LM-head chunk of the intrinsic metrics (0: whole [B, T, V] logits)", NON_NEGATIVE
    )
    local_task_docs: int = _opt(500, "held-out documents per offline task (the first N, in manifest order)", POSITIVE)
    mc_choices: int = _opt(4, "choices per offline multiple-choice item (chance: 1/n)", (lambda v: v >= 2, ">= 2"))
    mc_passage_words: int = _opt(32, "words per offline multiple-choice item (passages of the held-out documents)",
                                 (lambda v: v >= 4, ">= 4"))  # fmt: skip
    bootstrap_iters: int = _opt(1000, "lm-eval bootstrap resamples for stderr of non-mean metrics", NON_NEGATIVE)


# --------------------------------------------------------------------------------------------------- report
@dataclass
class ReportConfig:
    plots: bool = _opt(True, "write PNG plots and embed them in summary.md")


# ---------------------------------------------------------------------------------------------------- slurm
# sbatch --time formats: minutes, minutes:seconds, hours:minutes:seconds, days-hours, days-hours:minutes,
# days-hours:minutes:seconds
SLURM_TIME = re.compile(
    r"(?P<d>\d+)-(?P<dh>\d+)(?::(?P<dm>\d+)(?::(?P<ds>\d+))?)?"  # days-hours[:minutes[:seconds]]
    r"|(?P<a>\d+)(?::(?P<b>\d+)(?::(?P<c>\d+))?)?"  # minutes[:seconds] or hours:minutes:seconds
)
SLURM_TIME_FORMATS = "minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"


def slurm_time_s(value: str | int) -> int | None:
    """Seconds of an sbatch ``--time`` value (an int is minutes), None when it is not in one of Slurm's formats."""
    match = SLURM_TIME.fullmatch(str(value).strip())
    if match is None:
        return None
    g = {k: int(v) if v is not None else 0 for k, v in match.groupdict().items()}
    if match["d"] is not None:
        return ((g["d"] * 24 + g["dh"]) * 60 + g["dm"]) * 60 + g["ds"]
    if match["c"] is not None:
        return (g["a"] * 60 + g["b"]) * 60 + g["c"]
    return g["a"] * 60 + g["b"]


SLURM_TIME_CHECK = (lambda v: bool(slurm_time_s(v)), f"in sbatch --time format ({SLURM_TIME_FORMATS})")


@dataclass
class SlurmResources:
    nodes: int = _opt(1, "nodes (only train spans nodes; the cache scales out with array_tasks)", POSITIVE)
    gpus_per_node: int = _opt(0, "GPUs per node (--gpus-per-node)", NON_NEGATIVE)
    nproc_per_node: int | None = _opt(None, "processes per node (None: one per GPU, 1 without GPUs)", POSITIVE)
    cpus_per_task: int = _opt(4, "CPU cores per node (one task per node)", POSITIVE)
    mem_gb: int = _opt(16, "memory per node in GB", POSITIVE)
    time: str | int = _opt("1:00:00", f"wall-clock limit, as sbatch --time ({SLURM_TIME_FORMATS})", SLURM_TIME_CHECK)
    array_tasks: int = _opt(1, "array tasks (cache stage: shards are split over them)", POSITIVE)
    # where the job runs and what it runs under; None / empty: the run's value (slurm.<key>)
    partition: str | None = _opt(None, "partition (None: slurm.partition), e.g. cpu for manifest and report")
    account: str | None = _opt(None, "account to charge (None: slurm.account)")
    qos: str | None = _opt(None, "quality of service (None: slurm.qos)")
    constraint: str | None = _opt(None, "node features, as --constraint (None: slurm.constraint), e.g. h100&ib")
    reservation: str | None = _opt(None, "reservation (None: slurm.reservation)")
    exclusive: bool | None = _opt(None, "whole nodes, --exclusive (None: slurm.exclusive)")
    mail_type: str | None = _opt(None, "--mail-type, e.g. END,FAIL (None: slurm.mail_type)")
    extra_args: list[str] = _opt([], "more sbatch options for this stage (after slurm.extra_args)")
    setup: list[str] = _opt([], "shell lines run before this stage (after slurm.setup), e.g. module load cuda/12.4")
    env: dict[str, str] = _opt({}, "variables exported to this stage (over slurm.env)")
    srun_args: list[str] = _opt([], "more srun options for this stage's step (after slurm.srun_args)")
    wrapper: list[str] | None = _opt(None, "command the stage runs under (None: slurm.wrapper)")


def _stage_resources(name: str, **defaults: Any) -> type:
    """SlurmResources with one stage's defaults, so ``slurm.stages.train.nodes=4`` keeps train's other defaults
    (a plain dict of SlurmResources would fall back to the generic defaults and drop the unnamed stages)."""
    hints = typing.get_type_hints(SlurmResources)
    fields = [
        (f.name, hints[f.name], _opt(defaults.get(f.name, _default_of(f)), f.metadata["doc"], f.metadata["check"]))
        for f in dataclasses.fields(SlurmResources)
    ]
    cls = dataclasses.make_dataclass(name, fields)
    cls.__module__ = __name__
    return cls


def _default_of(f: dataclasses.Field) -> Any:
    return f.default if f.default_factory is dataclasses.MISSING else f.default_factory()


ManifestResources = _stage_resources("ManifestResources", cpus_per_task=8, mem_gb=32, time="2:00:00")
CacheResources = _stage_resources("CacheResources", gpus_per_node=8, cpus_per_task=32, mem_gb=512, time="12:00:00")
TrainResources = _stage_resources("TrainResources", gpus_per_node=8, cpus_per_task=32, mem_gb=512, time="1-00:00:00")
EvaluateResources = _stage_resources("EvaluateResources", gpus_per_node=1, cpus_per_task=8, mem_gb=128, time="4:00:00")
ReportResources = _stage_resources("ReportResources", cpus_per_task=2, mem_gb=8, time="30")


@dataclass
class SlurmStages:
    manifest: ManifestResources = _opt(ManifestResources(), "tokenize and pack (CPU)")
    cache: CacheResources = _opt(CacheResources(), "teacher pass: torchrun on one node per array task")
    train: TrainResources = _opt(TrainResources(), "one job per variant; torchrun with one process per GPU per node")
    evaluate: EvaluateResources = _opt(EvaluateResources(), "lm-eval of every variant and the teacher")
    report: ReportResources = _opt(ReportResources(), "tables and plots (CPU)")


@dataclass
class SlurmConfig:
    # where every job runs (a stage's own value in slurm.stages.<stage> wins)
    partition: str | None = _opt(None, "partition (None: cluster default)")
    account: str | None = _opt(None, "account to charge")
    qos: str | None = _opt(None, "quality of service")
    constraint: str | None = _opt(None, "node features, as --constraint")
    reservation: str | None = _opt(None, "reservation to run in")
    exclusive: bool = _opt(False, "whole nodes (--exclusive)")
    mail_type: str | None = _opt(None, "--mail-type, e.g. END,FAIL")
    mail_user: str | None = _opt(None, "--mail-user (None: the submitting user)")
    extra_args: list[str] = _opt([], "extra sbatch arguments for every stage")
    # the environment hook and the launch line (run-wide; per stage these add to it)
    export: str | None = _opt(None, "sbatch --export (None: ALL; NONE starts the job from a clean environment)")
    setup: list[str] = _opt([], "shell lines every job runs first: module load ..., source <venv>/bin/activate, ...")
    env: dict[str, str] = _opt({}, "variables exported to every stage (no secrets: the scripts are kept in logs/)")
    srun_args: list[str] = _opt([], "extra srun options of the stage step, e.g. --container-image=<img> (pyxis)")
    wrapper: list[str] = _opt([], "command every stage runs under, e.g. [apptainer, exec, --nv, distill.sif]")
    python: str | None = _opt(None, "interpreter on the compute nodes (None: the one running submit)")
    signal_s: int = _opt(300, "seconds before the time limit that the USR1 warning is sent (cache, train)", POSITIVE)
    rdzv_port: int = _opt(29500, "torchrun rendezvous port on the first node of a multi-node job", POSITIVE)
    stages: SlurmStages = _opt(SlurmStages(), "resources per stage (the one source of truth for sbatch)")


@dataclass
class MonitorConfig:
    enabled: bool = _opt(True, "run monitor.py beside every stage")
    interval_s: float = _opt(1.0, "seconds between samples", POSITIVE)


# ----------------------------------------------------------------------------------------------------- root
@dataclass
class Config:
    run_name: str = _opt(doc="names runs/<run_name>/ and logs/<run_name>/")
    runs_dir: str = _opt("runs", "root of run directories")
    logs_dir: str = _opt("logs", "root of log directories")
    seed: int = _opt(0, "global seed (data order, init, sampling)")
    teacher: TeacherConfig = _opt(doc="the teacher model")
    student: ModelConfig = _opt(doc="the student model (every variant starts from it)")
    manifest: ManifestConfig = _opt(ManifestConfig(), "data mixture -> packed shards")
    cache: CacheConfig = _opt(CacheConfig(), "teacher pass -> Parquet cache")
    train: TrainConfig = _opt(TrainConfig(), "student distillation")
    evaluate: EvaluateConfig = _opt(EvaluateConfig(), "lm-eval + teacher-relative metrics")
    report: ReportConfig = _opt(ReportConfig(), "tables and plots")
    slurm: SlurmConfig = _opt(SlurmConfig(), "cluster resources")
    monitor: MonitorConfig = _opt(MonitorConfig(), "telemetry")


# ------------------------------------------------------------------------------------------------ validation
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(json.dumps(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"mapping of {_type_name(typing.get_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _show(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (str, int, float, bool, type(None))) else repr(value)


FLOAT_LITERAL = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _convert(tp: Any, value: Any, path: str) -> Any:
    """Check ``value`` against type ``tp``; return the typed value or raise ConfigError naming ``path``."""
    origin = typing.get_origin(tp)
    expected = f"{path}: expected {_type_name(tp)}, got {_show(value)}"
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, path)
            except ConfigError:
                continue
        raise ConfigError(expected)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(expected)
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(expected)
        (item_tp,) = typing.get_args(tp)
        return [_convert(item_tp, v, f"{path}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(expected)
        _, item_tp = typing.get_args(tp)
        return {str(k): _convert(item_tp, v, f"{path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value):
            value = dataclasses.asdict(value)
        if not isinstance(value, dict):
            raise ConfigError(expected)
        return _build(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(expected)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(expected)
        return value
    if tp is float:
        if isinstance(value, str) and FLOAT_LITERAL.fullmatch(value.strip()):
            return float(value)  # PyYAML (YAML 1.1) reads 3e-4 without a dot as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(expected)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(expected)
        return value
    if tp is Any:
        return value
    raise TypeError(f"unsupported schema type {tp!r} at {path}")


def _build(cls: type, data: dict, path: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    prefix = f"{path}." if path else ""
    for key in data:
        if key not in known:
            raise ConfigError(f"{prefix}{key}: unknown key (expected one of: {', '.join(known)})")
    kwargs = {}
    for name, f in known.items():
        key_path = f"{prefix}{name}"
        check = f.metadata.get("check")
        if name in data:
            try:
                value = _convert(hints[name], data[name], key_path)
            except ConfigError as err:
                if check is None or not str(err).startswith(f"{key_path}: expected "):
                    raise
                raise ConfigError(
                    f"{key_path}: expected {_type_name(hints[name])} {check[1]}, got {_show(data[name])}"
                ) from None
        elif f.default is REQUIRED:
            raise ConfigError(f"{key_path}: required value missing ({f.metadata.get('doc', '')})")
        elif f.default is not dataclasses.MISSING:
            value = f.default
        else:
            value = f.default_factory()
        if check is not None and value is not None:
            predicate, description = check
            if not predicate(value):
                raise ConfigError(f"{key_path}: expected {_type_name(hints[name])} {description}, got {_show(value)}")
        kwargs[name] = value
    return cls(**kwargs)


# ------------------------------------------------------------------------------------------- overrides, load
def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], yaml-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"{text}: expected an override of the form key.path=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"{key}: expected a dotted key path")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def seed_defaults(data: dict, parts: list[str]) -> None:
    """Copy the default of a mapping- or list-valued field into ``data`` when an override reaches inside it.

    Without this, ``train.variants.kd.response.temperature=2`` on a config that keeps the default variants would
    replace them all by one half-specified ``kd``; with it the override edits the default ``kd`` in place.
    """
    cls: Any = Config
    node: Any = data
    for part in parts[:-1]:
        f = next((f for f in dataclasses.fields(cls) if f.name == part), None)
        if f is None or not isinstance(node, dict):
            return
        tp = typing.get_type_hints(cls)[part]
        if typing.get_origin(tp) in (dict, list):
            if node.get(part) is None and f.default_factory is not dataclasses.MISSING:
                node[part] = _plain(f.default_factory())
            return
        if not dataclasses.is_dataclass(tp):
            return
        if node.get(part) is None:
            node[part] = {}
        cls, node = tp, node[part]


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def apply_override(data: dict, parts: list[str], value: Any) -> None:
    """Set ``data[p0][p1]...`` creating mappings on the way; numeric parts index into lists."""
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = _list_item(node, part, parts[: i + 1])
            continue
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"{'.'.join(parts[: i + 1])}: is a value, cannot set {'.'.join(parts)}")
    last = parts[-1]
    if isinstance(node, list):
        index = int(_list_index(node, last, parts))
        node[index] = value
    else:
        node[last] = value


def _list_index(node: list, part: str, parts: list[str]) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"{'.'.join(parts)}: expected a list index below {len(node)}")
    return int(part)


def _list_item(node: list, part: str, parts: list[str]) -> Any:
    return node[_list_index(node, part, parts)]


def from_dict(data: dict) -> Config:
    """Validate a plain mapping into a :class:`Config`."""
    if not isinstance(data, dict):
        raise ConfigError(f"<root>: expected a mapping, got {_show(data)}")
    cfg = _build(Config, data, "")
    from pipeline import validate  # validate imports this module for the schema: imported here, not at the top

    validate.check_config(cfg)
    return cfg


def load(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config, apply dotted overrides and validate."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config ({err.strerror})") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} invalid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    for text in overrides:
        parts, value = parse_override(text)
        seed_defaults(data, parts)
        apply_override(data, parts, value)
    return from_dict(data)


def to_dict(obj: Any) -> Any:
    """The resolved config (or a section of it) as plain data."""
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested config values (dataclasses, mappings, lists) as ``{"a.b.0.c": leaf}``: key paths as the user writes
    them, so a changed value can be named."""
    obj = _plain(obj)
    if isinstance(obj, dict):
        items: Any = obj.items()
    elif isinstance(obj, list) and obj:
        items = enumerate(obj)
    else:
        return {prefix: obj}
    out: dict[str, Any] = {}
    for key, value in items:
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def section_hash(*sections: Any) -> str:
    """Stable short hash of config sections (what a stage's output depends on); dataclasses at any depth count by
    their fields."""
    blob = json.dumps([_plain(s) for s in sections], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
