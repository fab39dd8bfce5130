"""Cache stage with the tiny random Llama teacher: extraction equals the model's own full computation, the stage's
artifacts and layout, kill -9 + rerun gives byte-identical shards, disjoint task split, preemption, and the errors
for a foreign tokenizer, another teacher and bad settings."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from pipeline import cache
from pipeline import cache_format as cf
from pipeline import teacher_parallel as tp
from pipeline.config import ModelConfig
from pipeline.config import load as load_config
from pipeline.modeling import load_causal_lm, load_tokenizer, vocab_hash, vocab_size
from pipeline.rundir import PipelineError
from tests.conftest import REPO, SMALL_MANIFEST, redeclare, write_config


@pytest.fixture
def run_config(tmp_path, tiny_assets, small_manifest):
    """``run_config(**overrides)`` -> config path whose run already holds the shared manifest."""
    shutil.copytree(small_manifest, tmp_path / "runs" / "tiny" / "manifest")

    def make(**overrides) -> Path:
        return write_config(tmp_path, tiny_assets, {**SMALL_MANIFEST, "cache.log_every_s": 0.01, **overrides})

    return make


def cache_dir(config: Path) -> Path:
    return config.parent / "runs" / "tiny" / "cache"


def manifest_files(config: Path) -> list[str]:
    manifest = json.loads((config.parent / "runs" / "tiny" / "manifest" / "manifest.json").read_text())
    return [s["file"] for _, s in cache.manifest_shards(manifest)]


def shard_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.parquet"))}


def test_extraction_matches_full_model_computation(tiny_assets):
    model = load_causal_lm(ModelConfig(name_or_path=str(tiny_assets["teacher"])), "teacher", torch.device("cpu"))
    model.eval()
    torch.manual_seed(3)
    ids = torch.randint(0, model.config.vocab_size, (3, 20))
    mask = torch.ones_like(ids)
    mask[2, 13:] = 0  # a padded final row
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    for temperature, chunk in ((1.0, 60), (2.0, 60), (1.0, 7), (2.0, 7)):
        spec = cache.Extraction(
            top_k=8,
            temperature=temperature,
            hidden_layers=[0, 1, 3],
            hidden_dtype=torch.float16,
            positions=None,
            embed_layer=2,
            logits_chunk=chunk,
        )
        got = cache.extract_batch(model, ids, mask, spec)
        logp = torch.log_softmax(out.logits.float() / temperature, dim=-1)
        ref_values, ref_ids = torch.topk(logp, 8, dim=-1)
        if chunk == 60:  # one chunk: the same matmul shapes as the full forward, so bit-identical
            assert torch.equal(got["topk_logprobs"], ref_values) and torch.equal(got["topk_ids"], ref_ids)
        else:  # smaller matmuls may round the last bit differently; near-ties may then swap order
            torch.testing.assert_close(got["topk_logprobs"], ref_values, rtol=0, atol=1e-5)
            torch.testing.assert_close(logp.gather(-1, got["topk_ids"]), got["topk_logprobs"], rtol=0, atol=1e-5)
        tail = torch.log1p(-ref_values.double().exp().sum(-1))
        torch.testing.assert_close(got["tail_logmass"].double(), tail, rtol=1e-5, atol=1e-6)
    for layer in (0, 1, 3):
        assert torch.equal(got[cf.hidden_column(layer)], out.hidden_states[layer].half())
    weights = mask.unsqueeze(-1).float()
    pooled = (out.hidden_states[2] * weights).sum(1) / weights.sum(1)
    torch.testing.assert_close(got["embed"], pooled)
    assert not torch.allclose(got["embed"][2], out.hidden_states[2][2].mean(0))  # padding really excluded
    spec.positions = cf.hidden_positions(20, every_n=3)
    sub = cache.extract_batch(model, ids, mask, spec)
    assert torch.equal(sub["hidden_1"], out.hidden_states[1][:, ::3].half())
    # hooks keep exactly the requested states (not all L + 1) and are removed afterwards
    body = model.get_decoder()

    def hook_count() -> int:  # transformers keeps its own output-capturing hooks installed; ours must go
        return sum(len(b._forward_hooks) + len(b._forward_pre_hooks) for b in cache.decoder_layers(body))

    before = hook_count()
    with torch.inference_mode(), cache.capture_hidden_states(body, {0, 2}) as kept:
        assert hook_count() == before + 2
        body(input_ids=ids, attention_mask=mask, use_cache=False)
    assert sorted(kept) == [0, 2] and all(torch.equal(kept[i], out.hidden_states[i]) for i in (0, 2))
    assert hook_count() == before


def test_chunked_topk_keeps_tail_accurate_when_topk_holds_nearly_all_mass():
    hidden = torch.eye(4)
    head = torch.nn.Linear(4, 6, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[40.0, 0, 0, 0], [0, 0, 0, 0]] + [[0, 0, 0, 0]] * 4))
    values, ids, tail = cache.topk_chunked(hidden, head, top_k=1, temperature=1.0, chunk=3)
    # row 0: p(top) = e^40 / (e^40 + 5) -> tail = log(5) - logsumexp(40, log 5), ~ -38.4, far below fp32 eps of 1-p
    expected = torch.log(torch.tensor(5.0, dtype=torch.float64)) - torch.logsumexp(
        torch.tensor([40.0, float(torch.log(torch.tensor(5.0)))], dtype=torch.float64), 0
    )
    assert abs(float(tail[0].detach()) - float(expected)) < 1e-4
    _, _, full_tail = cache.topk_chunked(hidden, head, top_k=6, temperature=1.0, chunk=4)
    assert torch.isneginf(full_tail).all()  # k == V: no tail (stored as the fp16 floor)


def test_stage_writes_shards_records_marker_and_reader_feeds_student(run_config, tiny_assets):
    config = run_config(**{"cache.top_k": 16, "cache.hidden_every_n": 2})
    assert cache.main(["--config", str(config)]) == 0
    out = cache_dir(config)
    shards = cf.list_cache_shards(out, "train")
    assert [p.name for p in shards + cf.list_cache_shards(out, "val")] == manifest_files(config)
    assert (out / "_COMPLETE.json").is_file() and (out / "config.yaml").is_file()
    record = json.loads((out / "_shards" / "train-00001.json").read_text())
    assert record["sha256"] == cf.file_sha256(shards[1]) and record["rows"] == 6
    meta = cf.read_cache_meta(shards[1])
    assert meta["manifest_shard"] == "train-00001.parquet" and meta["top_k"] == 16 and meta["hidden_layers"] == [1, 3]
    assert meta["hidden_positions"] == list(range(0, 32, 2)) and meta["embed_layer"] == 3
    student_tok = load_tokenizer(ModelConfig(name_or_path=str(tiny_assets["student"])))
    cf.validate_for_student(
        meta, vocab_hash=vocab_hash(student_tok), vocab_size=vocab_size(student_tok), need_hidden_layers=[3]
    )
    # the stored values are the teacher's (fp16-rounded) log-probs for these rows
    ds = cf.CacheDataset([shards[1]], batch_size=6, shuffle=False)
    (batch,) = [cf.to_compute(b, "cpu") for b in ds]
    model = load_causal_lm(ModelConfig(name_or_path=str(tiny_assets["teacher"])), "teacher", torch.device("cpu"))
    spec, _ = cache.resolve_extraction(load_config(str(config)).cache, model.config, 32, 0)
    for start in (0, 4):  # the stage's batches of 4 (and 2) rows (cache.batch_size 4), so the same matmul shapes
        rows = slice(start, start + 4)
        ref = cache.extract_batch(model, batch["input_ids"][rows], batch["attention_mask"][rows], spec)
        assert torch.equal(batch["topk_ids"][rows], ref["topk_ids"])
        assert torch.equal(batch["topk_logprobs"][rows], ref["topk_logprobs"].half().float())
        assert torch.equal(batch["tail_logmass"][rows], ref["tail_logmass"].half().float())
        assert torch.equal(batch["hidden_1"][rows], ref["hidden_1"].float())
    assert batch["hidden_3"].shape == (6, 16, 64) and batch["hidden_positions"].tolist() == meta["hidden_positions"]
    # rerun: the wrapper sees a matching marker and does nothing
    before = shard_bytes(out)
    assert cache.main(["--config", str(config)]) == 0
    assert shard_bytes(out) == before


@pytest.mark.slow
def test_kill_9_mid_run_then_rerun_gives_identical_shards(run_config, tmp_path):
    reference = run_config(run_name="ref", **{"cache.batch_size": 2})
    shutil.copytree(tmp_path / "runs" / "tiny" / "manifest", tmp_path / "runs" / "ref" / "manifest")
    assert cache.main(["--config", str(reference)]) == 0
    config = run_config(**{"cache.batch_size": 2})
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cache", "--config", str(config)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    records = cache_dir(config) / "_shards"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(list(records.glob("*.json"))) < 2:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(records.glob("*.json")))
    assert 2 <= done < len(manifest_files(config)), f"kill landed outside the run ({done} shards done)"
    assert not (cache_dir(config) / "_COMPLETE.json").exists()
    assert cache.main(["--config", str(config)]) == 0
    assert shard_bytes(cache_dir(config)) == shard_bytes(cache_dir(reference))
    assert not list(cache_dir(config).glob(".*.tmp"))


def test_task_split_is_disjoint_and_marker_waits_for_all_tasks(run_config, monkeypatch):
    config = run_config()
    assert cache.main(["--config", str(config), "--task-index", "1", "--task-count", "2"]) == 0
    out = cache_dir(config)
    first = set(shard_bytes(out))
    everything = manifest_files(config)
    assert first == set(everything[1::2]) and not (out / "_COMPLETE.json").exists()
    assert cache.main(["--config", str(config), "--task-index", "0", "--task-count", "2"]) == 0
    assert list(shard_bytes(out)) == sorted(everything) and (out / "_COMPLETE.json").exists()
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "6")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "4")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    assert cache.task_split(types.SimpleNamespace(task_index=None, task_count=None)) == (2, 3)
    # slurm submit passes the count: a resubmit's --array=6 of 8 tasks is task 6, whatever the array's first id
    assert cache.task_split(types.SimpleNamespace(task_index=None, task_count=8)) == (6, 8)
    with pytest.raises(PipelineError, match="--task-index 3"):
        cache.task_split(types.SimpleNamespace(task_index=3, task_count=3))


def test_corrupt_shard_is_recomputed_and_other_teacher_invalidates(run_config, tiny_assets):
    config = run_config()
    assert cache.main(["--config", str(config)]) == 0
    out = cache_dir(config)
    good = shard_bytes(out)
    (out / "train-00002.parquet").write_bytes(good["train-00002.parquet"][:-100])  # truncated shard
    (out / "_shards" / "val-00000.json").unlink()  # shard written, record lost (kill between the two)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")}
    assert cache.main(["--config", str(config)]) == 0
    assert shard_bytes(out) == good
    changed = {p.name for p in out.glob("*.parquet") if p.stat().st_mtime_ns != mtimes[p.name]}
    assert changed == {"train-00002.parquet", "val-00000.parquet"}
    # another teacher with the same tokenizer: every shard's signature changes, so all are recomputed
    other = run_config(
        **{
            "teacher.name_or_path": str(tiny_assets["student"]),
            "teacher.tokenizer": str(tiny_assets["teacher"]),  # the manifest's tokenizer, so the manifest stands
            "cache.hidden_layers": [1, 2],
            "cache.embed_layer": 2,
            "train.variants.feature.feature.layer_pairs": [[1, 2]],
        }
    )
    assert cache.main(["--config", str(other)]) == 0
    assert cf.read_cache_meta(out / "train-00000.parquet")["hidden_dim"] == 32
    old_copy = out.parent / "old-train-00000.parquet"
    old_copy.write_bytes(good["train-00000.parquet"])
    with pytest.raises(PipelineError, match="cannot be mixed"):
        cf.CacheDataset([out / "train-00000.parquet", old_copy], batch_size=4)


def test_preemption_finishes_the_shard_and_stops(run_config, monkeypatch):
    config = run_config()
    original = cache.cache_one_shard

    def then_signal(*args, **kwargs):
        info = original(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGUSR1)
        return info

    monkeypatch.setattr(cache, "cache_one_shard", then_signal)
    before = signal.getsignal(signal.SIGUSR1)
    assert cache.main(["--config", str(config)]) == 0  # stopped cleanly: the job shell would requeue the job
    out = cache_dir(config)
    assert len(list((out / "_shards").glob("*.json"))) == 1 and len(shard_bytes(out)) == 1
    assert not (out / "_COMPLETE.json").exists()
    assert signal.getsignal(signal.SIGUSR1) is before  # the stage's handlers are gone again


def test_errors_foreign_tokenizer_bad_layer_and_top_k(run_config, capsys):
    config = run_config(**{"cache.hidden_layers": [3, 4]})
    assert cache.main(["--config", str(config)]) == 2
    assert "cache.hidden_layers.1: hidden-state index 4 out of range" in capsys.readouterr().err
    config = run_config(**{"cache.top_k": 100000})
    assert cache.main(["--config", str(config)]) == 2
    assert "cache.top_k: expected <= the teacher's vocabulary" in capsys.readouterr().err
    assert not list(cache_dir(config).glob("*.parquet"))
    manifest_file = config.parent / "runs" / "tiny" / "manifest" / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    manifest["tokenizer"]["vocab_hash"] = "0123456789abcdef"  # as if built with another tokenizer at that path
    manifest_file.write_text(json.dumps(manifest))
    redeclare(manifest_file.parent)
    assert cache.main(["--config", str(run_config())]) == 1
    assert "tokenizer.vocab_hash 0123456789abcdef" in capsys.readouterr().err


def test_plan_prints_sizes_without_running_the_teacher(run_config, capsys):
    config = run_config(**{"cache.top_k": 16})
    assert cache.main(["--config", str(config), "--plan"]) == 0
    text = capsys.readouterr().out
    assert "topk_ids" in text and "hidden_3" in text
    total = [line for line in text.splitlines() if line.startswith("TOTAL")][0].split()
    # per token: sample_id 8/32 + ids 4 + mask 1 + top-16 (4 + 2) * 16 + tail 2 + 2 layers x 64 x 2 + embed 64 x 4/32
    assert float(total[1]) == 8 / 32 + 4 + 1 + 96 + 2 + 256 + 8
    assert not cache_dir(config).exists()
    # the parallel plan for the configured node (8 GPUs by default): every valid T and device_map=auto
    assert "configured tensor_parallel 1" in text and "T=2" in text and "device_map=auto" in text
    # before the manifest exists, manifest.max_tokens stands in for the token count
    unbuilt = run_config(run_name="unbuilt", **{"manifest.max_tokens": 3200, "cache.top_k": 16})
    assert cache.main(["--config", str(unbuilt), "--plan"]) == 0
    assert "cache plan for 3,200 tokens" in capsys.readouterr().out


def test_cache_format_version_is_part_of_the_stage_identity(monkeypatch):
    """An upgraded format must not be skipped as 'already complete' (train would then fail on old shards)."""
    from pipeline import cache, config
    from pipeline.config import section_hash

    cfg = config.from_dict({"run_name": "r", "teacher": {"name_or_path": "t"}, "student": {"name_or_path": "s"}})
    before = section_hash(cache.SPEC.sections(cfg, None))
    monkeypatch.setattr(cache.cf, "FORMAT_VERSION", cache.cf.FORMAT_VERSION + 1)
    assert section_hash(cache.SPEC.sections(cfg, None)) != before


def test_cluster_loading_device_map_auto_in_bf16(run_config, tiny_assets):
    """The cluster recipe's teacher loading (``device_map="auto"``, bf16) on this machine's only device (no GPU
    here, so every layer lands on the CPU): the stage feeds inputs to wherever the embeddings were placed and
    records the dtype; the cached distributions match an fp32 teacher to bf16 precision."""
    spec = ModelConfig(name_or_path=str(tiny_assets["teacher"]), dtype="bfloat16", device_map="auto")
    assert {(p.dtype, p.device.type) for p in load_causal_lm(spec, "teacher").parameters()} == {(torch.bfloat16, "cpu")}
    auto = {"teacher.device_map": "auto", "slurm.stages.cache.nproc_per_node": 1}  # one process spans the GPUs
    config = run_config(**auto, **{"teacher.dtype": "bfloat16", "cache.top_k": 8})
    assert cache.main(["--config", str(config)]) == 0
    shard = cf.list_cache_shards(cache_dir(config), "train")[0]
    assert cf.read_cache_meta(shard)["dtype"] == "bfloat16"
    (bf16,) = [cf.to_compute(b, "cpu") for b in cf.CacheDataset([shard], batch_size=6, shuffle=False)]
    ref = load_causal_lm(ModelConfig(name_or_path=str(tiny_assets["teacher"]), dtype="float32"), "teacher")
    with torch.inference_mode():
        logp = torch.log_softmax(ref(input_ids=bf16["input_ids"]).logits.float(), dim=-1)
    # bf16 weights and activations (8 mantissa bits) plus fp16 storage: 0.005 nats apart here; near-ties may swap
    torch.testing.assert_close(logp.gather(-1, bf16["topk_ids"]), bf16["topk_logprobs"], rtol=0, atol=0.05)
    assert (logp.argmax(-1) == bf16["topk_ids"][..., 0]).float().mean() > 0.9


# ---------------------------------------------------------------------------------------- several processes
def torchrun(config: Path, nproc: int, *overrides: str) -> subprocess.Popen:
    """``python -m pipeline.cache --nproc-per-node N``: the stage re-executes itself under torchrun, as in a Slurm
    job (gloo on this CPU; own session, so a hang can take the group down)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pipeline.cache", "--config", str(config), "--nproc-per-node", str(nproc),
           "monitor.enabled=false", *overrides]  # fmt: skip
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip


