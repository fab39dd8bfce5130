"""The failure catalogue (README "Failure catalogue"): every bad input ends the stage with a non-zero exit code and
one line naming the culprit, leaves every file under ``runs/`` byte-identical (markers and config dumps of finished
stages included: a stage checks its inputs before it touches anything), and the README's "what to do", followed
literally, makes the same command succeed.

One complete tiny run (manifest + cache) is built once for the module and copied per test. Cache damage comes in two
kinds: a shard changed after the cache stage recorded it (a disk, a person) is caught by lineage before training
reads it, and a plain ``make cache`` recomputes that shard alone; a shard the cache stage itself wrote wrong (another
teacher, an old format, NaN) is simulated by re-recording the damaged file in the cache marker (``redeclare``), so
the content checks that guard against a producer gone wrong are what must catch it.
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
from tests.conftest import redeclare, write_config

STAGES = {"manifest": manifest.main, "cache": cache.main, "train": train.main}
Command = tuple[str, list[str]]  # (stage, arguments after --config)


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
    redeclare: bool = False  # record the damaged cache as the cache stage's own output (see the module docstring)
    fix_files: Callable[[Path], None] = lambda run: None  # the advice's file actions ("delete the shard")
    fix: list[Command] = dataclasses.field(default_factory=list)  # the advice's commands, in order
    fixed_args: list[str] | None = None  # the failed command as the advice corrects it (None: unchanged)
    recomputes: bool = False  # the advice's `make cache` rewrites exactly the damaged shards


def each(paths_of: Callable[[Path], list[Path]], how: Callable[[Path], None]) -> Callable[[Path], list[Path]]:
    def damage(run: Path) -> list[Path]:
        paths = paths_of(run)
        for path in paths:
            how(path)
        return paths

    return damage


def shard(name: str) -> Callable[[Path], list[Path]]:
    return lambda run: [run / "cache" / name]


def delete_all(run: Path) -> None:
    """The advice's "delete the shard" for every shard the damage touched (the error names the first it meets)."""
    for path in cache_shards(run):
        path.unlink()


def trained_then(run: Path) -> list[Path]:
    """A finished kd student (its checkpoints, final weights, marker): what a refused rerun must leave alone."""
    config = run.parent.parent / "config.yaml"
    assert train.main(["--config", str(config), *KD]) == 0
    return []


