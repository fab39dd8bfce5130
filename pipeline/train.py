"""Training stage: distil the cached teacher into the student — one unit per variant of ``train.variants``.

Reads   the cache shards the cache stage's marker declares (runs/<run>/cache/{train,val}-*.parquet, through
        ``pipeline.cache_format`` only), and the student checkpoint ``student.name_or_path``; a student with another
        tokenizer also the manifest rows' text (runs/<run>/manifest/, exactly the shards the cache was computed from,
        checked by checksum; ``pipeline.xtok``); the teacher only for a variant with ``response.targets: online``,
        which runs it in the loop on each batch (full-vocabulary KD).
Writes  runs/<run>/train/<variant>/
          checkpoints/step_<n:07d>/   model + projectors (LoRA: adapter + projectors only), optimizer, RNG
                                      (accelerate ``save_state``; FSDP: model + optimizer as per-rank DCP shards
                                      in sharded/, see pipeline.fsdp), scheduler.pt,
                                      data_rank_<r>.json (epoch, batches consumed), trainer_state.json; written under
                                      a temporary name and renamed, so a listed checkpoint is always complete
          final/                      HF ``save_pretrained`` dir + tokenizer (LoRA: the merged model)
          adapter/                    LoRA adapter (LoRA only)
          metrics.jsonl               one JSON per logged step {step, split: train|val, loss, ce, kd_*, lr, ...}
          samples/rank_<r:05d>.jsonl  sample ids consumed at each optimizer step (audit trail of the data order)
          summary.json, config.yaml, _COMPLETE.json (marker, last)
Run     python -m pipeline.train --config C [--variant NAME] [key=value ...]      (no --variant: all, in order)
        python -m torch.distributed.run --nproc-per-node N -m pipeline.train --config C ...
                                      (DDP; FSDP2 with train.distributed=fsdp, on CPU/gloo as on GPU/NCCL)

The stage reads top to bottom as in nanoGPT/torchtune. ``_train_variant`` is four calls: ``_setup`` builds one
``TrainingSetup`` (accelerator, loss recipe, model, optimizer, schedule, tokenizer, data) from ``_setup_*`` helpers in
dependency order; ``_resume`` restores the latest checkpoint or starts afresh; ``_train_loop`` runs the optimizer
steps (``_optimizer_step``: accumulate, one all-reduce of the named step metrics, clip, step; then log, validate,
checkpoint); ``_finish`` saves the model and the summary. ``_loss_step(batch)`` computes every loss component.
Resume is automatic (``train.resume: auto``): the latest complete checkpoint restores weights, optimizer, schedule,
RNG and each rank's data position, so an interrupted run (kill -9, preemption) ends with the same weights and the
same sample sequence as an uninterrupted one; a checkpoint made from other settings or inputs (another cache or
student) is refused naming the keys that differ, before anything of a finished run is touched. USR1 (Slurm's
time-limit/preemption warning) → checkpoint at the next step boundary, requeue, exit 0; SIGTERM (scancel) →
checkpoint at the next step boundary, exit without requeue.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pipeline import cache_format, definition, lm_head, losses, preemption, xtok
from pipeline.config import (
    Config,
    ConfigError,
    LossConfig,
    ModelConfig,
    TrainConfig,
    flatten,
    model_identity,
    to_dict,
)
from pipeline.fsdp import Fsdp2
from pipeline.jsonlog import console_progress, parse_jsonl, redact_values
from pipeline.lm_head import causal_targets
from pipeline.modeling import (
    load_causal_lm,
    load_model_config,
    load_tokenizer,
    weights_fingerprint,
)
from pipeline.rundir import (
    PipelineError,
    RunDir,
    StageContext,
    StageSpec,
    atomic_write_json,
    describe_changes,
    stage_main,
)
from pipeline.validate import hidden_index, num_hidden_states

STAGE = "train"
# a rank's signal as a number that survives the step's sum over ranks: any stop request outweighs every warning
SIGNAL_CODES = {preemption.WARNING: 1.0, preemption.STOP: 1e6}
COMPONENTS = ("ce", "kd_response", "kd_feature", "kd_relation")  # metric names, also the weight keys
CHECKPOINT_PREFIX = "step_"
TMP_PREFIX = ".tmp-"
# Knobs that change how a run is observed or stored, not what it computes: a resume may change them.
OPERATIONAL_KEYS = ("checkpoint_every", "keep_checkpoints", "eval_every", "eval_batches", "log_every", "resume")
OPERATIONAL_KEYS += ("num_workers", "threads", "variants", "baseline_variant", "trackers")


def signal_from_code(total: float) -> int | None:
    """The signal the ranks act on, from the sum of their SIGNAL_CODES (STOP beats WARNING)."""
    if total >= SIGNAL_CODES[preemption.STOP]:
        return preemption.STOP
    return preemption.WARNING if total > 0 else None


# ------------------------------------------------------------------------------------------------ schedule
def lr_at(step: int, train: TrainConfig) -> float:
    """LR of optimizer step ``step`` (0-based): linear warmup, cosine to ``min_lr_ratio·lr``, then flat.

    As in nanoGPT's ``get_lr``; past ``max_steps`` it stays at the floor (a cosine continued past its end would
    rise again).
    """
    peak, floor = train.lr, train.lr * train.min_lr_ratio
    if step < train.warmup_steps:
        return peak * (step + 1) / (train.warmup_steps + 1)
    if step >= train.max_steps:
        return floor
    ratio = (step - train.warmup_steps) / max(1, train.max_steps - train.warmup_steps)
    return floor + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (peak - floor)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on matrices of linear layers; none on norms, biases and embeddings (GPT-2 practice)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for _, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:  # tied weights appear twice
            continue
        seen.add(id(param))
        (no_decay if param.ndim < 2 or id(param) in embeddings else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ------------------------------------------------------------------------------------------------- recipe
@dataclass
class LossRecipe:
    """One variant's losses resolved against the student and the cache (derived once, then read-only)."""

    name: str
    loss: LossConfig
    capture_temperature: float
    feature_pairs: list[tuple[int, int]]  # (student hidden_states index, teacher cached layer), both non-negative
    relation_layer: int  # student hidden_states index pooled for relations
    sampled_support: str | None = None  # what the cache's draws came from ("full", "tail"; None: no draws)
    teacher: nn.Module | None = None  # the teacher run in the loop (response.targets: online), frozen, eval mode
    # checked once here; None without response KD; SampledOptions for sampled, head + sampled tail and online targets
    response: losses.ResponseOptions | losses.SampledOptions | None = field(init=False)

    def __post_init__(self) -> None:
        response = self.loss.response
        if response.weight == 0:
            self.response = None
        elif response.targets == "topk":
            options = (response.divergence, response.temperature, response.tail, self.capture_temperature)
            self.response = losses.ResponseOptions(*options, response.jsd_beta, response.unmapped)
        else:
            self.response = losses.SampledOptions(response.temperature)

    @property
    def weights(self) -> dict[str, float]:
        """{component: weight in the total}, in COMPONENTS order."""
        loss = self.loss
        return {
            "ce": loss.ce_weight,
            "kd_response": loss.response.weight,
            "kd_feature": loss.feature.weight,
            "kd_relation": loss.relation.weight,
        }

    @property
    def components(self) -> tuple[str, ...]:
        """The components ``_loss_step`` computes: CE always (logged even at weight 0), each KD family weighted > 0."""
        return tuple(name for name, weight in self.weights.items() if name == "ce" or weight > 0)

    @property
    def uses_logits(self) -> bool:
        return self.loss.ce_weight > 0 or self.loss.response.weight > 0

    @property
    def needs_hidden(self) -> bool:
        return self.loss.feature.weight > 0 or self.loss.relation.weight > 0

    @property
    def online(self) -> bool:
        return self.loss.response.weight > 0 and self.loss.response.targets == "online"

    @property
    def needs_sampled(self) -> tuple[str, ...]:
        """The draw supports of the cache that serve this recipe's targets (none: it reads no draws)."""
        if self.loss.response.weight == 0:
            return ()
        return {"sampled": ("full",), "topk+sampled": ("full", "tail")}.get(self.loss.response.targets, ())

    def columns(self) -> list[str]:
        cols = ["sample_id", "input_ids", "attention_mask"]
        targets = self.loss.response.targets
        if self.loss.response.weight > 0 and targets in ("topk", "topk+sampled"):
            cols += ["topk_ids", "topk_logprobs", "tail_logmass"]
        if self.needs_sampled:
            cols += list(cache_format.SAMPLED_COLUMNS)
        if self.loss.feature.weight > 0:
            cols += [cache_format.hidden_column(t) for t in dict.fromkeys(t for _, t in self.feature_pairs)]
        if self.loss.relation.weight > 0:
            cols.append("embed")
        return cols


