"""The benchmark machinery on tiny inputs: every row is measured and lands in the JSON, the printed table and the
Markdown report. The goals themselves are not asserted here (timings on shared machines do not belong in tests)."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import subprocess

import pytest
import torch

from pipeline import bench

TINY = bench.Sizes(
    name="tiny",
    text_chars=60_000,
    vocab=300,
    teacher_hidden=32,
    teacher_layers=2,
    teacher_steps=3,
    student_hidden=32,
    student_layers=2,
    seq_len=32,
    cache_rows=24,
    rows_per_shard=8,
    batch=4,
    memory_positions=512,
    logits_chunk=64,
    gemm_n=64,
    repeats=2,
    threads=1,
    step_vocab=3000,
    step_hidden=32,
    step_seq_len=64,
    step_chunk=16,
)
ROWS = ("reader", "extraction", "memory", "kd_response", "kd_feature", "kd_relation", "student_step_memory",
        "student_step_time", "bytes", "sampled_bytes_per_token", "flops", "slurm")  # fmt: skip


def test_quick_machinery_writes_json_table_and_markdown(tmp_path, tiny_assets, capsys):
    out, markdown = tmp_path / "out", tmp_path / "BENCHMARKS.md"
    result = bench.run_bench(
        TINY, out, markdown, tiny_assets["corpus"], "python -m pipeline.bench", slurm=False, parallel=False
    )
    table = capsys.readouterr().out

    saved = json.loads((out / "bench.json").read_text())
    assert saved["rows"] == result["rows"]
    rows = {row["key"]: row for row in saved["rows"]}
    assert tuple(rows) == ROWS
    for key in ROWS[:-1]:
        assert rows[key]["value"] > 0, key
        assert rows[key]["status"] in ("pass", "FAIL", "info"), key
    assert rows["slurm"]["status"] == "skipped" and "skipped" in rows["slurm"]["detail"]
    assert saved["assets"]["text"] == bench.shown_path(tiny_assets["corpus"])
    assert saved["assets"]["vocab"] <= TINY.vocab
    assert len(saved["raw"]["extraction"]["times_s"]["bare"]) == TINY.repeats
    assert saved["raw"]["bytes"]["tokens"] == TINY.cache_rows * TINY.seq_len
    assert saved["machine"]["torch"] == torch.__version__ and saved["machine"]["cores"] >= 1
    assert len(list((out / "cache").glob("train-*.parquet"))) == TINY.cache_rows // TINY.rows_per_shard
    step = saved["raw"]["student_step"]
    assert len(step["times_s"]["chunked"]) == len(step["times_s"]["whole"]) == TINY.repeats
    assert step["peaks"]["whole"]["step_rise_bytes"] > 0 and step["positions"] == TINY.step_batch * TINY.step_seq_len

    for row in result["rows"]:  # one table line per row, in the terminal and in the report
        assert f"| {row['name']} |" in table
    report = markdown.read_text()
    assert bench.format_table([bench.Row(**{k: v for k, v in r.items() if k != "status"}) for r in result["rows"]]) in (
        report
    )
    assert saved["machine"]["cpu"] in report and "python -m pipeline.bench" in report


@pytest.mark.parametrize(
    ("value", "goal", "op", "status"),
    [(31.0, 30.0, ">=", "pass"), (29.0, 30.0, ">=", "FAIL"), (1.05, 1.1, "<=", "pass"), (1.2, 1.1, "<=", "FAIL"),
     (None, 15.0, "<=", "skipped"), (0.3, None, "", "info")],
)  # fmt: skip
def test_row_status_compares_with_the_goal(value, goal, op, status):
    assert bench.Row("k", "n", value, "x", goal, op).status == status


def test_forward_flops_counts_every_matmul_and_attention():
    model = bench.tiny_llama(vocab=100, hidden=32, layers=2, max_positions=64, seed=0)
    h, i, kv = 32, 64, 32 // 4 * 2  # 4 heads of 8, 2 KV heads
    per_layer = h * h + 2 * h * kv + h * h + 3 * h * i  # q, k+v, o, gate/up/down
    linear = 2 * per_layer + 100 * h  # + LM head; the embedding lookup is no matmul
    tokens = 3 * 16
    assert bench.forward_flops(model, 3, 16) == 2 * linear * tokens + 4 * 2 * 16 * h * tokens


def test_text_falls_back_to_the_repository_sources(tmp_path):
    text, source = bench.load_text(tmp_path / "missing.jsonl", 5000)
    assert len(text) == 5000 and "repository sources" in source


def test_slurm_row_is_skipped_with_a_note_without_a_cluster(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol/sbatch on PATH
    row, raw = bench.bench_slurm(tmp_path, lambda msg: None)
    assert row.status == "skipped" and "no Slurm cluster" in row.detail and raw == {}


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("scontrol") is None or subprocess.run(["scontrol", "ping"], capture_output=True).returncode != 0,
    reason="no local Slurm cluster (make cluster)",
)
def test_slurm_chain_of_five_trivial_jobs_completes(tmp_path):
    row, raw = bench.bench_slurm(tmp_path, lambda msg: None)
    assert row.value is not None and row.value > 0, row.detail
    assert raw["jobs"] == 5 and set(raw["states"].values()) == {"COMPLETED"}
    record = json.loads((tmp_path / "slurm" / "logs" / "bench_slurm" / "slurm" / "submission.json").read_text())
    assert [job["stage"] for job in record["jobs"]] == ["manifest", "cache", "train", "evaluate", "report"]


@pytest.mark.slow
def test_teacher_parallel_rows_compare_dp_and_tp_caches_with_one_process(tmp_path, tiny_assets):
    """The rows of ``bench_parallel``: 1 process, DP=2 and TP=2 under torchrun cache the same rows; DP is byte for
    byte the single process, TP within storage rounding; tokens/s of each mode side by side."""
    sizes = dataclasses.replace(TINY, parallel_rows=8, parallel_shards=2)
    torch.set_num_threads(1)
    assets = bench.build_assets(sizes, tiny_assets["corpus"], torch.device("cpu"), lambda msg: None)
    rows, raw = bench.bench_parallel(assets, sizes, tmp_path, lambda msg: None)
    by_key = {row.key: row for row in rows}
    assert list(by_key) == ["parallel_dp", "parallel_tp", "parallel_speed"] and raw["tensor_parallel"] == 2
    assert by_key["parallel_dp"].value == 0 and raw["dp"]["identical_shards"] == 2
    assert by_key["parallel_tp"].status == "pass" and raw["tp"]["within_rounding"]
    assert all(raw["results"][mode]["tokens_per_s"] > 0 for mode in ("single", "dp", "tp"))
    assert raw["results"]["tp"]["processes"] == 2 and "tokens/s" in by_key["parallel_speed"].detail


def test_step_time_ratios_measures_every_kd_family(tiny_assets):
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(tiny_assets["student"])
    result = bench.step_time_ratios(student, batch_size=2, seq_len=16, top_k=4, teacher_dim=64, repeats=1)
    assert set(result) == {f"{n}_s" for n in ("ce", "response", "feature", "relation")} | {
        f"{n}_ratio" for n in ("response", "feature", "relation")
    }
    assert all(math.isfinite(v) and v > 0 for v in result.values())
