"""The teacher cache's on-disk format, shared by its writer (the cache stage) and its readers (train, evaluate).

Layout under ``runs/<run>/cache/``::

    train-00000.parquet, ..., val-00000.parquet   one cache shard per manifest shard, same stem
    _shards/<stem>.json                           completion record per shard {sha256, rows, bytes, ...}

Columns (one row = one packed sequence of T tokens; k = top_k, H = hidden_dim, Tsub = stored hidden positions):

    sample_id       int64                              the manifest row's sample_id
    input_ids       fixed_size_list<int32>[T]          copied from the manifest
    attention_mask  fixed_size_list<int8>[T]           1 real token, 0 padding
    topk_ids        fixed_size_list<int32>[T*k]        row-major [T, k], most probable first
    topk_logprobs   fixed_size_list<halffloat>[T*k]    log p_tau(id) of the FULL distribution at temperature tau
    tail_logmass    fixed_size_list<halffloat>[T]      log(1 - sum of the k probabilities)
    sampled_ids     fixed_size_list<int32>[T*n]        row-major [T, n]: distinct drawn ids, heaviest first, then
                                                       padding (id 0, weight 0); only with sampled targets
    sampled_weights fixed_size_list<halffloat>[T*n]    w_v = (c_v / n) * p(v) / q(v) (pipeline.sampling): E[w_v] = p(v)
    hidden_<i>      fixed_size_binary[Tsub*H*2]        hidden_states[i] at the stored positions, fp16 or bf16 bytes
    embed           fixed_size_list<float32>[H]        masked mean of hidden_states[embed_layer] over real tokens

Why these encodings (measured, see ``pipeline.bench.benchmark_reader``): fixed-size types decode to one contiguous
numpy buffer; list elements are non-nullable (format v2), so Parquet stores no per-value definition levels (the two
top-k columns decode ~25 % faster than with v1's nullable elements); dictionary encoding is off everywhere (it slows
float columns and buys nothing on them); the id and log-prob leaves use Parquet BYTE_STREAM_SPLIT so zstd sees the
(mostly zero) high bytes of int32 ids and the fp16 exponents as separate streams (~17 % smaller than plain, and
faster to decode); hidden states stay fixed_size_binary, which decodes ~2x faster than a float list of the same data.
Statistics are off (min/max of a multi-MB binary cell is useless). Log-probs below the fp16 range are stored as
:data:`LOGPROB_FLOOR` (exp of it is 0), so files never hold infinities; NaN/inf in a file means corruption and the
reader refuses it naming the file and column.

Sampled targets (``cache.targets`` sampled or topk+sampled): n = ``sampling.draws`` tokens per position drawn from a
proposal q (p itself, or p^(1/t) with ``proposal_temperature`` t) over the whole vocabulary (support ``full``) or
over the tokens outside the top-k (support ``tail``), stored as distinct ids with their weights. The metadata key
``sampling`` describes them completely (draws, support, proposal temperature, seed, the weight formula and how the
uniforms were generated); it is None for a top-k-only cache, whose shards have no sampled columns.

Hidden positions: with ``hidden_every_n`` or ``hidden_fraction`` set, the same sorted position index applies to
every row of the cache and is stored in the metadata (``hidden_positions``); the reader yields it as a [Tsub] tensor.
Hidden-state indices follow ``pipeline.modeling.HIDDEN_INDEX_CONVENTION`` and are stored non-negative.

Schema metadata ``b"pipeline.cache"`` holds JSON with :data:`META_KEYS`. Raise :data:`FORMAT_VERSION` on any change
to columns, encodings or their meaning. Writers are deterministic (fixed row-group size derived from the schema, no
timestamps), so an interrupted and resumed cache stage produces byte-identical shards.
"""

from __future__ import annotations

import collections
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, get_worker_info

from pipeline.data_format import schema_json
from pipeline.rundir import MARKER, PipelineError, atomic_path, declared_outputs, file_problem, file_sha256
from pipeline.validate import hidden_index