def resolve_recipe(name: str, loss: LossConfig, meta: dict[str, Any], student_config: Any) -> LossRecipe:
    """A variant's losses with every hidden index normalised against the student and the cached teacher (the config
    rules, ranges included, are ``pipeline.validate``'s and ran at stage start)."""
    key = f"train.variants.{name}"
    count = num_hidden_states(student_config)
    pairs = []
    for i, (s, t) in enumerate(loss.feature.layer_pairs if loss.feature.weight > 0 else []):
        s_idx = hidden_index(s, count, f"{key}.feature.layer_pairs.{i}.0", "the student")
        pairs.append((s_idx, cache_format.normalise_layer(t, meta)))
    relation_layer = hidden_index(loss.relation.student_layer, count, f"{key}.relation.student_layer", "the student")
    support = (meta.get("sampling") or {}).get("support")
    return LossRecipe(name, loss, float(meta["temperature"]), pairs, relation_layer, support)


# -------------------------------------------------------------------------------------------------- model
class Distillee(nn.Module):
    """The trained state: the student plus the feature projectors, one module so DDP/FSDP sync both.

    ``logits_chunk`` (``train.logits_chunk``): positions per LM-head chunk (``pipeline.lm_head``); 0 computes the
    whole [B, T, V] logits through the student's own forward.
    """

    def __init__(self, student: nn.Module, projectors: losses.FeatureProjectors | None, logits_chunk: int = 0) -> None:
        super().__init__()
        self.student = student
        self.projectors = projectors
        self.logits_chunk = logits_chunk

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        output_hidden_states: bool,
        feature_pairs: list[tuple[int, int]],
        positions: Tensor | None,
        targets: lm_head.HeadTargets,
    ) -> tuple[tuple[Tensor, ...] | None, dict[tuple[int, int], Tensor], dict[str, Tensor]]:
        """(student hidden_states, {(s, t): projected hidden_states[s] at ``positions``, [B, T', Ht]},
        {ce, kd_response}: the logit losses against ``targets``).

        The LM head, its losses and the projections run inside forward, so FSDP has their weights unsharded and DDP
        sees them used.
        """
        kwargs = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "output_hidden_states": output_hidden_states,
        }
        if self.logits_chunk:
            body, head = lm_head.body_and_head(self.student)
            out = body(**kwargs)
            scores = lm_head.chunked_scores(out.last_hidden_state, head, targets, self.logits_chunk)
        else:
            out = self.student(**kwargs)
            scores = lm_head.scores_from_logits(out.logits, targets)
        projected = {}
        for s, t in feature_pairs:
            hidden = out.hidden_states[s] if positions is None else out.hidden_states[s][:, positions]
            projected[(s, t)] = self.projectors(s, t, hidden)
        return out.hidden_states, projected, scores


def _student_model_config(cfg: Config) -> ModelConfig:
    """fp32 master weights unless the config pins a dtype (bf16 compute comes from autocast on GPU)."""
    dtype = "float32" if cfg.student.dtype == "auto" else cfg.student.dtype
    return dataclasses.replace(cfg.student, dtype=dtype, device_map=None)


def build_student(cfg: Config, on: torch.device) -> nn.Module:
    """The student as configured: full weights, or wrapped with a LoRA adapter (peft)."""
    student = load_causal_lm(_student_model_config(cfg), "student", on)
    student.config.use_cache = False
    if cfg.train.lora.enabled:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        lora = cfg.train.lora
        adapter = PeftLoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules),
            task_type="CAUSAL_LM",
        )
        try:
            student = get_peft_model(student, adapter)
        except ValueError as err:
            raise ConfigError(f"train.lora.target_modules: {str(err).splitlines()[0]}") from None
    return student


# ------------------------------------------------------------------------------------------------ loss step
def head(batch: dict[str, Any], top_k: int | None) -> tuple[Tensor, Tensor, Tensor]:
    """The cached (top-k ids, log-probs, tail), cut to the first ``top_k`` entries when set (``response.top_k``)."""
    ids, logprobs, tail = batch["topk_ids"], batch["topk_logprobs"], batch["tail_logmass"]
    if top_k is None or top_k >= ids.shape[-1]:
        return ids, logprobs, tail
    return losses.truncate_topk(ids, logprobs, tail, top_k)


