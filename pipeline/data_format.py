"""The manifest stage's output format: packed token sequences in Parquet shards plus ``manifest.json``.

Layout under ``runs/<run>/manifest/``::

    train-00000.parquet, train-00001.parquet, ...   packed training rows
    val-00000.parquet, ...                          packed held-out rows
    manifest.json                                   provenance, counts and the shard list (see read_manifest)

Columns of every shard (one row = one packed sequence of ``seq_len`` tokens):

    sample_id       int64                         index of the row within its split, 0..N-1 in file order
    input_ids       fixed_size_list<int32>[T]     token ids; documents are separated by EOS
    attention_mask  fixed_size_list<int8>[T]      1 real token, 0 padding (only a split's last row is padded)
    doc_starts      list<int32>                   positions in the row where a document starts (a row that
                                                  begins mid-document has no 0 entry; EOS ends every document)
    text            binary                        the UTF-8 bytes of the text the row's tokens cover: the pieces of
                                                  its documents back to back (EOS adds no bytes); cut at token
                                                  boundaries, so a row's first or last bytes may be part of a
                                                  character that continues in the neighbouring row
    token_ends      fixed_size_list<int32>[T]     byte offset in ``text`` where each token ends (non-decreasing;
                                                  an EOS appended after a document ends where the document does;
                                                  padding ends at len(text)); see pipeline.xtok.document_ends

``text`` and ``token_ends`` (format 2) are what a student with another tokenizer needs to re-tokenize the same text
and line its positions up with the cached teacher's (pipeline.xtok).

Arrow schema metadata ``b"pipeline.data"`` holds JSON {format_version, split, shard_index, seq_len, vocab_hash,
vocab_size}. Raise :data:`PACKED_FORMAT_VERSION` on any change to the columns or their meaning.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.rundir import PipelineError, atomic_path, file_sha256

PACKED_FORMAT_VERSION = 2  # 2: text and token_ends
META_KEY = b"pipeline.data"
MANIFEST_FILE = "manifest.json"
SPLITS = ("train", "val")
SHARD_META_KEYS = ("split", "shard_index", "seq_len", "vocab_hash", "vocab_size")
TOKEN_COLUMNS = ("sample_id", "input_ids", "attention_mask", "doc_starts")
TEXT_COLUMNS = ("text", "token_ends")


def shard_name(split: str, index: int) -> str:
    """``train-00000.parquet``: the file name of shard ``index`` of ``split``."""
    return f"{split}-{index:05d}.parquet"


def packed_schema(seq_len: int, meta: dict[str, Any]) -> pa.Schema:
    """The Arrow schema of a packed shard with ``meta`` (format_version added) as ``pipeline.data`` metadata."""
    fields = [
        pa.field("sample_id", pa.int64(), nullable=False),
        pa.field("input_ids", pa.list_(pa.int32(), seq_len), nullable=False),
        pa.field("attention_mask", pa.list_(pa.int8(), seq_len), nullable=False),
        pa.field("doc_starts", pa.list_(pa.int32()), nullable=False),
        pa.field("text", pa.binary(), nullable=False),
        pa.field("token_ends", pa.list_(pa.int32(), seq_len), nullable=False),
    ]
    blob = json.dumps({"format_version": PACKED_FORMAT_VERSION, **meta}, sort_keys=True)
    return pa.schema(fields, metadata={META_KEY: blob.encode()})


def _check_arrays(
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    doc_starts: Sequence[np.ndarray],
    sample_ids: np.ndarray,
    texts: Sequence[bytes],
    token_ends: np.ndarray,
) -> None:
    """Programming errors in the writer's caller, not user input: plain ValueError."""
    if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape or token_ends.shape != input_ids.shape:
        raise ValueError(
            f"input_ids {input_ids.shape}, attention_mask {attention_mask.shape} and token_ends {token_ends.shape} "
            "must be equal [N, T]"
        )
    if len(doc_starts) != len(input_ids) or sample_ids.shape != (len(input_ids),) or len(texts) != len(input_ids):
        raise ValueError(
            f"doc_starts ({len(doc_starts)}), texts ({len(texts)}) and sample_ids {sample_ids.shape} must have N "
            "entries"
        )
    if not np.isin(attention_mask, (0, 1)).all():
        raise ValueError("attention_mask must hold only 0 and 1")
    problem = token_ends_problem(texts, token_ends)
    if problem:
        raise ValueError(problem)


def token_ends_problem(texts: Sequence[bytes], token_ends: np.ndarray) -> str | None:
    """What is wrong with a shard's ``token_ends`` against its ``text`` (None when nothing): every row's ends are
    non-decreasing, within its text, and the last one is its text's length."""
    lengths = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
    if len(token_ends) and token_ends.shape[1]:
        if (token_ends < 0).any() or (np.diff(token_ends, axis=1) < 0).any():
            return "token_ends must be non-negative and non-decreasing along every row"
        bad = np.flatnonzero(token_ends[:, -1] != lengths)
        if len(bad):
            row = int(bad[0])
            return f"token_ends of row {row} end at {int(token_ends[row, -1])}, its text has {lengths[row]} bytes"
    return None


