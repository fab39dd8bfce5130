"""The pipeline definition: which stages exist, in what order, what each one reads and which units it has.

    manifest ─► cache ─► train[<variant>] ─► evaluate[<variant> | teacher] ─► report

Declared once, as datatrove hands one pipeline to interchangeable executors: the local executor
(``python -m pipeline.run``) runs it in order, the Slurm executor (``python -m pipeline.slurm submit``) renders it
into an ``afterok`` chain, every stage's wrapper takes its upstream markers from :func:`upstream`, and the log tools
list stages in this order. Stage modules import this module, never each other.

A *unit* is one output of a stage with its own completion marker: a training variant, an evaluated model; ``None``
for a stage with a single output. A unit of a downstream stage reads the unit of the same name upstream when there
is one (``evaluate[kd]`` reads ``train[kd]``), every unit of a stage when it has a single output itself (``report``
reads every ``evaluate[*]`` and ``train[*]``), and nothing of that stage otherwise (``evaluate[teacher]``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from pipeline.config import Config

TEACHER = "teacher"  # the evaluate unit of the teacher itself (a reserved variant name)


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline and how executors run it."""

    name: str
    after: tuple[str, ...] = ()  # stages whose outputs it reads: its upstream, and so the order
    distributed: bool = False  # runs under torchrun, one process per GPU (``--nproc-per-node``)
    preemptible: bool = False  # saves its state on the time-limit warning (USR1), so Slurm is asked to send one
    slurm_jobs: Literal["one", "per_unit", "array"] = "one"  # Slurm: one job for every unit, one per unit, an array


PIPELINE: tuple[Stage, ...] = (
    Stage("manifest"),
    Stage("cache", after=("manifest",), distributed=True, preemptible=True, slurm_jobs="array"),
    Stage("train", after=("cache",), distributed=True, preemptible=True, slurm_jobs="per_unit"),
    Stage("evaluate", after=("manifest", "cache", "train")),
    Stage("report", after=("evaluate", "train")),
)
STAGES: tuple[str, ...] = tuple(s.name for s in PIPELINE)


def stage(name: str) -> Stage | None:
    """The stage called ``name``, or None for a name outside the pipeline (a test's toy stage)."""
    return next((s for s in PIPELINE if s.name == name), None)


def select(names: list[str] | None) -> list[Stage]:
    """The stages named (all when None), in pipeline order; an unknown name raises ValueError naming the valid ones."""
    if names is None:
        return list(PIPELINE)
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage {', '.join(unknown)} (expected some of: {', '.join(STAGES)})")
    return [s for s in PIPELINE if s.name in names]


def units(cfg: Config, name: str) -> list[str | None]:
    """Every unit of stage ``name`` for ``cfg``, in order."""
    if name == "train":
        return list(cfg.train.variants)
    if name == "evaluate":
        return [*cfg.train.variants, *([TEACHER] if cfg.evaluate.include_teacher else [])]
    return [None]


def upstream(cfg: Config, name: str, unit: str | None) -> list[tuple[str, str | None]]:
    """The (stage, unit) outputs that unit ``unit`` of stage ``name`` reads, in pipeline order."""
    edges: list[tuple[str, str | None]] = []
    for before in stage(name).after:
        theirs = units(cfg, before)
        if theirs == [None]:
            edges.append((before, None))
        elif unit in theirs:
            edges.append((before, unit))
        elif unit is None:
            edges += [(before, u) for u in theirs]
    return edges