def response_targets(batch: dict[str, Any], recipe: LossRecipe) -> dict[str, Tensor]:
    """What the student's distributions are scored against (``lm_head.HeadTargets.teacher``) for the recipe's
    ``response.targets``; empty without response KD.

    ``topk``: the cached top-k (+ tail), cut to ``response.top_k``; ``sampled``: the cached draws;
    ``topk+sampled``: the exact top-k head plus the draws outside it (``losses.head_and_sampled_tail``); ``online``:
    the teacher run now on the batch, its full distribution at the loss temperature as dense weights (k = V: the same
    loss, exact, the ground truth of the sparse targets).
    """
    response = recipe.loss.response
    if recipe.response is None:
        return {}
    if response.targets == "topk":
        return dict(zip(lm_head.TEACHER_COLUMNS, head(batch, response.top_k), strict=True))
    if response.targets == "sampled":
        return {"target_ids": batch["sampled_ids"], "target_weights": batch["sampled_weights"]}
    if response.targets == "topk+sampled":
        head_ids, head_logprobs, _ = head(batch, response.top_k)
        ids, weights = losses.head_and_sampled_tail(
            head_ids, head_logprobs, batch["sampled_ids"], batch["sampled_weights"], support=recipe.sampled_support
        )
        return {"target_ids": ids, "target_weights": weights}
    with torch.no_grad():
        logits = recipe.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return {"target_weights": torch.softmax(logits.float() / response.temperature, -1)}


def _loss_step(
    model: nn.Module, batch: dict[str, Any], recipe: LossRecipe, gather: bool
) -> tuple[Tensor, dict[str, Tensor], dict[str, float]]:
    """Forward the student on one micro-batch and compute every active loss component.

    Returns (weighted total, {component: value}, {component: normaliser}) where the normaliser is what the
    component averaged over (valid tokens, or sequences for relations) — validation weights batches by it.
    """
    config = recipe.loss
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    positions = batch.get("hidden_positions") if recipe.feature_pairs else None
    labels, ce_mask, kd_mask = causal_targets(input_ids, attention_mask)
    if "xtok_aligned" in batch:  # a student with another tokenizer: the teacher is a target where the two align
        kd_mask = batch["xtok_aligned"]
    teacher_targets = response_targets(batch, recipe)
    # Without a weight CE is only logged, so it builds no graph.
    targets = lm_head.HeadTargets(
        labels, ce_mask, kd_mask, teacher_targets, recipe.response, ce_grad=config.ce_weight > 0
    )
    hidden_states, projected, components = model(
        input_ids, attention_mask, recipe.needs_hidden, recipe.feature_pairs, positions, targets
    )
    normalisers = {"ce": float(ce_mask.sum()), "kd_response": float(kd_mask.sum())}
    if config.feature.weight > 0:
        sub_mask = kd_mask if positions is None else kd_mask[:, positions]
        sub_mask = batch.get("xtok_hidden_mask", sub_mask)  # aligned positions whose teacher state is cached
        terms = [
            losses.feature_distance(proj, batch[cache_format.hidden_column(t)], sub_mask, config.feature.metric)
            for (_, t), proj in projected.items()
        ]
        components["kd_feature"] = torch.stack(terms).mean()
        normalisers["kd_feature"] = float(sub_mask.sum())
    if config.relation.weight > 0:
        relation = config.relation
        pooled = losses.pool_hidden(hidden_states[recipe.relation_layer], attention_mask)
        teacher = batch["embed"]
        if gather and relation.gather_across_ranks:
            pooled, teacher = losses.gather_across_ranks(pooled), losses.gather_across_ranks(teacher)
        components["kd_relation"], _ = losses.relation_loss(
            pooled, teacher, distance_weight=relation.distance_weight, angle_weight=relation.angle_weight,
            pairwise_weight=relation.pairwise_weight, pairwise_metric=relation.pairwise_metric,
        )  # fmt: skip
        normalisers["kd_relation"] = float(input_ids.shape[0])
    total = losses.combine(components, recipe.weights)
    return total, components, normalisers


# ------------------------------------------------------------------------------------------ one variant's run
def _train_variant(cfg: Config, rd: RunDir, ctx: StageContext, variant: str) -> dict[str, float]:
    """Setup, resume, loop, finish: the whole run of one variant; returns its summary numbers."""
    setup = _setup(cfg, rd, ctx, variant)
    try:
        progress, batches = _resume(cfg, ctx, setup)
        last_train, val = _train_loop(cfg, ctx, setup, progress, batches)
        return _finish(cfg, setup, progress, last_train, val)
    finally:
        for tracker in setup.accelerator.trackers:  # not end_training(): it ends the process group too
            tracker.finish()


# ---------------------------------------------------------------------------------------------------- setup
@dataclass
class TrainingSetup:
    """Everything one variant's run holds, built once by ``_setup`` in dependency order, then read by the loop."""

    variant: str
    out: Path  # runs/<run>/train/<variant>
    accelerator: Any  # accelerate.Accelerator, or pipeline.fsdp.Fsdp2 around one
    recipe: LossRecipe
    model: nn.Module  # the Distillee, prepared by the accelerator (DDP or FSDP2)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR  # stepped once per optimizer step, by the loop (not accelerate)
    tokenizer: Any
    cross: xtok.CrossTokenizer | None  # a student with another tokenizer: how its rows are made (pipeline.xtok)
    train_data: cache_format.CacheDataset | xtok.XtokDataset  # this rank's share of the train shards
    val_files: list[Path]
    seq_len: int  # tokens per cached row
    trainable_params: int
    resume_identity: dict[str, Any]  # what a checkpoint's continuation depends on (stored in every checkpoint)

    @property
    def metrics_path(self) -> Path:
        return self.out / "metrics.jsonl"

    @property
    def samples_path(self) -> Path:
        return self.out / "samples" / f"rank_{self.accelerator.process_index:05d}.jsonl"


