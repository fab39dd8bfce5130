"""Evaluate stage: real lm-eval on tiny models with the offline tasks, intrinsic metrics on a real cache, layout,
teacher reuse, and the report parsing lm-eval's real output."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import corpus_texts, mark_complete, write_config

from pipeline import evaluate, report, rundir
from pipeline.cache_format import write_shard
from pipeline.config import ConfigError, load
from pipeline.data_format import read_manifest, read_packed_shard, shard_paths
from pipeline.modeling import HIDDEN_INDEX_CONVENTION, load_causal_lm, load_tokenizer, vocab_hash, vocab_size
from pipeline.rundir import RunDir

REPO = Path(__file__).resolve().parent.parent
VARIANTS = {"ce": {}, "kd": {"ce_weight": 0.5, "response": {"weight": 0.5}}}


def run_manifest(cfg_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.manifest", "--config", str(cfg_path)], cwd=REPO, capture_output=True
    )
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]


@torch.inference_mode()
def write_val_cache(cfg, rd: RunDir) -> None:
    """A held-out cache from the teacher's real logits (what the cache stage writes), plus its marker."""
    teacher = load_causal_lm(cfg.teacher, "teacher", torch.device("cpu"))
    tok = load_tokenizer(cfg.teacher)
    manifest_dir = rd.stage_dir("manifest")
    k = cfg.cache.top_k
    names = []
    for path in shard_paths(read_manifest(manifest_dir), manifest_dir, "val"):
        shard = read_packed_shard(path)
        ids = torch.from_numpy(shard["input_ids"].astype(np.int64))
        logp = torch.log_softmax(teacher(input_ids=ids).logits.float(), -1)
        top_lp, top_ids = logp.topk(k, dim=-1)
        tail = torch.log1p(-top_lp.exp().sum(-1).clamp(max=1 - 1e-6))
        rows, seq_len = ids.shape
        meta = dict(
            teacher=cfg.teacher.name_or_path, teacher_fingerprint="test", vocab_hash=vocab_hash(tok),
            vocab_size=vocab_size(tok), top_k=k, temperature=1.0, dtype="float32", hidden_layers=[], hidden_dim=64,
            hidden_dtype="float16", hidden_positions=None, hidden_index_convention=HIDDEN_INDEX_CONVENTION,
            num_hidden_states=4, embed_layer=None, seq_len=seq_len, split="val", manifest_shard=path.name,
            manifest_sha256=rundir.file_sha256(path), rows=rows, targets="topk", sampling=None,
        )  # fmt: skip
        columns = {
            "sample_id": shard["sample_id"],
            "input_ids": shard["input_ids"],
            "attention_mask": shard["attention_mask"],
            "topk_ids": top_ids.int().numpy(),
            "topk_logprobs": top_lp.half().numpy(),
            "tail_logmass": tail.half().numpy(),
        }
        write_shard(rd.stage_dir("cache") / path.name, columns, meta)
        names.append(path.name)
    mark_complete(cfg, "cache", None, names, {"tokens": 1.0})


def write_trained(cfg, rd: RunDir, variant: str, student: Path) -> None:
    """A trained variant as the train stage leaves it: final/ HF dir, summary.json, metrics.jsonl, marker."""
    vdir = rd.stage_dir("train", variant)
    shutil.copytree(student, vdir / "final")
    summary = {"variant": variant, "steps": 6, "tokens": 768, "wall_time_s": 3.0}
    (vdir / "summary.json").write_text(json.dumps(summary))
    (vdir / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 6.0 - s / 10}) + "\n" for s in range(6)))
    files = [str(p.relative_to(vdir)) for p in (vdir / "final").iterdir()] + ["summary.json", "metrics.jsonl"]
    mark_complete(cfg, "train", variant, files)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory, tiny_assets):
    """Config + run dir with a real manifest, a real held-out cache and two 'trained' variants (built once; the
    tests below run in file order and the last one breaks a variant on purpose)."""
    root = tmp_path_factory.mktemp("evaluate")
    overrides = {"train.variants": VARIANTS, "evaluate.tasks": [], "evaluate.local_task_docs": 24}
    cfg_path = write_config(root, tiny_assets, overrides)
    cfg = load(cfg_path)
    rd = RunDir.from_config(cfg)
    run_manifest(cfg_path)
    write_val_cache(cfg, rd)
    for variant in VARIANTS:
        write_trained(cfg, rd, variant, tiny_assets["student"])
    return cfg_path, cfg, rd


