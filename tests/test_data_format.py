"""Packed-shard format: round trip, schema/metadata contract, atomic writes, manifest validation."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import data_format as df
from pipeline.rundir import PipelineError, file_sha256

META = {"split": "train", "shard_index": 0, "seq_len": 6, "vocab_hash": "abc", "vocab_size": 384}


def _arrays(rows: int = 3, seq_len: int = 6):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 384, size=(rows, seq_len)).astype(np.int64)
    mask = np.ones((rows, seq_len), dtype=np.int64)
    mask[-1, 4:] = 0
    starts = [np.array([0, 3]), np.array([], dtype=np.int64), np.array([2])][:rows]
    return ids, mask, starts, np.arange(rows)


TEXTS = [b"abcdefgh", "caf\u00e9 ok".encode(), b"xyz"]
ENDS = np.array([[1, 2, 4, 4, 6, 8], [2, 3, 5, 5, 7, 8], [1, 2, 2, 3, 3, 3]])  # the last row's padding ends at 3


def text_columns(rows: int = 3) -> dict:
    return {"texts": TEXTS[:rows], "token_ends": ENDS[:rows]}


def test_round_trip_and_schema(tmp_path):
    ids, mask, starts, sids = _arrays()
    info = df.write_packed_shard(tmp_path / "train-00000.parquet", ids, mask, starts, sids, META, **text_columns())
    path = tmp_path / "train-00000.parquet"
    assert info == {"file": path.name, "rows": 3, "sha256": file_sha256(path), "bytes": path.stat().st_size}
    schema = pq.read_schema(path)
    assert schema.field("sample_id").type == pa.int64()
    assert schema.field("input_ids").type == pa.list_(pa.int32(), 6)
    assert schema.field("attention_mask").type == pa.list_(pa.int8(), 6)
    assert schema.field("doc_starts").type == pa.list_(pa.int32())
    meta = json.loads(schema.metadata[b"pipeline.data"])
    assert meta == {**META, "format_version": df.PACKED_FORMAT_VERSION}
    got = df.read_packed_shard(path)
    assert got["input_ids"].dtype == np.int32 and got["attention_mask"].dtype == np.int8
    np.testing.assert_array_equal(got["input_ids"], ids)
    np.testing.assert_array_equal(got["attention_mask"], mask)
    np.testing.assert_array_equal(got["sample_id"], sids)
    assert [a.tolist() for a in got["doc_starts"]] == [[0, 3], [], [2]]
    assert df.read_packed_meta(path) == got["meta"]
    assert schema.field("text").type == pa.binary() and schema.field("token_ends").type == pa.list_(pa.int32(), 6)
    text = df.read_packed_text(path)
    assert text["text"] == TEXTS and text["token_ends"].dtype == np.int32
    np.testing.assert_array_equal(text["token_ends"], ENDS)
    np.testing.assert_array_equal(text["sample_id"], sids)
    assert not list(tmp_path.glob(".*.tmp")), "temp file left behind"


def test_read_handles_multiple_row_groups(tmp_path):
    ids, mask, starts, sids = _arrays()
    path = tmp_path / "a.parquet"
    df.write_packed_shard(path, ids, mask, starts, sids, META, compression="none", **text_columns())
    table = pq.read_table(path)
    pq.write_table(table, tmp_path / "b.parquet", row_group_size=1)  # several chunks per column when read back
    got = df.read_packed_shard(tmp_path / "b.parquet")
    np.testing.assert_array_equal(got["input_ids"], ids)
    assert [a.tolist() for a in got["doc_starts"]] == [[0, 3], [], [2]]


def test_write_is_deterministic(tmp_path):
    ids, mask, starts, sids = _arrays()
    a = df.write_packed_shard(tmp_path / "a.parquet", ids, mask, starts, sids, META, **text_columns())
    b = df.write_packed_shard(tmp_path / "b.parquet", ids, mask, starts, sids, META, **text_columns())
    assert a["sha256"] == b["sha256"]


def test_failed_write_leaves_nothing(tmp_path):
    ids, mask, starts, sids = _arrays()
    with pytest.raises(ValueError, match="seq_len"):
        df.write_packed_shard(tmp_path / "x.parquet", ids, mask, starts, sids, {**META, "seq_len": 7}, **text_columns())
    with pytest.raises(ValueError, match="attention_mask"):
        df.write_packed_shard(tmp_path / "x.parquet", ids, mask * 2, starts, sids, META, **text_columns())
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("ends", "message"),
    [
        (np.array([[1, 2, 4, 3, 6, 8]]), "non-decreasing"),
        (np.array([[1, 2, 4, 4, 6, 7]]), "token_ends of row 0 end at 7, its text has 8 bytes"),
    ],
)
def test_token_ends_that_do_not_fit_the_text_are_refused(tmp_path, ends, message):
    ids, mask, starts, sids = _arrays(rows=1)
    with pytest.raises(ValueError, match=message):
        df.write_packed_shard(tmp_path / "x.parquet", ids, mask, starts, sids, META, texts=TEXTS[:1], token_ends=ends)
    df.write_packed_shard(tmp_path / "ok.parquet", ids, mask, starts, sids, META, texts=TEXTS[:1], token_ends=ENDS[:1])
    table = pq.read_table(tmp_path / "ok.parquet")  # a shard damaged after it was written
    table = table.set_column(table.schema.get_field_index("text"), "text", pa.array([b"abc"], pa.binary()))
    pq.write_table(table, tmp_path / "damaged.parquet")
    with pytest.raises(PipelineError, match="damaged.parquet: token_ends of row 0 end at 8, its text has 3 bytes"):
        df.read_packed_text(tmp_path / "damaged.parquet")


def test_foreign_parquet_is_rejected_naming_the_file(tmp_path):
    path = tmp_path / "foreign.parquet"
    pq.write_table(pa.table({"x": [1, 2]}), path)
    with pytest.raises(PipelineError, match="foreign.parquet"):
        df.read_packed_shard(path)
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(PipelineError, match="junk.parquet: not a readable"):
        df.read_packed_meta(tmp_path / "junk.parquet")


def _manifest(tmp_path) -> dict:
    ids, mask, starts, sids = _arrays()
    train = df.write_packed_shard(tmp_path / df.shard_name("train", 0), ids, mask, starts, sids, META, **text_columns())
    val = df.write_packed_shard(
        tmp_path / df.shard_name("val", 0), ids[:1], mask[:1], starts[:1], sids[:1], META, **text_columns(1)
    )
    manifest = {
        "format_version": df.PACKED_FORMAT_VERSION,
        "seq_len": 6,
        "seed": 0,
        "tokenizer": {"name_or_path": "t", "vocab_hash": "abc", "vocab_size": 384, "eos_token_id": 0},
        "sources": [],
        "counts": {},
        "splits": {
            "train": {"rows": 3, "tokens": 16, "shards": [train]},
            "val": {"rows": 1, "tokens": 6, "shards": [val]},
        },
    }
    (tmp_path / df.MANIFEST_FILE).write_text(json.dumps(manifest))
    return manifest


def test_read_manifest_valid(tmp_path):
    manifest = _manifest(tmp_path)
    assert df.read_manifest(tmp_path, verify_checksums=True) == manifest
    assert df.shard_paths(manifest, tmp_path, "train") == [tmp_path / "train-00000.parquet"]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda m: m.pop("seq_len"), "key seq_len missing"),
        (lambda m: m.update(format_version=99), "format_version 99"),
        (lambda m: m["tokenizer"].update(vocab_size="big"), "tokenizer.vocab_size has the wrong type"),
        (lambda m: m["splits"].pop("val"), "splits.val missing"),
        (lambda m: m["splits"]["train"].update(rows=4), "splits.train.rows is 4 but its shards hold 3"),
        (lambda m: m["splits"]["train"]["shards"][0].update(file="gone.parquet"), "gone.parquet does not exist"),
        (lambda m: m["splits"]["train"]["shards"][0].update(sha256="0" * 64), "sha256 differs"),
    ],
)
def test_read_manifest_rejects(tmp_path, mutate, message):
    manifest = _manifest(tmp_path)
    mutate(manifest)
    (tmp_path / df.MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(PipelineError, match=message) as info:
        df.read_manifest(tmp_path, verify_checksums=True)
    assert "manifest.json" in str(info.value) or "parquet" in str(info.value)


def test_read_manifest_missing_or_corrupt(tmp_path):
    with pytest.raises(PipelineError, match="manifest.json: missing"):
        df.read_manifest(tmp_path)
    (tmp_path / df.MANIFEST_FILE).write_text("{not json")
    with pytest.raises(PipelineError, match="manifest.json: unreadable"):
        df.read_manifest(tmp_path)


def test_schema_metadata_that_is_not_an_object_is_a_clear_error(tmp_path):
    import pyarrow as pa
    import pytest

    from pipeline.data_format import META_KEY, schema_json
    from pipeline.rundir import PipelineError

    schema = pa.schema([("x", pa.int32())], metadata={META_KEY: b"[1]"})
    with pytest.raises(PipelineError, match="shard.parquet: pipeline.data metadata is not a JSON object"):
        schema_json(tmp_path / "shard.parquet", schema, META_KEY, "manifest shard")
