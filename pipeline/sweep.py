"""Recipe sweep: short students trained under a grid of train settings on one run's cache, measured by held-out
perplexity, top-1 agreement, KL and ECE, with the table written into the README.

Reads   the config's manifest and cache (complete: ``make demo DEMO_CONFIG=...`` or ``make run`` first) and its
        student; the teacher only for the online settings.
Writes  each setting as a train variant named like the setting (``runs/<run>/train/<name>/``: the train stage's own
        outputs and marker, so a rerun, or a setting equal to one of the config's variants with the same name,
        reuses the trained student), ``runs/<run>/sweep/sweep.json`` and, with ``--readme``, the table between the
        markers ``<!-- sweep:begin -->`` and ``<!-- sweep:end -->``.
Run     ``python -m pipeline.sweep --config configs/demo_targets.yaml [--only a,b] [--readme README.md]``

Every setting is trained by the real stage (``python -m pipeline.train --variant <name>``, the variant and its train
keys as command-line overrides), so a row is exactly what the pipeline produces for that recipe; its held-out
metrics come from the evaluate stage's own ``intrinsic_metrics`` on ``final/`` (the offline lm-eval tasks are left
out: they take longer than the rest and are at chance for every 64-step student). Perplexity changes are relative
to the CE-only setting of the same batch geometry (micro-batch and steps), named in ``baseline``. ``ce``, ``kd``,
``kd_sampled``, ``kd_hybrid`` and ``online`` are the names and recipes of configs/demo_targets.yaml's students, so
after the demo they are measured without training again.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import load as load_config
from pipeline.rundir import REPO, RunDir, atomic_write_json, atomic_write_text

BEGIN, END = "<!-- sweep:begin -->", "<!-- sweep:end -->"


def kd(ce: float = 0.5, response: float = 0.5, **options: Any) -> dict[str, Any]:
    """A response-KD variant: ``ce`` x CE + ``response`` x KD with ``options`` for ``response``."""
    return {"ce_weight": ce, "response": {"weight": response, **options}}


DEMO_KD = kd(targets="sampled")  # configs/demo.yaml's `kd`: the best recipe at the demo's rate in this sweep
HYBRID = kd(targets="topk+sampled")  # the exact top-32 head, the draws outside it for the tail


def rkd(weight: float) -> dict[str, Any]:
    """The demo's KD plus relation KD (RKD distance + angle on pooled embeddings) at ``weight``."""
    return {**DEMO_KD, "relation": {"weight": weight}}


@dataclasses.dataclass(frozen=True)
class Setting:
    """One row of the sweep: a variant recipe plus the train keys it changes, and its CE baseline."""

    name: str
    recipe: str  # what the row means, for the table
    variant: dict[str, Any]
    train: dict[str, Any] = dataclasses.field(default_factory=dict)
    baseline: str = "ce"
    nproc: int = 1


