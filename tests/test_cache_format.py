"""Cache shard format and CacheDataset: round trip, exactly-once over ranks x DataLoader workers, deterministic
shuffling, exact resume, and the errors a misused or corrupt cache must raise."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader

from pipeline import cache_format as cf
from pipeline import rundir
from pipeline.config import ConfigError
from pipeline.rundir import PipelineError

T, K, H, V = 6, 3, 4, 50


def make_meta(rows: int, **over) -> dict:
    meta = {
        "teacher": "tiny-teacher",
        "teacher_fingerprint": "abc123",
        "vocab_hash": "vocabhash",
        "vocab_size": V,
        "top_k": K,
        "temperature": 1.0,
        "dtype": "float32",
        "hidden_layers": [1, 3],
        "hidden_dim": H,
        "hidden_dtype": "float16",
        "hidden_positions": None,
        "hidden_index_convention": "hf",
        "num_hidden_states": 4,
        "embed_layer": 3,
        "targets": "topk",
        "sampling": None,
        "seq_len": T,
        "split": "train",
        "manifest_shard": "train-00000.parquet",
        "manifest_sha256": "0" * 64,
        "rows": rows,
    }
    meta.update(over)
    return meta


def make_columns(meta: dict, first_id: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    n, tsub = meta["rows"], cf.num_hidden_positions(meta)
    hidden_dtype = np.float16 if meta["hidden_dtype"] == "float16" else np.int16
    cols = {
        "sample_id": np.arange(first_id, first_id + n, dtype=np.int64),
        "input_ids": rng.integers(0, V, (n, T), dtype=np.int32),
        "attention_mask": np.ones((n, T), np.int8),
        "topk_ids": rng.integers(0, V, (n, T, K), dtype=np.int32),
        "topk_logprobs": -rng.random((n, T, K)).astype(np.float16) * 5,
        "tail_logmass": -rng.random((n, T)).astype(np.float16),
    }
    for layer in meta["hidden_layers"]:
        values = torch.randn(n, tsub, H)
        if hidden_dtype is np.float16:
            cols[cf.hidden_column(layer)] = values.half().numpy()
        else:
            cols[cf.hidden_column(layer)] = values.bfloat16().view(torch.int16).numpy()
    if meta["embed_layer"] is not None:
        cols["embed"] = rng.standard_normal((n, H)).astype(np.float32)
    return cols


def write_shards(tmp_path, sizes, row_group_size=None, **over):
    """Shards of a split with sample_ids 0..N-1 in file order; returns (paths, written columns)."""
    paths, written, first = [], [], 0
    for i, rows in enumerate(sizes):
        meta = make_meta(rows, manifest_shard=f"train-{i:05d}.parquet", **over)
        cols = make_columns(meta, first, seed=i)
        path = tmp_path / f"train-{i:05d}.parquet"
        cf.write_shard(path, cols, meta, row_group_size=row_group_size)
        paths.append(path)
        written.append(cols)
        first += rows
    return paths, written


def sample_ids(batches) -> list[int]:
    return [int(s) for b in batches for s in b["sample_id"]]


def test_round_trip_values_dtypes_and_shapes(tmp_path):
    paths, written = write_shards(tmp_path, [5, 4], row_group_size=2)
    ds = cf.CacheDataset(paths, batch_size=3, shuffle=False, memory_map=True)
    batches = list(ds)
    assert [b["input_ids"].shape[0] for b in batches] == [3, 3, 3]
    merged = {k: np.concatenate([w[k] for w in written]) for k in written[0]}
    got = {k: torch.cat([b[k] for b in batches]) for k in batches[0] if k not in ("epoch", "batch_index")}
    # the stored dtypes, shared with numpy (no conversion in the reader)
    stored = {k: v.dtype for k, v in got.items()}
    assert stored == {
        "sample_id": torch.int64,
        "input_ids": torch.int32,
        "attention_mask": torch.int8,
        "topk_ids": torch.int32,
        "topk_logprobs": torch.float16,
        "tail_logmass": torch.float16,
        "hidden_1": torch.float16,
        "hidden_3": torch.float16,
        "embed": torch.float32,
    }
    assert got["topk_ids"].shape == (9, T, K) and got["hidden_1"].shape == (9, T, H)
    for name in ("sample_id", "input_ids", "attention_mask", "topk_ids", "topk_logprobs", "tail_logmass", "embed"):
        np.testing.assert_array_equal(got[name].numpy(), merged[name])
    np.testing.assert_array_equal(got["hidden_3"].numpy(), merged["hidden_3"])
    # to_compute widens on the device: int64 ids and mask, float32 floats, same values; non-tensors pass through
    wide = cf.to_compute({**batches[0], "hidden_positions": torch.arange(3)}, "cpu")
    assert {k: v.dtype for k, v in wide.items() if isinstance(v, torch.Tensor)} == {
        **{k: torch.int64 for k in ("sample_id", "input_ids", "attention_mask", "topk_ids", "hidden_positions")},
        **{k: torch.float32 for k in ("topk_logprobs", "tail_logmass", "hidden_1", "hidden_3", "embed")},
    }
    assert torch.equal(wide["topk_logprobs"], batches[0]["topk_logprobs"].float())
    assert torch.equal(wide["topk_ids"], batches[0]["topk_ids"].long()) and wide["epoch"] == 0
    assert "hidden_positions" not in batches[0]
    meta = cf.read_cache_meta(paths[0])
    assert meta["row_groups"] == [2, 2, 1] and meta["format_version"] == cf.FORMAT_VERSION
    leaf = pq.ParquetFile(paths[0]).metadata.row_group(0).column(3)
    assert "BYTE_STREAM_SPLIT" in leaf.encodings and not leaf.has_dictionary_page


def test_row_sampler_deals_every_row_once_per_epoch_over_ranks_and_workers_from_row_counts_alone():
    samplers = [
        cf.RowSampler(
            [7, 9, 4], batch_size=3, seed=5, shuffle=True, shuffle_buffer=4, rank=rank, world_size=2, infinite=False
        )  # fmt: skip
        for rank in range(2)
    ]
    for epoch in (0, 1):
        dealt = [(s, e, i) for s in samplers for worker in range(3) for e, i in s.schedule(epoch, 0, worker, 3)]
        assert {e for _, e, _ in dealt} == {epoch}
        rows = np.concatenate([s.batch_rows(e, i) for s, e, i in dealt])
        assert sorted(rows.tolist()) == list(range(20))
    assert samplers[0].epoch_order(0).tolist() != samplers[0].epoch_order(1).tolist()
    assert [s.batches_per_epoch for s in samplers] == [4, 3]  # 20 rows: 7 batches, the last (rank 0's) short
    assert [len(s.batch_rows(0, s.batches_per_epoch - 1)) for s in samplers] == [2, 3]


@pytest.mark.parametrize("mode", ["arena", "wide", "direct"])
def test_batches_spanning_more_row_groups_than_cached_slots(tmp_path, monkeypatch, mode):
    if mode == "wide":  # hidden (48-byte rows here) and top-k id columns (72) take the no-arena path of wide rows
        monkeypatch.setattr(cf, "ARENA_MAX_ROW_BYTES", 40)
    # arena: 2-row groups, a 5 + 10-row window; direct: 4-row groups hold a whole 2 + 2-row window
    group_rows, batch, buffer = (4, 2, 2) if mode == "direct" else (2, 5, 10)
    paths, written = write_shards(tmp_path, [7, 9], row_group_size=group_rows)
    merged = {k: np.concatenate([w[k] for w in written]) for k in written[0]}
    ds = cf.CacheDataset(paths, batch_size=batch, seed=1, shuffle_buffer=buffer, cached_row_groups=1)
    spans = []
    for epoch in (0, 1):  # 1 slot, batches over several groups: the slots grow, evict and reload
        ds.set_epoch(epoch)
        batches = list(ds)
        ids = np.concatenate([b["sample_id"].numpy() for b in batches])
        assert sorted(ids) == list(range(16)) and list(ids) != list(range(16))
        for batch in batches:
            rows = batch["sample_id"].numpy()
            spans.append(len(set(ds.arena.row_group[ds.sampler.file_offsets[0] + rows].tolist())))
            np.testing.assert_array_equal(batch["topk_ids"].numpy(), merged["topk_ids"][rows])
            np.testing.assert_array_equal(batch["hidden_1"].numpy(), merged["hidden_1"][rows])
            np.testing.assert_array_equal(batch["embed"].numpy(), merged["embed"][rows])
    assert ds.arena._slots > 1 and max(spans) > 1
    direct = {"arena": [], "wide": ["hidden_1", "hidden_3", "topk_ids"], "direct": sorted(ds.columns)}[mode]
    assert ds.arena.direct == (mode == "direct") and sorted(ds.arena._direct) == direct


def test_bf16_hidden_subsampled_positions_and_column_selection(tmp_path):
    positions = cf.hidden_positions(T, every_n=2)
    assert positions == [0, 2, 4]
    paths, written = write_shards(tmp_path, [4], hidden_dtype="bfloat16", hidden_positions=positions, embed_layer=None)
    ds = cf.CacheDataset(paths, batch_size=4, shuffle=False, columns=["topk_logprobs", "hidden_-1"])
    (batch,) = list(ds)
    assert set(batch) == {"sample_id", "topk_logprobs", "hidden_3", "hidden_positions", "epoch", "batch_index"}
    expected = torch.from_numpy(written[0]["hidden_3"]).view(torch.bfloat16)
    assert torch.equal(batch["hidden_3"], expected) and batch["hidden_3"].shape == (4, 3, H)
    assert batch["hidden_positions"].tolist() == positions
    fraction = cf.hidden_positions(100, fraction=0.25, seed=1)
    assert len(fraction) == 25 and fraction == sorted(set(fraction)) == cf.hidden_positions(100, fraction=0.25, seed=1)


@pytest.mark.parametrize("world_size,workers", [(2, 2), (3, 0)])
def test_each_sample_exactly_once_across_ranks_and_workers(tmp_path, world_size, workers):
    paths, _ = write_shards(tmp_path, [7, 5, 9], row_group_size=3)
    seen = []
    for rank in range(world_size):
        ds = cf.CacheDataset(paths, batch_size=2, seed=3, rank=rank, world_size=world_size, shuffle_buffer=4)
        ds.set_epoch(1)
        loader = DataLoader(ds, batch_size=None, num_workers=workers)
        batches = list(loader)
        assert len(batches) == len(ds)
        assert [b["batch_index"] for b in batches] == list(range(len(ds)))
        seen += sample_ids(batches)
    assert sorted(seen) == list(range(21))


def test_shuffle_is_deterministic_per_seed_and_epoch(tmp_path):
    paths, _ = write_shards(tmp_path, [6, 6, 6])

    def order(seed, epoch):
        ds = cf.CacheDataset(paths, batch_size=4, seed=seed, shuffle_buffer=8)
        ds.set_epoch(epoch)
        return sample_ids(ds)

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1) and order(0, 0) != order(1, 0)
    assert sorted(order(0, 1)) == list(range(18)) and order(0, 1) != list(range(18))


def test_resume_reproduces_the_uninterrupted_sequence_across_epochs(tmp_path):
    paths, _ = write_shards(tmp_path, [7, 6], row_group_size=4)
    kwargs = dict(batch_size=2, seed=5, shuffle_buffer=5, rank=1, world_size=2, infinite=True)
    full_ds = cf.CacheDataset(paths, **kwargs)
    per_epoch = len(full_ds)  # 13 rows -> 7 global batches -> rank 1 has 3
    full = []
    for batch in DataLoader(full_ds, batch_size=None, num_workers=2):
        full.append((batch["epoch"], batch["batch_index"], batch["sample_id"].tolist()))
        if len(full) == 3 * per_epoch:
            break
    assert [e for e, _, _ in full] == [0] * per_epoch + [1] * per_epoch + [2] * per_epoch
    for consumed in (1, per_epoch + 2):  # odd offsets: the worker round-robin restarts at the resume point
        epoch, index, _ = full[consumed - 1]
        resumed_ds = cf.CacheDataset(paths, **kwargs)
        resumed_ds.start_from(epoch, index + 1)
        resumed = []
        for batch in DataLoader(resumed_ds, batch_size=None, num_workers=2):
            resumed.append((batch["epoch"], batch["batch_index"], batch["sample_id"].tolist()))
            if len(resumed) == len(full) - consumed:
                break
        assert resumed == full[consumed:]


def test_write_refuses_nan_and_reader_detects_nan_in_file(tmp_path):
    meta = make_meta(3)
    cols = make_columns(meta, 0, 0)
    cols["topk_logprobs"][1, 2, 0] = np.nan
    with pytest.raises(PipelineError, match="topk_logprobs.*NaN"):
        cf.write_shard(tmp_path / "train-00000.parquet", cols, meta)
    assert not list(tmp_path.iterdir())
    cols = make_columns(meta, 0, 0)
    cols["hidden_1"][0, 0, 0] = np.inf
    with pytest.raises(PipelineError, match="hidden_1.*NaN/inf"):
        cf.write_shard(tmp_path / "train-00000.parquet", cols, meta)
    # a corrupt file written behind the writer's back
    cols = make_columns(meta, 0, 0)
    path = tmp_path / "train-00000.parquet"
    cf.write_shard(path, cols, meta)
    table = pq.read_table(path)
    tail = table.column("tail_logmass").combine_chunks()
    values = tail.flatten().to_numpy().copy()
    values[4] = np.nan
    table = table.set_column(5, "tail_logmass", cf._fixed_list(values, table.schema.field(5).type))
    pq.write_table(table, path)
    with pytest.raises(PipelineError, match=r"train-00000.parquet: column tail_logmass holds NaN/inf"):
        list(cf.CacheDataset([path], batch_size=2))


def test_metadata_errors(tmp_path):
    paths, _ = write_shards(tmp_path, [3])
    table = pq.read_table(paths[0])
    meta = json.loads(table.schema.metadata[cf.META_KEY])
    old = tmp_path / "train-00009.parquet"
    pq.write_table(table.replace_schema_metadata({cf.META_KEY: json.dumps({**meta, "format_version": 0})}), old)
    with pytest.raises(PipelineError, match="format_version 0, this code reads"):
        cf.read_cache_meta(old)
    plain = tmp_path / "plain.parquet"
    pq.write_table(table.replace_schema_metadata({}), plain)
    with pytest.raises(PipelineError, match="not a cache shard"):
        cf.read_cache_meta(plain)
    with pytest.raises(PipelineError, match="missing; run the cache stage"):
        cf.read_cache_meta(tmp_path / "nope.parquet")
    good = cf.read_cache_meta(paths[0])
    cf.validate_for_student(good, vocab_hash="vocabhash", vocab_size=V, need_hidden_layers=[1, -1], need_embed=True)
    with pytest.raises(PipelineError, match="train-00000.parquet: teacher vocabulary"):
        cf.validate_for_student(good, vocab_hash="other", vocab_size=V)
    with pytest.raises(PipelineError, match="hidden layer 2 is not cached"):
        cf.validate_for_student(good, vocab_hash="vocabhash", vocab_size=V, need_hidden_layers=[2])
    with pytest.raises(PipelineError, match="requested column 'hidden_2'"):
        cf.CacheDataset(paths, batch_size=2, columns=["hidden_2"])
    other, _ = write_shards(tmp_path / "other", [3], top_k=K, teacher_fingerprint="different")
    with pytest.raises(PipelineError, match="teacher_fingerprint.*cannot be mixed"):
        cf.CacheDataset(paths + other, batch_size=2)
    with pytest.raises(PipelineError, match="_COMPLETE.json: missing"):
        cf.list_cache_shards(tmp_path / "absent", "train")
    with pytest.raises(ConfigError, match="hidden-state index 7 out of range for the cached teacher"):
        cf.normalise_layer(7, good)
    with pytest.raises(PipelineError, match="fewer than world_size"):
        cf.CacheDataset(paths, batch_size=4, rank=1, world_size=2, infinite=True)


def test_listed_shards_are_the_declared_ones_never_a_glob(tmp_path):
    """A consumer reads exactly what the cache marker declares: a stray shard on disk is not data, and a declared
    shard that is missing or changed is refused naming it and the command that recomputes it."""
    paths, _ = write_shards(tmp_path, [3, 2, 4])
    records = {p.name: rundir.record_file(p) for p in paths[:2]}  # the third is a stray of an earlier run
    rundir.atomic_write_json(tmp_path / rundir.MARKER, {"outputs": records})
    assert cf.list_cache_shards(tmp_path, "train") == paths[:2] and cf.list_cache_shards(tmp_path, "val") == []
    paths[1].write_bytes(paths[1].read_bytes()[:-10])
    with pytest.raises(
        PipelineError, match=r"train-00001.parquet \(declared in _COMPLETE.json\): changed since .*run make cache"
    ):
        cf.list_cache_shards(tmp_path, "train")
    paths[1].unlink()
    with pytest.raises(
        PipelineError, match=r"train-00001.parquet \(declared in _COMPLETE.json\): missing; run make cache"
    ):
        cf.list_cache_shards(tmp_path, "train")


def test_writer_is_deterministic(tmp_path):
    meta = make_meta(4)
    cols = make_columns(meta, 0, 7)
    a = cf.write_shard(tmp_path / "a" / "train-00000.parquet", cols, meta)
    b = cf.write_shard(tmp_path / "b" / "train-00000.parquet", cols, meta)
    assert a["sha256"] == b["sha256"] and a["rows"] == 4 and a["bytes"] > 0