def _setup(cfg: Config, rd: RunDir, ctx: StageContext, variant: str) -> TrainingSetup:
    """Cache metadata → recipe → accelerator → student (checked against the cache) → projectors → prepared model →
    optimizer → schedule → data: each part needs the ones before it. Writes nothing."""
    train = cfg.train
    if train.threads:
        torch.set_num_threads(train.threads)
    cache_dir = rd.stage_dir("cache")
    train_files = cache_format.list_cache_shards(cache_dir, "train")
    if not train_files:
        raise PipelineError(f"{cache_dir}: no train-*.parquet cache shards; rerun the cache stage (make cache)")
    meta = cache_format.read_cache_meta(train_files[0])  # what the student must match

    recipe = resolve_recipe(variant, train.variants[variant], meta, load_model_config(cfg.student, "student"))
    acc = _setup_accelerator(cfg, recipe, rd.logs / STAGE / "trackers" / variant)
    if recipe.online:
        recipe = dataclasses.replace(recipe, teacher=_setup_online_teacher(cfg, acc.device))
    torch.manual_seed(cfg.seed)  # identical projector init on every rank (DDP also broadcasts rank 0's)
    student = build_student(cfg, acc.device)
    tokenizer, teacher_tokenizer = _setup_tokenizer(cfg, meta, recipe, student)
    cross = _setup_cross_tokenizer(rd, tokenizer, teacher_tokenizer, student.config)
    if train.gradient_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = Distillee(student, _setup_projectors(recipe, student, meta), train.logits_chunk).to(acc.device)
    model.train()
    model = acc.prepare(model)  # before the optimizer: FSDP2 replaces the parameters by their shards
    optimizer = acc.prepare(_setup_optimizer(model, train))
    if train.lora.enabled and train.distributed != "fsdp":
        _checkpoint_trainable_only(acc)
    scheduler = _setup_scheduler(optimizer, train)
    trainable = sum(p.numel() for p in acc.unwrap_model(model).parameters() if p.requires_grad)
    # every shard's footer checked (one cache run, the columns this recipe reads) before anything is written
    train_data = _setup_data(train_files, recipe, cfg, acc.process_index, acc.num_processes, train=True, cross=cross)

    identity = resume_identity(cfg, variant, ctx.state.inputs)
    _setup_trackers(acc, cfg, variant, identity)
    world, seq_len = acc.num_processes, int(meta["seq_len"])
    sequences = train.micro_batch_size * train.grad_accum_steps * world
    ctx.log.info(
        "setup",
        f"{variant}: {world} process(es), {trainable:,} trainable parameters, {sequences} sequences per step",
        trainable_params=trainable,
        tokens_per_step=sequences * seq_len,
    )
    return TrainingSetup(
        variant=variant,
        out=rd.stage_dir(STAGE, variant),
        accelerator=acc,
        recipe=recipe,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        tokenizer=tokenizer,
        cross=cross,
        train_data=train_data,
        val_files=cache_format.list_cache_shards(cache_dir, "val"),
        seq_len=seq_len,
        trainable_params=trainable,
        resume_identity=identity,
    )


def _setup_accelerator(cfg: Config, recipe: LossRecipe, trackers_dir: Path) -> Any:
    """Accelerator: DDP, or FSDP2 (``pipeline.fsdp``, on CPU too) across processes; bf16 on GPU, fp32 on CPU; the
    experiment trackers of ``train.trackers`` writing under ``trackers_dir``.

    The LR scheduler is NOT handed to accelerate: its wrapper steps a scheduler once per process, which would run
    the schedule ``world_size`` times too fast; the loop steps it exactly once per optimizer step.
    """
    from accelerate import Accelerator, DistributedDataParallelKwargs

    on_gpu = torch.cuda.is_available()
    precision = cfg.train.mixed_precision
    mixed = ("bf16" if on_gpu else "no") if precision == "auto" else precision
    trackers = {"log_with": list(cfg.train.trackers), "project_dir": str(trackers_dir)} if cfg.train.trackers else {}
    if cfg.train.distributed == "fsdp":  # FSDP2 casts to bf16 itself (MixedPrecisionPolicy): no autocast on top
        return Fsdp2(Accelerator(cpu=not on_gpu, mixed_precision="no", **trackers), mixed)
    # Without logits in the loss the LM head (and layers past the last distilled one) get no gradient.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=not recipe.uses_logits)
    return Accelerator(cpu=not on_gpu, mixed_precision=mixed, kwargs_handlers=[ddp], **trackers)


def _setup_trackers(acc: Any, cfg: Config, variant: str, identity: dict[str, Any]) -> None:
    """TensorBoard / Weights & Biases runs (accelerate's tracker support, main process only) named after the run
    and the variant, with what the resume identity covers as hyperparameters; the loop logs every metrics.jsonl
    line to them as ``train/<name>`` and ``val/<name>``."""
    if not cfg.train.trackers:
        return
    hparams = {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v) for k, v in identity.items()}
    wandb = {"name": variant, "group": cfg.run_name}
    acc.init_trackers(cfg.run_name, config=hparams, init_kwargs={"wandb": wandb})


def _setup_online_teacher(cfg: Config, on: torch.device) -> nn.Module:
    """The teacher for ``response.targets: online``: a whole copy per rank, frozen, in eval mode (no dropout), in its
    configured dtype (bf16 on GPU by default); not part of the trained state or of any checkpoint."""
    teacher = load_causal_lm(cfg.teacher, "teacher", on)
    teacher.eval().requires_grad_(False)
    teacher.config.use_cache = False
    return teacher


def _setup_tokenizer(cfg: Config, meta: dict[str, Any], recipe: LossRecipe, student: nn.Module) -> tuple[Any, Any]:
    """The student's tokenizer, after checking that the cached columns this recipe reads are there, in the ids of the
    tokenizer the student reads through (its own, or for a student with another vocabulary the teacher's, which
    ``pipeline.xtok`` maps), and that its output rows cover its ids (before step 1). Returns (the student's
    tokenizer, the teacher's when the two differ, else None)."""
    tokenizer = load_tokenizer(cfg.student, "student")
    teacher_tokenizer = load_tokenizer(cfg.teacher, "teacher")
    cached = xtok.cache_ids(tokenizer, teacher_tokenizer)
    other = cached.other
    cache_format.validate_for_student(
        meta,
        vocab_hash=cached.vocab_hash,
        vocab_size=cached.vocab_size,
        need_hidden_layers=[t for _, t in recipe.feature_pairs],
        need_embed=recipe.loss.relation.weight > 0,
        need_sampled=recipe.needs_sampled,
        reader=cached.reader,
    )
    rows = student.get_output_embeddings().weight.shape[0]
    ids = len(tokenizer) if other else int(meta["vocab_size"])
    if rows < ids:
        raise PipelineError(
            f"{cfg.student.tokenizer or cfg.student.name_or_path if other else meta['path']}: token ids go up to "
            f"{ids - 1} but the student ({cfg.student.name_or_path}) has only {rows} output rows; resize its "
            "embeddings or use another student"
        )
    return tokenizer, teacher_tokenizer if other else None


def _setup_cross_tokenizer(
    rd: RunDir, tokenizer: Any, teacher_tokenizer: Any | None, student_config: Any
) -> xtok.CrossTokenizer | None:
    """None when the student reads the teacher's ids; else the builder of its own rows from the manifest's text
    (``pipeline.xtok``), each at most as long as the student's context."""
    if teacher_tokenizer is None:
        return None
    return xtok.setup_for_model(teacher_tokenizer, tokenizer, rd.stage_dir("manifest"), student_config)


