"""A token in the environment never reaches a log, config dump, result or report of a full tiny run.

The token is also handed to the pipeline the way users leak it by accident — as a config value that every stage
dumps (``student.revision``, ignored for local model directories) — so the test fails if any writer skips redaction,
not only if nobody happens to print the environment.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from pipeline import cache, evaluate, manifest, report, train
from tests.conftest import write_config

TOKEN = "hf_abcdefGHIJKLmnopqrSTUVWXyz0123456789"
OTHER = "sk-proj-0123456789abcdefSECRET"


def test_environment_tokens_never_reach_logs_config_dumps_or_reports(tmp_path, tiny_assets, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("OPENAI_API_KEY", OTHER)
    config = write_config(
        tmp_path,
        tiny_assets,
        {
            "student.revision": TOKEN,
            "train.variants": {"ce": {}, "kd": {"ce_weight": 0.5, "response": {"weight": 0.5}}},
            "train.max_steps": 2,
            "train.checkpoint_every": 2,
            "train.eval_every": 2,
        },
    )
    for stage in (manifest, cache, train, evaluate, report):
        assert stage.main(["--config", str(config)]) == 0, stage.__name__
    console = capsys.readouterr()

    files = [p for root in ("runs", "logs") for p in (tmp_path / root).rglob("*") if p.is_file()]
    written = {p.relative_to(tmp_path): p.read_bytes() for p in files}
    kinds = {Path(*p.parts[:3]).as_posix() for p in written}
    for stage in ("manifest", "cache", "train", "evaluate", "report"):  # every stage wrote logs and outputs
        assert f"logs/tiny/{stage}" in kinds and f"runs/tiny/{stage}" in kinds, stage
    dumps = [yaml.safe_load(written[p]) for p in written if p.name == "config.yaml"]  # still valid YAML
    assert len(dumps) >= 5 and all(d["student"]["revision"] == "***" for d in dumps)
    assert any(p.name == "summary.md" for p in written) and any(p.name == "results.json" for p in written)
    for secret in (TOKEN, OTHER):
        leaks = [str(p) for p, data in written.items() if secret.encode() in data]
        assert not leaks, f"{secret[:6]}… written to {leaks}"
        assert secret not in console.out + console.err