FORMAT_VERSION = 3  # 3: targets + sampling metadata, optional sampled_ids / sampled_weights columns
META_KEY = b"pipeline.cache"
LOGPROB_FLOOR = float(np.finfo(np.float16).min)  # -65504: log-probs below it are stored as it (p == 0 in fp32)
ROW_GROUP_TARGET_BYTES = 64 << 20  # uncompressed bytes per row group: the reader's unit of I/O and memory
MAX_ROW_GROUP_ROWS = 1024
# reader: rows wider than this (hidden states) are gathered straight from the decoded row groups instead of being
# copied into the arena first; at that width the per-group Python overhead is nil and the copy would double the
# bytes moved (measured: ~30 % of the read time with one 576-wide bf16 layer at T=512)
ARENA_MAX_ROW_BYTES = 64 << 10
META_KEYS: dict[str, type | tuple[type, ...]] = {
    "format_version": int,
    "teacher": str,
    "teacher_fingerprint": str,
    "vocab_hash": str,
    "vocab_size": int,
    "top_k": int,
    "temperature": (int, float),
    "dtype": str,
    "hidden_layers": list,
    "hidden_dim": int,
    "hidden_dtype": str,
    "hidden_positions": (list, type(None)),
    "hidden_index_convention": str,
    "num_hidden_states": int,
    "embed_layer": (int, type(None)),
    "targets": str,
    "sampling": (dict, type(None)),
    "seq_len": int,
    "split": str,
    "manifest_shard": str,
    "manifest_sha256": str,
    "rows": int,
}
BASE_COLUMNS = ("sample_id", "input_ids", "attention_mask", "topk_ids", "topk_logprobs", "tail_logmass")
SAMPLED_COLUMNS = ("sampled_ids", "sampled_weights")
# BYTE_STREAM_SPLIT-encoded list leaves
BSS_LEAVES = ("topk_ids", "topk_logprobs", "tail_logmass", "embed", *SAMPLED_COLUMNS)
HIDDEN_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
# list value type -> torch dtype of the batch tensor (the reader yields what is stored)
STORED_TORCH_DTYPES = {
    pa.int8(): torch.int8,
    pa.int32(): torch.int32,
    pa.float16(): torch.float16,
    pa.float32(): torch.float32,
}
# exponent bits of a 2-byte float: all ones means inf or NaN
NONFINITE_MASK = {"float16": 0x7C00, "bfloat16": 0x7F80}


def hidden_column(layer: int) -> str:
    """Parquet column of hidden_states[layer], also its key in a :class:`CacheDataset` batch."""
    return f"hidden_{layer}"


def cache_shard_name(manifest_shard: str) -> str:
    """A cache shard has the stem of the manifest shard it was computed from."""
    return Path(manifest_shard).name


def num_hidden_positions(meta: dict[str, Any]) -> int:
    positions = meta.get("hidden_positions")
    return int(meta["seq_len"]) if positions is None else len(positions)


def hidden_positions(seq_len: int, every_n: int = 1, fraction: float | None = None, seed: int = 0) -> list[int] | None:
    """Stored hidden positions: None for all, every n-th, or a seeded random fraction (sorted); same for all rows."""
    if fraction is not None:
        count = max(1, round(fraction * seq_len))
        rng = np.random.default_rng([seed, seq_len, count])
        return sorted(int(p) for p in rng.choice(seq_len, size=count, replace=False))
    if every_n > 1:
        return list(range(0, seq_len, every_n))
    return None


def sampled_width(meta: dict[str, Any]) -> int:
    """Slots per position of the sampled columns (the number of draws: every draw may be distinct); 0 without."""
    sampling = meta.get("sampling")
    return 0 if sampling is None else int(sampling["draws"])


def optional_columns(meta: dict[str, Any]) -> list[str]:
    """Columns beyond :data:`BASE_COLUMNS` that ``meta`` promises, in schema order."""
    names = list(SAMPLED_COLUMNS) if meta.get("sampling") is not None else []
    names += [hidden_column(i) for i in meta["hidden_layers"]]
    return names + (["embed"] if meta.get("embed_layer") is not None else [])


def _list(value_type: pa.DataType, size: int) -> pa.DataType:
    """Fixed-size list with non-nullable elements: Parquet then stores no per-value definition levels, which
    makes the big top-k columns ~25 % faster to decode (nullable elements were v1)."""
    return pa.list_(pa.field("element", value_type, nullable=False), size)


def cache_schema(meta: dict[str, Any]) -> pa.Schema:
    """The Arrow schema of a cache shard described by ``meta`` (format_version added to the stored metadata)."""
    seq_len, k, dim = int(meta["seq_len"]), int(meta["top_k"]), int(meta["hidden_dim"])
    fields = [
        pa.field("sample_id", pa.int64(), nullable=False),
        pa.field("input_ids", _list(pa.int32(), seq_len), nullable=False),
        pa.field("attention_mask", _list(pa.int8(), seq_len), nullable=False),
        pa.field("topk_ids", _list(pa.int32(), seq_len * k), nullable=False),
        pa.field("topk_logprobs", _list(pa.float16(), seq_len * k), nullable=False),
        pa.field("tail_logmass", _list(pa.float16(), seq_len), nullable=False),
    ]
    if meta.get("sampling") is not None:
        width = seq_len * sampled_width(meta)
        fields.append(pa.field("sampled_ids", _list(pa.int32(), width), nullable=False))
        fields.append(pa.field("sampled_weights", _list(pa.float16(), width), nullable=False))
    width = num_hidden_positions(meta) * dim * 2
    fields += [pa.field(hidden_column(i), pa.binary(width), nullable=False) for i in meta["hidden_layers"]]
    if meta.get("embed_layer") is not None:
        fields.append(pa.field("embed", _list(pa.float32(), dim), nullable=False))
    blob = json.dumps({**meta, "format_version": FORMAT_VERSION}, sort_keys=True)
    return pa.schema(fields, metadata={META_KEY: blob.encode()})


def bytes_per_row(schema: pa.Schema) -> int:
    """Uncompressed bytes of one row of ``schema`` (fixed-size types only)."""
    total = 0
    for field in schema:
        tp = field.type
        if pa.types.is_fixed_size_list(tp):
            total += tp.list_size * tp.value_type.bit_width // 8
        elif pa.types.is_fixed_size_binary(tp):
            total += tp.byte_width
        else:
            total += tp.bit_width // 8
    return total