def _setup_projectors(recipe: LossRecipe, student: nn.Module, meta: dict[str, Any]) -> losses.FeatureProjectors | None:
    if not recipe.feature_pairs:
        return None
    width = int(student.config.hidden_size if hasattr(student.config, "hidden_size") else student.config.d_model)
    return losses.FeatureProjectors(recipe.feature_pairs, width, int(meta["hidden_dim"]))


def _setup_optimizer(model: nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
    betas = (train.betas[0], train.betas[1])
    fused = {"fused": True} if torch.cuda.is_available() else {}
    return torch.optim.AdamW(param_groups(model, train.weight_decay), lr=train.lr, betas=betas, **fused)


def _setup_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, train) / train.lr)


def _setup_data(
    files: list[Path],
    recipe: LossRecipe,
    cfg: Config,
    rank: int,
    world: int,
    *,
    train: bool,
    cross: xtok.CrossTokenizer | None = None,
) -> cache_format.CacheDataset | xtok.XtokDataset:
    """The cache reader for this rank; for a student with another tokenizer wrapped so its batches are the
    student's own rows (``xtok.XtokDataset``: same order, sharding and resume)."""
    dataset = cache_format.CacheDataset(
        files,
        batch_size=cfg.train.micro_batch_size,
        seed=cfg.seed,
        shuffle=train,
        shuffle_buffer=cfg.train.shuffle_buffer,
        rank=rank,
        world_size=world,
        columns=recipe.columns(),
        infinite=train,
    )
    return dataset if cross is None else cross.wrap(dataset)


def _loader(dataset: torch.utils.data.IterableDataset, num_workers: int) -> torch.utils.data.DataLoader:
    # A private generator: creating an iterator draws a seed, which must not advance the global RNG (resume
    # restores the global RNG and has to see the same stream as an uninterrupted run). Pinned batches let
    # to_compute's host-to-device copies run asynchronously on a GPU.
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(0),
        pin_memory=torch.cuda.is_available(),
    )


# --------------------------------------------------------------------------------------------------- resume
@dataclass
class Position:
    """Where this rank's data stream stands: the next batch is ``batches_consumed`` of ``epoch``."""

    epoch: int = 0
    batches_consumed: int = 0


@dataclass
class Progress:
    """Where the run stands: restored from a checkpoint (or zero), advanced by the loop, saved in each checkpoint."""

    step: int = 0  # optimizer steps taken
    tokens: float = 0.0  # real tokens trained on, over every rank
    wall_before_s: float = 0.0  # wall time of the attempts before this process
    position: Position = dataclasses.field(default_factory=Position)
    last_saved: int = -1  # step of the latest checkpoint (-1: none)
    started: float = dataclasses.field(default_factory=time.monotonic)  # when this process's loop began

    def wall_time_s(self) -> float:
        return self.wall_before_s + time.monotonic() - self.started


def resume_identity(cfg: Config, variant: str, inputs: dict[str, str]) -> dict[str, Any]:
    """What a checkpoint's continuation depends on, key by key (stored in it, so a refusal names what differs): the
    student, this variant's losses, the computational train knobs, the seed, and the identities of the inputs it was
    trained from (the cache's shard set by content, the student's initial weights)."""
    train = {k: v for k, v in to_dict(cfg.train).items() if k not in OPERATIONAL_KEYS}
    covered = {"student": cfg.student, f"train.variants.{variant}": cfg.train.variants[variant], "train": train}
    if _online(cfg, variant):
        covered["teacher"] = model_identity(cfg.teacher)
    config = redact_values(flatten({**covered, "seed": cfg.seed}))  # stored in the checkpoint: no secret in it
    return {**config, **{f"inputs.{k}": v for k, v in sorted(inputs.items())}}


def complete_checkpoints(root: Path) -> list[Path]:
    """Checkpoint dirs whose rename happened (so every file is in place), oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(CHECKPOINT_PREFIX) and (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def _resume(cfg: Config, ctx: StageContext, setup: TrainingSetup) -> tuple[Progress, Iterator[dict[str, Any]]]:
    """Continue from the latest complete checkpoint (``train.resume: auto``, no ``--force``) or start afresh; returns
    the progress and this rank's batch stream, positioned after the last batch the checkpoint consumed.

    A checkpoint from other settings or inputs is refused before anything of the previous run is touched; then the
    outputs of a finished run and the log lines past the checkpoint are removed (this run rewrites them).
    """
    acc, out = setup.accelerator, setup.out
    fresh = cfg.train.resume == "never" or ctx.force
    checkpoints = [] if fresh else complete_checkpoints(out / "checkpoints")
    progress = Progress()
    if checkpoints:
        state, position = _read_checkpoint_state(checkpoints[-1], acc, setup.resume_identity, setup.variant)
        progress = Progress(state["step"], state["tokens"], state["wall_time_s"], position, last_saved=state["step"])
    ctx.begin_writes()
    if acc.is_main_process:
        _remove_previous_outputs(out, fresh)
    acc.wait_for_everyone()
    if acc.is_main_process:
        _truncate_jsonl(setup.metrics_path, progress.step)
    setup.samples_path.parent.mkdir(parents=True, exist_ok=True)
    _truncate_jsonl(setup.samples_path, progress.step)
    setup.train_data.start_from(progress.position.epoch, progress.position.batches_consumed)
    batches = iter(_loader(setup.train_data, cfg.train.num_workers))
    if checkpoints:
        # After the iterator exists: load_state restores the RNG streams exactly as they were at the checkpoint.
        acc.load_state(str(checkpoints[-1]))
        setup.scheduler.load_state_dict(torch.load(checkpoints[-1] / "scheduler.pt", weights_only=False))
        ctx.log.info("resumed", f"{setup.variant}: from {checkpoints[-1].name}", step=progress.step)
    else:
        torch.manual_seed(cfg.seed + acc.process_index)  # dropout streams differ by rank
    return progress, batches


def _read_checkpoint_state(ckpt: Path, acc: Any, expected: dict[str, Any], variant: str) -> tuple[dict, Position]:
    """The checkpoint's trainer state and this rank's data position; refused, naming the keys that differ, when it
    was made from another config or other inputs (another cache, manifest or student)."""
    state = json.loads((ckpt / "trainer_state.json").read_text())
    if state.get("resume") != expected:
        raise PipelineError(
            f"{ckpt}: cannot be resumed, made from other settings or inputs: "
            f"{describe_changes(state.get('resume') or {}, expected)}; pass --force to train {variant} afresh "
            "(or set train.resume=never)"
        )
    if state.get("world_size") != acc.num_processes:
        raise PipelineError(
            f"{ckpt}: written by {state.get('world_size')} processes, now {acc.num_processes}; each rank's data "
            "position is only valid for the same world size (relaunch with it, or train.resume=never)"
        )
    pos = json.loads((ckpt / f"data_rank_{acc.process_index:05d}.json").read_text())
    return state, Position(**pos)


def _remove_previous_outputs(out: Path, fresh: bool) -> None:
    """Unfinished checkpoint renames, every checkpoint when starting afresh, and a finished run's final outputs."""
    ckpt_root = out / "checkpoints"
    for stale in ckpt_root.glob(f"{TMP_PREFIX}*") if ckpt_root.is_dir() else []:
        shutil.rmtree(stale, ignore_errors=True)
    if fresh:
        shutil.rmtree(ckpt_root, ignore_errors=True)
    for path in (out / "final", out / "adapter", out / "summary.json"):
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def _truncate_jsonl(path: Path, max_step: int) -> None:
    """Keep the lines of steps <= max_step (a resumed run rewrites what came after its checkpoint; a fresh one,
    max_step 0, everything)."""
    if max_step == 0:
        path.unlink(missing_ok=True)
        return
    if not path.exists():
        return
    kept = [r for r in parse_jsonl(path.read_text().splitlines()) if r.get("step", math.inf) <= max_step]
    tmp = path.with_name(path.name + ".tmp")  # a line torn by kill -9 does not parse: dropped
    tmp.write_text("".join(json.dumps(record, sort_keys=True) + "\n" for record in kept))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------- loop