def write_packed_shard(
    path: Path,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    doc_starts: Sequence[np.ndarray],
    sample_ids: np.ndarray,
    meta: dict[str, Any],
    compression: str = "zstd",
    *,
    texts: Sequence[bytes],
    token_ends: np.ndarray,
) -> dict[str, Any]:
    """Write one packed shard atomically (temp file + rename); return {file, rows, sha256, bytes}.

    ``input_ids``/``attention_mask``/``token_ends`` are [N, T] arrays, ``doc_starts`` N arrays of positions,
    ``sample_ids`` [N], ``texts`` N byte strings; ``meta`` must hold split, shard_index, seq_len, vocab_hash and
    vocab_size.
    """
    path = Path(path)
    input_ids = np.ascontiguousarray(input_ids, dtype=np.int32)
    attention_mask = np.ascontiguousarray(attention_mask, dtype=np.int8)
    token_ends = np.ascontiguousarray(token_ends, dtype=np.int64)
    sample_ids = np.asarray(sample_ids, dtype=np.int64)
    _check_arrays(input_ids, attention_mask, doc_starts, sample_ids, texts, token_ends)
    missing = [k for k in SHARD_META_KEYS if k not in meta]
    if missing:
        raise ValueError(f"shard metadata lacks {missing}")
    rows, seq_len = input_ids.shape
    if seq_len != meta["seq_len"]:
        raise ValueError(f"input_ids rows have {seq_len} tokens, meta says seq_len={meta['seq_len']}")
    lengths = np.fromiter((len(d) for d in doc_starts), dtype=np.int64, count=rows)
    offsets = np.zeros(rows + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    starts = np.concatenate([np.asarray(d, dtype=np.int32) for d in doc_starts]) if rows else np.zeros(0, np.int32)
    columns = [
        pa.array(sample_ids, type=pa.int64()),
        pa.FixedSizeListArray.from_arrays(pa.array(input_ids.reshape(-1)), seq_len),
        pa.FixedSizeListArray.from_arrays(pa.array(attention_mask.reshape(-1)), seq_len),
        pa.ListArray.from_arrays(pa.array(offsets), pa.array(starts, type=pa.int32())),
        pa.array(list(texts), type=pa.binary()),
        pa.FixedSizeListArray.from_arrays(pa.array(token_ends.reshape(-1).astype(np.int32)), seq_len),
    ]
    table = pa.Table.from_arrays(columns, schema=packed_schema(seq_len, meta))
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression=None if compression == "none" else compression)
    return {"file": path.name, "rows": rows, "sha256": file_sha256(path), "bytes": path.stat().st_size}


def read_packed_meta(path: Path) -> dict[str, Any]:
    """The ``pipeline.data`` metadata of a shard (validated), without reading its data."""
    path = Path(path)
    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowException) as err:
        raise PipelineError(f"{path}: not a readable Parquet shard ({err})") from None
    return _meta_from_schema(path, schema)


def schema_json(path: Path, schema: pa.Schema, key: bytes, kind: str) -> dict[str, Any]:
    """The JSON object stored under ``key`` in a shard's Arrow schema metadata (shared by the manifest and cache
    formats); a PipelineError naming the file when it is absent, not JSON or not an object."""
    raw = (schema.metadata or {}).get(key)
    if raw is None:
        raise PipelineError(f"{path}: expected Arrow schema metadata {key.decode()!r}; not a {kind}")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        raise PipelineError(f"{path}: {key.decode()} metadata is not valid JSON") from None
    if not isinstance(meta, dict):
        raise PipelineError(f"{path}: {key.decode()} metadata is not a JSON object")
    return meta


def _meta_from_schema(path: Path, schema: pa.Schema) -> dict[str, Any]:
    meta = schema_json(path, schema, META_KEY, "manifest shard")
    if meta.get("format_version") != PACKED_FORMAT_VERSION:
        raise PipelineError(
            f"{path}: format_version {meta.get('format_version')!r}, expected {PACKED_FORMAT_VERSION}; "
            "rerun the manifest stage with this code"
        )
    for key in TOKEN_COLUMNS + TEXT_COLUMNS:
        if key not in schema.names:
            raise PipelineError(f"{path}: column {key!r} missing")
    return meta


def _read_table(path: Path, columns: Sequence[str]) -> tuple[pa.Table, dict[str, Any]]:
    path = Path(path)
    try:
        schema = pq.read_schema(path)
        meta = _meta_from_schema(path, schema)
        return pq.read_table(path, columns=list(columns)), meta
    except (OSError, pa.ArrowException) as err:
        raise PipelineError(f"{path}: not a readable Parquet shard ({err})") from None


def _square(table: pa.Table, name: str, dtype: type, seq_len: int) -> np.ndarray:
    col = table.column(name).combine_chunks()
    return col.flatten().to_numpy(zero_copy_only=False).astype(dtype, copy=False).reshape(table.num_rows, seq_len)


def _doc_starts(table: pa.Table) -> list[np.ndarray]:
    starts = table.column("doc_starts").combine_chunks()
    offsets = starts.offsets.to_numpy()
    values = starts.flatten().to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
    return np.split(values, offsets[1:-1] - offsets[0]) if table.num_rows else []