def row_group_rows(schema: pa.Schema) -> int:
    """Rows per row group: a function of the schema only, so the writer is deterministic."""
    return max(1, min(MAX_ROW_GROUP_ROWS, ROW_GROUP_TARGET_BYTES // bytes_per_row(schema)))


# ------------------------------------------------------------------------------------------------------ writer
def _fixed_list(values: np.ndarray, list_type: pa.DataType) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(values).reshape(-1)), type=list_type)


def _fixed_binary(values: np.ndarray) -> pa.Array:
    raw = np.ascontiguousarray(values).view(np.uint8).reshape(len(values), -1)
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(raw.shape[1]), len(raw), [None, pa.py_buffer(raw)])


def _nonfinite_2byte(values: np.ndarray, dtype_name: str) -> bool:
    mask = NONFINITE_MASK[dtype_name]
    return bool(((values.view(np.uint16) & mask) == mask).any())


def _check_column(name: str, values: np.ndarray, shape: tuple[int, ...], dtypes: tuple) -> None:
    """Shapes and dtypes are programming errors of the caller (ValueError), unlike non-finite values."""
    if values.shape != shape or values.dtype not in dtypes:
        raise ValueError(f"{name}: expected shape {shape} dtype {dtypes}, got {values.shape} {values.dtype}")


def write_shard(
    path: Path,
    columns: dict[str, np.ndarray],
    meta: dict[str, Any],
    *,
    compression: str = "zstd",
    compression_level: int | None = 3,
    row_group_size: int | None = None,
) -> dict[str, Any]:
    """Write one cache shard atomically (temp + rename); return {file, rows, sha256, bytes}.

    ``columns`` holds numpy arrays: sample_id [N] int64, input_ids [N,T] int32, attention_mask [N,T] int8,
    topk_ids [N,T,k] int32, topk_logprobs [N,T,k] float16, tail_logmass [N,T] float16, with sampled targets
    sampled_ids [N,T,n] int32 and sampled_weights [N,T,n] float16, ``hidden_<i>``
    [N,Tsub,H] as 2-byte values (float16, or bf16 bit patterns as int16/uint16), embed [N,H] float32.
    ``meta`` must hold :data:`META_KEYS` except format_version. Non-finite values raise PipelineError.
    """
    path = Path(path)
    missing = [key for key in META_KEYS if key != "format_version" and key not in meta]
    if missing:
        raise ValueError(f"cache shard metadata lacks {missing}")
    rows, seq_len, k, dim = int(meta["rows"]), int(meta["seq_len"]), int(meta["top_k"]), int(meta["hidden_dim"])
    tsub = num_hidden_positions(meta)
    two_byte = (np.dtype(np.float16), np.dtype(np.int16), np.dtype(np.uint16))
    expected = {
        "sample_id": ((rows,), (np.dtype(np.int64),)),
        "input_ids": ((rows, seq_len), (np.dtype(np.int32),)),
        "attention_mask": ((rows, seq_len), (np.dtype(np.int8),)),
        "topk_ids": ((rows, seq_len, k), (np.dtype(np.int32),)),
        "topk_logprobs": ((rows, seq_len, k), (np.dtype(np.float16),)),
        "tail_logmass": ((rows, seq_len), (np.dtype(np.float16),)),
        **{
            name: ((rows, seq_len, sampled_width(meta)), (np.dtype(dt),))
            for name, dt in zip(SAMPLED_COLUMNS, (np.int32, np.float16), strict=True)
            if meta.get("sampling") is not None
        },
        **{hidden_column(i): ((rows, tsub, dim), two_byte) for i in meta["hidden_layers"]},
    }
    if meta.get("embed_layer") is not None:
        expected["embed"] = ((rows, dim), (np.dtype(np.float32),))
    if set(columns) != set(expected):
        raise ValueError(f"columns {sorted(columns)} differ from the schema's {sorted(expected)}")
    for name, (shape, dtypes) in expected.items():
        _check_column(name, columns[name], shape, dtypes)
    for name in ("topk_logprobs", "tail_logmass", "sampled_weights"):
        if name in columns and _nonfinite_2byte(columns[name], "float16"):
            raise PipelineError(f"{path}: column {name}: teacher produced NaN/inf; refusing to write the shard")
    for layer in meta["hidden_layers"]:
        if _nonfinite_2byte(columns[hidden_column(layer)], meta["hidden_dtype"]):
            raise PipelineError(
                f"{path}: column {hidden_column(layer)}: teacher hidden states hold NaN/inf "
                f"(overflow in {meta['hidden_dtype']}?); refusing to write the shard"
            )
    if "embed" in columns and not np.isfinite(columns["embed"]).all():
        raise PipelineError(f"{path}: column embed: NaN/inf in pooled embeddings; refusing to write the shard")

    schema = cache_schema(meta)
    arrays = []
    for field in schema:
        values = columns[field.name]
        if pa.types.is_fixed_size_list(field.type):
            arrays.append(_fixed_list(values, field.type))
        elif pa.types.is_fixed_size_binary(field.type):
            arrays.append(_fixed_binary(values))
        else:
            arrays.append(pa.array(values, type=field.type))
    table = pa.Table.from_arrays(arrays, schema=schema)
    encodings = {f"{name}.list.element": "BYTE_STREAM_SPLIT" for name in BSS_LEAVES if name in schema.names}
    with atomic_path(path) as tmp:
        pq.write_table(
            table,
            tmp,
            row_group_size=row_group_size or row_group_rows(schema),
            compression=None if compression == "none" else compression,
            compression_level=None if compression == "none" else compression_level,
            use_dictionary=False,
            column_encoding=encodings,
            write_statistics=["sample_id"],
            write_page_index=False,
        )
    return {"file": path.name, "rows": rows, "sha256": file_sha256(path), "bytes": path.stat().st_size}