def _train_loop(
    cfg: Config, ctx: StageContext, setup: TrainingSetup, progress: Progress, batches: Iterator[dict[str, Any]]
) -> tuple[dict[str, float], dict[str, float]]:
    """Optimizer steps up to ``train.max_steps``, each logged, validated and checkpointed on its schedule; returns
    the last step's train metrics and the last validation's.

    USR1 or SIGTERM on any rank is acted on by every rank at the step's end (the step sums the signals): a checkpoint,
    then ``preemption.Interrupted``.
    """
    train, acc, variant = cfg.train, setup.accelerator, setup.variant
    last_train: dict[str, float] = {}
    val: dict[str, float] = {}
    window_tokens, window_s = 0.0, 0.0  # throughput since the last logged step
    progress.started = time.monotonic()
    bar = console_progress(ctx.log, train.max_steps, variant, "step", initial=progress.step)
    with preemption.deferred(preemption.WARNING, preemption.STOP), bar:  # signals wait for the step's end
        while progress.step < train.max_steps:
            t0 = time.perf_counter()
            result = _optimizer_step(setup, batches, train, progress)
            progress.step += 1
            step = progress.step
            progress.position = result.position
            _append_jsonl(setup.samples_path, {"step": step, "epoch": result.epochs, "sample_ids": result.sample_ids})
            window_tokens, window_s = window_tokens + result.tokens, window_s + time.perf_counter() - t0
            progress.tokens += result.tokens
            last_train = result.losses
            bar.update(1)
            if step % train.log_every == 0 or step == train.max_steps:
                record = {
                    "step": step, "split": "train", **last_train, "lr": result.lr, "grad_norm": result.grad_norm,
                    "tokens_per_s": window_tokens / max(window_s, 1e-9), "mem_gb": _memory_gb(acc.device),
                    "epoch": progress.position.epoch,
                }  # fmt: skip
                window_tokens, window_s = 0.0, 0.0
                if acc.is_main_process:
                    _append_jsonl(setup.metrics_path, record)
                acc.log({f"train/{k}": v for k, v in record.items() if k not in ("step", "split")}, step=step)
                ctx.log.info("step", f"{variant} step {step}/{train.max_steps}", **record)
            if setup.val_files and (step % train.eval_every == 0 or step == train.max_steps):
                val = _validate(setup, cfg)
                if acc.is_main_process:
                    _append_jsonl(setup.metrics_path, {"step": step, "split": "val", **val})
                acc.log({f"val/{k}": v for k, v in val.items()}, step=step)
                ctx.log.info("val", f"{variant} step {step}", **val)
            if step % train.checkpoint_every == 0 or step == train.max_steps or result.signal:
                _save_checkpoint(setup, progress, train.keep_checkpoints)
                progress.last_saved = step
            if result.signal:
                acc.wait_for_everyone()
                raise preemption.Interrupted(result.signal, f"{variant}: checkpoint at step {step} saved", step=step)
    return last_train, val


@dataclass
class StepResult:
    """One optimizer step as the loop logs it."""

    losses: dict[str, float]  # "loss" (the weighted total) and each component of the recipe, means over ranks
    tokens: float  # real tokens of the step, over every rank
    grad_norm: float  # before clipping
    lr: float  # the LR the step used
    signal: int | None  # a preemption signal received by any rank
    position: Position  # this rank's data position after the step
    sample_ids: list[int]  # this rank's samples, in the order consumed
    epochs: list[int]  # the epoch of each of this rank's micro-batches


def _optimizer_step(
    setup: TrainingSetup, batches: Iterator[dict[str, Any]], train: TrainConfig, progress: Progress
) -> StepResult:
    """``grad_accum_steps`` micro-batches (gradients synchronised on the last only), one collective for the step's
    metrics and signals, a refusal of non-finite values, clipping, and the optimizer and schedule steps."""
    acc, model, recipe = setup.accelerator, setup.model, setup.recipe
    names = ("loss", *recipe.components)
    sums = {name: torch.zeros((), dtype=torch.float64, device=acc.device) for name in (*names, "tokens")}
    sample_ids, epochs = [], []
    for micro in range(train.grad_accum_steps):
        batch = next(batches)
        position = Position(batch["epoch"], batch["batch_index"] + 1)
        sample_ids += batch["sample_id"].tolist()
        epochs.append(batch["epoch"])
        batch = cache_format.to_compute(batch, acc.device)
        last_micro = micro == train.grad_accum_steps - 1
        with contextlib.nullcontext() if last_micro else acc.no_sync(model):
            total, components, _ = _loss_step(model, batch, recipe, gather=True)
            acc.backward(total / train.grad_accum_steps)
        for name, value in {"loss": total, **components}.items():
            sums[name] += value.detach().double() / train.grad_accum_steps
        sums["tokens"] += batch["attention_mask"].sum()
    signal = SIGNAL_CODES.get(preemption.received(), 0.0)  # summed over ranks: any rank's signal stops all
    totals = _sum_over_ranks(acc, {**sums, "signal": signal})
    step_losses = {name: totals[name] / acc.num_processes for name in names}
    bad = [name for name, value in step_losses.items() if not math.isfinite(value)]
    if bad:
        raise PipelineError(
            f"train.variants.{setup.variant}: non-finite {', '.join(bad)} at step {progress.step + 1} (last good "
            f"checkpoint: {progress.last_saved if progress.last_saved >= 0 else 'none'}); lower train.lr, "
            "check the cache for corrupt values, or use train.max_grad_norm"
        )
    grad_norm = float(acc.clip_grad_norm_(model.parameters(), train.max_grad_norm))
    if not math.isfinite(grad_norm):
        raise PipelineError(
            f"train.variants.{setup.variant}: non-finite grad_norm at step {progress.step + 1} "
            f"(loss {step_losses['loss']:.4g}); the last good checkpoint is intact; lower train.lr"
        )
    lr = setup.scheduler.get_last_lr()[0]
    setup.optimizer.step()
    setup.scheduler.step()
    setup.optimizer.zero_grad(set_to_none=True)
    return StepResult(
        step_losses, totals["tokens"], grad_norm, lr, signal_from_code(totals["signal"]), position, sample_ids, epochs
    )


