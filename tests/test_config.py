"""Config schema: every error class gives one line naming the key path, overrides (including list indices), exit
code 2 from a real stage's main, and the shipped configs validate."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline import config
from pipeline.config import ConfigError

REPO = Path(__file__).resolve().parent.parent
MINIMAL = {"run_name": "t", "teacher": {"name_or_path": "org/teacher"}, "student": {"name_or_path": "org/student"}}


def error_of(data: dict | None = None, overrides: tuple[str, ...] = (), tmp_path: Path | None = None) -> str:
    """The ConfigError message for a config mapping plus overrides; asserts it is a single line."""
    with pytest.raises(ConfigError) as info:
        if tmp_path is None:
            config.from_dict(data)
        else:
            path = tmp_path / "c.yaml"
            path.write_text(yaml.safe_dump(data))
            config.load(path, overrides)
    message = str(info.value)
    assert "\n" not in message, f"not one line: {message!r}"
    return message


def with_(**sections) -> dict:
    return {**MINIMAL, **sections}


# ---------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (with_(trian={}), "trian: unknown key (expected one of: run_name,"),
        (with_(train={"lr_max": 1.0}), "train.lr_max: unknown key"),
        (with_(train={"variants": {"kd": {"response": {"wieght": 1}}}}), "train.variants.kd.response.wieght: unknown"),
        (with_(manifest={"sources": [{"path": "json", "colour": 1}]}), "manifest.sources.0.colour: unknown key"),
        (with_(slurm={"stages": {"traim": {}}}), "slurm.stages.traim: unknown key"),
    ],
)
def test_unknown_key_names_its_path(data, expected):
    assert error_of(data).startswith(expected)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            with_(train={"variants": {"kd": {"response": {"weight": 0.5, "temperature": "hot"}}}}),
            'train.variants.kd.response.temperature: expected float > 0, got "hot"',
        ),
        (with_(train={"max_steps": "many"}), 'train.max_steps: expected int > 0, got "many"'),
        (with_(train={"max_steps": True}), "train.max_steps: expected int > 0, got true"),  # bool is not an int
        (with_(train={"max_steps": 2.5}), "train.max_steps: expected int > 0, got 2.5"),
        (with_(seed="zero"), 'seed: expected int, got "zero"'),
        (with_(cache={"hidden_layers": [1, "two"]}), 'cache.hidden_layers.1: expected int, got "two"'),
        (with_(cache={"hidden_layers": 3}), "cache.hidden_layers: expected list of int, got 3"),
        (with_(cache={"hidden_dtype": "float32"}), 'cache.hidden_dtype: expected one of "float16", "bfloat16"'),
        (with_(teacher={"name_or_path": 70}), "teacher.name_or_path: expected str, got 70"),
        (with_(train={"lora": {"enabled": "yes"}}), 'train.lora.enabled: expected bool, got "yes"'),
        (with_(evaluate={"tasks": [{"name": "mmlu", "num_fewshot": "five"}]}), "evaluate.tasks.0.num_fewshot: exp"),
        (with_(train="fast"), 'train: expected mapping, got "fast"'),
    ],
)
def test_wrong_type_names_path_expectation_and_value(data, expected):
    assert error_of(data).startswith(expected)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"teacher": {"name_or_path": "a"}, "student": {"name_or_path": "b"}}, "run_name: required value missing"),
        ({"run_name": "t", "student": {"name_or_path": "b"}}, "teacher: required value missing"),
        (with_(teacher={"dtype": "float32"}), "teacher.name_or_path: required value missing"),
        (with_(manifest={"sources": [{"split": "train"}]}), "manifest.sources.0.path: required value missing"),
        (with_(evaluate={"tasks": [{"num_fewshot": 5}]}), "evaluate.tasks.0.name: required value missing"),
    ],
)
def test_missing_required_value(data, expected):
    assert error_of(data).startswith(expected)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (with_(train={"lr": -1e-3}), "train.lr: expected float > 0, got -0.001"),
        (with_(train={"lr": 0}), "train.lr: expected float > 0, got 0"),
        (with_(manifest={"val_fraction": 1.0}), "manifest.val_fraction: expected float in [0, 1), got 1.0"),
        (with_(train={"warmup_steps": -1}), "train.warmup_steps: expected int >= 0, got -1"),
        (with_(cache={"top_k": 0}), "cache.top_k: expected int > 0, got 0"),
        (with_(train={"betas": [0.9, 1.5]}), "train.betas: expected two floats in [0, 1)"),
        (with_(run_name="a/b"), 'run_name: expected a non-empty name without "/", got "a/b"'),
        (with_(train={"baseline_variant": "base"}), "train.baseline_variant: expected one of the variants (ce, kd)"),
        (
            with_(train={"variants": {"ce": {}, "zero": {"ce_weight": 0}}}),
            "train.variants.zero: expected at least one positive loss weight",
        ),
        (
            with_(train={"variants": {"ce": {}, "f": {"feature": {"weight": 1, "layer_pairs": [[1, 9]]}}}}),
            "train.variants.f.feature.weight: needs cache.hidden_layers",
        ),
        (
            with_(train={"variants": {"ce": {}, "j": {"response": {"weight": 1, "jsd_beta": 1.0}}}}),
            "train.variants.j.response.jsd_beta: expected float in (0, 1), got 1.0",
        ),
        (with_(manifest={"seq_len": 1}), "manifest.seq_len: expected int >= 2, got 1"),
        (with_(train={"variants": {"ce": {}, "tasks": {}}}), 'train.variants.tasks: the name "tasks" is reserved'),
        (
            with_(manifest={"sources": [{"path": "json", "fields": {"txt": "body"}}]}),
            "manifest.sources.0.fields.txt: unknown field (expected one of: text,",
        ),
        (
            with_(cache={"hidden_fraction": 0.5, "hidden_every_n": 2}),
            "cache.hidden_fraction: set either hidden_fraction or hidden_every_n > 1, not both",
        ),
        (
            with_(train={"variants": {"ce": {}, "r": {"relation": {"weight": 1}}}}),
            "train.variants.r.relation.weight: needs cache.embed_layer",
        ),
        (
            with_(manifest={"sources": [{"path": "json", "weight": 0}]}),
            "manifest.sources: expected weights summing to a positive number",
        ),
    ],
)
def test_value_out_of_range_or_inconsistent(data, expected):
    assert error_of(data).startswith(expected)


def test_unreadable_and_invalid_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml: cannot read config"):
        config.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run_name: t\ntrain: {lr: [\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: line \d+ invalid YAML"):
        config.load(bad)
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        config.load(listed)


# ------------------------------------------------------------------------------------------------- overrides
def test_overrides_are_yaml_typed_and_nested(tmp_path):
    data = with_(manifest={"sources": [{"path": "json", "data_files": "a.jsonl"}, {"path": "json"}]})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    cfg = config.load(
        path,
        [
            "train.lr=3e-4",
            "cache.hidden_layers=[8,16]",
            "train.lora.enabled=true",
            "manifest.sources.1.weight=0.25",
            "manifest.sources.0.data_files=b.jsonl",
            "train.variants.kd.response.temperature=2",
            "train.variants.wide.ce_weight=1.0",
            "teacher.revision=",
        ],
    )
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    assert cfg.cache.hidden_layers == [8, 16]
    assert cfg.train.lora.enabled is True
    assert [s.weight for s in cfg.manifest.sources] == [1.0, 0.25]
    assert cfg.manifest.sources[0].data_files == "b.jsonl"
    assert cfg.train.variants["kd"].response.temperature == 2.0
    assert cfg.train.variants["kd"].response.weight == 0.5  # the rest of the default variant is kept
    assert set(cfg.train.variants) == {"ce", "kd", "wide"}
    assert cfg.teacher.revision == ""


def test_slurm_stage_override_keeps_that_stages_other_defaults(tmp_path):
    cfg = config.from_dict(with_(slurm={"stages": {"train": {"nodes": 4}}}))
    default = config.from_dict(MINIMAL)
    assert cfg.slurm.stages.train.nodes == 4
    assert cfg.slurm.stages.train.gpus_per_node == default.slurm.stages.train.gpus_per_node > 0
    assert cfg.slurm.stages.cache == default.slurm.stages.cache


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("manifest.sources.3.weight=1", "manifest.sources.3: expected a list index below 1"),
        ("manifest.sources.x.weight=1", "manifest.sources.x: expected a list index below 1"),
        ("manifest.sources.1=json", "manifest.sources.1: expected a list index below 1"),
        ("train.lr", "train.lr: expected an override of the form key.path=value"),
        ("train..lr=1", "train..lr: expected a dotted key path"),
        ("run_name.x=1", "run_name: is a value, cannot set run_name.x"),
        ("seed.x=1", "seed: expected int, got {'x': 1}"),
        ("train.lr=fast", 'train.lr: expected float > 0, got "fast"'),
        ("train.lr=-3e-4", "train.lr: expected float > 0, got -0.0003"),
        ("train.max_stpes=5", "train.max_stpes: unknown key"),
    ],
)
def test_bad_override(tmp_path, override, expected):
    data = with_(manifest={"sources": [{"path": "json"}]})
    assert error_of(data, (override,), tmp_path).startswith(expected)


# ------------------------------------------------------------------------------------------- stage exit codes
@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["train.variants.kd.response.temperature=hot"], "train.variants.kd.response.temperature: expected float > 0"),
        (["manifest.sedd=1"], "manifest.sedd: unknown key"),
    ],
)
def test_stage_main_exits_2_with_one_line(tmp_path, capsys, overrides, expected):
    from pipeline import manifest

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**MINIMAL, "runs_dir": str(tmp_path / "runs"), "logs_dir": str(tmp_path / "l")}))
    assert manifest.main(["--config", str(path), *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"config error: {err.removeprefix('config error: ')}" and len(err.splitlines()) == 1
    assert expected in err
    assert not (tmp_path / "runs").exists(), "a config error must stop the stage before it writes anything"


def test_missing_required_in_stage_main(tmp_path, capsys):
    from pipeline import manifest

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"run_name": "t", "student": {"name_or_path": "x"}}))
    assert manifest.main(["--config", str(path)]) == 2
    assert capsys.readouterr().err.strip() == "config error: teacher: required value missing (the teacher model)"


# ----------------------------------------------------------------------------------------------- shipped ones
@pytest.mark.parametrize("name", ["demo.yaml", "demo_xtok.yaml", "llama70b_to_8b.yaml", "tiny.yaml"])
def test_shipped_configs_validate_and_set_only_known_keys(name):
    cfg = config.load(REPO / "configs" / name)
    assert cfg.train.baseline_variant in cfg.train.variants
    assert any(v.response.weight > 0 for v in cfg.train.variants.values()), "no response-KD student"
    assert all(v.response.weight == 0 for k, v in cfg.train.variants.items() if k == cfg.train.baseline_variant)


def test_shipped_config_values_differ_from_defaults():
    """Config files set only values that differ from the schema defaults (nanoGPT's config/ convention)."""
    defaults = config.to_dict(config.from_dict(MINIMAL))

    def walk(data: dict, default: dict, path: str) -> list[str]:
        same = []
        for key, value in data.items():
            if isinstance(value, dict) and isinstance(default.get(key), dict) and key != "variants":
                same += walk(value, default[key], f"{path}{key}.")
            elif key in default and default[key] == value:
                same.append(f"{path}{key}")
        return same

    for name in ("demo.yaml", "demo_xtok.yaml", "llama70b_to_8b.yaml"):
        data = yaml.safe_load((REPO / "configs" / name).read_text())
        assert walk(data, defaults, "") == [], f"{name} repeats defaults"


def test_llama_config_is_the_cluster_target():
    cfg = config.load(REPO / "configs" / "llama70b_to_8b.yaml")
    assert cfg.teacher.name_or_path == "meta-llama/Llama-3.1-70B-Instruct" and cfg.teacher.device_map is None
    assert cfg.teacher.tensor_parallel == 4 and cfg.slurm.stages.cache.gpus_per_node % 4 == 0  # 2 replicas/node
    assert cfg.student.name_or_path == "meta-llama/Llama-3.1-8B"
    assert cfg.teacher.dtype == cfg.student.dtype == "bfloat16"
    assert cfg.manifest.seq_len == 4096 and cfg.cache.top_k == 64 and cfg.cache.hidden_layers
    assert cfg.train.distributed == "fsdp" and cfg.slurm.stages.train.gpus_per_node == 8
    assert cfg.slurm.stages.cache.array_tasks > 1
    assert {t.name for t in cfg.evaluate.tasks} == {"mmlu", "hellaswag", "arc_challenge", "gsm8k", "truthfulqa_mc2"}
    assert all(t.limit is None for t in cfg.evaluate.tasks), "limit is for tests only"


def test_loading_a_config_imports_no_torch():
    """``slurm status``/``cancel`` load configs on a login node: the config and its light rules stay cheap."""
    import subprocess
    import sys

    code = "import sys; from pipeline import config; config.load('configs/llama70b_to_8b.yaml')"
    code += "; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_section_hash_tracks_only_the_hashed_sections():
    a = config.from_dict(MINIMAL)
    b = config.from_dict(with_(train={"lr": 1e-3}))
    assert config.section_hash(a.cache, a.teacher) == config.section_hash(b.cache, b.teacher)
    assert config.section_hash({"train": a.train}) != config.section_hash({"train": b.train})  # nested dataclasses
    assert config.section_hash(a.train) != config.section_hash(b.train)
    assert len(config.section_hash(a.train)) == 16
