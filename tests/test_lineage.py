"""Lineage test matrix: for each stage and each of its inputs, change the input (rebuild it with another setting,
delete a file, corrupt a file, add a stray file) and check that the stage redoes exactly the affected work or
refuses naming the culprit, never exiting 0 on stale data; a refused rerun leaves every finished output
byte-identical. Every scenario of issue 12 is here.

One complete tiny run (manifest, cache, train kd, evaluate kd + teacher without lm-eval, report) is built once and
copied per test. Its config names the models and data by relative paths (``teacher``, ``student``, ``corpus.jsonl``:
symlinks to the fixtures in each test's directory), so a test can put a different teacher or student at the same
path, the way a user replaces a checkpoint in place.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from pipeline import cache, evaluate, manifest, report, train
from pipeline import config as config_mod
from pipeline.rundir import RunDir, stage_spec, unit_state

STAGES = {"manifest": manifest.main, "cache": cache.main, "train": train.main, "evaluate": evaluate.main,
          "report": report.main}  # fmt: skip
UNITS = [("manifest", None), ("cache", None), ("train", "kd"), ("evaluate", "kd"), ("evaluate", "teacher"),
         ("report", None)]  # fmt: skip
SETTINGS = {  # relative to the run's directory; everything else from configs/tiny.yaml
    "teacher.name_or_path": "teacher",
    "student.name_or_path": "student",
    "manifest.sources.0.data_files": "corpus.jsonl",
    "train.variants": {"kd": {"ce_weight": 0.5, "response": {"weight": 0.5}}},
    "train.baseline_variant": "kd",
    "evaluate.local_tasks": False,
    "monitor.enabled": False,
}


def link_assets(root: Path, assets: dict[str, Path]) -> None:
    for name, target in (("teacher", assets["teacher"]), ("student", assets["student"]), ("corpus.jsonl",
                         assets["corpus"])):  # fmt: skip
        (root / name).symlink_to(target)


def write_run_config(root: Path) -> Path:
    data = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    for key, value in SETTINGS.items():
        config_mod.apply_override(data, key.split("."), value)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_assets) -> Path:
    """A directory holding runs/ of one complete run of every stage."""
    root = tmp_path_factory.mktemp("lineage_base")
    link_assets(root, tiny_assets)
    config = write_run_config(root)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        for name, main in STAGES.items():
            assert main(["--config", str(config)]) == 0, name
    finally:
        os.chdir(cwd)
    return root


class Run:
    """One test's copy of the base run, with the working directory inside it."""

    def __init__(self, root: Path, capsys) -> None:
        self.root, self.capsys = root, capsys
        self.config = root / "config.yaml"
        self.dir = root / "runs" / "tiny"

    def __call__(self, stage: str, *args: str) -> tuple[int, str]:
        self.capsys.readouterr()
        code = STAGES[stage](["--config", str(self.config), *args])
        out = self.capsys.readouterr()
        return code, out.out + out.err

    def ok(self, stage: str, *args: str) -> str:
        code, text = self(stage, *args)
        assert code == 0, text[-3000:]
        return text

    def refused(self, stage: str, *args: str, names: tuple[str, ...]) -> str:
        """The stage exits 1 naming every string in ``names``, and runs/ keeps every byte."""
        before = self.snapshot()
        code, text = self(stage, *args)
        assert code == 1, text[-3000:]
        for needle in names:
            assert needle in text, f"{needle!r} not in\n{text[-3000:]}"
        assert self.snapshot() == before, "a refused rerun changed files"
        return text

    def state(self, stage: str, unit: str | None = None, *overrides: str):
        cfg = config_mod.load(self.config, list(overrides))
        return unit_state(stage_spec(stage), cfg, RunDir.from_config(cfg), unit)

    def snapshot(self, under: str = "") -> dict[str, str]:
        root = self.dir / under
        return {
            str(p.relative_to(self.dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in root.rglob("*")
            if p.is_file()
        }

    def mtimes(self, under: str) -> dict[str, int]:
        return {p.name: p.stat().st_mtime_ns for p in (self.dir / under).glob("*.parquet")}

    def replace_model(self, name: str) -> None:
        """A new checkpoint at the same path (here: the same weights with an edited config.json)."""
        link = self.root / name
        target = link.resolve()
        link.unlink()
        shutil.copytree(target, link)
        config = json.loads((link / "config.json").read_text())
        (link / "config.json").write_text(json.dumps({**config, "note": "retrained"}, indent=1))


@pytest.fixture
def run(base, tmp_path, tiny_assets, capsys, monkeypatch) -> Run:
    link_assets(tmp_path, tiny_assets)
    shutil.copytree(base / "runs", tmp_path / "runs", symlinks=True)  # copy2: mtimes kept, as `cp -a` keeps them
    write_run_config(tmp_path)
    monkeypatch.chdir(tmp_path)
    return Run(tmp_path, capsys)


def test_a_complete_run_is_complete_and_a_rerun_of_every_stage_is_a_noop(run):
    assert all(run.state(stage, unit).complete for stage, unit in UNITS)
    before = run.snapshot()
    for stage in STAGES:
        assert "already complete" in run.ok(stage)
    assert run.snapshot() == before


def test_unit_state_has_no_side_effects_and_names_the_culprit_for_every_unit(run):
    """What ``slurm submit`` calls: after a change upstream every downstream unit is incomplete, the reason names
    the file and the unit it belongs to, and nothing on disk moves."""
    (run.dir / "cache" / "train-00004.parquet").unlink()
    before = run.snapshot()
    states = {(stage, unit): run.state(stage, unit) for stage, unit in UNITS}
    assert run.snapshot() == before
    assert states["manifest", None].complete and states["evaluate", "teacher"].complete is False
    for key in [("cache", None), ("train", "kd"), ("evaluate", "kd"), ("evaluate", "teacher")]:
        state = states[key]
        assert not state.complete and state.culprit == "cache", key
        assert "cache/train-00004.parquet (declared in _COMPLETE.json): missing" in state.reason, key
    report_state = states["report", None]  # the report's inputs are optional: the missing ones are noted, not waited on
    assert not report_state.complete and set(report_state.waiting) == {"evaluate/kd", "evaluate/teacher", "train/kd"}


# -------------------------------------------------------------------------------------------------- manifest
def test_manifest_redoes_after_its_data_changed_and_the_cache_is_then_stale(run):
    corpus = run.root / "corpus.jsonl"
    text = corpus.read_text()
    corpus.unlink()
    corpus.write_text(text + json.dumps({"text": "A new document about the old king."}) + "\n")
    assert "data:corpus.jsonl changed" in run.state("manifest").reason
    assert "already complete" not in run.ok("manifest")
    assert run.state("cache").reason.startswith("cache: made from other inputs: manifest changed")
    run.refused("train", names=("cache: made from other inputs: manifest changed", "run make cache first"))


def test_identity_is_by_content_a_rebuild_with_the_same_bytes_changes_nothing_downstream(run):
    """This copy's manifest.json names other absolute data paths (provenance), so a forced rebuild changes its
    identity: the cache reruns, finds every shard's manifest checksum unchanged, recomputes nothing, and declares
    the same shards, so the student stays complete (evaluation reads the manifest itself, so it is redone). A
    deleted manifest shard is refused by the cache and rebuilt byte-identical by a plain manifest rerun."""
    run.ok("manifest", "--force")
    assert run.state("cache").reason.startswith("cache: made from other inputs: manifest changed")
    assert "0 to compute" in run.ok("cache")
    assert run.state("train", "kd").complete
    assert run.state("evaluate", "teacher").reason.startswith("evaluate/teacher: made from other inputs: manifest")
    (run.dir / "manifest" / "train-00001.parquet").unlink()
    run.refused("cache", names=("runs/tiny/manifest/train-00001.parquet (declared in _COMPLETE.json): missing",
                                "run make manifest first"))  # fmt: skip
    assert "already complete" not in run.ok("manifest")
    assert all(run.state(stage, unit).complete for stage, unit in UNITS[:3])


def test_manifest_rebuilt_smaller_removes_stale_shards_everywhere(run):
    """Issue 12, "removed data still trained on": the manifest rebuilt smaller; the cache recomputes what changed and
    deletes every shard no manifest shard maps to; training reads only declared shards."""
    smaller = "manifest.max_tokens=3000"
    run.ok("manifest", smaller)
    listed = json.loads((run.dir / "manifest" / "manifest.json").read_text())["splits"]
    names = {s["file"] for split in listed.values() for s in split["shards"]}
    assert {p.name for p in (run.dir / "manifest").glob("*.parquet")} == names
    # the cache under the old config: the manifest on disk was not made with it
    run.refused("cache", names=("manifest: its configuration changed: manifest.max_tokens (was 3000, now null)",
                                "run make manifest first"))  # fmt: skip
    mtimes = run.mtimes("cache")
    run.ok("cache", smaller)
    assert {p.name for p in (run.dir / "cache").glob("*.parquet")} == names
    assert {p.stem + ".parquet" for p in (run.dir / "cache" / "_shards").glob("*.json")} == names
    unchanged = {n for n, t in run.mtimes("cache").items() if mtimes.get(n) == t}
    assert unchanged  # a manifest shard with the same checksum keeps its cache shard (same signature)
    run.refused("train", smaller, names=("checkpoints/step_0000006: cannot be resumed", "inputs.cache (was"))
    run.ok("train", smaller, "--force")
    rows = listed["train"]["rows"]
    samples = [json.loads(line) for line in (run.dir / "train/kd/samples/rank_00000.jsonl").read_text().splitlines()]
    ids = [i for step in samples for i in step["sample_ids"]]
    assert ids and max(ids) < rows  # sample ids count rows of the current shards only: no stale shard was read


def test_a_stray_manifest_shard_is_never_read_and_a_rebuild_removes_it(run):
    stray = run.dir / "manifest" / "train-00099.parquet"
    shutil.copy(run.dir / "manifest" / "train-00000.parquet", stray)
    assert all(run.state(stage, unit).complete for stage, unit in UNITS)  # undeclared: not an input of anything
    run.ok("manifest", "--force")
    assert not stray.exists()


# ----------------------------------------------------------------------------------------------------- cache
def test_a_deleted_or_corrupted_cache_shard_is_refused_by_train_and_recomputed_alone(run):
    """Issue 12, "a missing shard is never noticed" (and the README's advice for a corrupt one)."""
    gone, bad = run.dir / "cache" / "train-00003.parquet", run.dir / "cache" / "val-00001.parquet"
    gone.unlink()
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: caught by its mtime, then its checksum
    bad.write_bytes(bytes(data))
    missing = "runs/tiny/cache/train-00003.parquet (declared in _COMPLETE.json): missing"
    run.refused("train", names=(missing, "run make cache first"))
    run.refused("evaluate", "--model", "teacher", names=(missing, "run make cache first"))
    mtimes = run.mtimes("cache")
    text = run.ok("cache")
    assert "2 to compute" in text
    assert {n for n, t in run.mtimes("cache").items() if mtimes.get(n) != t} == {gone.name, bad.name}
    # deterministic recompute: the same bytes, so the cache's identity and everything downstream is unchanged
    assert all(run.state(stage, unit).complete for stage, unit in UNITS)


def test_a_stray_cache_shard_is_not_read_and_the_cache_stage_removes_it(run):
    stray = run.dir / "cache" / "train-00099.parquet"
    shutil.copy(run.dir / "cache" / "train-00000.parquet", stray)
    shutil.copy(run.dir / "cache" / "_shards" / "train-00000.json", run.dir / "cache" / "_shards" / "train-00099.json")
    assert run.state("train", "kd").complete
    from pipeline.cache_format import list_cache_shards

    assert stray not in list_cache_shards(run.dir / "cache", "train")
    (run.dir / "cache" / "val-00000.parquet").unlink()  # something for the cache stage to do
    run.ok("cache")
    assert not stray.exists() and not (run.dir / "cache" / "_shards" / "train-00099.json").exists()


def test_a_new_teacher_at_the_same_path_makes_the_cache_and_everything_after_it_stale(run):
    run.replace_model("teacher")
    assert run.state("manifest").complete
    reason = run.state("cache").reason
    assert reason.startswith("cache: made from other inputs: weights:teacher changed (was ")
    run.refused("train", names=(reason, "train/kd cannot start until cache is complete: run make cache first"))
    run.refused("evaluate", "--model", "teacher", names=("weights:teacher changed",))


def test_a_cache_config_the_cache_was_not_made_with_is_refused_downstream(run):
    run.refused("train", "cache.top_k=4", names=("cache: its configuration changed: cache.top_k (was 8, now 4)",
                                                 "run make cache first"))  # fmt: skip
    # an execution knob is not part of what the cache holds
    assert run.state("train", "kd", "cache.batch_size=2").complete


# ----------------------------------------------------------------------------------------------------- train
def test_stale_student_after_a_recache_is_refused_then_retrained_with_force(run):
    """Issue 12, "stale student after a re-cache"."""
    final = run.dir / "train/kd/final/model.safetensors"
    old = final.read_bytes()
    run.ok("cache", "--force", "cache.top_k=4")
    run.refused("train", names=("cache: its configuration changed: cache.top_k (was 4, now 8)",))
    refusal = ("train/kd/checkpoints/step_0000006: cannot be resumed", "inputs.cache (was ", "pass --force to train")
    text = run.refused("train", "cache.top_k=4", names=refusal)
    assert "[train] resumed" not in text and final.read_bytes() == old
    run.ok("train", "cache.top_k=4", "--force")
    assert final.read_bytes() != old
    checkpoint = json.loads((run.dir / "train/kd/checkpoints/step_0000006/trainer_state.json").read_text())
    assert checkpoint["resume"]["inputs.cache"] == run.state("train", "kd", "cache.top_k=4").inputs["cache"]


def test_a_refused_rerun_leaves_the_finished_student_byte_identical(run):
    """Issue 12, "a refused rerun destroys the finished result": another train.lr is refused before final/,
    summary.json, the marker or config.yaml is touched; the old config still finds the unit complete."""
    before = run.snapshot("train")
    run.refused("train", "train.lr=0.002", names=("cannot be resumed", "train.lr (was 0.001, now 0.002)"))
    assert run.snapshot("train") == before and run.state("train", "kd").complete


def test_a_new_student_at_the_same_path_is_not_resumed(run):
    run.replace_model("student")
    assert run.state("train", "kd").reason.startswith("train/kd: made from other inputs: weights:student changed")
    run.refused("train", names=("cannot be resumed", "inputs.weights:student (was "))
    run.ok("train", "--force")
    assert run.state("train", "kd").complete


def test_a_deleted_final_model_is_restored_from_the_checkpoint(run):
    final = run.dir / "train/kd/final/model.safetensors"
    old = final.read_bytes()
    final.unlink()
    assert "final/model.safetensors (declared in _COMPLETE.json): missing" in run.state("train", "kd").reason
    run.refused("evaluate", "--model", "kd", names=("train/kd", "run make train first"))
    assert "resumed: kd: from step_0000006" in run.ok("train")
    assert final.read_bytes() == old  # same checkpoint, same inputs: the same weights, with zero steps run


def test_an_operational_knob_resumes_instead_of_retraining(run):
    assert "resumed: kd: from step_0000006" in run.ok("train", "train.log_every=2")


# -------------------------------------------------------------------------------------------------- evaluate
def test_a_retrained_student_makes_only_its_evaluation_stale_and_the_report_says_so(run):
    run.ok("train", "--force", "train.lr=0.002")
    assert run.state("evaluate", "teacher", "train.lr=0.002").complete
    assert run.state("evaluate", "kd", "train.lr=0.002").reason.startswith(
        "evaluate/kd: made from other inputs: train/kd changed"
    )
    run.ok("report", "train.lr=0.002")
    summary = json.loads((run.dir / "report/summary.json").read_text())
    assert set(summary["models"]) == {"teacher"}
    assert any(n.startswith("model kd: no evaluation (evaluate/kd: made from other inputs") for n in summary["notes"])
    text = run.ok("evaluate", "train.lr=0.002")
    assert "evaluate/teacher is already complete" in text
    assert "evaluate/kd is already complete" not in text
    run.ok("report", "train.lr=0.002")
    assert set(json.loads((run.dir / "report/summary.json").read_text())["models"]) == {"kd", "teacher"}


def test_an_edited_result_is_not_complete_and_a_stray_model_is_not_reported(run):
    results = run.dir / "evaluate/kd/results.json"
    results.write_text(results.read_text().replace('"step": 6', '"step": 60'))
    assert "evaluate/kd/results.json (declared in _COMPLETE.json): changed" in run.state("evaluate", "kd").reason
    shutil.copytree(run.dir / "evaluate/kd", run.dir / "evaluate/ghost")  # a model no longer in the config
    run.ok("evaluate")
    run.ok("report")
    summary = json.loads((run.dir / "report/summary.json").read_text())
    assert set(summary["models"]) == {"kd", "teacher"} and summary["models"]["kd"]["step"] == 6