def _sum_over_ranks(acc: Any, values: dict[str, Tensor | float]) -> dict[str, float]:
    """Each named scalar summed over every rank in ONE collective (packed into a float64 vector in the dict's order;
    callers build the names from the recipe, never from the data, so the order is the same on every rank)."""
    packed = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=acc.device) for v in values.values()])
    if acc.num_processes > 1:
        packed = acc.reduce(packed, reduction="sum")
    return dict(zip(values, packed.tolist(), strict=True))


def _validate(setup: TrainingSetup, cfg: Config) -> dict[str, float]:
    """Held-out CE and every KD component of the recipe, each weighted by what it averages over (tokens, or sequences
    for relations), summed over ranks; plus ``loss``, their weighted total (and for a student with another tokenizer
    its aligned share of positions and of the teacher's top-k mass, ``xtok.stats_summary``).

    Ranks step in lockstep (an all-reduced "has a batch" flag) because FSDP forwards are collective; a rank that ran
    out repeats its last batch with weight 0. Relations stay within each rank's batch here (no gather).
    """
    acc, model, recipe = setup.accelerator, setup.model, setup.recipe
    dataset = _setup_data(
        setup.val_files, recipe, cfg, acc.process_index, acc.num_processes, train=False, cross=setup.cross
    )
    limit = cfg.train.eval_batches
    zero = torch.zeros((), dtype=torch.float64, device=acc.device)
    weighted = {name: zero.clone() for name in recipe.components}  # Σ component value × its normaliser
    weights = {name: zero.clone() for name in recipe.components}  # Σ normaliser
    stats = {name: zero.clone() for name in (xtok.STAT_KEYS if setup.cross is not None else ())}
    model.eval()
    iterator, last, seen = iter(_loader(dataset, 0)), None, 0
    with torch.no_grad():
        while True:
            batch = next(iterator, None) if limit is None or seen < limit else None
            if _sum_over_ranks(acc, {"ranks_with_a_batch": float(batch is not None)})["ranks_with_a_batch"] == 0:
                break
            weight = 0.0 if batch is None else 1.0
            batch = batch if batch is not None else last
            if batch is None:  # this rank has no validation rows at all: nothing to repeat
                continue
            last, seen = batch, seen + 1
            for i, name in enumerate(stats):
                stats[name] += float(batch["xtok_stats"][i]) * weight
            batch = cache_format.to_compute(batch, acc.device)
            _, components, normalisers = _loss_step(model, batch, recipe, gather=False)
            for name, value in components.items():
                n = normalisers.get(name, 1.0) * weight
                weighted[name] += value.double() * n
                weights[name] += n
    model.train()
    totals = _sum_over_ranks(acc, {**{f"{k}.weighted": v for k, v in weighted.items()},
                                   **{f"{k}.weight": v for k, v in weights.items()}, **stats})  # fmt: skip
    result = {k: totals[f"{k}.weighted"] / totals[f"{k}.weight"] for k in weights if totals[f"{k}.weight"] > 0}
    result["loss"] = sum(recipe.weights[k] * v for k, v in result.items() if recipe.weights.get(k, 0) > 0)
    if stats:
        result.update(xtok.stats_summary([totals[name] for name in stats]))
    return result


def _memory_gb(on: torch.device) -> float:
    if on.type == "cuda":
        return torch.cuda.max_memory_allocated(on) / 1e9
    import psutil

    return psutil.Process().memory_info().rss / 1e9


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------- checkpoints
def _save_checkpoint(setup: TrainingSetup, progress: Progress, keep: int) -> Path:
    """Atomic checkpoint of everything a resume needs (weights, optimizer, RNG, schedule, each rank's data position,
    the progress and the resume identity); the oldest beyond ``keep`` are removed afterwards."""
    acc, step = setup.accelerator, progress.step
    root = setup.out / "checkpoints"
    final = root / f"{CHECKPOINT_PREFIX}{step:07d}"
    tmp = root / f"{TMP_PREFIX}{final.name}"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    acc.save_state(str(tmp), safe_serialization=False)
    atomic_write_json(tmp / f"data_rank_{acc.process_index:05d}.json", dataclasses.asdict(progress.position))
    acc.wait_for_everyone()
    if acc.is_main_process:
        torch.save(setup.scheduler.state_dict(), tmp / "scheduler.pt")
        state = {
            "resume": setup.resume_identity,
            "variant": setup.variant,
            "keep": keep,
            "tokens": progress.tokens,
            "wall_time_s": progress.wall_time_s(),
            "step": step,
            "world_size": acc.num_processes,
        }
        atomic_write_json(tmp / "trainer_state.json", state)
        if final.exists():  # the same step saved by an earlier attempt that died before pruning
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def _checkpoint_trainable_only(acc: Any) -> None:
    """LoRA: checkpoints keep the trainable parameters (adapter, projectors) and leave out the frozen base weights,
    which a resume loads from ``student.name_or_path`` again (the resume hash pins that checkpoint): an 8B student's
    checkpoint is the adapter's megabytes and its optimizer state, not 16 GB of bf16 weights every ``checkpoint_every``
    steps. Through accelerate's save/load hooks, so the optimizer, RNG and data position are saved as before. (FSDP
    saves sharded state through its own path and keeps full checkpoints.)"""

    def trainable(model: nn.Module) -> set[str]:
        # remove_duplicate=False: a tied parameter appears in the state dict under every name
        return {name for name, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}

    def save(models: list, weights: list, output_dir: str) -> None:
        for i, model in enumerate(models):
            keep = trainable(model)
            weights[i] = {k: v for k, v in weights[i].items() if k in keep}

    def load(models: list, input_dir: str) -> None:
        for i, model in enumerate(models):
            path = Path(input_dir) / (f"pytorch_model_{i}.bin" if i else "pytorch_model.bin")
            state = torch.load(path, map_location="cpu", weights_only=True)
            lacking = sorted(trainable(model) - set(state))
            unexpected = model.load_state_dict(state, strict=False).unexpected_keys
            if lacking or unexpected:
                raise PipelineError(
                    f"{path}: checkpoint does not match the LoRA student (lacks {lacking[:3]}, "
                    f"unexpected {unexpected[:3]}); delete {Path(input_dir).parent} or rerun with --force"
                )
        models.clear()  # loaded here: accelerate must not load them again (it would expect every weight)

    acc.register_save_state_pre_hook(save)
    acc.register_load_state_pre_hook(load)


