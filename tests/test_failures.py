"""The failure catalogue (README "Failure catalogue"): every bad input ends the stage with a non-zero exit code and
one line naming the culprit, and leaves what earlier runs wrote intact.

One complete tiny run (manifest + cache) is built once for the module and copied per test. "Intact" means: every
file under ``runs/`` keeps its bytes, except the files a case damages on purpose and, for a stage that is re-run
with another configuration, that stage's own resolved-config dump and completion marker, which the stage wrapper
rewrites/withdraws by design before it starts (so an interrupted redo can never look complete).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import cache, manifest, train
from pipeline import cache_format as cf
from tests.conftest import write_config

STAGES = {"manifest": manifest.main, "cache": cache.main, "train": train.main}


@pytest.fixture(scope="module")
def base_runs(tmp_path_factory, tiny_assets) -> Path:
    """runs/ of one complete manifest + cache of the tiny config."""
    root = tmp_path_factory.mktemp("failures_base")
    config = write_config(root, tiny_assets)
    assert manifest.main(["--config", str(config)]) == 0
    assert cache.main(["--config", str(config)]) == 0
    return root / "runs"


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def cache_shards(run: Path, split: str = "train") -> list[Path]:
    return sorted((run / "cache").glob(f"{split}-*.parquet"))


def rewrite_shard(path: Path, meta: dict | None = None, drop: str | None = None, nan: str | None = None) -> None:
    """Rewrite a cache shard with changed metadata, a dropped column or a NaN in a float column."""
    table = pq.read_table(path)
    stored = json.loads(table.schema.metadata[cf.META_KEY])
    if drop:
        table = table.drop_columns([drop])
    if nan:
        column = table.column(nan).combine_chunks()
        values = column.flatten().to_numpy(zero_copy_only=False).copy()
        values[3] = np.nan
        index = table.schema.get_field_index(nan)
        table = table.set_column(index, nan, pa.FixedSizeListArray.from_arrays(pa.array(values), column.type.list_size))
    table = table.replace_schema_metadata({cf.META_KEY: json.dumps({**stored, **(meta or {})}).encode()})
    pq.write_table(table, path)


def zero_column(path: Path, name: str = "topk_logprobs") -> None:
    """Zero the middle half of one column chunk's compressed pages (the footer stays readable)."""
    column = next(
        c
        for c in (pq.read_metadata(path).row_group(0).column(i) for i in range(pq.read_metadata(path).num_columns))
        if c.path_in_schema.split(".")[0] == name
    )
    data = bytearray(path.read_bytes())
    start, size = column.data_page_offset, column.total_compressed_size
    data[start + size // 4 : start + 3 * size // 4] = bytes(3 * size // 4 - size // 4)
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def block_dir(path: Path) -> None:
    """A file where the stage wants a directory: unwritable even for root (permission bits are not)."""
    path.write_text("not a directory")


def block_logs(run: Path) -> list[Path]:
    blocker = run.parent.parent / "logs_blocked"
    block_dir(blocker)
    return [blocker]


@dataclasses.dataclass
class Case:
    stage: str
    args: list[str]
    message: str | tuple[str, ...]  # substring(s) the output must contain: they name the culprit
    code: int = 1
    damage: Callable[[Path], list[Path]] = lambda run: []  # breaks inputs on purpose; returns what it changed
    redone: bool = False  # the stage had completed with another config: its marker/config.yaml may change


def each(paths_of: Callable[[Path], list[Path]], how: Callable[[Path], None]) -> Callable[[Path], list[Path]]:
    def damage(run: Path) -> list[Path]:
        paths = paths_of(run)
        for path in paths:
            how(path)
        return paths

    return damage


def shard(name: str) -> Callable[[Path], list[Path]]:
    return lambda run: [run / "cache" / name]


KD = ["--variant", "kd"]
CASES = {
    # ---- cache shards as the training stage reads them
    "corrupt shard": Case(
        "train", KD, ("/cache/train-", ".parquet: row group 0 unreadable"), damage=each(cache_shards, zero_column)
    ),
    "truncated shard": Case(
        "train", KD, "train-00000.parquet: not a readable Parquet cache shard",
        damage=each(shard("train-00000.parquet"), truncate),
    ),
    "shard from another teacher": Case(
        "train", KD, "train-00003.parquet: teacher_fingerprint='0000000000000000' differs",
        damage=each(shard("train-00003.parquet"), lambda p: rewrite_shard(p, {"teacher_fingerprint": "0" * 16})),
    ),
    "shard from another tokenizer": Case(
        "train", KD, "train-00000.parquet: teacher vocabulary (hash 0123456789abcdef",
        damage=each(shard("train-00000.parquet"), lambda p: rewrite_shard(p, {"vocab_hash": "0123456789abcdef"})),
    ),
    "missing column": Case(
        "train", KD, "train-00002.parquet: column 'tail_logmass' missing",
        damage=each(shard("train-00002.parquet"), lambda p: rewrite_shard(p, drop="tail_logmass")),
    ),
    "wrong cache format version": Case(
        "train", KD, "train-00001.parquet: cache format_version 99, this code reads",
        damage=each(shard("train-00001.parquet"), lambda p: rewrite_shard(p, {"format_version": 99})),
    ),
    "NaN/inf in cached values": Case(
        "train", KD, ("/cache/train-", ".parquet: column topk_logprobs holds NaN/inf"),
        damage=each(cache_shards, lambda p: rewrite_shard(p, nan="topk_logprobs")),
    ),
    # ---- configuration
    "unknown config key": Case("train", [*KD, "train.lrr=0.1"], "train.lrr: unknown key", code=2),
    "wrong config type": Case("train", [*KD, "train.max_steps=many"], "train.max_steps: expected int", code=2),
    "missing model path": Case(
        "train", [*KD, "student.name_or_path=/nonexistent/student"], "student.name_or_path: cannot load"
    ),
    # ---- data
    "empty dataset after filtering": Case(
        "manifest", ["manifest.min_chars=100000"], "manifest.sources: no training document left", redone=True
    ),
    "zero-weight mixture": Case(
        "manifest", ["manifest.sources.0.weight=0"], "manifest.sources: expected weights summing to a positive",
        code=2,
    ),
    "seq_len above the model's maximum": Case(
        "manifest", ["manifest.seq_len=512"], "manifest.seq_len: 512 exceeds the teacher's max_position_embeddings 256",
        redone=True,
    ),
    # ---- teacher / student shapes
    "hidden-layer index out of range (cache)": Case(
        "cache", ["cache.hidden_layers=[1,3,4]"], "cache.hidden_layers.2: hidden-state index 4 out of range",
        redone=True,
    ),
    "hidden-layer index out of range (feature KD)": Case(
        "train", ["--variant", "feature", "train.variants.feature.feature.layer_pairs=[[5,3]]"],
        "train.variants.feature.feature.layer_pairs.0.0: hidden-state index 5 out of range",
    ),
    "k larger than the vocabulary": Case(
        "cache", ["cache.top_k=100000"], "cache.top_k: expected <= the teacher's vocabulary", redone=True
    ),
    # ---- environment
    "output directory not writable": Case(
        "train", KD, "train/kd: output directory is not writable", damage=each(lambda run: [run / "train"], block_dir)
    ),
    "log directory not writable": Case(
        "train", [*KD, "logs_dir={tmp}/logs_blocked"], "logs_blocked/tiny/train: log directory is not writable",
        damage=block_logs,
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
def test_failure_names_the_culprit_exits_nonzero_and_damages_nothing(name, tmp_path, tiny_assets, base_runs, capsys):
    case = CASES[name]
    shutil.copytree(base_runs, tmp_path / "runs")
    run = tmp_path / "runs" / "tiny"
    config = write_config(tmp_path, tiny_assets)
    changed = case.damage(run)
    before = snapshot(tmp_path / "runs")
    args = [a.replace("{tmp}", str(tmp_path)) for a in case.args]
    code = STAGES[case.stage](["--config", str(config), *args])
    out = capsys.readouterr()
    text = out.out + out.err
    assert code == case.code, f"{name}: exit {code}\n{text}"
    for needle in (case.message,) if isinstance(case.message, str) else case.message:
        assert needle in text, f"{name}: {needle!r} not in\n{text}"
    assert "Traceback" not in text
    after = snapshot(tmp_path / "runs")
    allowed = {f"tiny/{case.stage}/_COMPLETE.json", f"tiny/{case.stage}/config.yaml"} if case.redone else set()
    damaged = sorted(p for p in before if after.get(p) != before[p] and p not in allowed)
    assert not damaged, f"{name} changed {damaged}"
    assert all(p.exists() for p in changed)  # the broken inputs are still there for the user to inspect
    new_outputs = [p for p in set(after) - set(before) if p.endswith((".parquet", ".safetensors", "_COMPLETE.json"))]
    assert not new_outputs, f"{name} left outputs behind: {new_outputs}"
