"""Manifest stage: a weighted dataset mixture becomes tokenized, packed, sharded training data with provenance.

Reads   ``cfg.manifest.sources`` through ``datasets`` (hub names, or local builders such as json/parquet with
        ``data_files``), the teacher's tokenizer and the teacher's config (``max_position_embeddings`` only).
Writes  ``runs/<run>/manifest/{train,val}-NNNNN.parquet`` and ``manifest.json`` (format: pipeline/data_format.py),
        ``config.yaml`` and, last, ``_COMPLETE.json`` (both by the stage wrapper).
Run     ``python -m pipeline.manifest --config configs/demo.yaml [key.path=value ...] [--force]``

One pass, in this order (memory: one chunk of documents, one shard per split and the dedup hashes):

1. Checks before any work: the config rules (``pipeline.validate``: EOS token, ``seq_len`` within both models'
   context, ...) ran at stage start; here every source loads, a local pattern matches files that are not empty, and
   the field mapping names existing columns.
2. Mixture (:class:`Mixer`): the weights are shares of the kept tokens (``manifest.mixture: tokens``, the default):
   the next record comes from the source furthest below its share; ``documents`` draws each record's source with
   probability proportional to its weight instead. The mixture ends when a picked source runs out or a cap is
   reached, so the shares hold whether or not a cap is set (no "source 1 to its quota, then source 2"); the realised
   ``token_share`` of every source is recorded next to its ``target_share``.
3. Record -> text: plain ``text``; alpaca (``instruction`` + optional ``input`` + ``output``) and
   ``prompt``/``response`` become a user/assistant exchange; chat ``messages`` (content a string or a list of parts)
   and ShareGPT ``conversations`` (``from``/``value``). Exchanges are rendered with the tokenizer's chat template when
   it has one (``manifest.chat_template``), else as ``Role: content`` paragraphs. Records of no known shape are
   counted as ``unmatched`` and skipped (a null ``text`` is an empty document).
4. Filters, each counted per source: empty, too_short/too_long (characters of the rendered text), duplicate (hash of
   NFKC-normalised, case- and whitespace-folded text).
5. Held-out split by document, before packing: a document is validation when a seeded hash of its normalised text
   falls below ``val_fraction``; independent of order, and duplicates can never straddle the splits.
6. Chunks of documents are tokenized with ``datasets.map(batched=True, num_proc=...)``, EOS is appended to every
   document and documents are packed back to back into rows of ``seq_len`` (a document may continue on the next row;
   ``doc_starts`` records where each one begins; only the last row of a split is padded). ``max_tokens`` stops at
   the first document that would exceed it.
7. Shards are written into ``manifest/.staging`` and moved into place only when everything succeeded, then
   ``manifest.json``; shards of an earlier run that the new manifest does not list are deleted. A failed run deletes
   the staging directory and leaves an earlier complete output (marker included) untouched.

Output bytes depend only on the config, the data and the library versions: no timestamps in what is written.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import logging
import os
import shutil
import sys
import time
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import data_format
from pipeline.config import CANONICAL_FIELDS, SHAPE_FIELDS, Config, ManifestConfig, SourceConfig
from pipeline.modeling import load_tokenizer, vocab_hash, vocab_size
from pipeline.rundir import PipelineError, RunDir, StageContext, StageSpec, atomic_write_json, file_sha256, stage_main

STAGE = "manifest"
SHAPES = tuple(SHAPE_FIELDS)  # the order auto-detection tries them in
DROP_REASONS = ("unmatched", "empty", "too_short", "too_long", "duplicate", "over_cap")
# ShareGPT speaker names (OpenHermes-2.5, Vicuna, tool-use sets) -> chat-template roles; others pass through.
ROLE_ALIASES = {"human": "user", "gpt": "assistant", "chatgpt": "assistant", "bard": "assistant", "model": "assistant"}
READ_BATCH = 1024  # records per Arrow batch read from a source (amortises Arrow -> Python conversion)
DRAW_BLOCK = 4096  # source picks drawn from the RNG at once
CHUNK_DOCS = 16384  # documents per datasets.map call: amortises the process pool, bounds memory
FIRST_CHUNK_DOCS = 256  # the first chunks are small (doubling up to CHUNK_DOCS): the token mixture learns each
#                         source's tokens per character from exact counts early, not after 16k documents
MIN_DOCS_PER_PROC = 2048  # below this a worker pool costs more than it saves
TEMPLATE_DATE = "26 Jul 2024"  # date_string for chat templates that print a date (Llama 3.1's own default)


# ------------------------------------------------------------------------------------------------- sources
@dataclass
class Source:
    """One opened mixture source: its records (canonical field names) and provenance."""

    cfg: SourceConfig
    key: str  # config key path, used in every error about this source
    label: str  # what the user wrote: path, config name and data files
    records: Iterator[dict[str, Any]]
    provenance: dict[str, Any]


def _label(src: SourceConfig) -> str:
    parts = [src.path] + ([f"name={src.name}"] if src.name else [])
    if src.data_files is not None:
        parts.append(f"data_files={src.data_files}")
    return " ".join(parts)


def _cause(err: BaseException) -> str:
    """The innermost cause's first line: datasets wraps the useful message (the bad file, line, column)."""
    for _ in range(16):  # bounded: exception chains can, rarely, be cyclic
        inner = err.__cause__ or err.__context__
        if inner is None:
            break
        err = inner
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def _local_files(builder: Any) -> list[Path]:
    files = [f for split_files in (builder.config.data_files or {}).values() for f in split_files]
    return sorted({Path(f) for f in files if "://" not in str(f) and Path(f).is_file()})