# ------------------------------------------------------------------------------------------------ metadata
def _meta_from_schema(path: Path, schema: pa.Schema, num_rows: int | None = None) -> dict[str, Any]:
    meta = schema_json(path, schema, META_KEY, "cache shard")
    if meta.get("format_version") != FORMAT_VERSION:
        raise PipelineError(
            f"{path}: cache format_version {meta.get('format_version')!r}, this code reads {FORMAT_VERSION}; "
            "rerun the cache stage with this code (make cache ARGS=--force)"
        )
    for key, kind in META_KEYS.items():
        value = meta.get(key, KeyError)
        if value is KeyError:
            raise PipelineError(f"{path}: cache metadata key {key!r} missing; rerun the cache stage")
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise PipelineError(f"{path}: cache metadata key {key!r} has type {type(value).__name__}")
    for name in list(BASE_COLUMNS) + optional_columns(meta):
        if name not in schema.names:
            raise PipelineError(f"{path}: column {name!r} missing although the metadata promises it")
    if num_rows is not None and num_rows != meta["rows"]:
        raise PipelineError(f"{path}: metadata says {meta['rows']} rows, the file holds {num_rows}; shard is corrupt")
    return meta


def read_cache_meta(path: Path) -> dict[str, Any]:
    """The validated ``pipeline.cache`` metadata of a shard (footer only), plus ``path`` and ``row_groups``
    (rows of each row group)."""
    return _read_footer(path)[0]


def _read_footer(path: Path) -> tuple[dict[str, Any], pq.FileMetaData]:
    """:func:`read_cache_meta` and the parsed Parquet footer (reused to open the file without parsing it again)."""
    path = Path(path)
    try:
        footer = pq.read_metadata(path)
    except FileNotFoundError:
        raise PipelineError(f"{path}: cache shard missing; run the cache stage (make cache)") from None
    except (OSError, pa.ArrowException) as err:
        raise PipelineError(f"{path}: not a readable Parquet cache shard ({err})") from None
    meta = _meta_from_schema(path, footer.schema.to_arrow_schema(), footer.num_rows)
    meta["path"] = str(path)
    meta["row_groups"] = [footer.row_group(i).num_rows for i in range(footer.num_row_groups)]
    return meta, footer


def list_cache_shards(cache_dir: Path, split: str) -> list[Path]:
    """The cache shards of ``split`` that the cache stage's marker declares, by shard index: never a glob of what is
    on disk (a shard left from an earlier run is not data). A declared shard that is missing or no longer the one
    recorded is a PipelineError naming it and the command that recomputes it."""
    cache_dir = Path(cache_dir)
    declared = declared_outputs(cache_dir)
    files = []
    for name in sorted(n for n in declared if n.startswith(f"{split}-") and n.endswith(".parquet")):
        problem = file_problem(cache_dir / name, declared[name])
        if problem:
            raise PipelineError(
                f"{cache_dir / name} (declared in {MARKER}): {problem}; run make cache (it recomputes only missing "
                "or changed shards)"
            )
        files.append(cache_dir / name)
    return files


def normalise_layer(layer: int, meta: dict[str, Any]) -> int:
    """A hidden_states index of the cached teacher (negative counts from the end) as stored in the cache."""
    return hidden_index(layer, int(meta["num_hidden_states"]), f"teacher hidden layer {layer}", "the cached teacher")


