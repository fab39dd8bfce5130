"""Report stage: one table, one JSON and one Markdown page answering "did distillation work, at what cost, which
recipe won", built only from result files.

Reads (every input optional; what is missing is listed under "Not included" in the report, never a crash):
    runs/<run>/evaluate/<model>/results.json                  intrinsic metrics, provenance (evaluate stage)
    runs/<run>/evaluate/<model>/lm_eval/**/results_<ts>.json  lm-eval's own output (EvaluationTracker layout)
    runs/<run>/train/<variant>/summary.json, metrics.jsonl    training summary and CE curves (train, held-out)
    runs/<run>/{manifest,cache}/_COMPLETE.json                stage summaries (token counts for tokens per joule)
    logs/<run>/<stage>/telemetry_*.jsonl, telemetry_summary_*.json   GPU telemetry from monitor.py
Writes:
    runs/<run>/report/summary.csv    one row per model: step, training cost, intrinsic metrics, primary task scores,
                                     deltas vs the CE-only baseline and vs the teacher
    runs/<run>/report/summary.json   everything above plus every lm-eval metric/filter/stderr, telemetry, notes
    runs/<run>/report/summary.md     tables, embedded plots, the primary-metric rule, notes
    runs/<run>/report/plots/*.png    CE curves per variant, eval scores with error bars, telemetry over time, energy
Run:
    python -m pipeline.report --config C
Prints a compact per-model table to the console.

Primary metric of a task (one rule for all tasks, :func:`primary_metric`): the first of ``PRIMARY_METRICS`` that
the task reports, under the first filter of ``FILTER_ORDER`` it has (else the alphabetically first filter); a
task reporting none of them uses its alphabetically first metric. Groups: a group with an aggregate score is one
row and its subtasks are listed in summary.json/csv under it; a group without one (``kd_heldout``) is replaced by
its subtasks. For a task run several times, the newest ``results_<timestamp>.json`` wins.

Deltas: ``<metric>_vs_<baseline>`` and ``<metric>_vs_teacher`` are ``model − reference`` in the metric's own units;
whether that is an improvement follows the metric's ``higher_is_better``.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

from pipeline import definition, telemetry
from pipeline.config import Config
from pipeline.jsonlog import parse_jsonl
from pipeline.metrics import INTRINSIC_METRICS
from pipeline.rundir import (
    RunDir,
    StageContext,
    StageSpec,
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    stage_main,
)
from pipeline.telemetry import GPU_SERIES

TEACHER = definition.TEACHER
PRIMARY_METRICS = ("acc_norm", "acc", "exact_match", "f1", "mc2", "word_perplexity", "perplexity", "bits_per_byte")
FILTER_ORDER = ("none", "strict-match")
LOWER_IS_BETTER = re.compile(r"perplexity|bits_per_byte|loss|ece|kl|error")
RESULTS_FILE = re.compile(r"^results_(?P<ts>.+)\.json$")
TRAIN_FIELDS = ("steps", "tokens", "wall_time_s", "tokens_per_s", "final_train_loss", "val_loss")


# ------------------------------------------------------------------------------------------------ reading
def _read_json(path: Path, notes: list[str]) -> Any:
    """Parsed JSON, or None with a note when the file is unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        notes.append(f"{path}: unreadable ({type(err).__name__}); skipped")
        return None


def _read_jsonl(path: Path, notes: list[str]) -> list[dict]:
    """Objects of a JSON-lines file; a torn last line (a run still writing or killed) is skipped with a note."""
    try:
        text = Path(path).read_text()
    except OSError as err:
        notes.append(f"{path}: unreadable ({err.strerror}); skipped")
        return []
    bad: list[str] = []
    rows = list(parse_jsonl(text.splitlines(), bad))
    if bad:
        notes.append(f"{path}: {len(bad)} malformed line(s) skipped")
    return rows