def _field_mapping(i: int, src: SourceConfig, columns: list[str], label: str) -> dict[str, str]:
    """canonical field -> column of this source; mapped columns must exist."""
    key = f"manifest.sources.{i}"
    for canon, column in src.fields.items():  # the names themselves are checked with the config (validate)
        if column not in columns:
            raise PipelineError(
                f"{key}.fields.{canon}: column {column!r} not found in {label} (columns: {', '.join(columns)})"
            )
    mapping = {c: src.fields.get(c, c) for c in CANONICAL_FIELDS if src.fields.get(c, c) in columns}
    required = [f for f in SHAPE_FIELDS.get(src.format, ()) if f != "input"]  # alpaca's input is optional
    missing = [src.fields.get(f, f) for f in required if f not in mapping]
    if missing:
        raise PipelineError(
            f"{key}.format: {src.format} records need column(s) {', '.join(missing)}, not found in {label} "
            f"(columns: {', '.join(columns)}); map them with {key}.fields"
        )
    if not mapping:
        raise PipelineError(
            f"{key}: no column of {label} matches a known record shape (columns: {', '.join(columns)}; "
            f"known: {', '.join(CANONICAL_FIELDS)}); map one with {key}.fields"
        )
    return mapping


def _patterns(src: SourceConfig) -> list[str]:
    """The data_files patterns of a source, flattened (a string, a list, or a mapping split -> either)."""
    data_files = src.data_files
    items = (
        data_files
        if isinstance(data_files, list)
        else list(data_files.values())
        if isinstance(data_files, dict)
        else [data_files]
    )
    return [p for item in items if item for p in (item if isinstance(item, list) else [item])]


def _is_local_builder(src: SourceConfig) -> bool:
    """json/parquet/csv/... over files on this machine (a hub dataset's data_files are paths inside its repo)."""
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

    return src.path in _PACKAGED_DATASETS_MODULES and src.data_files is not None


def _check_local_files(key: str, src: SourceConfig) -> None:
    """A pattern that matches nothing, or a file without a byte, is named before datasets turns it into an
    anonymous StopIteration."""
    for pattern in _patterns(src):
        if "://" in pattern:
            continue
        matches = sorted(glob.glob(pattern))
        if not matches:
            raise PipelineError(f"{key}.data_files: no file matches {pattern!r}")
        for match in matches:
            if os.path.isfile(match) and os.path.getsize(match) == 0:
                raise PipelineError(f"{key}.data_files: no records in {match} (empty file)")


def _bad_json_line(src: SourceConfig) -> str | None:
    """``<file>:<line>: <problem>`` of the first line of a local JSON-lines source that is not one JSON value
    (Arrow's reader reports a row within a block, which a person cannot find in the file)."""
    if src.path != "json" or not _is_local_builder(src):
        return None
    for pattern in _patterns(src):
        for path in sorted(glob.glob(pattern)):
            with open(path, encoding="utf-8", errors="replace") as fh:
                for number, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        json.loads(line)
                    except json.JSONDecodeError as err:
                        return f"{path}:{number}: malformed JSON ({err.msg}, column {err.colno})"
    return None