def test_heldout_documents_and_mc_items(upstream):
    _, cfg, rd = upstream
    docs = evaluate.heldout_documents(rd.stage_dir("manifest"), load_tokenizer(cfg.teacher), 1000)
    corpus = set(corpus_texts(240))
    assert len(docs) >= 20 and all(d in corpus for d in docs)  # EOS splitting recovers whole documents
    items = evaluate.build_mc_items(docs, 4, seed=0, passage_words=1000)  # whole documents
    assert items == evaluate.build_mc_items(docs, 4, seed=0, passage_words=1000)
    assert len(items) >= 0.8 * len(docs)
    for item in items:
        assert len(item["choices"]) == 4 and len(set(item["choices"])) == 4
        true = item["choices"][item["label"]]
        assert any(" ".join(d.split()) == f"{item['context']} {true}" for d in docs)
        assert all(len(c.split()) <= len(true.split()) for c in item["choices"])
    labels = [i["label"] for i in items]
    assert len(set(labels)) > 1  # the answer position is shuffled


def test_long_documents_give_one_mc_item_per_passage():
    docs = [" ".join(f"d{d}w{w}" for w in range(n)) for d, n in enumerate((70, 40, 9, 3))]
    items = evaluate.build_mc_items(docs, 3, seed=1, passage_words=16)
    # 70 words: 16+16+16+16+6; 40: 16+16+8; 9: 9; 3: too short for a context and a continuation of two words each
    passages = [(f"d{d}w{w}", n) for d, starts in ((0, [0, 16, 32, 48, 64]), (1, [0, 16, 32]), (2, [0])) for w in
                starts for n in [min(16, (70, 40, 9)[d] - w)]]  # fmt: skip
    assert [(i["context"].split()[0], len(i["context"].split()) + len(i["choices"][i["label"]].split()))
            for i in items] == passages  # fmt: skip
    for item in items:
        true = item["choices"][item["label"]]
        assert f"{item['context']} {true}" in docs[int(item["context"].split()[0][1:].split("w")[0])]
        assert len(set(item["choices"])) == 3 and all(len(c.split()) <= len(true.split()) for c in item["choices"])


def test_evaluate_stage_end_to_end(upstream, capsys):
    cfg_path, cfg, rd = upstream
    args = ["--config", str(cfg_path), "evaluate.tasks=[{name: kd_heldout, limit: 6}]", "evaluate.intrinsic_batches=3"]
    assert evaluate.main(args) == 0
    tasks = rd.stage_dir("evaluate", "tasks")
    assert sorted(p.name for p in tasks.iterdir()) == [
        "kd_heldout.yaml", "kd_heldout_mc.jsonl", "kd_heldout_mc.yaml", "kd_heldout_ppl.jsonl", "kd_heldout_ppl.yaml"
    ]  # fmt: skip
    for model in ("ce", "kd", "teacher"):
        mdir = rd.stage_dir("evaluate", model)
        res = json.loads((mdir / "results.json").read_text())
        assert (mdir / "_COMPLETE.json").exists() and (mdir / "config.yaml").exists()
        assert res["step"] == (None if model == "teacher" else 6)
        assert res["task_versions"]["kd_heldout_mc"] == 2.0 and res["limits"]["kd_heldout_mc"] == 6
        assert set(res["provenance"]["packages"]) >= {"torch", "transformers", "lm_eval", "datasets"}
        assert res["provenance"]["git_hash"] and res["provenance"]["config_hash"]
        (result_file,) = res["lm_eval_files"]
        assert (mdir / result_file).exists() and Path(result_file).name.startswith("results_")
        intrinsic = res["intrinsic"]
        assert intrinsic["heldout_tokens"] > 0 and 0 <= intrinsic["ece"] <= 1
        assert 1 < intrinsic["heldout_ppl"] < 10 * 384
    teacher = json.loads((rd.stage_dir("evaluate", "teacher") / "results.json").read_text())["intrinsic"]
    student = json.loads((rd.stage_dir("evaluate", "ce") / "results.json").read_text())["intrinsic"]
    # the teacher agrees with its own cache (fp16 ties aside) and is at ~zero KL from it; the random student is not
    assert teacher["top1_agreement"] > 0.97 and teacher["kl_teacher_student"] < 1e-2
    assert student["kl_teacher_student"] > 10 * teacher["kl_teacher_student"]

    # lm-eval's own output, parsed by the report's parser: group replaced by its two subtasks
    listed = json.loads((rd.stage_dir("evaluate", "ce") / "results.json").read_text())["lm_eval_files"]
    parsed = report.collect_lm_eval(rd.stage_dir("evaluate", "ce"), listed, [])
    assert report.displayed_tasks(parsed) == ["kd_heldout_mc", "kd_heldout_ppl"]
    assert report.primary_metric(parsed["kd_heldout_mc"]) == ("acc_norm", "none")
    assert parsed["kd_heldout_mc"]["n_samples"] == 6 and parsed["kd_heldout_mc"]["parent"] == "kd_heldout"
    assert parsed["kd_heldout_ppl"]["metrics"]["word_perplexity"]["none"]["value"] > 1

    # retraining a student does not redo the teacher; the student's evaluation is stale, and the report says so
    before = (rd.stage_dir("evaluate", "teacher") / "_COMPLETE.json").read_text()
    summary_path = rd.stage_dir("train", "kd") / "summary.json"
    summary_path.write_text(summary_path.read_text().replace('"steps": 6', '"steps": 7'))  # a retrain, as train would
    mark_complete(load(cfg_path, args[2:]), "train", "kd", list(rundir.declared_outputs(summary_path.parent)))
    capsys.readouterr()
    assert evaluate.main([*args, "--model", "teacher"]) == 0
    assert "evaluate/teacher is already complete" in capsys.readouterr().err
    assert (rd.stage_dir("evaluate", "teacher") / "_COMPLETE.json").read_text() == before
    stale = rundir.unit_state(evaluate.SPEC, load(cfg_path, args[2:]), rd, "kd")
    assert not stale.complete and stale.reason.startswith("evaluate/kd: made from other inputs: train/kd changed")

    assert report.main(["--config", str(cfg_path), *args[2:]]) == 0
    summary = json.loads((rd.stage_dir("report") / "summary.json").read_text())
    assert summary["columns"] == ["kd_heldout_mc", "kd_heldout_ppl"] and set(summary["models"]) == {"ce", "teacher"}
    assert summary["models"]["ce"]["deltas"]["kd_heldout_ppl_vs_teacher"] is not None
    assert "model kd: no evaluation (evaluate/kd: made from other inputs: train/kd changed" in "\n".join(
        summary["notes"]
    )
    assert "ppl↓" in capsys.readouterr().out