def _number(value: Any) -> float | None:
    """A finite float, or None for lm-eval's "N/A", blanks and non-finite values."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def parse_lm_eval_file(path: Path) -> dict[str, dict[str, Any]]:
    """One lm-eval ``results_<ts>.json`` -> {task or group: entry}.

    entry: {name, parent (enclosing group or None), is_group, subtasks, version, n_shot, n_samples, source,
    timestamp, higher_is_better {metric: bool}, metrics {metric: {filter: {"value", "stderr"}}}}. Result keys are
    ``metric,filter`` with ``metric_stderr,filter`` beside them; non-numeric values ("N/A", " ") become None.
    """
    data = json.loads(Path(path).read_text())
    stamp = RESULTS_FILE.match(Path(path).name)
    subtasks = data.get("group_subtasks") or {}
    parent = {child: group for group, children in subtasks.items() for child in children}
    scored = {**(data.get("groups") or {}), **(data.get("results") or {})}
    out = {}
    for name, values in scored.items():
        metrics: dict[str, dict[str, dict[str, float | None]]] = {}
        for key, value in values.items():
            if "," not in key:
                continue
            metric, filt = key.split(",", 1)
            if metric.endswith("_stderr"):
                continue
            metrics.setdefault(metric, {})[filt] = {
                "value": _number(value),
                "stderr": _number(values.get(f"{metric}_stderr,{filt}")),
            }
        out[name] = {
            "name": name,
            "parent": parent.get(name),
            "is_group": name in subtasks,
            "subtasks": list(subtasks.get(name, [])),
            "version": (data.get("versions") or {}).get(name),
            "n_shot": (data.get("n-shot") or {}).get(name),
            "n_samples": ((data.get("n-samples") or {}).get(name) or {}).get("effective"),
            "higher_is_better": (data.get("higher_is_better") or {}).get(name, {}),
            "limit": (data.get("config") or {}).get("limit"),
            "metrics": {m: f for m, f in metrics.items() if any(v["value"] is not None for v in f.values())},
            "source": str(path),
            "timestamp": stamp.group("ts") if stamp else "",
        }
    return out


def primary_metric(entry: dict[str, Any]) -> tuple[str, str] | None:
    """(metric, filter) reported for a task, by the module's one rule; None when it has no numeric metric."""
    metrics = entry["metrics"]
    if not metrics:
        return None
    metric = next((m for m in PRIMARY_METRICS if m in metrics), sorted(metrics)[0])
    filters = metrics[metric]
    filt = next((f for f in FILTER_ORDER if f in filters), sorted(filters)[0])
    return metric, filt


def higher_is_better(entry: dict[str, Any] | None, metric: str) -> bool:
    """The task's own declaration, else the intrinsic metric's, else a name rule (perplexity/loss/… are lower)."""
    if entry and metric in entry.get("higher_is_better", {}):
        return bool(entry["higher_is_better"][metric])
    if metric in INTRINSIC_METRICS:
        return INTRINSIC_METRICS[metric].higher_is_better
    return not LOWER_IS_BETTER.search(metric)


def collect_lm_eval(model_dir: Path, listed: list[str], notes: list[str]) -> dict[str, dict[str, Any]]:
    """Every task of one model over the lm-eval result files its results.json lists (paths relative to
    ``model_dir``, never a glob: a file left from an earlier evaluation is not a result); for a task run several
    times the newest wins."""
    files = sorted((model_dir / name for name in listed), key=lambda p: (p.name, str(p)))
    tasks: dict[str, dict[str, Any]] = {}
    for path in files:
        try:
            parsed = parse_lm_eval_file(path)
        except (OSError, json.JSONDecodeError, AttributeError, TypeError) as err:
            notes.append(f"{path}: not a readable lm-eval result ({type(err).__name__}); skipped")
            continue
        for name, entry in parsed.items():
            if name not in tasks or entry["timestamp"] >= tasks[name]["timestamp"]:
                tasks[name] = entry
    return tasks


def displayed_tasks(tasks: dict[str, dict[str, Any]]) -> list[str]:
    """Tasks shown as columns: top-level tasks, scored groups, and subtasks of groups without a score."""
    shown = []

    def visit(name: str) -> None:
        entry = tasks.get(name)
        if entry is None:
            return
        if entry["is_group"] and primary_metric(entry) is None:
            for child in entry["subtasks"]:
                visit(child)
        elif primary_metric(entry) is not None:
            shown.append(name)

    for name in sorted(tasks):
        if tasks[name]["parent"] is None:
            visit(name)
    return shown


