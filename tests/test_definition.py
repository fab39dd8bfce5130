"""The pipeline definition: order, unit-level upstream edges, and that every user reads it (stage wrappers, the
Slurm resources schema, the executors) instead of writing the chain again."""

from __future__ import annotations

import dataclasses
import importlib

import pytest

from pipeline import config as config_mod
from pipeline import definition


def test_order_and_upstream_edges(tiny_config):
    cfg = config_mod.load(tiny_config())
    assert definition.STAGES == ("manifest", "cache", "train", "evaluate", "report")
    assert definition.units(cfg, "train") == ["ce", "kd", "feature", "relation"]
    assert definition.units(cfg, "evaluate") == ["ce", "kd", "feature", "relation", "teacher"]
    assert definition.upstream(cfg, "cache", None) == [("manifest", None)]
    assert definition.upstream(cfg, "train", "kd") == [("cache", None)]
    assert definition.upstream(cfg, "evaluate", "kd") == [("manifest", None), ("cache", None), ("train", "kd")]
    assert definition.upstream(cfg, "evaluate", "teacher") == [("manifest", None), ("cache", None)]
    report = definition.upstream(cfg, "report", None)
    assert report[:5] == [("evaluate", u) for u in ("ce", "kd", "feature", "relation", "teacher")]
    assert report[5:] == [("train", u) for u in ("ce", "kd", "feature", "relation")]
    no_teacher = config_mod.load(tiny_config(), ["evaluate.include_teacher=false"])
    assert "teacher" not in definition.units(no_teacher, "evaluate")


def test_every_stage_wrapper_takes_its_upstream_from_the_definition(tiny_config):
    cfg = config_mod.load(tiny_config())
    for stage in definition.PIPELINE:
        spec = importlib.import_module(f"pipeline.{stage.name}").SPEC
        assert spec.name == stage.name
        for unit in definition.units(cfg, stage.name):
            assert spec.upstream(cfg, unit) == definition.upstream(cfg, stage.name, unit), (stage.name, unit)
        # the report reads the complete results (an incomplete one is a note in it, not a reason to wait)
        assert spec.optional_upstream == (stage.name == "report")


def test_slurm_resources_exist_for_exactly_the_pipeline_stages():
    assert tuple(f.name for f in dataclasses.fields(config_mod.SlurmStages)) == definition.STAGES
    assert not hasattr(config_mod, "STAGES")  # one list of stages: definition.STAGES


def test_select():
    assert [s.name for s in definition.select(["train", "cache"])] == ["cache", "train"]  # pipeline order
    with pytest.raises(ValueError, match="unknown stage tokenize"):
        definition.select(["tokenize"])