def _unreadable(key: str, label: str, src: SourceConfig, err: BaseException, what: str) -> PipelineError:
    line = _bad_json_line(src)
    return PipelineError(f"{key} ({label}): {line}" if line else f"{key} ({label}): {what} ({_cause(err)})")


def _batches(ds: Any, key: str, label: str, src: SourceConfig) -> Iterator[dict[str, list]]:
    it = iter(ds.iter(batch_size=READ_BATCH))
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except Exception as err:  # any reader error (bad JSON line, corrupt Parquet page) is a bad input file
            raise _unreadable(key, label, src, err, "unreadable data") from None
        yield batch


def _records(first: dict[str, list], rest: Iterator[dict[str, list]], mapping: dict[str, str]):
    """Records with canonical field names (None where a batch lacks the column) from column batches."""
    for batch in itertools.chain([first], rest):
        columns = {canon: batch.get(col) for canon, col in mapping.items()}
        n = len(next(iter(batch.values()))) if batch else 0
        for j in range(n):
            yield {canon: (values[j] if values is not None else None) for canon, values in columns.items()}


def open_source(i: int, src: SourceConfig) -> Source:
    """Load source ``i`` (streaming or not), check its columns against the field mapping, record provenance."""
    import datasets

    key, label = f"manifest.sources.{i}", _label(src)
    if _is_local_builder(src):
        _check_local_files(key, src)
    try:
        builder = datasets.load_dataset_builder(
            src.path, name=src.name, data_files=src.data_files, revision=src.revision
        )
        if src.streaming:
            ds = builder.as_streaming_dataset(split=src.split)
        else:
            builder.download_and_prepare()
            ds = builder.as_dataset(split=src.split)
    except Exception as err:  # datasets raises many types for a bad path/file/split; all mean "cannot load this"
        raise _unreadable(key, label, src, err, "cannot load") from None
    first = None
    if ds.column_names is None:  # streaming without declared features: learn the columns from the first batch
        first = next(_batches(ds, key, label, src), None)
    mapping = _field_mapping(i, src, list(ds.column_names or first or []), label)
    if ds.column_names is not None:  # convert only the mapped columns to Python objects
        ds = ds.select_columns(sorted(set(mapping.values())))
    batches = _batches(ds, key, label, src)
    first = first or next(batches, None)
    if not first or not len(next(iter(first.values()))):
        raise PipelineError(f"{key} ({label}): no records in split {src.split!r}")
    local = _local_files(builder)
    provenance = {
        "path": src.path,
        "name": src.name,
        "split": src.split,
        "revision": src.revision,
        # hub datasets: the commit the name/revision resolved to; local builders: content hashes of the files
        "resolved_revision": None if local else builder.hash,
        "data_files": [{"file": str(f), "sha256": file_sha256(f), "bytes": f.stat().st_size} for f in local],
        "fingerprint": None if src.streaming else ds._fingerprint,
        "streaming": src.streaming,
        "format": src.format,
        "fields": mapping,
        "weight": src.weight,
    }
    return Source(src, key, label, _records(first, batches, mapping), provenance)


def data_file_identities(cfg: ManifestConfig) -> dict[str, str]:
    """``{"data:<file>": "<bytes>:<mtime_ns>"}`` of every local data file: inputs of the stage, so edited data is
    not skipped (size and mtime: hashing gigabytes of JSONL at every lineage check is not worth it)."""
    out = {}
    for src in cfg.sources:
        for path in sorted({m for p in _patterns(src) for m in glob.glob(p)}):
            st = os.stat(path)
            out[f"data:{path}"] = f"{st.st_size}:{st.st_mtime_ns}"
    return out


# ------------------------------------------------------------------------------------------- records -> text
def _part_text(part: Any) -> str | None:
    if isinstance(part, str):
        return part
    if isinstance(part, dict) and part.get("type", "text") in ("text", None) and isinstance(part.get("text"), str):
        return part["text"]
    return None