def validate_for_student(
    meta: dict[str, Any],
    *,
    vocab_hash: str,
    vocab_size: int,
    need_hidden_layers: Sequence[int] = (),
    need_embed: bool = False,
    need_sampled: Sequence[str] = (),
    reader: str = "student's",
) -> None:
    """Refuse a cache that cannot feed this student: other tokenizer vocabulary, missing layers, embeddings or
    sampled targets (``need_sampled``: the draw supports that would do, e.g. ``("full",)``). ``vocab_hash`` and
    ``vocab_size`` are those of the tokenizer whose ids the student reads (``reader`` names it in the error): its
    own, or the teacher's for a student with another tokenizer, which maps them (``pipeline.xtok``)."""
    where = meta.get("path", "<cache shard>")
    if meta["vocab_hash"] != vocab_hash or int(meta["vocab_size"]) != int(vocab_size):
        raise PipelineError(
            f"{where}: teacher vocabulary (hash {meta['vocab_hash']}, size {meta['vocab_size']}) differs from the "
            f"{reader} (hash {vocab_hash}, size {vocab_size}); token ids are not interchangeable"
        )
    stored = [int(i) for i in meta["hidden_layers"]]
    for layer in need_hidden_layers:
        if normalise_layer(int(layer), meta) not in stored:
            raise PipelineError(
                f"{where}: teacher hidden layer {layer} is not cached (cached: {stored}); add it to "
                "cache.hidden_layers and rerun the cache stage"
            )
    if need_embed and meta["embed_layer"] is None:
        raise PipelineError(f"{where}: no pooled embeddings cached; set cache.embed_layer and rerun the cache stage")
    support = (meta.get("sampling") or {}).get("support")
    if need_sampled and support not in need_sampled:
        held = f"cache.targets {meta['targets']!r}" + (f" (draws from the {support} support)" if support else "")
        wanted = " or ".join({"full": "sampled", "tail": "topk+sampled"}[s] for s in need_sampled)
        raise PipelineError(
            f"{where}: these targets need draws from the {' or '.join(need_sampled)} support, the cache holds {held}; "
            f"set cache.targets to {wanted} and rerun the cache stage"
        )


# ------------------------------------------------------------------------------------------------------ reader
# batch dtype -> compute dtype: the reader yields the stored (compact) dtypes, to_compute widens on the device
COMPUTE_DTYPES = {
    torch.int8: torch.int64,
    torch.int32: torch.int64,
    torch.float16: torch.float32,
    torch.bfloat16: torch.float32,
}
CONSISTENT_KEYS = (
    "seq_len",
    "top_k",
    "temperature",
    "hidden_layers",
    "hidden_dim",
    "hidden_dtype",
    "hidden_positions",
    "embed_layer",
    "targets",
    "sampling",
    "vocab_hash",
    "teacher_fingerprint",
)


def stored_column(key: str, meta: dict[str, Any]) -> str:
    """The stored column a requested name stands for: ``hidden_-1`` / ``hidden_3`` (and the older spelling
    ``hidden.3``) -> ``hidden_3``, the layer normalised against the cached teacher; other names unchanged."""
    for prefix in ("hidden.", "hidden_"):
        if key.startswith(prefix) and key[len(prefix) :].lstrip("-").isdigit():
            return hidden_column(normalise_layer(int(key[len(prefix) :]), meta))
    return key


