"""End to end: manifest -> cache -> train -> evaluate -> report on the tiny random fixtures, each stage through its
real ``main()``, then assertions on the artifacts every stage left behind (row counts, shapes, finite losses,
results for every model, a non-empty report) and on a rerun being a no-op."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import write_config

STAGES = ("manifest", "cache", "train", "evaluate", "report")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_assets) -> dict:
    """Run all five stages once; returns the config, run directory and per-stage exit codes and wall times."""
    import importlib

    root = tmp_path_factory.mktemp("e2e")
    cfg_path = write_config(root, tiny_assets, {"evaluate.local_task_docs": 8, "evaluate.bootstrap_iters": 0})
    codes, seconds = {}, {}
    for stage in STAGES:
        module = importlib.import_module(f"pipeline.{stage}")
        started = time.monotonic()
        codes[stage] = module.main(["--config", str(cfg_path)])
        seconds[stage] = time.monotonic() - started
        if codes[stage] != 0:
            break
    cfg = yaml.safe_load(cfg_path.read_text())
    return {"config": cfg_path, "cfg": cfg, "root": root / "runs" / "tiny", "codes": codes, "seconds": seconds}


def marker(root: Path, *parts: str) -> dict:
    return json.loads((root.joinpath(*parts) / "_COMPLETE.json").read_text())


def test_every_stage_exits_0_and_writes_its_marker_last(run):
    assert run["codes"] == dict.fromkeys(STAGES, 0), run["codes"]
    root = run["root"]
    for stage in ("manifest", "cache", "report"):
        out = root / stage
        newest = max(p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != "_COMPLETE.json")
        assert (out / "_COMPLETE.json").stat().st_mtime_ns >= newest, f"{stage}: a file was written after the marker"
        assert (out / "config.yaml").is_file()


def test_manifest_rows_and_shapes(run):
    from pipeline import data_format

    out = run["root"] / "manifest"
    manifest = data_format.read_manifest(out, verify_checksums=True)
    seq_len = run["cfg"]["manifest"]["seq_len"]
    for split in ("train", "val"):
        paths = data_format.shard_paths(manifest, out, split)
        shards = [data_format.read_packed_shard(p) for p in paths]
        rows = sum(len(s["sample_id"]) for s in shards)
        assert rows == manifest["splits"][split]["rows"] > 0
        ids = np.concatenate([s["sample_id"] for s in shards])
        assert np.array_equal(ids, np.arange(rows)), "sample_id must be 0..N-1 in file order"
        assert all(s["input_ids"].shape[1] == seq_len for s in shards)
        masks = np.concatenate([s["attention_mask"] for s in shards])
        assert masks[:-1].all(), "only the final row of a split may be padded"
    assert manifest["splits"]["train"]["tokens"] + manifest["splits"]["val"]["tokens"] > 1000


def test_cache_mirrors_manifest_with_finite_teacher_signals(run):
    import torch

    from pipeline import cache_format, data_format

    root, cfg = run["root"], run["cfg"]
    manifest = data_format.read_manifest(root / "manifest")
    k, layers = cfg["cache"]["top_k"], cfg["cache"]["hidden_layers"]
    for split in ("train", "val"):
        files = cache_format.list_cache_shards(root / "cache", split)
        expected = [Path(s["file"]).stem for s in manifest["splits"][split]["shards"]]
        assert [f.stem for f in files] == expected, "one cache shard per manifest shard, same stem"
        metas = [cache_format.read_cache_meta(f) for f in files]
        assert sum(m["rows"] for m in metas) == manifest["splits"][split]["rows"]
        assert all(m["top_k"] == k and m["hidden_layers"] == layers for m in metas)
        seen = 0
        for batch in cache_format.CacheDataset(files, batch_size=4, shuffle=False):
            b, t = batch["input_ids"].shape
            assert t == cfg["manifest"]["seq_len"] and batch["topk_ids"].shape == (b, t, k)
            assert batch["hidden_1"].shape[0] == b and batch["hidden_1"].shape[-1] == 64  # teacher hidden size
            assert torch.isfinite(batch["topk_logprobs"]).all() and (batch["topk_logprobs"] <= 0).all()
            assert (batch["topk_logprobs"][..., :-1] >= batch["topk_logprobs"][..., 1:]).all(), "top-k sorted"
            assert (batch["tail_logmass"] <= 0).all() and batch["embed"].shape == (b, 64)
            seen += b
        assert seen == manifest["splits"][split]["rows"]


def test_every_variant_trained_with_finite_losses_and_loadable_weights(run):
    from transformers import AutoModelForCausalLM

    root, cfg = run["root"], run["cfg"]
    steps = cfg["train"]["max_steps"]
    for variant, recipe in cfg["train"]["variants"].items():
        out = root / "train" / variant
        assert marker(root, "train", variant)["unit"] == variant
        summary = json.loads((out / "summary.json").read_text())
        assert summary["steps"] == steps and summary["tokens"] > 0 and summary["wall_time_s"] > 0
        lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        train_lines = [m for m in lines if m["split"] == "train"]
        assert [m["step"] for m in train_lines] == list(range(1, steps + 1))
        assert all(math.isfinite(m["loss"]) for m in lines)
        assert all(math.isfinite(m["grad_norm"]) and m["grad_norm"] > 0 for m in train_lines)
        assert any(m["split"] == "val" and math.isfinite(m["loss"]) for m in lines)
        for term, key in (("response", "kd_response"), ("feature", "kd_feature"), ("relation", "kd_relation")):
            if recipe.get(term, {}).get("weight", 0) > 0:
                assert all(m[key] > 0 for m in train_lines), f"{variant}: {key} missing or zero"
        model = AutoModelForCausalLM.from_pretrained(out / "final")
        assert model.config.hidden_size == 32


def test_results_for_every_student_and_the_teacher(run):
    root, cfg = run["root"], run["cfg"]
    models = [*cfg["train"]["variants"], "teacher"]
    for model in models:
        results = json.loads((root / "evaluate" / model / "results.json").read_text())
        intrinsic = results["intrinsic"]
        assert 1 < intrinsic["heldout_ppl"] < 1e6 and 0 <= intrinsic["top1_agreement"] <= 1
        assert math.isfinite(intrinsic["kl_teacher_student"]) and math.isfinite(intrinsic["ece"])
        assert results["tasks"], f"{model}: no lm-eval task results"
        assert results["provenance"]
    teacher = json.loads((root / "evaluate" / "teacher" / "results.json").read_text())["intrinsic"]
    assert teacher["top1_agreement"] == 1.0 and abs(teacher["kl_teacher_student"]) < 1e-4


def test_report_table_lists_every_model(run):
    import csv

    root, cfg = run["root"], run["cfg"]
    models = [*cfg["train"]["variants"], "teacher"]
    with open(root / "report" / "summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["model"] for r in rows] == models
    assert all(float(r["heldout_ppl"]) > 1 for r in rows)
    table = (root / "report" / "summary.md").read_text()
    for model in models:
        assert f"| {model} |" in table
    plots = list((root / "report" / "plots").glob("*.png"))
    assert plots and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots)


def test_rerun_of_the_whole_pipeline_is_a_noop(run):
    import importlib

    root = run["root"]
    markers = {p: p.read_bytes() for p in root.rglob("_COMPLETE.json")}
    started = time.monotonic()
    for stage in STAGES:
        assert importlib.import_module(f"pipeline.{stage}").main(["--config", str(run["config"])]) == 0
    assert {p: p.read_bytes() for p in root.rglob("_COMPLETE.json")} == markers
    assert time.monotonic() - started < sum(run["seconds"].values())