BIG = {"micro_batch_size": 32, "max_steps": 16, "warmup_steps": 3}  # same tokens as 8 x 64, relations over 32
LR3 = {"lr": 3.0e-3}  # compared with CE at the same rate: a higher rate also helps CE alone
GRID: tuple[Setting, ...] = (
    Setting("ce", "CE only", {}),
    Setting("kd", "0.5 CE + 0.5 KL, top-32 + tail", kd()),
    Setting("kd_w08", "0.2 CE + 0.8 KL, top-32 + tail", kd(0.2, 0.8)),
    Setting("kd_w10", "KL only, top-32 + tail", kd(0.0, 1.0)),
    Setting("kd_k8", "0.5 CE + 0.5 KL, top-8 + tail", kd(top_k=8)),
    Setting("kd_t2", "0.5 CE + 0.5 KL, top-32 renormalised, tau 2", kd(tail="renormalize", temperature=2.0)),
    Setting("ce_lr3", "CE only, lr 3e-3", {}, LR3, baseline="ce_lr3"),
    Setting("kd_lr3", "0.5 CE + 0.5 KL, top-32 + tail, lr 3e-3", kd(), LR3, baseline="ce_lr3"),
    Setting("kd_sampled", "0.5 CE + 0.5 sampled (32 draws) (demo)", DEMO_KD),
    Setting("sampled_w08", "0.2 CE + 0.8 sampled", kd(0.2, 0.8, targets="sampled")),
    Setting("sampled_w10", "sampled only", kd(0.0, 1.0, targets="sampled")),
    Setting("sampled_lr3", "0.5 CE + 0.5 sampled, lr 3e-3", DEMO_KD, LR3, baseline="ce_lr3"),
    Setting("kd_hybrid", "0.5 CE + 0.5 KL, top-32 + sampled tail", HYBRID),
    Setting("hybrid_w08", "0.2 CE + 0.8 KL, top-32 + sampled tail", kd(0.2, 0.8, targets="topk+sampled")),
    Setting("hybrid_lr3", "0.5 CE + 0.5 KL, top-32 + sampled tail, lr 3e-3", HYBRID, LR3, baseline="ce_lr3"),
    Setting("online", "0.5 CE + 0.5 full-vocabulary KL (online)", kd(targets="online")),
    Setting("online_w08", "0.2 CE + 0.8 full-vocabulary KL (online)", kd(0.2, 0.8, targets="online")),
    Setting("relation", "demo KD + 0.01 RKD, 8 sequences", rkd(0.01)),
    Setting("relation_w001", "demo KD + 0.001 RKD, 8 sequences", rkd(0.001)),
    Setting("ce_b32", "CE only, 32 x 16 steps", {}, BIG, baseline="ce_b32"),
    Setting("kd_b32", "demo KD, 32 x 16 steps", DEMO_KD, BIG, baseline="ce_b32"),
    Setting("relation_b32", "demo KD + 0.01 RKD over 32 sequences", rkd(0.01), BIG, baseline="ce_b32"),
    Setting("relation_b32_w001", "demo KD + 0.001 RKD over 32 sequences", rkd(0.001), BIG, baseline="ce_b32"),
    Setting("relation_b32_w1", "demo KD + 0.1 RKD over 32 sequences", rkd(0.1), BIG, baseline="ce_b32"),
)


def overrides(setting: Setting, base: list[str]) -> list[str]:
    """The command-line overrides that make ``setting`` the config's only variant (and its own baseline)."""
    name = setting.name
    flow = yaml.safe_dump({name: setting.variant}, default_flow_style=True, width=10_000).strip()
    extra = [f"train.{k}={json.dumps(v)}" for k, v in setting.train.items()]
    return [*base, f"train.variants={flow}", f"train.baseline_variant={name}", *extra]


def run_stage(stage: str, config: Path, args: list[str], nproc: int = 1) -> None:
    """``python -m pipeline.<stage> --config C args`` as a process; raises with its output's tail on failure."""
    cmd = [sys.executable, "-m", f"pipeline.{stage}", "--config", str(config), *args]
    if nproc > 1:
        cmd.append(f"--nproc-per-node={nproc}")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-15:])
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{tail}")


def heldout_metrics(cfg: Any, rd: RunDir, name: str) -> dict[str, float]:
    """The evaluate stage's intrinsic metrics (held-out ppl, top-1, KL, ECE) of the trained variant ``name``."""
    from pipeline import evaluate
    from pipeline.modeling import device, load_causal_lm, load_tokenizer

    student, _ = evaluate.evaluated_model(cfg, rd, name)
    model = load_causal_lm(student, "student", device())
    metrics, _ = evaluate.intrinsic_metrics(model, load_tokenizer(student, "student"), cfg, rd)  # rows: xtok only
    return metrics


