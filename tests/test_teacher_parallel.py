"""pipeline.teacher_parallel: the exact merge of per-slice top-k and normalisers (in one process, slices of one
logits matrix standing in for the ranks) and the layout and config checks. The real multi-process paths (2 replicas
x TP=2 and DP=2 shards equal to single-process ones through transformers' tensor parallelism, kill -9 of a rank) run
the cache stage under torchrun in tests/test_cache.py."""

from __future__ import annotations

import types

import pytest
import torch

from pipeline import config as config_mod
from pipeline import teacher_parallel as tp
from pipeline.config import ConfigError
from pipeline.rundir import PipelineError


def merged(logits: torch.Tensor, top_k: int, ranks: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What ``ranks`` ranks holding torch.chunk slices of the vocabulary compute together (DTensor's Shard(0))."""
    floats, ids, offset = [], [], 0
    for piece in torch.chunk(logits, ranks, dim=-1):
        f, i = tp.local_candidates(piece.clone(), top_k, offset)
        floats.append(f)
        ids.append(i)
        offset += piece.shape[-1]
    return tp.merge_candidates(torch.stack(floats), torch.stack(ids), top_k)


@pytest.mark.parametrize("ranks", [1, 2, 3, 5])
@pytest.mark.parametrize("top_k", [1, 8, 12, 37])
def test_merged_slices_give_the_full_distributions_top_k_and_exact_tail(ranks, top_k):
    torch.manual_seed(ranks * 100 + top_k)
    logits = torch.randn(20, 37) * 4  # 37 = 8+8+8+8+5 for 5 ranks: slices narrower than k = 12 are padded
    values, ids, tail = merged(logits, top_k, ranks)
    logp = torch.log_softmax(logits.double(), dim=-1)
    ref_values, ref_ids = torch.topk(logp, top_k, dim=-1)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(values.double(), ref_values, rtol=0, atol=2e-6)
    outside = logp.scatter(-1, ref_ids, float("-inf"))
    ref_tail = torch.logsumexp(outside, dim=-1)
    if top_k == 37:
        assert torch.isneginf(tail).all()  # k == V: nothing outside
    else:
        torch.testing.assert_close(tail.double(), ref_tail, rtol=0, atol=2e-6)


def test_tiny_tail_is_summed_directly_not_as_one_minus_the_top_k():
    logits = torch.zeros(1, 6)
    logits[0, 0] = 40.0  # p(top) = e^40 / (e^40 + 5): the tail, ~e^-38.4, is far below fp32's eps of 1 - p
    _, ids, tail = merged(logits, 1, 2)
    expected = torch.log(torch.tensor(5.0, dtype=torch.float64)) - torch.logsumexp(
        torch.tensor([40.0, float(torch.log(torch.tensor(5.0)))], dtype=torch.float64), 0
    )
    assert ids.item() == 0 and abs(float(tail) - float(expected)) < 1e-4


def test_layout_of_ranks_into_replicas(monkeypatch):
    layout = tp.Layout(world=8, rank=5, tensor_parallel=4)
    assert (layout.replicas, layout.replica, layout.tp_rank, layout.writer) == (2, 1, 1, False)
    assert tp.Layout(world=8, rank=4, tensor_parallel=4).writer
    assert tp.setup(1, torch.device("cpu")) == tp.Layout()  # no torchrun: one process, nothing initialised
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(PipelineError, match="teacher.tensor_parallel: 2 does not divide the 3 processes"):
        tp.setup(2, torch.device("cpu"))


def test_config_checks_name_the_key(tiny_assets):
    from transformers import AutoConfig

    teacher_config = AutoConfig.from_pretrained(tiny_assets["teacher"])  # 4 attention heads, 2 KV heads
    tp.check_tensor_parallel(teacher_config, 2)
    with pytest.raises(ConfigError, match="teacher.tensor_parallel: 4 does not divide the teacher's num_key_value"):
        tp.check_tensor_parallel(teacher_config, 4)
    no_plan = types.SimpleNamespace(architectures=["OddLM"], num_attention_heads=8, num_key_value_heads=8)
    with pytest.raises(ConfigError, match="OddLM has none .* teacher.device_map: auto"):
        tp.check_tensor_parallel(no_plan, 2)
    base = {"run_name": "r", "student": {"name_or_path": "s"}}
    with pytest.raises(ConfigError, match="teacher.tensor_parallel: 2 shards every layer"):
        config_mod.from_dict({**base, "teacher": {"name_or_path": "t", "tensor_parallel": 2, "device_map": "auto"}})
    with pytest.raises(ConfigError, match=r"tensor_parallel: 3 does not divide the cache's 8 process\(es\) per node"):
        config_mod.from_dict({**base, "teacher": {"name_or_path": "t", "tensor_parallel": 3}})
    with pytest.raises(ConfigError, match='teacher.device_map: "auto" spreads one teacher .* starts 8 per node'):
        config_mod.from_dict({**base, "teacher": {"name_or_path": "t", "device_map": "auto"}})
    three = {"slurm": {"stages": {"cache": {"nproc_per_node": 3}}}}
    assert config_mod.from_dict({**base, **three, "teacher": {"name_or_path": "t", "tensor_parallel": 3}})
    with pytest.raises(ConfigError, match="student.tensor_parallel: unknown key"):
        student = {"name_or_path": "s", "tensor_parallel": 2}
        config_mod.from_dict({**base, "teacher": {"name_or_path": "t"}, "student": student})
    # how the teacher is run is not part of what the cache holds: its identity ignores tensor_parallel
    one = config_mod.TeacherConfig(name_or_path="t")
    assert config_mod.model_identity(one) == config_mod.model_identity(config_mod.TeacherConfig("t", tensor_parallel=8))


def test_compare_caches_matches_top_k_by_id_and_rejects_real_differences(tmp_path):
    """Two entries whose stored log-probs are equal may come out swapped (a reordered sum): still equal. A changed
    id, a value two fp16 steps away or another token is not."""
    import numpy as np

    from pipeline import cache_format as cf

    meta = {"top_k": 3, "temperature": 1.0, "hidden_layers": [1], "hidden_dim": 4, "hidden_dtype": "float16",
            "hidden_positions": None, "hidden_index_convention": "x", "num_hidden_states": 3, "embed_layer": None,
            "targets": "topk", "sampling": None, "seq_len": 2, "teacher": "t", "teacher_fingerprint": "f",
            "vocab_hash": "v", "vocab_size": 50, "dtype": "float32", "split": "train",
            "manifest_shard": "train-00000.parquet", "manifest_sha256": "s", "rows": 1}  # fmt: skip

    def write(directory, ids, values, tokens=(5, 6)):
        cols = {"sample_id": np.array([0]), "input_ids": np.array([tokens], dtype=np.int32),
                "attention_mask": np.ones((1, 2), dtype=np.int8),
                "topk_ids": np.array([ids], dtype=np.int32), "topk_logprobs": np.array([values], dtype=np.float16),
                "tail_logmass": np.full((1, 2), -3.0, dtype=np.float16),
                "hidden_1": torch.ones(1, 2, 4, dtype=torch.float16).view(torch.int16).numpy()}  # fmt: skip
        cf.write_shard(tmp_path / directory / "train-00000.parquet", cols, meta)
        return tmp_path / directory

    base = [[1, 2, 3], [4, 5, 6]], [[-0.5, -2.0, -2.0], [-0.1, -3.0, -4.0]]
    want = write("want", *base)
    swapped = write("swapped", [[1, 3, 2], [4, 5, 6]], base[1])
    report = tp.compare_caches(swapped, want)
    assert report["within_rounding"] and report["reordered_positions"] == 1 and report["identical_shards"] == 0
    near_tie = tp.compare_caches(write("near_tie", [[1, 2, 9], [4, 5, 6]], base[1]), want)  # 9 ties with 3 at k
    assert near_tie["within_rounding"] and near_tie["boundary_swaps"] == 1
    other = tp.compare_caches(write("other_id", [[9, 2, 3], [4, 5, 6]], base[1]), want)
    assert not other["within_rounding"] and other["other_id_differences"] == 1
    far = write("far", base[0], [[-0.5, -2.0, -2.0], [-0.1, -3.0, -4.0 - 2 * 2.0**-8]])
    assert tp.compare_caches(far, want)["max_fp16_steps"] == 2.0
    assert not tp.compare_caches(write("tokens", *base, tokens=(5, 7)), want)["within_rounding"]
    assert tp.compare_caches(write("same", *base), want)["identical_shards"] == 1


def test_parallel_plan_for_llama_70b_on_8x80gb_nodes():
    """The README's planning arithmetic: Llama-3.1-70B's config.json sizes, bf16, 4 x 4096 tokens per batch."""
    from transformers import LlamaConfig

    teacher_config = LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                 num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
                                 tie_word_embeddings=False)  # fmt: skip
    assert tp.teacher_shape(teacher_config)["params"] == 70_553_706_496
    hw = tp.Hardware()
    rows = tp.plan_parallel(
        teacher_config, seq_len=4096, batch=4, logits_chunk=2048, dtype_bytes=2, gpus_per_node=8, hw=hw
    )
    by = {r["tensor_parallel"]: r for r in rows}
    assert list(by) == [1, 2, 4, 8, "auto"]
    assert not by[1]["fits"] and not by[2]["fits"] and by[4]["fits"] and by[8]["fits"]  # T=2: 77 of 80 GB
    assert by[4]["weights_gb"] == pytest.approx(141.1 / 4, rel=1e-3) and 35 < by[4]["memory_gb"] < 45
    assert by[4]["replicas"] == 2 and by[8]["comm_share"] > by[4]["comm_share"] > 0
    assert by[4]["node_tokens_per_s"] > by[8]["node_tokens_per_s"] > 6 * by["auto"]["node_tokens_per_s"]
    flops = 2 * tp.teacher_shape(teacher_config)["matmul_params"] + 4 * 80 * 4096 * 8192  # ~152 GFLOP per token
    assert by[1]["node_tokens_per_s"] == pytest.approx(8 * 989e12 * 0.4 / flops)
    assert by[4]["gpu_hours_per_1b_tokens"] == pytest.approx(1e9 / by[4]["node_tokens_per_s"] * 8 / 3600)
    text = tp.format_parallel_plan(rows, 2_000_000_000, 16, 8, 4, hw)
    assert "T=4" in text and "device_map=auto" in text and "NO" in text