def test_intrinsic_batches_cap_and_determinism(upstream):
    _, cfg, rd = upstream
    model = load_causal_lm(cfg.teacher, "teacher", torch.device("cpu"))
    tok = load_tokenizer(cfg.teacher)
    one, rows = evaluate.intrinsic_metrics(model, tok, load(upstream[0], ["evaluate.intrinsic_batches=1"]), rd)
    again, _ = evaluate.intrinsic_metrics(model, tok, load(upstream[0], ["evaluate.intrinsic_batches=1"]), rd)
    full, _ = evaluate.intrinsic_metrics(model, tok, cfg, rd)
    assert one == again and rows is None  # the teacher's own tokenizer: no student rows of its own
    assert one["heldout_tokens"] < full["heldout_tokens"] and one["heldout_bytes"] < full["heldout_bytes"]
    assert np.isfinite(list(full.values())).all()
    # bits per byte and per character divide the same NLL as the per-token perplexity
    nll = math.log(full["heldout_ppl"]) * full["heldout_tokens"]
    assert full["bits_per_byte"] == pytest.approx(nll / (math.log(2) * full["heldout_bytes"]))
    assert full["char_ppl"] == pytest.approx(math.exp(nll / full["heldout_chars"]))


def test_evaluate_errors(upstream):
    cfg_path, _, rd = upstream
    assert evaluate.main(["--config", str(cfg_path), "--model", "nope"]) == 2
    with pytest.raises(ConfigError, match="reserved"):
        evaluate.units(load(cfg_path, ["train.variants={ce: {}, teacher: {}}"]), None)
    shutil.rmtree(rd.stage_dir("train", "kd") / "final")
    assert evaluate.main(["--config", str(cfg_path), "evaluate.local_tasks=false", "--model", "kd"]) == 1


def test_lm_eval_warnings_that_do_not_apply_are_dropped_and_explained_once(caplog):
    import io
    import logging

    from pipeline.jsonlog import JsonLogger

    console = io.StringIO()
    log = JsonLogger("tiny", "evaluate", None, rank=0, stream=console)
    evaluate._EXPLAINED.clear()
    model_logger, evaluator_logger = (
        logging.getLogger("lm_eval.models.huggingface"),
        logging.getLogger("lm_eval.evaluator"),
    )
    chat = "pretrained=/m appears to be an\n    instruct or chat variant but chat template is not applied.\n  Recommend"
    for offline_only in (True, True, False):  # the last group includes a task of lm-eval's own
        caplog.clear()
        with evaluate.expected_lm_eval_warnings(log, offline_only), caplog.at_level(logging.WARNING):
            model_logger.warning("`pretrained` model kwarg is not of type `str`. Many other model arguments ...")
            evaluator_logger.warning(chat)
            evaluator_logger.warning("a warning of its own")
        passed = [r.getMessage() for r in caplog.records]
        assert passed == (["a warning of its own"] if offline_only else [chat, "a warning of its own"])
    notes = [line for line in console.getvalue().splitlines() if "lm_eval_note" in line]
    assert len(notes) == 2 and "evaluate hands it the model" in notes[0] and "kd_heldout" in notes[1]
    evaluator_logger.warning(chat)  # outside a run nothing is filtered
    assert caplog.records[-1].getMessage() == chat