def collect_training(rd: RunDir, variants: list[str], notes: list[str]) -> dict[str, dict[str, Any]]:
    """{variant: {summary, curve_train [(step, CE)], curve_val [(step, held-out CE)]}} of the given (complete)
    variants. The curves are cross-entropy, not ``loss``: every variant logs its CE on the same held-out rows, while
    its ``loss`` is a weighted total of other components, so only CE compares variants with each other."""
    out = {}
    for variant in variants:
        vdir = rd.stage_dir("train", variant)
        summary_path, metrics_path = vdir / "summary.json", vdir / "metrics.jsonl"
        summary = _read_json(summary_path, notes) if summary_path.exists() else None
        rows = _read_jsonl(metrics_path, notes) if metrics_path.exists() else []
        curves: dict[str, list[tuple[float, float]]] = {"train": [], "val": []}
        for row in rows:
            step, ce = _number(row.get("step")), _number(row.get("ce"))
            if step is not None and ce is not None and row.get("split", "train") in curves:
                curves[row.get("split", "train")].append((step, ce))
        out[variant] = {
            "summary": summary if isinstance(summary, dict) else None,
            "curve_train": curves["train"],
            "curve_val": curves["val"],
        }
    return out


def _timestamp(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
    return None


def telemetry_point(line: dict[str, Any]) -> dict[str, float] | None:
    """One monitor.py line -> {t, gpu_util_pct, gpu_count, gpu_mem_gb, gpu_power_w} (the series it has, as
    ``telemetry.gpu_point`` names and combines them), or None without a time or GPU readings."""
    t = _timestamp(line.get("ts"))
    point = telemetry.gpu_point(line.get("metrics") or {})
    return None if t is None or not point else {"t": t, **point}


def collect_telemetry(logs_dir: Path, notes: list[str]) -> dict[str, dict[str, Any]]:
    """{stage: {points [...], summary {...}}} from monitor.py's files, merged over hosts, array tasks and requeued
    attempts (``telemetry.merge_series``/``merge_summaries``: GPUs and power add, utilisation is the mean over all
    GPUs, duration the wall span)."""
    out: dict[str, dict[str, Any]] = {}
    if not logs_dir.is_dir():
        return out
    # the report's own telemetry is still being written while it runs: what is there is an earlier report's
    for stage_dir in sorted(p for p in logs_dir.iterdir() if p.is_dir() and p.name != "report"):
        series = []
        for path in sorted(stage_dir.glob("telemetry_*.jsonl")):
            points = sorted((p for p in map(telemetry_point, _read_jsonl(path, notes)) if p is not None),
                            key=lambda p: p["t"])  # fmt: skip
            series.append(points)
        summaries = [_read_json(p, notes) for p in sorted(stage_dir.glob("telemetry_summary_*.json"))]
        summaries = [s for s in summaries if isinstance(s, dict)]
        if not any(series) and not summaries:
            continue
        interval = next((s["interval_s"] for s in summaries if _number(s.get("interval_s"))), None)
        points = telemetry.merge_series(series, float(interval or _median_spacing(series)))
        out[stage_dir.name] = {"points": points, "summary": telemetry.merge_summaries(summaries)}
    return out


def _median_spacing(series: list[list[dict[str, float]]]) -> float:
    """Sampling interval of telemetry files without a summary: the median gap between their points (else 1 s)."""
    gaps = sorted(b["t"] - a["t"] for points in series for a, b in zip(points, points[1:], strict=False))
    return gaps[len(gaps) // 2] if gaps and gaps[len(gaps) // 2] > 0 else 1.0


def _energy_wh(summary: dict[str, float]) -> float | None:
    for key in ("energy_wh", "gpu_energy_wh"):
        if key in summary:
            return summary[key]
    if "energy_j" in summary:
        return summary["energy_j"] / 3600
    return None


# ------------------------------------------------------------------------------------------------ building
def build_summary(cfg: Config, rd: RunDir, missing: dict[str, str]) -> dict[str, Any]:
    """Everything the report shows, as plain data (this is summary.json). ``missing``: the evaluate and train units
    (``evaluate/kd``, ``train/kd``) that are not complete for this config, and why; they are left out with a note,
    so a stale result never appears as current."""
    notes: list[str] = []
    baseline = cfg.train.baseline_variant
    expected = [*cfg.train.variants, *([TEACHER] if cfg.evaluate.include_teacher else [])]
    eval_dir = rd.stage_dir("evaluate")
    models = [m for m in expected if f"evaluate/{m}" not in missing]
    for name in expected:
        if f"evaluate/{name}" in missing:
            notes.append(f"model {name}: no evaluation ({missing[f'evaluate/{name}']})")

    trained = [v for v in cfg.train.variants if f"train/{v}" not in missing]
    training = collect_training(rd, trained, notes)
    for name in cfg.train.variants:
        if f"train/{name}" in missing:
            notes.append(f"variant {name}: no training summary ({missing[f'train/{name}']})")

    per_model: dict[str, dict[str, Any]] = {}
    all_tasks: dict[str, dict[str, Any]] = {}
    for name in models:
        results = _read_json(eval_dir / name / "results.json", notes) or {}
        tasks = collect_lm_eval(eval_dir / name, results.get("lm_eval_files") or [], notes)
        if not tasks and results.get("tasks"):
            notes.append(f"model {name}: results.json lists tasks but no lm-eval results_*.json was found")
        for task, entry in tasks.items():
            all_tasks.setdefault(task, entry)
        train = (training.get(name) or {}).get("summary") or {}
        per_model[name] = {
            "role": TEACHER if name == TEACHER else ("baseline" if name == baseline else "student"),
            "step": results.get("step"),
            "model_path": results.get("model_path"),
            "intrinsic": {k: _number(v) for k, v in (results.get("intrinsic") or {}).items()},
            "tasks": tasks,
            "train": {k: train.get(k) for k in TRAIN_FIELDS if k in train},
            "provenance": results.get("provenance", {}),
            "task_versions": results.get("task_versions", {}),
        }

    columns = displayed_tasks(all_tasks)
    metric_info: dict[str, dict[str, Any]] = {
        m.name: {"higher_is_better": m.higher_is_better, "source": "intrinsic", "doc": m.doc}
        for m in INTRINSIC_METRICS.values()
    }
    for task in columns:
        pm = primary_metric(all_tasks[task])
        metric_info[task] = {
            "higher_is_better": higher_is_better(all_tasks[task], pm[0]),
            "source": "lm_eval",
            "metric": pm[0],
            "filter": pm[1],
        }
    for name, model in per_model.items():
        scores: dict[str, float | None] = dict(model["intrinsic"])
        stderr: dict[str, float | None] = {}
        for task in columns:
            entry = model["tasks"].get(task)
            metric, filt = metric_info[task]["metric"], metric_info[task]["filter"]
            cell = (entry["metrics"].get(metric) or {}).get(filt) if entry else None
            scores[task] = cell["value"] if cell else None
            stderr[task] = cell["stderr"] if cell else None
            if entry is None:
                notes.append(f"model {name}: task {task} missing from its lm-eval results")
        model["scores"], model["stderr"] = scores, stderr

    for ref_name, suffix in ((baseline, baseline), (TEACHER, TEACHER)):
        ref = per_model.get(ref_name)
        if ref is None:
            notes.append(f"deltas vs {ref_name}: not computed ({ref_name} has no evaluation)")
            continue
        for model in per_model.values():
            model.setdefault("deltas", {})
            for metric, value in model["scores"].items():
                base = ref["scores"].get(metric)
                delta = value - base if value is not None and base is not None else None
                model["deltas"][f"{metric}_vs_{suffix}"] = delta

    telemetry = collect_telemetry(rd.logs, notes)
    if not telemetry:
        notes.append(f"telemetry: none found under {rd.logs}/<stage>/telemetry_*.jsonl (monitor off or no GPU)")
    stage_tokens = _stage_tokens(rd, training, notes)
    energy = {}
    for stage, tel in telemetry.items():
        wh = _energy_wh(tel["summary"])
        if wh is None:
            continue
        tokens = stage_tokens.get(stage)
        energy[stage] = {
            "energy_wh": wh,
            "tokens": tokens,
            "tokens_per_joule": tokens / (wh * 3600) if tokens and wh > 0 else None,
        }
    for stage, tel in telemetry.items():
        if not any(key in point for point in tel["points"] for key in GPU_SERIES):
            notes.append(f"telemetry {stage}: host metrics only, no GPU readings (no NVML); no GPU plot")
    if telemetry and not energy:
        notes.append("energy: telemetry has no energy readings (no NVML energy counter); energy plot omitted")
    return {
        "run": cfg.run_name,
        "generated_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "baseline": baseline,
        "models": per_model,
        "columns": columns,
        "metric_info": metric_info,
        "primary_metric_rule": (
            f"first of {', '.join(PRIMARY_METRICS)} reported by the task, under filter "
            f"{' then '.join(FILTER_ORDER)} (else the first filter); otherwise the task's first metric"
        ),
        "training": {k: {"summary": v["summary"]} for k, v in training.items()},
        "telemetry": {k: v["summary"] for k, v in telemetry.items()},
        "energy": energy,
        "notes": notes,
        "_curves": {k: {"train": v["curve_train"], "val": v["curve_val"]} for k, v in training.items()},
        "_telemetry_points": {k: v["points"] for k, v in telemetry.items()},
    }


def _stage_tokens(rd: RunDir, training: dict[str, dict[str, Any]], notes: list[str]) -> dict[str, float]:
    """Tokens each stage processed: train from the variants' summaries, other stages from their markers."""
    out: dict[str, float] = {}
    train_tokens = [_number((v["summary"] or {}).get("tokens")) for v in training.values()]
    if any(t is not None for t in train_tokens):
        out["train"] = sum(t for t in train_tokens if t is not None)
    for stage in ("manifest", "cache"):
        path = rd.marker_path(stage)
        marker = _read_json(path, notes) if path.exists() else None
        tokens = _number(((marker or {}).get("summary") or {}).get("tokens"))
        if tokens is not None:
            out[stage] = tokens
    return out


# ------------------------------------------------------------------------------------------------ rendering
def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3g}"
        return f"{value:.{digits}g}"
    return str(value)


def table_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat row per model (summary.csv)."""
    rows = []
    for name, model in summary["models"].items():
        row: dict[str, Any] = {"model": name, "role": model["role"], "step": model["step"]}
        for key in TRAIN_FIELDS:
            row[f"train_{key}"] = model["train"].get(key)
        for metric in summary["metric_info"]:
            row[metric] = model["scores"].get(metric)
            if metric in model["stderr"]:
                row[f"{metric}_stderr"] = model["stderr"][metric]
        row.update(model.get("deltas", {}))
        rows.append(row)
    return rows


def to_csv(rows: list[dict[str, Any]]) -> str:
    fields = list(dict.fromkeys(k for row in rows for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in fields})
    return buf.getvalue()


def _md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _arrow(summary: dict[str, Any], metric: str) -> str:
    return "↑" if summary["metric_info"][metric]["higher_is_better"] else "↓"


def console_table(summary: dict[str, Any]) -> str:
    """Compact per-model table: held-out ppl, top-1 agreement, KL, ECE, task scores, train wall time."""
    metrics = [*INTRINSIC_METRICS, *summary["columns"]]
    short = {"heldout_ppl": "ppl", "top1_agreement": "top1", "kl_teacher_student": "KL", "ece": "ECE"}
    header = ["model", "step", *(f"{short.get(m, m)}{_arrow(summary, m)}" for m in metrics), "train_s"]
    rows = [
        [
            name,
            _fmt(model["step"]),
            *(_fmt(model["scores"].get(m)) for m in metrics),
            _fmt(model["train"].get("wall_time_s"), 5),
        ]
        for name, model in summary["models"].items()
    ]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    lines = ["  ".join(str(c).rjust(w) for c, w in zip(r, widths, strict=True)) for r in [header, *rows]]
    return "\n".join(lines)


def render_markdown(summary: dict[str, Any], plots: dict[str, str]) -> str:
    """summary.md: results, deltas, training cost, telemetry, plots, primary-metric rule, notes, provenance."""
    info = summary["metric_info"]
    metrics = list(info)
    out = [
        f"# Distillation report: {summary['run']}",
        "",
        f"Generated {summary['generated_at']}. "
        f"Baseline (CE only): `{summary['baseline']}`. ↑ higher is better, ↓ lower is better.",
        "",
    ]
    out += ["## Results", ""]
    header = ["model", "role", "step", *(f"{m} {_arrow(summary, m)}" for m in metrics)]
    rows = []
    for name, model in summary["models"].items():
        cells = []
        for m in metrics:
            value, err = model["scores"].get(m), model["stderr"].get(m)
            cells.append(f"{_fmt(value)} ± {_fmt(err, 2)}" if value is not None and err is not None else _fmt(value))
        rows.append([name, model["role"], model["step"], *cells])
    out += [_md_table(header, rows), ""]
    tasks = [m for m in metrics if info[m]["source"] == "lm_eval"]
    if tasks:
        out += ["Task metrics: " + ", ".join(f"{t}: `{info[t]['metric']},{info[t]['filter']}`" for t in tasks), ""]
    for ref in (summary["baseline"], TEACHER):
        deltas = [(n, m.get("deltas", {})) for n, m in summary["models"].items()]
        if not any(f"{metrics[0]}_vs_{ref}" in d for _, d in deltas):
            continue
        out += [f"## Deltas vs {ref} (model − {ref})", ""]
        out += [_md_table(["model", *metrics], [[n, *(d.get(f"{m}_vs_{ref}") for m in metrics)] for n, d in deltas])]
        out += [""]
    trained = {n: m["train"] for n, m in summary["models"].items() if m["train"]}
    if trained:
        out += [
            "## Training",
            "",
            _md_table(["variant", *TRAIN_FIELDS], [[n, *(t.get(k) for k in TRAIN_FIELDS)] for n, t in trained.items()]),
            "",
        ]
    if summary["telemetry"]:
        keys = sorted({k for s in summary["telemetry"].values() for k in s})
        out += [
            "## Telemetry per stage",
            "",
            _md_table(["stage", *keys], [[st, *(s.get(k) for k in keys)] for st, s in summary["telemetry"].items()]),
        ]
        out += [""]
    if summary["energy"]:
        out += [
            "## Energy",
            "",
            _md_table(
                ["stage", "energy_wh", "tokens", "tokens_per_joule"],
                [[st, e["energy_wh"], e["tokens"], e["tokens_per_joule"]] for st, e in summary["energy"].items()],
            ),
            "",
        ]
    if plots:
        out += ["## Plots", ""] + [f"### {title}\n\n![{title}]({path})\n" for title, path in plots.items()]
    out += ["## Primary metric rule", "", summary["primary_metric_rule"] + ".", ""]
    out += ["## Not included", ""]
    out += [f"- {n}" for n in summary["notes"]] or ["- nothing: every expected input was found"]
    out += ["", "## Provenance", ""]
    prov_rows = []
    for name, model in summary["models"].items():
        p = model["provenance"]
        pk = p.get("packages") or {}
        prov_rows.append(
            [
                name,
                model["model_path"],
                p.get("config_hash"),
                p.get("git_hash"),
                p.get("date"),
                pk.get("lm_eval"),
                pk.get("torch"),
                pk.get("transformers"),
                json.dumps(model["task_versions"], sort_keys=True) if model["task_versions"] else None,
            ]
        )
    out += [
        _md_table(
            ["model", "path", "config_hash", "git", "date", "lm_eval", "torch", "transformers", "task versions"],
            prov_rows,
        ),
        "",
    ]
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------ plotting
def _save(fig: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def make_plots(summary: dict[str, Any], plot_dir: Path) -> dict[str, str]:
    """Write the PNGs that have data; returns {title: path relative to the report directory}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots: dict[str, str] = {}
    curves = {k: v for k, v in summary["_curves"].items() if v["train"] or v["val"]}
    if curves:  # CE of each variant: the one quantity every variant logs on the same held-out rows
        fig, ax = plt.subplots(figsize=(7, 4))
        for i, (name, curve) in enumerate(sorted(curves.items())):
            color = f"C{i}"
            if curve["val"]:
                ax.plot(*zip(*curve["val"], strict=True), color=color, marker="o", label=f"{name} held-out")
            if curve["train"]:
                ax.plot(*zip(*curve["train"], strict=True), color=color, lw=0.8, alpha=0.45, label=f"{name} train")
        title = "Cross-entropy per variant (held-out and train)"
        ax.set(xlabel="optimizer step", ylabel="cross-entropy (nats/token)", title=title)
        ax.legend(fontsize=8)
        _save(fig, plot_dir / "ce_curves.png")
        plt.close(fig)
        plots[title] = "plots/ce_curves.png"

    metrics = [
        m for m in summary["metric_info"] if any(mm["scores"].get(m) is not None for mm in summary["models"].values())
    ]
    if metrics:
        cols = min(3, len(metrics))
        rows = math.ceil(len(metrics) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
        names = list(summary["models"])
        for ax, metric in zip(axes.flat, metrics, strict=False):
            values = [summary["models"][n]["scores"].get(metric) for n in names]
            errs = [summary["models"][n]["stderr"].get(metric) or 0.0 for n in names]
            ax.bar(
                names,
                [v if v is not None else 0.0 for v in values],
                yerr=errs if any(errs) else None,
                capsize=4,
                color=[f"C{i}" for i in range(len(names))],
            )
            ax.set_title(f"{metric} {_arrow(summary, metric)}", fontsize=9)
            ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        for ax in list(axes.flat)[len(metrics) :]:
            ax.axis("off")
        fig.tight_layout()
        _save(fig, plot_dir / "eval_scores.png")
        plt.close(fig)
        plots["Evaluation scores (error bars: lm-eval stderr)"] = "plots/eval_scores.png"

    for stage, points in sorted(summary["_telemetry_points"].items()):
        series = [s for s in GPU_SERIES if any(s in p for p in points)]
        if not series:
            continue
        t0 = points[0]["t"]
        fig, axes = plt.subplots(len(series), 1, figsize=(7, 2.2 * len(series)), sharex=True, squeeze=False)
        for ax, s in zip(axes[:, 0], series, strict=True):
            xs = [(p["t"] - t0) for p in points if s in p]
            ax.plot(xs, [p[s] for p in points if s in p])
            ax.set_ylabel(s, fontsize=8)
        axes[-1, 0].set_xlabel("seconds since stage start")
        fig.suptitle(f"GPU telemetry: {stage}")
        _save(fig, plot_dir / f"telemetry_{stage}.png")
        plt.close(fig)
        plots[f"GPU telemetry: {stage}"] = f"plots/telemetry_{stage}.png"

    if summary["energy"]:
        stages = list(summary["energy"])
        fig, ax = plt.subplots(figsize=(6, 3.5))
        bars = ax.bar(stages, [summary["energy"][s]["energy_wh"] for s in stages])
        for bar, s in zip(bars, stages, strict=True):
            tpj = summary["energy"][s]["tokens_per_joule"]
            if tpj is not None:
                ax.annotate(
                    f"{tpj:.3g} tok/J",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center",
                    va="bottom",
                    fontsize=8,
                )
        ax.set(ylabel="energy (Wh)", title="Energy per stage")
        _save(fig, plot_dir / "energy.png")
        plt.close(fig)
        plots["Energy per stage"] = "plots/energy.png"
    return plots


# ------------------------------------------------------------------------------------------------ stage
def run(cfg: Config, rd: RunDir, ctx: StageContext) -> dict[str, float]:
    """Build summary.{csv,json,md} and plots from the run's result files; print the compact table."""
    out = rd.stage_dir("report")
    summary = build_summary(cfg, rd, ctx.state.waiting)
    ctx.begin_writes()
    plots = make_plots(summary, out / "plots") if cfg.report.plots else {}
    for stale in (out / "plots").glob("*.png"):  # an earlier report's plot this one does not make
        if f"plots/{stale.name}" not in plots.values():
            stale.unlink()
    public = {k: v for k, v in summary.items() if not k.startswith("_")}
    public["plots"] = plots
    atomic_write_text(out / "summary.csv", to_csv(table_rows(summary)))
    atomic_write_json(out / "summary.json", public)
    atomic_write_text(out / "summary.md", render_markdown(summary, plots))
    print(console_table(summary))
    for note in summary["notes"]:
        print(f"note: {note}")
    ctx.log.info("report", f"{out / 'summary.md'}", models=len(summary["models"]), notes=len(summary["notes"]))
    return {"models": float(len(summary["models"])), "notes": float(len(summary["notes"]))}


def upstream(cfg: Config, unit: str | None) -> list[tuple[str, str | None]]:
    """Every model's evaluation and every variant's training (the definition's edges). Optional
    (``optional_upstream``): the complete ones are read and recorded, so the report reruns when any of them changes,
    and one that is not complete (a failed variant, a stale evaluation) is a note in the report, not a refusal."""
    return definition.upstream(cfg, "report", unit)


def outputs(cfg: Config, rd: RunDir, unit: str | None) -> dict[str, str | None]:
    """The three summaries and the plots summary.json lists."""
    out = rd.stage_dir("report")
    plots = json.loads((out / "summary.json").read_text()).get("plots") or {}
    return {name: None for name in [f"summary.{ext}" for ext in ("csv", "json", "md")] + sorted(plots.values())}


SPEC = StageSpec(
    name="report",
    run=run,
    sections=lambda cfg, unit: {
        "report": cfg.report,
        "run_name": cfg.run_name,
        "train.baseline_variant": cfg.train.baseline_variant,
    },
    upstream=upstream,
    outputs=outputs,
    optional_upstream=True,
)


def main(argv: list[str] | None = None) -> int:
    return stage_main(SPEC, argv)


if __name__ == "__main__":
    sys.exit(main())