def _content(value: Any) -> str | None:
    """A message content: a string, or a list of parts whose text parts are joined (images etc. carry no text)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = [_part_text(p) for p in value]
        return "\n".join(t for t in texts if t is not None)
    return None


def _messages(turns: Any, role_key: str, content_key: str) -> list[dict[str, str]] | None:
    if not isinstance(turns, list) or not turns:
        return None
    out = []
    for turn in turns:
        if not isinstance(turn, dict) or not isinstance(turn.get(role_key), str):
            return None
        content = _content(turn.get(content_key))
        if content is None:
            return None
        role = turn[role_key].strip().lower()
        out.append({"role": ROLE_ALIASES.get(role, role), "content": content})
    return out


def _exchange(user: str, assistant: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def record_shape(rec: dict[str, Any], fmt: str) -> tuple[str, str | list[dict[str, str]]] | None:
    """(shape, plain text or chat messages) of a record with canonical field names; None if no shape matches.
    A null ``text`` (a record of a text column with no value) is an empty text, unless another shape matches."""
    for shape in SHAPES if fmt == "auto" else (fmt,):
        if shape == "messages":
            msgs = _messages(rec.get("messages"), "role", "content")
        elif shape == "sharegpt":
            msgs = _messages(rec.get("conversations"), "from", "value")
        elif shape == "alpaca":
            ins, inp, outp = rec.get("instruction"), rec.get("input"), rec.get("output")
            ok = isinstance(ins, str) and isinstance(outp, str) and (inp is None or isinstance(inp, str))
            msgs = _exchange(f"{ins}\n\n{inp}" if inp else ins, outp) if ok else None
        elif shape == "prompt_response":
            prompt, response = rec.get("prompt"), rec.get("response")
            msgs = _exchange(prompt, response) if isinstance(prompt, str) and isinstance(response, str) else None
        else:
            text = rec.get("text")
            if isinstance(text, str):
                return shape, text
            continue
        if msgs is not None:
            return shape, msgs
    if "text" in rec and rec["text"] is None and fmt in ("auto", "text"):
        return "text", ""
    return None


def chat_renderer(tokenizer: Any, use_template: bool) -> Callable[[list[dict[str, str]]], tuple[str, bool]]:
    """messages -> (text, fell_back). The chat template when there is one; a template that rejects a
    conversation (e.g. roles must alternate) falls back to ``Role: content`` paragraphs, which is counted."""
    import jinja2

    has_template = use_template and bool(getattr(tokenizer, "chat_template", None))
    # Llama-3.x templates print today's date unless given date_string; pinning it keeps output bytes reproducible.
    fixed = {"date_string": TEMPLATE_DATE}

    def plain(msgs: list[dict[str, str]]) -> str:
        return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in msgs)

    def render(msgs: list[dict[str, str]]) -> tuple[str, bool]:
        if has_template:
            try:
                return tokenizer.apply_chat_template(msgs, tokenize=False, **fixed), False
            except (jinja2.TemplateError, ValueError, TypeError):
                return plain(msgs), True
        return plain(msgs), False

    return render


def normalise(text: str) -> str:
    """What counts as 'the same document': NFKC, case-folded, whitespace runs collapsed."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def is_validation(norm: str, seed: int, val_fraction: float) -> bool:
    """Seeded hash of the normalised text -> uniform in [0, 1); below val_fraction means held out."""
    digest = hashlib.blake2b(norm.encode(), digest_size=8, salt=seed.to_bytes(8, "little", signed=True)).digest()
    return int.from_bytes(digest, "little") / 2**64 < val_fraction


