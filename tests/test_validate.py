"""Config rules that span keys or need the models' configs (pipeline/validate.py): each one is refused by
``python -m pipeline.slurm submit`` (with and without ``--dry-run``) with exit code 2 and the key path, before a
script is written or a job queued, and by every stage at start before it writes anything. Issue 12's "fatal configs
pass submit" cases are all here."""

from __future__ import annotations

import types

import pytest

from pipeline import cache, evaluate, manifest, report, slurm, train, validate
from pipeline.config import ConfigError, load
from pipeline.modeling import load_model_config

CASES = {  # name -> (overrides, the error's start)
    "tail-bucket temperature differs from the cache's capture temperature": (
        {"train.variants.kd.response.temperature": 2.0},
        "train.variants.kd.response.temperature: tail_bucket needs the capture temperature of the cache (1.0)",
    ),
    "jsd beta at an end of (0, 1)": (
        {"train.variants.kd.response.divergence": "jsd", "train.variants.kd.response.jsd_beta": 1.0},
        "train.variants.kd.response.jsd_beta: expected float in (0, 1), got 1.0",
    ),
    "feature pair on student layer 7 of a 2-layer student": (
        {"train.variants.feature.feature.layer_pairs": [[7, 3]]},
        "train.variants.feature.feature.layer_pairs.0.0: hidden-state index 7 out of range for the student with 2 "
        "layers (valid: -3..2",
    ),
    "feature pair on a teacher layer that is not cached": (
        {"train.variants.feature.feature.layer_pairs": [[2, 2]]},
        "train.variants.feature.feature.layer_pairs.0: teacher layer 2 is not cached (cache.hidden_layers=[1, 3]",
    ),
    "relation student_layer 9": (
        {"train.variants.relation.relation.student_layer": 9},
        "train.variants.relation.relation.student_layer: hidden-state index 9 out of range for the student",
    ),
    "relation variant without cached embeddings": (
        {"cache.embed_layer": None},
        "train.variants.relation.relation.weight: needs cache.embed_layer set",
    ),
    "seq_len 1": ({"manifest.seq_len": 1}, "manifest.seq_len: expected int >= 2, got 1"),
    "seq_len above the models' context": (
        {"manifest.seq_len": 300},
        "manifest.seq_len: 300 exceeds the teacher's max_position_embeddings 256",
    ),
    "teacher hidden layer out of range": (
        {"cache.hidden_layers": [1, -5]},
        "cache.hidden_layers.1: hidden-state index -5 out of range for the teacher with 3 layers (valid: -4..3",
    ),
    "the same teacher layer twice (3 and -1)": (
        {"cache.hidden_layers": [3, -1]},
        "cache.hidden_layers.1: -1 names the same hidden state as cache.hidden_layers.0",
    ),
    "embedding layer out of range": ({"cache.embed_layer": 4}, "cache.embed_layer: hidden-state index 4 out of range"),
    "top-k above the vocabulary": ({"cache.top_k": 385}, "cache.top_k: expected <= the teacher's vocabulary (384)"),
    "LoRA target module the student lacks": (
        {"train.lora.enabled": True, "train.lora.target_modules": ["q_proj", "attn_out"]},
        "train.lora.target_modules.1: no module named 'attn_out' in the student",
    ),
    "no positive loss weight": (
        {"train.variants.kd.ce_weight": 0.0, "train.variants.kd.response.weight": 0.0},
        "train.variants.kd: expected at least one positive loss weight",
    ),
    "unknown record field": (
        {"manifest.sources.0.fields": {"body": "text"}},
        "manifest.sources.0.fields.body: unknown field",
    ),
    "the ULD rule for a student that shares the teacher's vocabulary": (
        {"train.variants.kd.response.unmapped": "uld"},
        "train.variants.kd.response.unmapped: uld applies to a student with another tokenizer",
    ),
    "sampled targets from a top-k-only cache": (
        {"train.variants.kd.response.targets": "sampled"},
        'train.variants.kd.response.targets: "sampled" needs draws from the whole distribution in the cache, '
        'cache.targets is "topk"; set cache.targets: sampled',
    ),
    "pure sampled targets from a cache of tail draws": (
        {"cache.targets": "topk+sampled", "train.variants.kd.response.targets": "sampled"},
        'train.variants.kd.response.targets: "sampled" needs draws from the whole distribution in the cache',
    ),
    "sampled targets with another divergence than the forward KL": (
        {
            "cache.targets": "sampled",
            "train.variants.kd.response.targets": "sampled",
            "train.variants.kd.response.divergence": "reverse_kl",
        },
        "train.variants.kd.response.divergence: sampled and online targets are distilled with the forward KL",
    ),
    "sampled targets at another temperature than the draws'": (
        {
            "cache.targets": "topk+sampled",
            "train.variants.kd.response.targets": "topk+sampled",
            "train.variants.kd.response.temperature": 2.0,
        },
        "train.variants.kd.response.temperature: sampled targets were drawn at the capture temperature of the cache",
    ),
    "a loss top-k above the cached top-k": (
        {"train.variants.kd.response.top_k": 9},
        "train.variants.kd.response.top_k: expected <= cache.top_k (8), got 9",
    ),
    "sampled targets with a tensor-parallel teacher": (
        {"cache.targets": "sampled", "teacher.tensor_parallel": 2, "slurm.stages.cache.gpus_per_node": 2},
        'cache.targets: "sampled" draws from the whole vocabulary on one process, but teacher.tensor_parallel 2',
    ),
    "a variant named like evaluate's own directory": (
        {"train.variants.tasks": {}},
        'train.variants.tasks: the name "tasks" is reserved',
    ),
}


