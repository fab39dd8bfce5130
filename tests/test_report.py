"""Report stage from complete and partial fake result directories (the report reads only files)."""

from __future__ import annotations

import csv
import json
import struct
from pathlib import Path

import pytest
from conftest import mark_complete

from pipeline import report
from pipeline.config import load
from pipeline.rundir import RunDir

VARIANTS = ("ce", "kd", "feature", "relation")


def lm_eval_json(scores: dict[str, float], stamp: str) -> dict:
    """The layout lm-eval 0.4 writes: a scored group with subtasks, an unscored group, filters, stderr, N/A."""
    mc, ppl, gsm = scores["mc"], scores["ppl"], scores["gsm"]
    return {
        "results": {
            "mmlu_mini": {"alias": "mmlu_mini", "acc,none": (mc + 0.1) / 2, "acc_stderr,none": 0.02},
            "mmlu_mini_a": {"alias": " - a", "acc,none": mc, "acc_stderr,none": 0.03},
            "mmlu_mini_b": {"alias": " - b", "acc,none": 0.1, "acc_stderr,none": 0.03},
            "kd_heldout": {"alias": "kd_heldout", "name": "kd_heldout"},
            "kd_heldout_mc": {
                "alias": "kd_heldout_mc",
                "acc,none": mc,
                "acc_stderr,none": 0.05,
                "acc_norm,none": mc + 0.05,
                "acc_norm_stderr,none": 0.04,
            },
            "kd_heldout_ppl": {
                "alias": "kd_heldout_ppl",
                "word_perplexity,none": ppl,
                "word_perplexity_stderr,none": "N/A",
                "bits_per_byte,none": 1.5,
                "bits_per_byte_stderr,none": "N/A",
            },
            "gsm_mini": {
                "alias": "gsm_mini",
                "exact_match,strict-match": gsm,
                "exact_match_stderr,strict-match": 0.01,
                "exact_match,flexible-extract": gsm + 0.2,
                "exact_match_stderr,flexible-extract": 0.01,
            },
        },
        "groups": {"mmlu_mini": {"alias": "mmlu_mini", "acc,none": (mc + 0.1) / 2, "acc_stderr,none": 0.02}},
        "group_subtasks": {
            "mmlu_mini": ["mmlu_mini_a", "mmlu_mini_b"],
            "kd_heldout": ["kd_heldout_mc", "kd_heldout_ppl"],
            "gsm_mini": [],
        },
        "versions": {
            "mmlu_mini": 1,
            "mmlu_mini_a": 1.0,
            "mmlu_mini_b": 1.0,
            "kd_heldout": "1.0",
            "kd_heldout_mc": 1.0,
            "kd_heldout_ppl": 1.0,
            "gsm_mini": 3.0,
        },
        "n-shot": {"kd_heldout_mc": 0, "gsm_mini": 5},
        "higher_is_better": {
            "kd_heldout_ppl": {"word_perplexity": False, "bits_per_byte": False},
            "kd_heldout_mc": {"acc": True, "acc_norm": True},
        },
        "n-samples": {"kd_heldout_mc": {"original": 40, "effective": 10}},
        "config": {"limit": 10},
        "date": 1.0,
        "model_name_sanitized": "__runs__x",
    }


