"""pipeline.jsonlog: the one schema every stage and the monitor write, Slurm ids, console only on rank 0,
levels, JSON-safe metrics and secrets never written anywhere."""

from __future__ import annotations

import io
import json
import math

from pipeline.jsonlog import (
    JsonLogger,
    console_progress,
    env_rank,
    open_logger,
    parse_jsonl,
    rank_log_path,
    redact,
    slurm_ids,
)

SCHEMA = ["ts", "level", "run", "stage", "job", "task", "host", "rank", "event", "message", "metrics"]


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_schema_and_slurm_ids(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "901")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "900")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.delenv("RANK", raising=False)
    assert slurm_ids() == ("900", "2") and env_rank() == 3
    log = open_logger("tiny", "cache", tmp_path)
    log.info("shard", "train-00001.parquet", rows=8, seconds=0.25)
    log.close()
    (rec,) = _lines(rank_log_path(tmp_path, "cache", 3))
    assert list(rec) == SCHEMA
    assert (rec["run"], rec["stage"], rec["job"], rec["task"], rec["rank"]) == ("tiny", "cache", "900", "2", 3)
    assert rec["metrics"] == {"rows": 8, "seconds": 0.25} and rec["ts"].endswith("+00:00")


def test_console_only_on_rank_zero_and_level_filter(tmp_path):
    s0, s1 = io.StringIO(), io.StringIO()
    r0 = JsonLogger("r", "train", tmp_path / "a.jsonl", rank=0, stream=s0, min_level="info")
    r1 = JsonLogger("r", "train", tmp_path / "b.jsonl", rank=1, stream=s1)
    for log in (r0, r1):
        log.debug("noise", "not shown")
        log.warning("slow", "step took long", step_s=3.5)
        log.close()
    assert s1.getvalue() == "" and "[train] WARNING slow: step took long step_s=3.5" in s0.getvalue()
    assert [r["event"] for r in _lines(tmp_path / "a.jsonl")] == ["slow"]  # debug below min_level: dropped


def test_metrics_are_json_safe(tmp_path):
    import numpy as np
    import torch

    log = JsonLogger("r", "train", tmp_path / "m.jsonl", console=False)
    log.info("step", loss=float("nan"), lr=torch.tensor(3e-4), n=np.int64(7), nested={"x": [1.23456789, math.inf]})
    log.close()
    (rec,) = _lines(tmp_path / "m.jsonl")  # strict JSON: NaN/inf as strings
    assert rec["metrics"] == {"loss": "nan", "lr": 0.0003, "n": 7, "nested": {"x": [1.23457, "inf"]}}


def test_secrets_never_reach_file_or_console(tmp_path, monkeypatch):
    token = "hf_abcdefghijklmnopqrstuvwxyz0123"
    monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setenv("SHORT_TOKEN", "1")  # a flag-like value is not redacted (it would mangle text)
    stream = io.StringIO()
    log = JsonLogger("r", "evaluate", tmp_path / "s.jsonl", rank=0, stream=stream)
    log.info("auth", f"using token {token}", header=f"Bearer {token}")
    log.close()
    text = (tmp_path / "s.jsonl").read_text() + stream.getvalue()
    assert token not in text and text.count("***") == 4  # message + metric, in the file and on the console
    assert redact("1 step") == "1 step"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_only_on_an_interactive_console_with_log_lines_above_it_and_never_in_the_file(tmp_path):
    for stream, shown in ((Terminal(), True), (io.StringIO(), False)):
        log = JsonLogger("tiny", "train", tmp_path / f"{shown}.jsonl", rank=0, stream=stream)
        with console_progress(log, 4, "kd", "step", initial=1) as bar:
            bar.update(1)
            log.info("step", "kd step 2/4", loss=2.5)
            bar.update(2)
        log.close()
        console = stream.getvalue()
        assert ("kd step 2/4 loss=2.5\n" in console) and ("50%" in console and "2/4" in console) == shown
        assert "kd:" not in console or shown  # the bar's own text
        assert [r["event"] for r in _lines(tmp_path / f"{shown}.jsonl")] == ["step"]
    quiet = JsonLogger("tiny", "train", None, rank=1, console=False, stream=Terminal())
    with console_progress(quiet, 4, "kd", "step") as bar:  # another rank: no console, no bar
        bar.update(4)
    assert quiet.stream.getvalue() == ""


def test_parse_jsonl_skips_blank_lines_non_objects_and_a_torn_line_which_it_reports():
    malformed: list[str] = []
    lines = ['{"step": 1}', "", "  ", "[1, 2]", '{"step": 2, "loss": 2.5}', '{"step": 3, "lo']
    assert list(parse_jsonl(lines, malformed)) == [{"step": 1}, {"step": 2, "loss": 2.5}]
    assert malformed == ['{"step": 3, "lo']
    assert list(parse_jsonl(['{"a": 1}', "{"])) == [{"a": 1}]  # without a list: skipped silently