def wait_for_records(directory: Path, count: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(list((directory / "_shards").glob("*.json"))) < count:
        assert proc.poll() is None, proc.communicate()[0].decode()[-3000:]
        time.sleep(0.005)


def finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    try:
        output = proc.communicate(timeout=timeout)[0].decode()
    finally:
        if proc.poll() is None:  # a hung collective: take the launcher and every rank down
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, output[-4000:]
    return output


@pytest.mark.slow
def test_tensor_and_data_parallel_shards_equal_single_process_and_survive_kill_9(run_config, tmp_path):
    """DP=2 gives the single-process bytes; 2 replicas x TP=2 (transformers' tensor parallelism on per-replica
    sub-meshes, vocabulary-parallel top-k) give the same ids and floats within one fp16 step; kill -9 of a TP rank
    mid-run and a rerun give the uninterrupted TP shards byte for byte."""
    runs = tmp_path / "runs"
    for name in ("dp", "tp", "killed"):
        shutil.copytree(runs / "tiny" / "manifest", runs / name / "manifest")
    config = run_config(**{"cache.batch_size": 2})
    assert cache.main(["--config", str(config)]) == 0
    single = cache_dir(config)

    # DP=2, preempted: USR1 reaches every rank (as the Slurm shell forwards it); each finishes its shard, they meet,
    # the job exits 0 without the marker, and the rerun computes the rest
    import psutil

    dp = runs / "dp" / "cache"
    proc = torchrun(config, 2, "run_name=dp", "cache.batch_size=1")
    wait_for_records(dp, 2, proc)
    for worker in psutil.Process(proc.pid).children(recursive=True):
        if "RANK" in worker.environ():
            worker.send_signal(signal.SIGUSR1)
    output = finish(proc)
    assert "preempted" in output and not (dp / "_COMPLETE.json").exists()
    assert 2 <= len(list((dp / "_shards").glob("*.json"))) < len(manifest_files(config))
    output = finish(torchrun(config, 2, "run_name=dp"))
    assert "2 processes = 2 replica(s) x tensor_parallel 1" in output
    assert shard_bytes(dp) == shard_bytes(single)

    output = finish(torchrun(config, 4, "run_name=tp", "teacher.tensor_parallel=2"))
    assert "4 processes = 2 replica(s) x tensor_parallel 2" in output
    assert (runs / "tp" / "cache" / "_COMPLETE.json").exists()
    parity = tp.compare_caches(runs / "tp" / "cache", single)  # top-k matched by id, floats within one fp16 step
    assert parity["within_rounding"] and parity["shards"] == len(manifest_files(config)), parity
    records = sorted(p.stem + ".parquet" for p in (runs / "tp" / "cache" / "_shards").glob("*.json"))
    assert records == sorted(manifest_files(config))  # one record per shard, written by one rank

    killed = runs / "killed" / "cache"
    proc = torchrun(config, 2, "run_name=killed", "teacher.tensor_parallel=2", "cache.batch_size=1")
    wait_for_records(killed, 2, proc)
    writer = next(c for c in psutil.Process(proc.pid).children(recursive=True) if c.environ().get("RANK") == "0")
    writer.kill()
    proc.communicate(timeout=120)
    done = len(list((killed / "_shards").glob("*.json")))
    assert proc.returncode != 0 and 2 <= done < len(manifest_files(config)), f"kill outside the run ({done} done)"
    assert not (killed / "_COMPLETE.json").exists()
    finish(torchrun(config, 2, "run_name=killed", "teacher.tensor_parallel=2"))
    assert shard_bytes(killed) == shard_bytes(runs / "tp" / "cache")
    assert not list(killed.glob(".*.tmp")) and (killed / "_COMPLETE.json").exists()