def _decode_group(table: pa.Table, path: Path, group: int, meta: dict[str, Any], check: bool) -> dict[str, np.ndarray]:
    """One row group as numpy arrays shaped per row, in the stored dtypes (zero-copy views of the Arrow buffers;
    2-byte hidden values as uint16 bit patterns); non-finite floats raise naming file, column and row group."""
    rows = table.num_rows
    out: dict[str, np.ndarray] = {}
    for name in table.column_names:
        chunks = table.column(name)
        column = chunks.chunk(0) if chunks.num_chunks == 1 else chunks.combine_chunks()
        if pa.types.is_fixed_size_binary(column.type):
            width = column.type.byte_width
            values = np.frombuffer(column.buffers()[1], np.uint16, rows * width // 2, column.offset * width)
            values = values.reshape(rows, num_hidden_positions(meta), int(meta["hidden_dim"]))
            bad = check and _nonfinite_2byte(values, meta["hidden_dtype"])
        elif pa.types.is_fixed_size_list(column.type):
            values = column.flatten().to_numpy(zero_copy_only=False)
            per_position = name.startswith(("topk_", "sampled_"))
            per_row = (int(meta["seq_len"]), -1) if per_position else (-1,)  # topk: [T, k], sampled: [T, n]
            values = values.reshape(rows, *per_row)
            if values.dtype == np.float16:  # exponent-bit test: ~10x cheaper than np.isfinite on fp16
                bad = check and _nonfinite_2byte(values, "float16")
            else:
                bad = check and values.dtype.kind == "f" and not np.isfinite(values).all()
        else:
            # a view of the data buffer (sample_id, int64, non-null); Array.to_numpy costs ~1 ms here
            values, bad = np.frombuffer(column.buffers()[1], np.int64, len(column), column.offset), False
        if bad:
            raise PipelineError(
                f"{path}: column {name} holds NaN/inf in row group {group}; the shard is corrupt "
                "(delete it and rerun the cache stage)"
            )
        out[name] = values
    return out


class RowSampler:
    """Which cached rows make each of one rank's batches, epoch by epoch: row ids only, no data.

    Rows are numbered globally in file order. For epoch ``e`` a generator seeded by ``(seed, e)`` permutes the file
    order, then displaces every row by a random amount below ``shuffle_buffer`` (argsort of ``position +
    U(0, shuffle_buffer)``), a vectorised, index-only equivalent of a shuffle buffer that keeps reads local. The
    epoch order is cut into global batches of ``batch_size`` rows; global batch ``g`` goes to rank
    ``g % world_size`` (ranks' counts differ by at most one batch; the last batch of an epoch may be short).
    """

    def __init__(
        self,
        file_rows: Sequence[int],
        *,
        batch_size: int,
        seed: int,
        shuffle: bool,
        shuffle_buffer: int,
        rank: int,
        world_size: int,
        infinite: bool,
    ) -> None:
        self.batch_size, self.seed, self.shuffle, self.shuffle_buffer = batch_size, seed, shuffle, shuffle_buffer
        self.rank, self.world_size, self.infinite = rank, world_size, infinite
        self.file_offsets = np.concatenate([[0], np.cumsum(file_rows)]).astype(np.int64)  # file -> its first row
        self.num_rows = int(self.file_offsets[-1])
        self.global_batches = math.ceil(self.num_rows / batch_size)
        self.batches_per_epoch = len(range(rank, self.global_batches, world_size))
        self._forget_order()

    def _forget_order(self) -> None:
        self._order_epoch: int | None = None
        self._order = np.zeros(0, np.int64)

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers recompute the order (8 bytes per row)
        state = dict(self.__dict__)
        del state["_order_epoch"], state["_order"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._forget_order()

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Global row ids of ``epoch`` in reading order (all ranks); cheap, cached for the current epoch."""
        if self._order_epoch == epoch:
            return self._order
        if not self.shuffle:
            order = np.arange(self.num_rows, dtype=np.int64)
        else:
            rng = np.random.default_rng([self.seed, epoch])
            perm = rng.permutation(len(self.file_offsets) - 1)
            stream = np.concatenate([np.arange(self.file_offsets[f], self.file_offsets[f + 1]) for f in perm])
            keys = np.arange(self.num_rows) + rng.random(self.num_rows) * self.shuffle_buffer
            order = stream[np.argsort(keys, kind="stable")]
        self._order_epoch, self._order = epoch, order
        return order

    def batch_rows(self, epoch: int, batch_index: int) -> np.ndarray:
        """Global row ids of this rank's batch ``batch_index`` in ``epoch``."""
        g = batch_index * self.world_size + self.rank
        return self.epoch_order(epoch)[g * self.batch_size : (g + 1) * self.batch_size]

    def schedule(self, epoch: int, start_batch: int, worker: int, workers: int) -> Iterator[tuple[int, int]]:
        """(epoch, batch_index) pairs of one DataLoader worker: this rank's batches from ``start_batch`` of
        ``epoch`` on, dealt round-robin to ``workers`` (epochs chained when ``infinite``)."""
        index, position = start_batch, 0
        while True:
            if index >= self.batches_per_epoch:
                if not self.infinite:
                    return
                epoch, index = epoch + 1, 0
                continue
            if position % workers == worker:
                yield epoch, index
            position += 1
            index += 1


class RowGroupArena:
    """Decoded Parquet row groups of a set of cache shards kept resident per consumer, and the gather of any rows
    from them: the data side of :class:`CacheDataset`.

    Row groups are read lazily, only for ``columns``, and ``cached_row_groups`` decoded groups stay resident (LRU;
    more when one batch spans more groups). When row groups are smaller than the window a batch is drawn from
    (``window`` rows: batch plus shuffle buffer), most batches span several groups, so each group is copied into an
    arena and a batch is one ``np.take`` per column whatever the number of groups it touches; otherwise, and for
    rows wider than :data:`ARENA_MAX_ROW_BYTES`, a batch is gathered straight from the decoded groups (measured on
    one 256-row group: ~12 % more tokens/s than copying it; on 64-row groups with a 256-row window the arena is
    ~25 % faster). Open files and decoded groups are per process: a pickled copy (a DataLoader worker) starts empty.
    """

    def __init__(
        self,
        files: Sequence[Path],
        footers: Sequence[pq.FileMetaData],
        metas: Sequence[dict[str, Any]],
        columns: Sequence[str],
        *,
        window: int,
        memory_map: bool,
        check_finite: bool,
        cached_row_groups: int,
    ) -> None:
        self.files, self.footers, self.meta, self.columns = list(files), list(footers), metas[0], list(columns)
        self.memory_map, self.check_finite, self.cached_row_groups = memory_map, check_finite, cached_row_groups
        # every row group of every file numbered in file order: global row -> (group number, first row of it)
        self.group_keys = [(f, g) for f, m in enumerate(metas) for g in range(len(m["row_groups"]))]
        group_rows = np.array([n for m in metas for n in m["row_groups"]], dtype=np.int64)
        self.group_first_row = np.concatenate([[0], np.cumsum(group_rows)[:-1]]).astype(np.int64)
        # 4 bytes per row (epoch_order holds 8): ~2 % faster per batch than a searchsorted
        self.row_group = np.repeat(np.arange(len(group_rows), dtype=np.int32), group_rows)
        self.slot_rows = int(group_rows.max()) if len(group_rows) else 1
        self.direct = self.slot_rows >= window  # no arena (see above)
        self._reset_state()

    def _reset_state(self) -> None:
        self._handles: dict[int, pq.ParquetFile] = {}
        self._arena: dict[str, np.ndarray] = {}  # column -> [slots * slot_rows, ...] decoded rows
        self._direct: dict[str, dict[int, np.ndarray]] = {}  # column -> slot -> decoded row group (no arena)
        self._slots = self.cached_row_groups
        self._lru: collections.OrderedDict[int, int] = collections.OrderedDict()  # group number -> slot
        self._slot_start = np.full(len(self.group_keys), -1, dtype=np.int64)  # group number -> first arena row

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for key in ("_handles", "_arena", "_direct", "_slots", "_lru", "_slot_start"):
            del state[key]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_state()

    def gather(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """{column: values of ``rows`` (global ids) in that order}: one ``np.take`` per column from the arena (or
        one per group touched, straight from the decoded groups), in the stored dtypes."""
        groups = self.row_group[rows]
        needed = sorted(set(groups.tolist()))
        if len(needed) > self._slots:
            self._grow(len(needed))
        missing = []
        for number in needed:  # resident ones first become the most recent, so loading the rest cannot evict them
            if number in self._lru:
                self._lru.move_to_end(number)
            else:
                missing.append(number)
        for number in missing:
            self._load(number)
        local = rows - self.group_first_row[groups]
        take = self._slot_start[groups] + local
        out = {}
        for name in self.columns:
            if name in self._direct:
                out[name] = self._gather_direct(self._direct[name], groups, local, needed)
            else:
                out[name] = self._arena[name].take(take, axis=0)
        return out

    def _load(self, number: int) -> None:
        """Read and decode row group ``number`` (file order) into the arena slot of the least recently used group."""
        file, group = self.group_keys[number]
        handle = self._handles.get(file)
        if handle is None:
            handle = pq.ParquetFile(self.files[file], metadata=self.footers[file], memory_map=self.memory_map)
            self._handles[file] = handle
        try:
            table = handle.read_row_group(group, columns=self.columns, use_threads=False)
        except (OSError, pa.ArrowException) as err:  # damaged pages: a user-fixable state, not a crash
            raise PipelineError(
                f"{self.files[file]}: row group {group} unreadable ({err}); the shard is corrupt "
                "(delete it and rerun the cache stage)"
            ) from None
        data = _decode_group(table, self.files[file], group, self.meta, self.check_finite)
        if len(self._lru) < self._slots:
            slot = len(self._lru)
        else:
            evicted, slot = self._lru.popitem(last=False)
            self._slot_start[evicted] = -1
        first = slot * self.slot_rows
        for name, values in data.items():
            if self.direct or values.nbytes > ARENA_MAX_ROW_BYTES * len(values):
                self._direct.setdefault(name, {})[slot] = values
                continue
            arena = self._arena.get(name)
            if arena is None:
                arena = self._arena[name] = np.empty((self._slots * self.slot_rows,) + values.shape[1:], values.dtype)
            arena[first : first + len(values)] = values
        self._lru[number] = slot
        self._slot_start[number] = first

    def _grow(self, slots: int) -> None:
        """Room for ``slots`` row groups at once (a batch spanning more groups than ``cached_row_groups``)."""
        self._arena.clear()
        self._direct.clear()
        self._lru.clear()
        self._slot_start.fill(-1)
        self._slots = slots

    def _gather_direct(
        self, slots: dict[int, np.ndarray], groups: np.ndarray, local: np.ndarray, needed: list[int]
    ) -> np.ndarray:
        """Rows of a column straight from the decoded row groups, one copy per group."""
        if len(needed) == 1:
            return slots[self._lru[needed[0]]].take(local, axis=0)
        first = slots[self._lru[needed[0]]]
        out = np.empty((len(local),) + first.shape[1:], first.dtype)
        for number in needed:
            where = groups == number
            out[where] = slots[self._lru[number]][local[where]]
        return out


class CacheDataset(IterableDataset):
    """Batches of cached teacher signals as torch tensors, split exactly once over ranks and DataLoader workers.

    The torch side of the reader: it checks the shards belong together and hold the requested columns, asks a
    :class:`RowSampler` which rows make each batch and a :class:`RowGroupArena` for their values, and turns those
    into tensors. A rank's batch stream (epochs chained when ``infinite``) is dealt round-robin to its DataLoader
    workers starting at the resume point, which is exactly the order in which a ``DataLoader(ds, batch_size=None,
    num_workers=W)`` returns them — so ``start_from(epoch, batches_consumed)`` with the number of batches the
    DataLoader has yielded reproduces the remaining sequence exactly.

    Use ``batch_size=None`` in the DataLoader and ``persistent_workers=False`` (workers copy the dataset, including
    its epoch, when an iterator is created). Each batch dict also holds ``epoch`` and ``batch_index`` (position in
    this rank's epoch): resume with ``start_from(epoch, batch_index + 1)``. Tensors are in the stored dtypes
    (int32 ids, int8 mask, fp16 log-probs and tail, fp16/bf16 hidden states as ``hidden_<i>``, float32 embed,
    int64 sample_id): move and widen them with :func:`to_compute`. Each consumer reads the row groups its rows fall
    in, so I/O grows with ranks x workers for wide shuffle windows.
    """

    def __init__(
        self,
        files: Sequence[Path],
        *,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 256,
        rank: int = 0,
        world_size: int = 1,
        columns: Sequence[str] | None = None,
        infinite: bool = False,
        memory_map: bool = False,
        check_finite: bool = True,
        cached_row_groups: int = 4,
    ) -> None:
        super().__init__()
        if not files:
            raise PipelineError("CacheDataset: no cache shards given (is the cache split empty?)")
        if batch_size <= 0 or not 0 <= rank < world_size or shuffle_buffer < 0:
            raise ValueError(f"batch_size={batch_size}, rank={rank}/{world_size}, shuffle_buffer={shuffle_buffer}")
        self.files = [Path(f) for f in files]
        metas, footers = map(list, zip(*(_read_footer(f) for f in self.files), strict=True))
        first = metas[0]
        for meta in metas[1:]:
            for key in CONSISTENT_KEYS:
                if meta[key] != first[key]:
                    raise PipelineError(
                        f"{meta['path']}: {key}={meta[key]!r} differs from {first['path']} ({first[key]!r}); "
                        "shards from different cache runs cannot be mixed"
                    )
        self.meta = first
        available = list(BASE_COLUMNS) + optional_columns(first)
        wanted = available if columns is None else [stored_column(c, first) for c in columns if c != "epoch"]
        for name in wanted:
            if name not in available:
                raise PipelineError(f"{first['path']}: requested column {name!r} not in the cache (has {available})")
        self.columns = ["sample_id"] + [c for c in dict.fromkeys(wanted) if c != "sample_id"]
        self.sampler = RowSampler(
            [m["rows"] for m in metas],
            batch_size=batch_size,
            seed=seed,
            shuffle=shuffle,
            shuffle_buffer=shuffle_buffer,
            rank=rank,
            world_size=world_size,
            infinite=infinite,
        )
        if infinite and self.sampler.batches_per_epoch == 0:
            raise PipelineError(
                f"{first['path']}: {self.sampler.num_rows} cached rows make {self.sampler.global_batches} batches of "
                f"{batch_size}, fewer than world_size={world_size}; use a smaller batch or more data"
            )
        self.arena = RowGroupArena(
            self.files,
            footers,
            metas,
            self.columns,
            window=batch_size + (shuffle_buffer if shuffle else 0),
            memory_map=memory_map,
            check_finite=check_finite,
            cached_row_groups=cached_row_groups,
        )
        # hidden states are stored as 2-byte patterns: viewed as the cached dtype, no copy
        hidden_dtype = HIDDEN_DTYPES[self.meta["hidden_dtype"]]
        self._views = {name: hidden_dtype if name.startswith("hidden_") else None for name in self.columns}
        positions = first["hidden_positions"]
        self._hidden_positions = None
        if positions is not None and any(name.startswith("hidden_") for name in self.columns):
            self._hidden_positions = torch.tensor(positions, dtype=torch.long)
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int) -> None:
        """Start the next iteration at the beginning of ``epoch``."""
        self.start_from(epoch, 0)

    def start_from(self, epoch: int, batches_consumed: int) -> None:
        """Resume: the next iteration yields this rank's batch ``batches_consumed`` of ``epoch`` onwards."""
        if epoch < 0 or batches_consumed < 0:
            raise ValueError(f"start_from({epoch}, {batches_consumed}): expected non-negative values")
        self.epoch, self.start_batch = int(epoch), int(batches_consumed)

    def __len__(self) -> int:
        """Batches per epoch on this rank (for finite iteration from the start of an epoch)."""
        return self.sampler.batches_per_epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for epoch, index in self.sampler.schedule(self.epoch, self.start_batch, worker, workers):
            yield self._batch(self.sampler.batch_rows(epoch, index), epoch, index)

    def _batch(self, rows: np.ndarray, epoch: int, index: int) -> dict[str, Any]:
        """The tensors of ``rows`` (global ids, batch order), shared with the gathered arrays by ``from_numpy``; no
        dtype conversion here (see :func:`to_compute`) beyond viewing 2-byte hidden patterns as fp16/bf16."""
        values = self.arena.gather(rows)
        batch: dict[str, Any] = {}
        for name, view in self._views.items():
            tensor = torch.from_numpy(values[name])
            batch[name] = tensor if view is None else tensor.view(view)
        if self._hidden_positions is not None:
            batch["hidden_positions"] = self._hidden_positions.clone()
        batch["epoch"], batch["batch_index"] = epoch, index
        return batch


def to_compute(batch: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    """A :class:`CacheDataset` batch on ``device`` in compute dtypes: ids and masks int64, 2-byte floats float32.

    The reader yields what the shard stores (int32 ids, int8 mask, fp16 log-probs, fp16/bf16 hidden states), so
    host memory, pinned buffers and the host-to-device copy carry half the bytes, and the widening runs on the
    device after the copy instead of in the data workers. Tensors already wide (sample_id, embed) only move."""
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
            wide = COMPUTE_DTYPES.get(value.dtype)
            value = value if wide is None else value.to(wide)
        out[key] = value
    return out