def read_packed_shard(path: Path) -> dict[str, Any]:
    """A shard's tokens as numpy arrays: {sample_id [N] int64, input_ids [N,T] int32, attention_mask [N,T] int8,
    doc_starts: list of N int32 arrays, meta: dict}. Vectorised (no per-row Python conversion); the text columns
    are left unread (:func:`read_packed_text`)."""
    table, meta = _read_table(path, TOKEN_COLUMNS)
    seq_len = int(meta["seq_len"])
    return {
        "sample_id": table.column("sample_id").to_numpy().astype(np.int64, copy=False),
        "input_ids": _square(table, "input_ids", np.int32, seq_len),
        "attention_mask": _square(table, "attention_mask", np.int8, seq_len),
        "doc_starts": _doc_starts(table),
        "meta": meta,
    }


def read_packed_text(path: Path) -> dict[str, Any]:
    """A shard's text columns: {sample_id [N] int64, text: list of N byte strings, token_ends [N,T] int32,
    doc_starts: list of N int32 arrays, meta} (what re-tokenizing a row needs, without its token ids); a
    PipelineError naming the file when the ends do not fit the text (a damaged shard)."""
    table, meta = _read_table(path, ("sample_id", "doc_starts", *TEXT_COLUMNS))
    texts = table.column("text").to_pylist()
    ends = _square(table, "token_ends", np.int32, int(meta["seq_len"]))
    problem = token_ends_problem(texts, ends)
    if problem:
        raise PipelineError(f"{path}: {problem}; the shard is damaged, rerun the manifest stage")
    return {
        "sample_id": table.column("sample_id").to_numpy().astype(np.int64, copy=False),
        "text": texts,
        "token_ends": ends,
        "doc_starts": _doc_starts(table),
        "meta": meta,
    }


def _need(obj: Any, key: str, kind: type | tuple[type, ...], where: Path, path: str) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise PipelineError(f"{where}: key {path} missing; rerun the manifest stage")
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise PipelineError(f"{where}: key {path} has the wrong type ({type(value).__name__})")
    return value


def read_manifest(manifest_dir: Path, verify_checksums: bool = False) -> dict[str, Any]:
    """``manifest.json`` of ``manifest_dir``, validated; shard files must exist (and match sha256 if asked).

    Raises PipelineError naming the file and the key on any problem.
    """
    manifest_dir = Path(manifest_dir)
    where = manifest_dir / MANIFEST_FILE
    try:
        manifest = json.loads(where.read_text())
    except FileNotFoundError:
        raise PipelineError(f"{where}: missing; run the manifest stage first (make manifest)") from None
    except (OSError, json.JSONDecodeError) as err:
        raise PipelineError(f"{where}: unreadable ({err})") from None
    version = _need(manifest, "format_version", int, where, "format_version")
    if version != PACKED_FORMAT_VERSION:
        raise PipelineError(f"{where}: format_version {version}, expected {PACKED_FORMAT_VERSION}; rerun the manifest")
    _need(manifest, "seq_len", int, where, "seq_len")
    _need(manifest, "seed", int, where, "seed")
    _need(manifest, "sources", list, where, "sources")
    _need(manifest, "counts", dict, where, "counts")
    tok = _need(manifest, "tokenizer", dict, where, "tokenizer")
    _need(tok, "name_or_path", str, where, "tokenizer.name_or_path")
    _need(tok, "vocab_hash", str, where, "tokenizer.vocab_hash")
    _need(tok, "vocab_size", int, where, "tokenizer.vocab_size")
    _need(tok, "eos_token_id", int, where, "tokenizer.eos_token_id")
    splits = _need(manifest, "splits", dict, where, "splits")
    for split in SPLITS:
        info = _need(splits, split, dict, where, f"splits.{split}")
        rows = _need(info, "rows", int, where, f"splits.{split}.rows")
        _need(info, "tokens", int, where, f"splits.{split}.tokens")
        shards = _need(info, "shards", list, where, f"splits.{split}.shards")
        total = 0
        for i, shard in enumerate(shards):
            key = f"splits.{split}.shards.{i}"
            name = _need(shard, "file", str, where, f"{key}.file")
            total += _need(shard, "rows", int, where, f"{key}.rows")
            digest = _need(shard, "sha256", str, where, f"{key}.sha256")
            file = manifest_dir / name
            if not file.is_file():
                raise PipelineError(f"{where}: {key}.file {name} does not exist in {manifest_dir}")
            if verify_checksums and file_sha256(file) != digest:
                raise PipelineError(f"{file}: sha256 differs from {where} ({key}.sha256); the shard was modified")
        if total != rows:
            raise PipelineError(f"{where}: splits.{split}.rows is {rows} but its shards hold {total} rows")
    return manifest


def shard_paths(manifest: dict[str, Any], manifest_dir: Path, split: str) -> list[Path]:
    """The shard files of ``split`` listed in a manifest read by :func:`read_manifest`, in order."""
    return [Path(manifest_dir) / s["file"] for s in manifest["splits"][split]["shards"]]
