"""The recipe sweep tool: every grid setting is a valid config, rows come from the real train stage and the evaluate
stage's metrics, the table compares each row with its own CE baseline, the README section between the markers is
replaced, and a setting named and made like a trained variant is measured without training again."""

from __future__ import annotations

import json
import shutil

import pytest

from pipeline import sweep
from pipeline.config import load
from tests.conftest import write_config


@pytest.mark.parametrize("setting", sweep.GRID, ids=lambda s: s.name)
def test_every_grid_setting_is_a_valid_single_variant_config(setting, tiny_assets, tmp_path):
    config = write_config(tmp_path, tiny_assets, {"cache.targets": "sampled", "cache.embed_layer": 3})
    cfg = load(config, sweep.overrides(setting, []))
    name = setting.name
    assert list(cfg.train.variants) == [name] and cfg.train.baseline_variant == name
    assert any(s.name == setting.baseline for s in sweep.GRID)
    for key, value in setting.train.items():
        assert getattr(cfg.train, key) == value


def test_table_compares_each_row_with_its_baseline():
    metrics = {"top1_agreement": 0.25, "kl_teacher_student": 2.0, "ece": 0.02, "train_s": 80.0}
    rows = [
        {"name": "ce", "recipe": "CE", "baseline": "ce", "steps": 64, "sequences_per_step": 8, "heldout_ppl": 500.0},
        {"name": "kd", "recipe": "KD", "baseline": "ce", "steps": 64, "sequences_per_step": 8, "heldout_ppl": 400.0},
    ]
    table = sweep.format_table([{**r, **metrics} for r in rows])
    assert "| `kd` | KD | 64 x 8 | 400.0 | -20.0 % |" in table
    assert "| `ce` | CE | 64 x 8 | 500.0 |  |" in table


def test_readme_section_between_the_markers_is_replaced(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\nbefore\n{sweep.BEGIN}\nold table\n{sweep.END}\nafter\n")
    sweep.write_readme(readme, "| new |", "python -m pipeline.sweep --config c")
    text = readme.read_text()
    assert "old table" not in text and "| new |" in text and text.startswith("# x\nbefore\n") and "after" in text
    readme.write_text("no markers")
    with pytest.raises(SystemExit, match="no <!-- sweep:begin -->"):
        sweep.write_readme(readme, "| new |", "c")


@pytest.mark.slow
def test_sweep_trains_and_evaluates_each_setting_through_the_stages(tiny_assets, tmp_path):
    from pipeline import cache, evaluate, manifest

    config = write_config(tmp_path, tiny_assets, {"manifest.max_tokens": 2000, "train.max_steps": 2,
                                                  "train.threads": 1, "cache.targets": "sampled"})  # fmt: skip
    assert manifest.main(["--config", str(config)]) == 0 and cache.main(["--config", str(config)]) == 0
    readme = tmp_path / "README.md"
    readme.write_text(f"{sweep.BEGIN}\n{sweep.END}\n")
    assert sweep.main(["--config", str(config), "--only", "ce,kd_sampled", "--readme", str(readme)]) == 0
    saved = json.loads((tmp_path / "runs" / "tiny" / "sweep" / "sweep.json").read_text())
    assert [r["name"] for r in saved["rows"]] == ["ce", "kd_sampled"]
    assert all(r["steps"] == 2 and r["heldout_ppl"] > 1 for r in saved["rows"])
    assert "| `kd_sampled` | 0.5 CE + 0.5 sampled" in readme.read_text()
    # the evaluate stage computes the same numbers for that student
    assert evaluate.main(["--config", str(config), "--model", "ce", "evaluate.local_tasks=false"]) == 0
    results = json.loads((tmp_path / "runs" / "tiny" / "evaluate" / "ce" / "results.json").read_text())
    assert results["intrinsic"]["heldout_ppl"] == pytest.approx(saved["rows"][0]["heldout_ppl"], rel=1e-9)
    summary = tmp_path / "runs" / "tiny" / "train" / "ce" / "summary.json"
    before = summary.stat().st_mtime_ns
    shutil.rmtree(tmp_path / "runs" / "tiny" / "sweep")
    assert sweep.main(["--config", str(config), "--only", "ce"]) == 0
    assert summary.stat().st_mtime_ns == before, "a finished setting is reused, not trained again"


def test_rows_of_separate_invocations_build_one_table_in_grid_order(tmp_path):
    path = tmp_path / "sweep.json"
    sweep.record(path, {"name": "kd", "heldout_ppl": 2.0}, "a")
    sweep.record(path, {"name": "ce", "heldout_ppl": 3.0}, "b")
    rows = sweep.record(path, {"name": "kd", "heldout_ppl": 1.0}, "c")
    assert [(r["name"], r["heldout_ppl"]) for r in rows] == [("ce", 3.0), ("kd", 1.0)]
    assert json.loads(path.read_text())["last_command"] == "c"