KD = ["--variant", "kd"]
CACHE = ("cache", [])
RECACHE = ("cache", ["--force"])
CASES = {
    # ---- cache shards changed after the cache stage recorded them: lineage refuses, `make cache` redoes that shard
    "cache shard damaged after it was written": Case(
        "train", KD, ("train-00003.parquet (declared in _COMPLETE.json): changed since it was recorded (sha256",
                      "train/kd cannot start until cache is complete: run make cache first"),
        damage=each(shard("train-00003.parquet"), zero_column), fix=[CACHE], recomputes=True,
    ),
    "cache shard truncated": Case(
        "train", KD, "train-00000.parquet (declared in _COMPLETE.json): changed since it was recorded (",
        damage=each(shard("train-00000.parquet"), truncate), fix=[CACHE], recomputes=True,
    ),
    "cache shard deleted": Case(
        "train", KD, "train-00002.parquet (declared in _COMPLETE.json): missing",
        damage=each(shard("train-00002.parquet"), lambda p: p.unlink()), fix=[CACHE], recomputes=True,
    ),
    # ---- cache shards the cache stage wrote wrong: the reader's content checks
    "corrupt cache shard (damaged pages)": Case(
        "train", KD, ("/cache/train-", ".parquet: row group 0 unreadable"), damage=each(cache_shards, zero_column),
        redeclare=True, fix_files=delete_all, fix=[CACHE], recomputes=True,
    ),
    "shard from another teacher": Case(
        "train", KD, "train-00003.parquet: teacher_fingerprint='0000000000000000' differs",
        damage=each(shard("train-00003.parquet"), lambda p: rewrite_shard(p, {"teacher_fingerprint": "0" * 16})),
        redeclare=True, fix=[RECACHE],
    ),
    "shard from another tokenizer": Case(
        "train", KD, "train-00000.parquet: teacher vocabulary (hash 0123456789abcdef",
        damage=each(shard("train-00000.parquet"), lambda p: rewrite_shard(p, {"vocab_hash": "0123456789abcdef"})),
        redeclare=True, fix=[RECACHE],
    ),
    "missing column": Case(
        "train", KD, "train-00002.parquet: column 'tail_logmass' missing",
        damage=each(shard("train-00002.parquet"), lambda p: rewrite_shard(p, drop="tail_logmass")),
        redeclare=True, fix=[RECACHE],
    ),
    "wrong cache format version": Case(
        "train", KD, "train-00001.parquet: cache format_version 99, this code reads",
        damage=each(shard("train-00001.parquet"), lambda p: rewrite_shard(p, {"format_version": 99})),
        redeclare=True, fix=[RECACHE],
    ),
    "NaN/inf in cached values": Case(
        "train", KD, ("/cache/train-", ".parquet: column topk_logprobs holds NaN/inf"),
        damage=each(cache_shards, lambda p: rewrite_shard(p, nan="topk_logprobs")),
        redeclare=True, fix_files=delete_all, fix=[CACHE], recomputes=True,
    ),
    # ---- lineage: an upstream that is not what this config says, a checkpoint from other settings
    "cache made under another config": Case(
        "train", [*KD, "cache.top_k=4"],
        ("cache: its configuration changed: cache.top_k (was 8, now 4)", "run make cache first"),
        fix=[("cache", ["cache.top_k=4"])],
    ),
    "checkpoint from other settings or inputs": Case(
        "train", [*KD, "train.lr=0.01"],
        ("kd/checkpoints/step_0000006: cannot be resumed", "train.lr (was 0.001, now 0.01)", "pass --force"),
        damage=trained_then, fixed_args=[*KD, "train.lr=0.01", "--force"],
    ),
    # ---- configuration
    "unknown config key": Case("train", [*KD, "train.lrr=0.1"], "train.lrr: unknown key", code=2, fixed_args=KD),
    "wrong config type": Case(
        "train", [*KD, "train.max_steps=many"], "train.max_steps: expected int", code=2, fixed_args=KD
    ),
    "missing model path": Case(
        "train", [*KD, "student.name_or_path=/nonexistent/student"], "student.name_or_path: cannot load",
        fixed_args=KD,
    ),
    "tail-bucket temperature differs from the cache's": Case(
        "train", [*KD, "train.variants.kd.response.temperature=2.0"],
        "train.variants.kd.response.temperature: tail_bucket needs the capture temperature of the cache (1.0)",
        code=2,
        fixed_args=[*KD, "train.variants.kd.response.temperature=2.0", "train.variants.kd.response.tail=renormalize"],
    ),
    # ---- data
    "empty dataset after filtering": Case(
        "manifest", ["manifest.min_chars=100000"], "manifest.sources: no training document left", fixed_args=[]
    ),
    "zero-weight mixture": Case(
        "manifest", ["manifest.sources.0.weight=0"], "manifest.sources: expected weights summing to a positive",
        code=2, fixed_args=["manifest.sources.0.weight=1"],
    ),
    "seq_len above the model's maximum": Case(
        "manifest", ["manifest.seq_len=512"],
        "manifest.seq_len: 512 exceeds the teacher's max_position_embeddings 256", code=2, fixed_args=[],
    ),
    # ---- teacher / student shapes
    "hidden-layer index out of range (cache)": Case(
        "cache", ["cache.hidden_layers=[1,3,4]"], "cache.hidden_layers.2: hidden-state index 4 out of range",
        code=2, fixed_args=["cache.hidden_layers=[1,3]"],
    ),
    "hidden-layer index out of range (feature KD)": Case(
        "train", ["--variant", "feature", "train.variants.feature.feature.layer_pairs=[[5,3]]"],
        "train.variants.feature.feature.layer_pairs.0.0: hidden-state index 5 out of range", code=2,
        fixed_args=["--variant", "feature", "train.variants.feature.feature.layer_pairs=[[2,3]]"],
    ),
    "k larger than the vocabulary": Case(
        "cache", ["cache.top_k=100000"], "cache.top_k: expected <= the teacher's vocabulary", code=2, fixed_args=[]
    ),
    "LoRA target module the student lacks": Case(
        "train", [*KD, "train.lora.enabled=true", "train.lora.target_modules=[qkv_proj]"],
        "train.lora.target_modules.0: no module named 'qkv_proj' in the student", code=2,
        fixed_args=[*KD, "train.lora.enabled=true", "train.lora.target_modules=[q_proj,v_proj]"],
    ),
    # ---- environment
    "output directory not writable": Case(
        "train", KD, "train/kd: output directory is not writable", damage=each(lambda run: [run / "train"], block_dir),
        fix_files=lambda run: (run / "train").unlink(),
    ),
    "log directory not writable": Case(
        "train", [*KD, "logs_dir={tmp}/logs_blocked"], "logs_blocked/tiny/train: log directory is not writable",
        damage=block_logs, fixed_args=KD,
    ),
}  # fmt: skip


def shard_mtimes(run: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (run / "cache").glob("*.parquet")}


@pytest.mark.parametrize("name", list(CASES))
def test_failure_is_named_damages_nothing_and_the_advice_fixes_it(name, tmp_path, tiny_assets, base_runs, capsys):
    case = CASES[name]
    shutil.copytree(base_runs, tmp_path / "runs")
    run = tmp_path / "runs" / "tiny"
    config = write_config(tmp_path, tiny_assets)
    changed = case.damage(run)
    if case.redeclare:
        redeclare(run / "cache")
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
    damaged = sorted(p for p in set(before) | set(after) if after.get(p) != before.get(p))
    # a unit that never ran may get its config dump (a shard's NaN shows only once its rows are read): nothing else
    first_dumps = {p for p in set(after) - set(before) if p.endswith("/config.yaml")}
    assert set(damaged) <= first_dumps, f"{name} changed {damaged}"
    # the broken inputs are still there for the user to inspect (a deleted shard stays deleted)
    runs = tmp_path / "runs"
    assert all(p.exists() == (not p.is_relative_to(runs) or p.relative_to(runs).as_posix() in before) for p in changed)

    # the README's "what to do", literally
    mtimes = shard_mtimes(run)
    case.fix_files(run)
    for stage, fix_args in case.fix:
        assert STAGES[stage](["--config", str(config), *fix_args]) == 0, f"{name}: {stage} {fix_args} failed"
    if case.recomputes:  # `make cache` redid the bad shards and left every other one alone
        rewritten = {n for n, t in shard_mtimes(run).items() if mtimes.get(n) != t}
        assert rewritten == {p.name for p in changed}, f"{name}: make cache rewrote {sorted(rewritten)}"
    fixed = args if case.fixed_args is None else case.fixed_args
    code = STAGES[case.stage](["--config", str(config), *fixed])
    text = "".join(capsys.readouterr())
    assert code == 0, f"{name}: still failing after the advice: exit {code}\n{text[-2000:]}"