# -------------------------------------------------------------------------------------------------- packing
@dataclass
class Packer:
    """Packs documents (token arrays ending in EOS) back to back into rows of ``seq_len``; writes full shards as
    they fill and pads only the split's last row."""

    split: str
    seq_len: int
    rows_per_shard: int
    pad_id: int
    meta: dict[str, Any]
    out_dir: Path
    compression: str
    pending: list[np.ndarray] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)  # doc start offsets within the pending tokens
    pending_tokens: int = 0
    docs: int = 0
    tokens: int = 0
    rows: int = 0
    shards: list[dict[str, Any]] = field(default_factory=list)

    def add(self, ids: np.ndarray) -> None:
        self.starts.append(self.pending_tokens)
        self.pending.append(ids)
        self.pending_tokens += len(ids)
        self.docs += 1
        self.tokens += len(ids)
        if self.pending_tokens >= self.seq_len * self.rows_per_shard:
            self._flush(final=False)

    def finish(self) -> None:
        self._flush(final=True)

    def _flush(self, final: bool) -> None:
        shard_tokens = self.seq_len * self.rows_per_shard
        flat = np.concatenate(self.pending) if self.pending else np.zeros(0, np.int32)
        starts = np.asarray(self.starts, dtype=np.int64)
        while len(flat) >= shard_tokens or (final and len(flat)):
            take = min(len(flat), shard_tokens)
            rows = -(-take // self.seq_len)
            ids = np.full(rows * self.seq_len, self.pad_id, dtype=np.int32)
            ids[:take] = flat[:take]
            mask = np.zeros(rows * self.seq_len, dtype=np.int8)
            mask[:take] = 1
            here = starts[starts < take]
            bounds = np.searchsorted(here, np.arange(1, rows) * self.seq_len)
            doc_starts = [s % self.seq_len for s in np.split(here, bounds)]
            self._write(ids.reshape(rows, self.seq_len), mask.reshape(rows, self.seq_len), doc_starts)
            flat, starts = flat[take:], starts[starts >= take] - take
        self.pending = [flat] if len(flat) else []
        self.starts = starts.tolist()
        self.pending_tokens = len(flat)

    def _write(self, ids: np.ndarray, mask: np.ndarray, doc_starts: list[np.ndarray]) -> None:
        index = len(self.shards)
        path = self.out_dir / data_format.shard_name(self.split, index)
        sample_ids = np.arange(self.rows, self.rows + len(ids), dtype=np.int64)
        meta = {**self.meta, "split": self.split, "shard_index": index}
        self.shards.append(
            data_format.write_packed_shard(path, ids, mask, doc_starts, sample_ids, meta, self.compression)
        )
        self.rows += len(ids)


def tokenize_texts(texts: list[str], tokenizer: Any, eos: int, num_proc: int) -> list[np.ndarray]:
    """Token ids of each text followed by EOS (unless it already ends in EOS), via datasets.map. No other special
    tokens are added: chat templates already carry theirs, and plain documents are delimited by EOS alone."""
    import datasets

    def encode(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        encoded = tokenizer(batch["text"], add_special_tokens=False, return_attention_mask=False)["input_ids"]
        return {"input_ids": [ids if ids and ids[-1] == eos else ids + [eos] for ids in encoded]}

    procs = num_proc if num_proc > 1 and len(texts) >= num_proc * MIN_DOCS_PER_PROC else None
    ds = datasets.Dataset.from_dict({"text": texts})
    out = ds.map(
        encode,
        batched=True,
        num_proc=procs,
        remove_columns=["text"],
        features=datasets.Features({"input_ids": datasets.List(datasets.Value("int32"))}),
        new_fingerprint="manifest-tokenize",  # skips hashing the tokenizer closure; nothing is cached on disk
    )
    column = out.data.column("input_ids").combine_chunks()
    offsets = column.offsets.to_numpy()
    values = column.flatten().to_numpy().astype(np.int32, copy=False)
    return np.split(values, offsets[1:-1] - offsets[0])


# ------------------------------------------------------------------------------------------------ the stage
def _counts() -> dict[str, Any]:
    return {
        "read": 0,
        "kept": 0,
        "train_docs": 0,
        "val_docs": 0,
        "tokens": 0,
        "dropped": dict.fromkeys(DROP_REASONS, 0),
        "shapes": dict.fromkeys(SHAPES, 0),
        "chat_template_fallback": 0,
    }


def special_ids(tokenizer: Any) -> tuple[int, int]:
    """(eos id, pad id); EOS exists (a config rule, ``pipeline.validate``), pad falls back to EOS."""
    pad = tokenizer.pad_token_id
    return int(tokenizer.eos_token_id), int(tokenizer.eos_token_id if pad is None else pad)


class Mixer:
    """Picks the source of every next record so the weights hold at every point of the stream, whether or not a cap
    ends it early.

    ``tokens`` (default): the weights are shares of the kept tokens, as data-mixture papers mean them. The next record
    comes from the source furthest below its share (deterministic deficit scheduling); kept documents not tokenized yet
    count with their source's measured tokens per character, dropped ones count zero. ``documents``: a seeded RNG
    picks each record's source with probability proportional to its weight (shares of records read).
    """

    def __init__(self, weights: list[float], mode: str, seed: int) -> None:
        self.shares = np.asarray(weights, dtype=np.float64) / sum(weights)
        self.mode = mode
        self.rng = np.random.default_rng(seed)
        n = len(weights)
        self.tokens, self.chars = np.zeros(n), np.zeros(n)  # tokenized documents
        self.pending_chars = np.zeros(n)  # kept documents waiting for the tokenizer

    def picks(self) -> Iterator[int]:
        if self.mode == "documents":
            while True:
                yield from (int(i) for i in self.rng.choice(len(self.shares), size=DRAW_BLOCK, p=self.shares))
        while True:
            ratio = self.tokens.sum() / self.chars.sum() if self.chars.sum() else 0.25
            per_char = np.where(self.chars > 0, self.tokens / np.maximum(self.chars, 1), ratio)
            estimate = self.tokens + self.pending_chars * per_char
            # the source furthest below its share (ties: the larger share, then the lower index); zero shares never
            yield int(np.argmax(np.where(self.shares > 0, self.shares * (estimate.sum() + 1) - estimate, -np.inf)))

    def kept(self, i: int, chars: int) -> None:
        self.pending_chars[i] += chars

    def tokenized(self, i: int, chars: int, tokens: int) -> None:
        self.pending_chars[i] -= chars
        self.chars[i] += chars
        self.tokens[i] += tokens


def _mixture(sources: list[Source], mixer: Mixer, state: dict[str, str]) -> Iterator[tuple[int, dict[str, Any]]]:
    for i in mixer.picks():
        rec = next(sources[i].records, None)
        if rec is None:
            state["stop_reason"] = f"source {i} exhausted"
            return
        yield i, rec


def run(cfg: Config, rd: RunDir, ctx: StageContext) -> dict[str, float]:
    """Build the manifest; see the module docstring for the steps."""
    import datasets

    started = time.monotonic()
    datasets.disable_progress_bars()
    logging.getLogger("datasets").setLevel(logging.CRITICAL)  # its errors are re-raised as one PipelineError
    mcfg = cfg.manifest
    tokenizer = load_tokenizer(cfg.teacher)
    eos, pad = special_ids(tokenizer)
    template = str(getattr(tokenizer, "chat_template", None) or "")
    if mcfg.chat_template and "strftime_now" in template and "date_string" not in template:
        ctx.log.warning("chat_template_date", "the teacher's chat template prints today's date: bytes vary by day")
    setup_s = time.monotonic() - started  # imports and tokenizer: fixed cost, kept out of the throughput
    sources = [open_source(i, src) for i, src in enumerate(mcfg.sources)]
    total_weight = sum(s.cfg.weight for s in sources)
    for s in sources:
        s.provenance["target_share"] = s.cfg.weight / total_weight
        ctx.log.info("source", f"{s.key}: {s.label}", target_share=s.provenance["target_share"])

    out = rd.stage_dir(STAGE)
    staging = out / ".staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        manifest = _build(cfg, sources, tokenizer, eos, pad, staging, ctx)
        ctx.begin_writes()  # everything checked and built: only now is the earlier manifest replaced
        _publish(staging, out, manifest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    elapsed = max(time.monotonic() - started - setup_s, 1e-9)
    counts = manifest["counts"]
    metrics = {
        "docs": float(counts["kept"]),
        "tokens": float(counts["tokens"]),
        "train_rows": float(manifest["splits"]["train"]["rows"]),
        "val_rows": float(manifest["splits"]["val"]["rows"]),
        "setup_s": setup_s,
        "process_s": elapsed,
        "docs_per_s": counts["kept"] / elapsed,
        "tokens_per_s": counts["tokens"] / elapsed,
    }
    print(summary_text(manifest, out, metrics))
    return metrics


def _build(
    cfg: Config, sources: list[Source], tokenizer: Any, eos: int, pad: int, staging: Path, ctx: StageContext
) -> dict[str, Any]:
    mcfg = cfg.manifest
    render = chat_renderer(tokenizer, mcfg.chat_template)
    shard_meta = {"seq_len": mcfg.seq_len, "vocab_hash": vocab_hash(tokenizer), "vocab_size": vocab_size(tokenizer)}
    packers = {
        split: Packer(split, mcfg.seq_len, mcfg.rows_per_shard, pad, shard_meta, staging, mcfg.compression)
        for split in data_format.SPLITS
    }
    per_source = [_counts() for _ in sources]
    total = _counts()
    seen: set[bytes] = set()
    state = {"stop_reason": "mixture exhausted"}
    mixer = Mixer([s.cfg.weight for s in sources], mcfg.mixture, cfg.seed)
    packed_tokens = 0
    chunk: list[tuple[int, str, bool]] = []
    kept, chunk_docs = 0, FIRST_CHUNK_DOCS

    def drop(i: int, reason: str) -> None:
        per_source[i]["dropped"][reason] += 1

    def pack(chunk: list[tuple[int, str, bool]]) -> bool:
        """Tokenize and pack a chunk; False once max_tokens is reached (the rest counts as over_cap)."""
        nonlocal packed_tokens
        ids_list = tokenize_texts([text for _, text, _ in chunk], tokenizer, eos, mcfg.num_proc)
        for n, ((i, text, val), ids) in enumerate(zip(chunk, ids_list, strict=True)):
            mixer.tokenized(i, len(text), len(ids))
            if mcfg.max_tokens is not None and packed_tokens + len(ids) > mcfg.max_tokens:
                for j, _, _ in chunk[n:]:
                    drop(j, "over_cap")
                state["stop_reason"] = "max_tokens reached"
                return False
            packers["val" if val else "train"].add(ids)
            c = per_source[i]
            c["kept"] += 1
            c["val_docs" if val else "train_docs"] += 1
            c["tokens"] += len(ids)
            packed_tokens += len(ids)
        return True

    for i, rec in _mixture(sources, mixer, state):
        c = per_source[i]
        c["read"] += 1
        shaped = record_shape(rec, sources[i].cfg.format)
        if shaped is None:
            drop(i, "unmatched")
            continue
        shape, body = shaped
        c["shapes"][shape] += 1
        if isinstance(body, str):
            text, is_empty = body, not body.strip()
        else:
            text, fell_back = render(body)
            c["chat_template_fallback"] += fell_back
            is_empty = not any(m["content"].strip() for m in body)
        if is_empty:
            drop(i, "empty")
            continue
        if len(text) < mcfg.min_chars:
            drop(i, "too_short")
            continue
        if mcfg.max_chars is not None and len(text) > mcfg.max_chars:
            drop(i, "too_long")
            continue
        norm = normalise(text)
        if mcfg.dedup:
            digest = hashlib.blake2b(norm.encode(), digest_size=16).digest()
            if digest in seen:
                drop(i, "duplicate")
                continue
            seen.add(digest)
        chunk.append((i, text, is_validation(norm, cfg.seed, mcfg.val_fraction)))
        mixer.kept(i, len(text))
        kept += 1
        capped = mcfg.max_samples is not None and kept >= mcfg.max_samples
        if len(chunk) >= chunk_docs or capped:
            full, chunk, chunk_docs = chunk, [], min(2 * chunk_docs, CHUNK_DOCS)
            if not pack(full):
                break
            if capped:
                state["stop_reason"] = "max_samples reached"
                break
    else:
        if chunk:
            pack(chunk)

    for packer in packers.values():
        packer.finish()
    for c in per_source:
        for name in ("read", "kept", "train_docs", "val_docs", "tokens", "chat_template_fallback"):
            total[name] += c[name]
        for group in ("dropped", "shapes"):
            for k, v in c[group].items():
                total[group][k] += v
    total["stop_reason"] = state["stop_reason"]
    for c in per_source:  # the realised mixture, next to each source's target_share
        c["token_share"] = c["tokens"] / total["tokens"] if total["tokens"] else 0.0
    _check_not_empty(cfg, total, sources)
    ctx.log.info("packed", "documents tokenized and packed", docs=total["kept"], tokens=total["tokens"])
    return {
        "format_version": data_format.PACKED_FORMAT_VERSION,
        "seq_len": mcfg.seq_len,
        "seed": cfg.seed,
        "mixture": mcfg.mixture,
        "tokenizer": {
            "name_or_path": cfg.teacher.tokenizer or cfg.teacher.name_or_path,
            "revision": cfg.teacher.revision,
            "vocab_hash": shard_meta["vocab_hash"],
            "vocab_size": shard_meta["vocab_size"],
            "eos_token_id": eos,
            "pad_token_id": pad,
            "chat_template": bool(getattr(tokenizer, "chat_template", None)) and mcfg.chat_template,
        },
        "sources": [{**s.provenance, "counts": c} for s, c in zip(sources, per_source, strict=True)],
        "counts": total,
        "options": {
            k: getattr(mcfg, k)
            for k in ("max_samples", "max_tokens", "min_chars", "max_chars", "dedup", "val_fraction", "rows_per_shard")
        },
        "splits": {
            split: {
                "rows": p.rows,
                "docs": p.docs,
                "tokens": p.tokens,
                "padding": p.rows * mcfg.seq_len - p.tokens,
                "shards": p.shards,
            }
            for split, p in packers.items()
        },
        "versions": _versions(),
    }


def _check_not_empty(cfg: Config, total: dict[str, Any], sources: list[Source]) -> None:
    if total["train_docs"] == 0:
        dropped = ", ".join(f"{k} {v}" for k, v in total["dropped"].items() if v) or "none"
        names = "; ".join(s.label for s in sources)
        raise PipelineError(
            f"manifest.sources: no training document left after filtering ({total['read']} read, dropped: "
            f"{dropped}) from {names}; check the data, manifest.min_chars/max_chars and the field mapping"
        )
    if cfg.manifest.val_fraction > 0 and total["val_docs"] == 0:
        raise PipelineError(
            f"manifest.val_fraction: {cfg.manifest.val_fraction} held out none of {total['kept']} documents "
            "(assignment is by a hash of each document); raise it, add data or set it to 0"
        )


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("datasets", "pyarrow", "tokenizers", "transformers")}


def _publish(staging: Path, out: Path, manifest: dict[str, Any]) -> None:
    """Move the new shards into place, delete shards of an earlier run that the new manifest does not list, and
    write manifest.json last (the stage wrapper then writes the marker)."""
    new = {s["file"] for split in manifest["splits"].values() for s in split["shards"]}
    for name in sorted(new):
        os.replace(staging / name, out / name)
    for split in data_format.SPLITS:
        for old in out.glob(f"{split}-*.parquet"):
            if old.name not in new:
                old.unlink()
    atomic_write_json(out / data_format.MANIFEST_FILE, manifest)


def summary_text(manifest: dict[str, Any], out: Path, metrics: dict[str, float]) -> str:
    """A few human-readable lines: sources, kept/dropped, tokens, shards, throughput."""
    counts = manifest["counts"]
    dropped = ", ".join(f"{k} {v:,}" for k, v in counts["dropped"].items() if v) or "none"
    lines = [
        f"manifest: {counts['read']:,} records read, {counts['kept']:,} kept ({counts['train_docs']:,} train, "
        f"{counts['val_docs']:,} val), dropped: {dropped}; stopped: {counts['stop_reason']}",
    ]
    for i, src in enumerate(manifest["sources"]):
        c = src["counts"]
        shapes = ", ".join(f"{k} {v:,}" for k, v in c["shapes"].items() if v) or "none"
        lines.append(
            f"  [{i}] {src['path']} {src['split']}: token share {c['token_share']:.3f} (target "
            f"{src['target_share']:.3f} of {manifest['mixture']}), read {c['read']:,}, kept {c['kept']:,}, tokens "
            f"{c['tokens']:,} (shapes: {shapes})"
        )
    splits = manifest["splits"]
    lines.append(
        f"  tokens {counts['tokens']:,} (seq_len {manifest['seq_len']}): train {splits['train']['rows']:,} rows in "
        f"{len(splits['train']['shards'])} shards, val {splits['val']['rows']:,} rows in "
        f"{len(splits['val']['shards'])} shards -> {out}"
    )
    lines.append(
        f"  {metrics['docs_per_s']:,.0f} docs/s, {metrics['tokens_per_s']:,.0f} tokens/s over "
        f"{metrics['process_s']:.1f} s of reading, tokenizing and packing (+{metrics['setup_s']:.1f} s setup)"
    )
    return "\n".join(lines)


def _sections(cfg: Config, unit: str | None) -> dict[str, Any]:
    teacher = cfg.teacher
    return {
        "teacher.tokenizer": teacher.tokenizer or teacher.name_or_path,
        "teacher.revision": teacher.revision,
        "teacher.gguf_file": None if teacher.tokenizer else teacher.gguf_file,
        "manifest": cfg.manifest,
        "seed": cfg.seed,
    }


def _outputs(cfg: Config, rd: RunDir, unit: str | None) -> dict[str, str | None]:
    """manifest.json and every shard it lists (their checksums are in it)."""
    manifest = data_format.read_manifest(rd.stage_dir(STAGE))
    shards = {s["file"]: s["sha256"] for split in data_format.SPLITS for s in manifest["splits"][split]["shards"]}
    return {data_format.MANIFEST_FILE: None, **shards}


SPEC = StageSpec(
    name=STAGE,
    run=run,
    sections=_sections,
    external=lambda cfg, unit: data_file_identities(cfg.manifest),
    outputs=_outputs,
)


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.manifest --config C [overrides] [--force]``; returns the exit code."""
    return stage_main(SPEC, argv)


if __name__ == "__main__":
    sys.exit(main())