def make_run(root: Path, cfg, *, models=(*VARIANTS, "teacher"), trained=VARIANTS, telemetry=True) -> RunDir:
    """Result files as the stages leave them, each unit marked complete for ``cfg`` (the upstream manifest and cache
    with no files of their own: the report reads only evaluation and training results)."""
    rd = RunDir.from_config(cfg)
    mark_complete(cfg, "manifest", None, [])
    mark_complete(cfg, "cache", None, [], {"tokens": 9000})
    quality = {"ce": 0.3, "kd": 0.5, "feature": 0.4, "relation": 0.35, "teacher": 0.9}
    for model in models:
        q = quality[model]
        mdir = rd.stage_dir("evaluate", model)
        out = mdir / "lm_eval" / "__runs__x"
        out.mkdir(parents=True)
        # an older run with different numbers: the newest timestamp must win
        stale = lm_eval_json({"mc": 0.0, "ppl": 1e6, "gsm": 0.0}, "2026-01-01T00-00-00.000001")
        (out / "results_2026-01-01T00-00-00.000001.json").write_text(json.dumps(stale))
        fresh = lm_eval_json({"mc": q, "ppl": 100 / q, "gsm": q / 10}, "2026-02-01T00-00-00.000001")
        (out / "results_2026-02-01T00-00-00.000001.json").write_text(json.dumps(fresh))
        intrinsic = {
            "heldout_ppl": 50 / q,
            "top1_agreement": q,
            "kl_teacher_student": 1 - q,
            "ece": 0.1 * q,
            "heldout_tokens": 1000.0,
        }
        results = {
            "model": model,
            "model_path": str(mdir),
            "step": None if model == "teacher" else 6,
            "intrinsic": intrinsic,
            "tasks": [{"name": "kd_heldout"}],
            "task_versions": {"kd_heldout_mc": 1.0},
            "provenance": {
                "config_hash": "abc",
                "git_hash": "deadbeef",
                "date": "2026-02-01",
                "packages": {"lm_eval": "0.4.13", "torch": "2.13.0", "transformers": "5.23.0"},
            },
        }
        results["lm_eval_files"] = [str(p.relative_to(mdir)) for p in sorted(out.iterdir())]
        (mdir / "results.json").write_text(json.dumps(results))
    for variant in trained:
        vdir = rd.stage_dir("train", variant)
        vdir.mkdir(parents=True)
        # loss is each variant's weighted total (not comparable across variants), ce the comparable part
        lines = [{"step": s, "split": "train", "loss": 5.0 - 0.3 * s - quality[variant], "ce": 6.0 - 0.2 * s}
                 for s in range(1, 7)]  # fmt: skip
        lines += [{"step": 3, "split": "val", "loss": 4.5, "ce": 5.5 - quality[variant]},
                  {"step": 6, "split": "val", "loss": 4.0, "ce": 5.0 - quality[variant]}]  # fmt: skip
        (vdir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"step": 7, "lo')
        summary = {
            "variant": variant,
            "steps": 6,
            "tokens": 768,
            "wall_time_s": 12.5,
            "tokens_per_s": 61.4,
            "final_train_loss": 3.2,
            "val_loss": 4.0,
        }
        (vdir / "summary.json").write_text(json.dumps(summary))
        mark_complete(cfg, "train", variant, ["summary.json", "metrics.jsonl"])
    for model in models:
        mdir = rd.stage_dir("evaluate", model)
        if model == "teacher" or model in trained:
            mark_complete(cfg, "evaluate", model, [str(p.relative_to(mdir)) for p in mdir.rglob("*") if p.is_file()])
    if telemetry:
        for stage in ("cache", "train", "report"):  # report: an earlier report run's (left out)
            sdir = rd.logs / stage
            sdir.mkdir(parents=True)
            lines = [
                {
                    "ts": f"2026-02-01T00:00:{i:02d}+00:00",
                    "stage": stage,
                    "event": "sample",
                    "metrics": {
                        "gpus": [
                            {"index": 0, "util_pct": 50 + i, "mem_used_gb": 10.0, "power_w": 200.0},
                            {"index": 1, "util_pct": 70 + i, "mem_used_gb": 12.0, "power_w": 220.0},
                        ],
                        "cpu_util_pct": 30.0,
                    },
                }
                for i in range(5)
            ]
            (sdir / "telemetry_node1_123.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
            (sdir / "telemetry_summary_node1_123.json").write_text(
                json.dumps(
                    {
                        "duration_s": 4.0,
                        "gpu_util_mean": 62.0,
                        "gpu_util_max": 74.0,
                        "gpu_mem_peak_gb": 22.0,
                        "energy_wh": 0.5,
                    }
                )
            )
    return rd


def _png_ok(path: Path) -> bool:
    data = path.read_bytes()
    width, height = struct.unpack(">II", data[16:24])
    return data[:8] == b"\x89PNG\r\n\x1a\n" and width > 100 and height > 100 and len(data) > 2000


def test_parse_and_primary_metric_rule(tmp_path):
    path = tmp_path / "results_2026-02-01T00-00-00.000001.json"
    path.write_text(json.dumps(lm_eval_json({"mc": 0.5, "ppl": 200.0, "gsm": 0.05}, "x")))
    parsed = report.parse_lm_eval_file(path)
    assert parsed["mmlu_mini_a"]["parent"] == "mmlu_mini" and parsed["mmlu_mini"]["is_group"]
    assert report.primary_metric(parsed["kd_heldout_mc"]) == ("acc_norm", "none")
    assert report.primary_metric(parsed["kd_heldout_ppl"]) == ("word_perplexity", "none")
    assert report.primary_metric(parsed["gsm_mini"]) == ("exact_match", "strict-match")
    assert report.primary_metric(parsed["kd_heldout"]) is None
    assert parsed["kd_heldout_ppl"]["metrics"]["word_perplexity"]["none"] == {"value": 200.0, "stderr": None}
    assert parsed["kd_heldout_mc"]["metrics"]["acc"]["none"]["stderr"] == 0.05
    # scored group stays one column, unscored group is replaced by its subtasks
    assert report.displayed_tasks(parsed) == ["gsm_mini", "kd_heldout_mc", "kd_heldout_ppl", "mmlu_mini"]
    assert not report.higher_is_better(parsed["kd_heldout_ppl"], "word_perplexity")
    assert report.higher_is_better(None, "top1_agreement") and not report.higher_is_better(None, "ece")


def test_report_complete_inputs(tmp_path, tiny_config, capsys):
    cfg_path = tiny_config()
    cfg = load(cfg_path)
    rd = make_run(tmp_path, cfg)
    assert report.main(["--config", str(cfg_path)]) == 0
    out = rd.stage_dir("report")
    summary = json.loads((out / "summary.json").read_text())
    kd, ce, teacher = (summary["models"][m] for m in ("kd", "ce", "teacher"))
    assert kd["scores"]["kd_heldout_mc"] == pytest.approx(0.55)  # acc_norm of the newest file
    assert kd["stderr"]["kd_heldout_mc"] == pytest.approx(0.04)
    assert kd["scores"]["gsm_mini"] == pytest.approx(0.05)  # strict-match, not flexible-extract
    assert kd["deltas"]["kd_heldout_mc_vs_ce"] == pytest.approx(0.55 - 0.35)
    assert kd["deltas"]["heldout_ppl_vs_teacher"] == pytest.approx(50 / 0.5 - 50 / 0.9)
    assert ce["deltas"]["top1_agreement_vs_ce"] == 0
    assert teacher["role"] == "teacher" and kd["train"]["wall_time_s"] == 12.5
    assert summary["energy"]["train"]["tokens"] == 4 * 768
    assert summary["energy"]["train"]["tokens_per_joule"] == pytest.approx(4 * 768 / (0.5 * 3600))
    assert summary["energy"]["cache"]["tokens"] == 9000
    assert sorted(summary["telemetry"]) == ["cache", "train"]
    assert summary["notes"] == [
        f"{rd.stage_dir('train', v) / 'metrics.jsonl'}: 1 malformed line(s) skipped" for v in VARIANTS
    ]
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [r["model"] for r in rows] == [*VARIANTS, "teacher"]
    assert float(rows[1]["kd_heldout_ppl"]) == pytest.approx(200.0)
    md = (out / "summary.md").read_text()
    for name in ("ce_curves", "eval_scores", "telemetry_cache", "telemetry_train", "energy"):
        assert f"](plots/{name}.png)" in md
        assert _png_ok(out / "plots" / f"{name}.png")
    assert "## Deltas vs ce" in md and "## Deltas vs teacher" in md and "acc_norm,none" in md
    printed = capsys.readouterr().out
    assert "ppl↓" in printed and "top1↑" in printed and "kd_heldout_mc↑" in printed
    assert any(line.split()[0] == "kd" and "12.5" in line for line in printed.splitlines())


def test_training_curves_compare_variants_on_cross_entropy_not_their_weighted_loss(tmp_path, tiny_config):
    cfg = load(tiny_config())
    rd = make_run(tmp_path, cfg, models=("ce", "kd"), trained=("ce", "kd"), telemetry=False)
    curves = report.collect_training(rd, ["ce", "kd"], [])
    assert curves["kd"]["curve_val"] == [
        (3, pytest.approx(5.0)),
        (6, pytest.approx(4.5)),
    ]  # held-out CE (loss: 4.5, 4.0)
    assert curves["ce"]["curve_val"] == [(3, pytest.approx(5.2)), (6, pytest.approx(4.7))]
    assert [s for s, _ in curves["kd"]["curve_train"]] == list(range(1, 7))
    assert curves["kd"]["curve_train"][0][1] == pytest.approx(5.8)


def test_report_partial_inputs(tmp_path, tiny_config, capsys):
    cfg_path = tiny_config()
    cfg = load(cfg_path)
    rd = make_run(tmp_path, cfg, models=("ce", "kd"), trained=("ce", "kd"), telemetry=False)
    kd = rd.stage_dir("evaluate", "kd")
    (kd / "lm_eval" / "__runs__x" / "results_2026-03-01T00-00-00.json").write_text("{")  # listed, unreadable
    (kd / "lm_eval" / "__runs__x" / "results_2026-04-01T00-00-00.json").write_text("{")  # a stray: never read
    results = json.loads((kd / "results.json").read_text())
    results["lm_eval_files"].append("lm_eval/__runs__x/results_2026-03-01T00-00-00.json")
    (kd / "results.json").write_text(json.dumps(results))
    mark_complete(cfg, "evaluate", "kd", ["results.json", *results["lm_eval_files"]])
    assert report.main(["--config", str(cfg_path)]) == 0
    out = rd.stage_dir("report")
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["models"]) == {"ce", "kd"}
    notes = "\n".join(summary["notes"])
    for expected in (
        "model feature: no evaluation",
        "model teacher: no evaluation",
        "variant relation: no training",
        "deltas vs teacher: not computed",
        "telemetry: none found",
        "results_2026-03-01T00-00-00.json",
    ):
        assert expected in notes
    assert "results_2026-04-01" not in notes
    md = (out / "summary.md").read_text()
    assert "## Not included" in md and "model feature: no evaluation" in md
    assert "## Deltas vs teacher" not in md and "plots/telemetry_" not in md
    assert _png_ok(out / "plots" / "eval_scores.png") and _png_ok(out / "plots" / "ce_curves.png")
    assert "note: model teacher: no evaluation" in capsys.readouterr().out


def test_report_with_nothing_at_all(tmp_path, tiny_config):
    cfg_path = tiny_config(**{"report.plots": False})
    assert report.main(["--config", str(cfg_path)]) == 0
    rd = RunDir.from_config(load(cfg_path))
    md = (rd.stage_dir("report") / "summary.md").read_text()
    assert "model ce: no evaluation" in md and not (rd.stage_dir("report") / "plots").exists()


def test_telemetry_of_two_concurrent_nodes_is_merged_not_taken_from_the_first(tmp_path):
    """Two 8-GPU nodes of one job for the same hour, at 20 % / 1000 W and 95 % / 5000 W (the issue's numbers): the
    report shows 16 GPUs, 6000 W, the mean over all 16 GPUs and 3600 s of wall clock, and the plotted series add
    the nodes' power at each moment."""
    stage = tmp_path / "logs" / "cache"
    stage.mkdir(parents=True)
    for host, util, watts, offset in (("node1", 20.0, 125.0, 0.0), ("node2", 95.0, 625.0, 0.3)):
        lines = [{"ts": 1000.0 + offset + i, "event": "telemetry",
                  "metrics": {"gpus": [{"uuid": f"{host}-{g}", "util_pct": util, "mem_used_gb": 40.0,
                                        "power_w": watts} for g in range(8)]}}
                 for i in range(3600)]  # fmt: skip
        (stage / f"telemetry_{host}_77_{host[-1]}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        summary = {"host": host, "interval_s": 1.0, "started_at": 1000.0 + offset, "duration_s": 3600.0,
                   "gpu_count": 8, "gpu_uuids": [f"{host}-{g}" for g in range(8)], "gpu_util_mean": util,
                   "power_mean_w": 8 * watts, "energy_wh": 8 * watts}  # fmt: skip
        (stage / f"telemetry_summary_{host}_77_{host[-1]}.json").write_text(json.dumps(summary))
    merged = report.collect_telemetry(tmp_path / "logs", [])["cache"]
    s = merged["summary"]
    assert s["gpu_count"] == 16 and s["power_mean_w"] == pytest.approx(6000, rel=1e-3)
    assert s["gpu_util_mean"] == pytest.approx(57.5) and s["duration_s"] == pytest.approx(3600.3)
    assert s["energy_wh"] == 6000
    middle = merged["points"][1800]
    assert middle["gpu_power_w"] == 6000 and middle["gpu_util_pct"] == pytest.approx(57.5)
    assert middle["gpu_mem_gb"] == 16 * 40.0