def measure(setting: Setting, config: Path, base: list[str]) -> dict[str, Any]:
    """Train one setting through the train stage (skipped when complete) and measure it; returns its row."""
    args = overrides(setting, base)
    name = setting.name
    run_stage("train", config, [*args, "--variant", name], setting.nproc)
    cfg = load_config(config, args)
    rd = RunDir.from_config(cfg)
    summary = json.loads((rd.stage_dir("train", name) / "summary.json").read_text())
    return {
        "name": setting.name,
        "recipe": setting.recipe,
        "baseline": setting.baseline,
        "variant": setting.variant,
        "train": setting.train,
        "steps": summary["steps"],
        "sequences_per_step": cfg.train.micro_batch_size * cfg.train.grad_accum_steps * setting.nproc,
        "train_s": summary["wall_time_s"],
        **heldout_metrics(cfg, rd, name),
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of the sweep: held-out ppl and its change against the row's CE baseline, top-1, KL, ECE."""
    by_name = {r["name"]: r for r in rows}
    lines = [
        "| setting | recipe | steps x seqs | held-out ppl | vs CE | top-1 | KL | ECE | train s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = by_name.get(r["baseline"])
        delta = "" if base is None or base is r else f"{100 * (r['heldout_ppl'] / base['heldout_ppl'] - 1):+.1f} %"
        lines.append(
            f"| `{r['name']}` | {r['recipe']} | {r['steps']} x {r['sequences_per_step']} | {r['heldout_ppl']:.1f} | "
            f"{delta} | {r['top1_agreement']:.4f} | {r['kl_teacher_student']:.3f} | {r['ece']:.4f} | "
            f"{r['train_s']:.0f} |"
        )
    return "\n".join(lines)


def write_readme(readme: Path, table: str, command: str) -> None:
    """Replace the text between the sweep markers of ``readme`` by the table (the markers must exist)."""
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{readme}: no {BEGIN} ... {END} markers to write the sweep table between")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    date = dt.date.today().isoformat()
    body = f"\n_Generated by `{command}` on {date}._\n\n{table}\n"
    atomic_write_text(readme, head + BEGIN + body + END + tail)


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.sweep --config C [--only a,b] [--readme FILE] [overrides]``; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.sweep", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("--only", default=None, help="comma-separated setting names, run in this order (default: all)")
    parser.add_argument("--readme", type=Path, default=None, help="write the table between the sweep markers")
    parser.add_argument("overrides", nargs="*", help="key.path=value applied to every setting")
    args = parser.parse_args(argv)
    grid = GRID
    if args.only:
        wanted = args.only.split(",")
        unknown = sorted(set(wanted) - {s.name for s in GRID})
        if unknown:
            parser.error(f"--only: unknown settings {unknown} (known: {', '.join(s.name for s in GRID)})")
        grid = tuple(next(s for s in GRID if s.name == name) for name in wanted)  # in the order given
    rd = RunDir.from_config(load_config(args.config, list(args.overrides)))
    command = ("python -m pipeline.sweep " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    table = ""
    for setting in grid:
        print(f"sweep: {setting.name}: {setting.recipe}", file=sys.stderr, flush=True)
        row = measure(setting, args.config, list(args.overrides))
        print(f"sweep: {setting.name}: held-out ppl {row['heldout_ppl']:.1f}", file=sys.stderr, flush=True)
        table = format_table(record(rd.root / "sweep" / "sweep.json", row, command))
        if args.readme:  # after every row: a long sweep that is stopped keeps what it measured
            write_readme(args.readme, table, "python -m pipeline.sweep --config " + str(args.config))
    print(table)
    return 0


def record(path: Path, row: dict[str, Any], command: str) -> list[dict[str, Any]]:
    """Add ``row`` to the sweep file (replacing a row of the same setting), rows in grid order; returns them all.
    Separate invocations (``--only``) thus build one table."""
    rows = json.loads(path.read_text())["rows"] if path.exists() else []
    by_name = {r["name"]: r for r in rows} | {row["name"]: row}
    order = [s.name for s in GRID]
    rows = sorted(by_name.values(), key=lambda r: order.index(r["name"]) if r["name"] in order else len(order))
    atomic_write_json(path, {"last_command": command, "rows": rows})
    return rows


if __name__ == "__main__":
    sys.exit(main())