def submit(config, *args: str) -> int:
    return slurm.main(["submit", "--config", str(config), *args])


@pytest.mark.parametrize("name", list(CASES))
def test_submit_dry_run_refuses_every_rule_with_exit_2_and_the_key_path(name, tiny_config, tmp_path, capsys):
    overrides, message = CASES[name]
    config = tiny_config(**overrides)
    assert submit(config, "--dry-run") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"config error: {message}"), err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "logs").exists() and not (tmp_path / "runs").exists()  # no script, no record


def test_submit_without_dry_run_refuses_before_queueing(tiny_config, tmp_path, capsys):
    config = tiny_config(**{"train.variants.kd.response.temperature": 2.0})
    assert submit(config) == 2
    assert "tail_bucket needs the capture temperature" in capsys.readouterr().err
    assert not (tmp_path / "logs").exists()


def test_a_valid_config_passes_submit_dry_run(tiny_config, capsys):
    assert submit(tiny_config(), "--dry-run") == 0
    assert "dry-run   report after evaluate" in capsys.readouterr().out


def test_unknown_lm_eval_task_is_refused_at_submit(tiny_config, capsys):
    """The real lm-eval task index (tens of seconds): a misspelt task would otherwise fail after training."""
    tasks = [{"name": "kd_heldout_mc"}, {"name": "hellaswag"}, {"name": "hellaswagg"}]
    assert submit(tiny_config(**{"evaluate.tasks": tasks}), "--dry-run") == 2
    assert "evaluate.tasks.2.name: unknown lm-eval task or group 'hellaswagg'" in capsys.readouterr().err


@pytest.mark.parametrize("stage", [manifest, cache, train, evaluate, report], ids=lambda m: m.__name__)
def test_every_stage_refuses_the_same_rules_before_writing(stage, tiny_config, tmp_path, capsys):
    config = tiny_config(**{"train.variants.feature.feature.layer_pairs": [[7, 3]]})
    assert stage.main(["--config", str(config)]) == 2
    assert "layer_pairs.0.0: hidden-state index 7 out of range" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "logs").exists()


def test_the_local_executor_refuses_before_the_first_stage(tiny_config, tmp_path, capsys):
    from pipeline import run

    config = tiny_config(**{"train.variants.relation.relation.student_layer": 9})
    assert run.main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "relation.student_layer: hidden-state index 9 out of range" in err and "==>" not in err
    assert not (tmp_path / "runs").exists()


def test_one_hidden_index_normaliser():
    """Negative indices count from the end; out-of-range ones are refused (never passed through)."""
    assert [validate.hidden_index(i, 4, "k") for i in (0, 3, -1, -4)] == [0, 3, 3, 0]
    for bad in (4, -5):
        with pytest.raises(ConfigError, match=rf"k: hidden-state index {bad} out of range .* \(valid: -4\.\.3"):
            validate.hidden_index(bad, 4, "k")
    assert validate.num_hidden_states(types.SimpleNamespace(num_hidden_layers=3)) == 4


def test_negative_indices_mean_the_same_layer_everywhere(tiny_config):
    """A feature pair [-1, -1] is student block 2 and the cached teacher layer 3, in the config rules and in the
    recipe training resolves (one normaliser)."""
    cfg = load(tiny_config(**{"train.variants.feature.feature.layer_pairs": [[-1, -1]]}))
    validate.check(cfg)
    student = load_model_config(cfg.student, "student")
    meta = {"num_hidden_states": 4, "temperature": 1.0}
    recipe = train.resolve_recipe("feature", cfg.train.variants["feature"], meta, student)
    assert recipe.feature_pairs == [(2, 3)] and recipe.columns()[-1] == "hidden_3"


def test_chunked_heads_are_refused_for_models_that_transform_their_logits_after_the_head(
    tiny_config, tiny_assets, tmp_path
):
    """A soft-capping student or teacher (Gemma-2 style): the chunked head would skip the cap, so each chunked use
    is refused naming its key; whole logits (``logits_chunk: 0``) pass."""
    import json
    import shutil

    capped = {}
    for who in ("student", "teacher"):
        capped[who] = tmp_path / f"capped_{who}"
        shutil.copytree(tiny_assets[who], capped[who])
        config_json = capped[who] / "config.json"
        config_json.write_text(json.dumps({**json.loads(config_json.read_text()), "final_logit_softcapping": 30.0}))
    student = {"student.name_or_path": str(capped["student"])}
    with pytest.raises(ConfigError, match=r"^train\.logits_chunk: the student .* applies final_logit_softcapping"):
        validate.check(load(tiny_config(**student)))
    with pytest.raises(ConfigError, match=r"^evaluate\.logits_chunk: the student"):
        validate.check(load(tiny_config(**student, **{"train.logits_chunk": 0})))
    validate.check(load(tiny_config(**student, **{"train.logits_chunk": 0, "evaluate.logits_chunk": 0})))
    teacher = {"teacher.name_or_path": str(capped["teacher"])}
    with pytest.raises(ConfigError, match=r"^evaluate\.logits_chunk: the teacher"):
        validate.check(load(tiny_config(**teacher)))
    validate.check(load(tiny_config(**teacher, **{"evaluate.include_teacher": False})))