# --------------------------------------------------------------------------------------------------- finish
def _finish(
    cfg: Config, setup: TrainingSetup, progress: Progress, last_train: dict[str, float], val: dict[str, float]
) -> dict[str, float]:
    """``final/`` (and LoRA ``adapter/``), then summary.json; returns the summary's numbers."""
    acc = setup.accelerator
    wall = progress.wall_time_s()
    _save_final(acc, setup.model, cfg, setup.tokenizer, setup.out)
    summary = {
        "variant": setup.variant,
        "steps": progress.step,
        "tokens": progress.tokens,
        "wall_time_s": wall,
        "tokens_per_s": progress.tokens / max(wall, 1e-9),
        "world_size": acc.num_processes,
        "trainable_params": setup.trainable_params,
        "final_train_loss": last_train.get("loss"),
        **{f"final_train_{k}": v for k, v in last_train.items() if k != "loss"},
        **{f"val_{k}": v for k, v in val.items()},
    }
    if setup.cross is not None:  # the student's rows are its own, not the manifest's: say how they were made
        summary["student_rows"] = setup.cross.provenance(cfg.student.tokenizer or cfg.student.name_or_path)
    if acc.is_main_process:
        atomic_write_json(setup.out / "summary.json", summary)
    acc.wait_for_everyone()
    acc.free_memory()
    return {k: float(v) for k, v in summary.items() if isinstance(v, (int, float)) and v is not None}


def _save_final(acc: Any, model: nn.Module, cfg: Config, tokenizer: Any, out: Path) -> None:
    """``final/`` (HF dir + tokenizer, LoRA merged) and ``adapter/``; each written under a temp name, renamed."""
    full = acc.get_state_dict(model)  # gathers FSDP shards; on DDP the plain state dict
    if not acc.is_main_process:
        acc.wait_for_everyone()
        return
    student_state = {k[len("student.") :]: v for k, v in full.items() if k.startswith("student.")}
    student = acc.unwrap_model(model).student
    targets = []
    if cfg.train.lora.enabled:
        fresh = build_student(cfg, torch.device("cpu"))
        fresh.load_state_dict({k: v.cpu() for k, v in student_state.items()})
        tmp_adapter = out / f"{TMP_PREFIX}adapter"
        shutil.rmtree(tmp_adapter, ignore_errors=True)
        fresh.save_pretrained(tmp_adapter)
        targets.append((tmp_adapter, out / "adapter"))
        student, student_state = fresh.merge_and_unload(), None
    tmp_final = out / f"{TMP_PREFIX}final"
    shutil.rmtree(tmp_final, ignore_errors=True)
    student.save_pretrained(tmp_final, state_dict=student_state)
    tokenizer.save_pretrained(tmp_final)
    targets.append((tmp_final, out / "final"))
    for tmp, final in targets:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    acc.wait_for_everyone()


# ---------------------------------------------------------------------------------------------------- stage
def run(cfg: Config, rd: RunDir, ctx: StageContext) -> dict[str, float]:
    """Train one variant (``ctx.unit``); returns its summary numbers."""
    return _train_variant(cfg, rd, ctx, ctx.unit)


def _units(cfg: Config, args: Any) -> list[str | None]:
    if args.variant is None:
        return list(cfg.train.variants)
    if args.variant not in cfg.train.variants:
        raise ConfigError(f"--variant: expected one of {', '.join(cfg.train.variants)}, got {args.variant!r}")
    return [args.variant]


def _sections(cfg: Config, unit: str | None) -> dict[str, Any]:
    # trackers only mirror metrics.jsonl elsewhere: adding one does not make a trained variant stale
    train = {k: v for k, v in to_dict(cfg.train).items() if k not in ("variants", "baseline_variant", "trackers")}
    variant = cfg.train.variants[unit]
    sections = {"student": cfg.student, f"train.variants.{unit}": variant, "train": train, "seed": cfg.seed}
    if _online(cfg, unit):  # its targets come from the teacher itself, not from the cache
        sections["teacher"] = model_identity(cfg.teacher)
    return sections


def _online(cfg: Config, variant: str) -> bool:
    response = cfg.train.variants[variant].response
    return response.weight > 0 and response.targets == "online"


def _external(cfg: Config, unit: str | None) -> dict[str, str]:
    """The weights a variant is trained from: the student's, and the teacher's when it runs in the loop."""
    weights = {"weights:student": weights_fingerprint(cfg.student, "student")}
    if _online(cfg, unit):
        weights["weights:teacher"] = weights_fingerprint(cfg.teacher, "teacher")
    return weights


def _outputs(cfg: Config, rd: RunDir, unit: str | None) -> dict[str, str | None]:
    """The trained model (``final/``, LoRA ``adapter/``), summary.json and metrics.jsonl (what evaluate and report
    read); checkpoints and the sample audit trail are the stage's own."""
    out = rd.stage_dir(STAGE, unit)
    files = [p for d in ("final", "adapter") if (out / d).is_dir() for p in (out / d).rglob("*") if p.is_file()]
    files += [out / "summary.json", out / "metrics.jsonl"]
    return {str(p.relative_to(out)): None for p in files}


def _complete(cfg: Config, rd: RunDir, ctx: StageContext) -> bool:
    """A variant is complete once its summary records every step (a preempted run has none yet)."""
    path = rd.stage_dir(STAGE, ctx.unit) / "summary.json"
    return path.exists() and json.loads(path.read_text()).get("steps") == cfg.train.max_steps


def _add_args(parser: Any) -> None:
    parser.add_argument("--variant", default=None, help="train only this variant of train.variants")


SPEC = StageSpec(
    name=STAGE,
    run=run,
    sections=_sections,
    upstream=lambda cfg, unit: definition.upstream(cfg, STAGE, unit),
    external=_external,
    outputs=_outputs,
    units=_units,
    add_args=_add_args,
    complete=_complete,
)


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.train --config C [--variant NAME] [overrides] [--force]``; returns the exit code."""
    return stage_main(SPEC, argv)


if __name__ == "__main__":
    sys.exit(main())
