"""Cross-tokenizer distillation from the cache: a student whose tokenizer differs from the teacher's learns from the
same cached teacher pass.

Why written here: no library does cross-tokenizer KD from a cache. TRL's GOLD trainer (with the ULD loss) and NeMo
RL's cross-tokenizer KD run the teacher live next to the student and align the two tokenizations of each batch on the
fly; here the teacher ran once (pipeline.cache) and only its top-k log-probs, tail mass and hidden states are left,
so the alignment is rebuilt from what the manifest stores with every packed row (pipeline.data_format, format 2):
the row's text and, per teacher token, the byte offset where it ends (``token_ends``).

The pieces, in the order the data flows:

1. :class:`Vocabulary` — what a token id stands for in text, as bytes: byte-level BPE (GPT-2, Llama 3, Qwen,
   SmolLM: ``Ġ`` = space, every character one byte of UTF-8 through GPT-2's byte-to-unicode table), SentencePiece
   (Llama 2, Mistral, Gemma: ``▁`` = space, ``<0xNN>`` byte-fallback pieces), else the tokenizer's own
   ``convert_tokens_to_string``. Added tokens stand for their literal content. Special tokens are flagged: they are
   matched by role (EOS to EOS, BOS to BOS) or by content, never by bytes.
2. :func:`document_ends` — the byte offset after every token of a tokenized text: exact (cumulated piece lengths)
   when the pieces spell the text byte for byte, which also places tokens that end inside a multi-byte character
   (byte-level BPE splits emoji and CJK characters); else from the fast tokenizer's offset mapping (characters
   converted to UTF-8 bytes). The manifest uses it for the teacher, :class:`StudentRows` for the student.
3. :func:`align` — student position ``j`` is aligned with teacher position ``t`` when both tokenizations place a
   boundary at the same byte offset, so both have read exactly the same text and predict what follows it. Tokens
   that add no bytes (EOS appended after a document, pieces of one character under offsets) make several positions
   end at one offset: equal counts on both sides pair in order, otherwise only the last of each.
4. :func:`vocab_map` — the teacher's ids mapped to student ids by exact token-string match (the bytes each spells;
   when several student ids spell the same bytes, a regular piece wins over a byte-fallback one), specials by role.
5. :class:`StudentRows` — the student's rows, built from the same text as the teacher's rows with its own tokenizer:
   each row of the manifest is re-tokenized document segment by document segment (a row that starts inside a
   document starts at one of the teacher's token boundaries), EOS appended where a document ends. A student row
   covers exactly the text of the teacher row it comes from, so it meets the cached top-k of that row; its length
   differs (packing differs: rows are padded to the batch's longest, cut only where one exceeds the student's
   context, which ``truncated_tokens`` counts).
6. :class:`XtokDataset` — wraps the cache reader: every cache batch becomes a student batch whose ``topk_ids`` are
   student ids (-1 where the teacher's id has no student counterpart), at aligned positions only.
7. The loss is the cache's own (``pipeline.losses``, through ``pipeline.lm_head``): CE on every student position,
   response KD at the aligned positions (``xtok_aligned`` is the KD mask), an empty slot (-1) masked on both sides,
   and ``response.unmapped`` deciding where the teacher's mass on it goes (``losses.UNMAPPED_RULES``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import IterableDataset

from pipeline.modeling import vocab_hash, vocab_size
from pipeline.rundir import PipelineError

BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece byte fallback
CONVENTIONS = ("byte_level", "sentencepiece", "text")
PAD_MULTIPLE = 8  # student rows are padded to a multiple of this (tensor-core friendly shapes on a GPU)


# -------------------------------------------------------------------------------------------------- vocabulary
@dataclass(frozen=True)
class Vocabulary:
    """What each id of a tokenizer stands for in text (see the module docstring, item 1)."""

    pieces: list[bytes | None]  # id -> the bytes it spells (None: an id the tokenizer never uses)
    special: np.ndarray  # [V] bool: special tokens, matched by role or content, not by bytes
    fallback: np.ndarray  # [V] bool: SentencePiece byte-fallback pieces (<0xNN>)
    convention: str  # one of CONVENTIONS
    eos_id: int
    bos_id: int | None
    pad_id: int  # the pad token, else EOS

    def __len__(self) -> int:
        return len(self.pieces)


def _convention(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise PipelineError(
            f"{getattr(tokenizer, 'name_or_path', tokenizer)}: not a fast tokenizer; cross-tokenizer distillation "
            "needs the offset mapping of a tokenizers-backed tokenizer"
        )
    spec = json.loads(backend.to_str())
    parts = json.dumps([spec.get("pre_tokenizer"), spec.get("decoder")])
    if '"ByteLevel"' in parts:
        return "byte_level"
    if '"Metaspace"' in parts or "\u2581" in parts or '"ByteFallback"' in parts:
        return "sentencepiece"
    return "text"


def _byte_decoder() -> dict[str, int]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {char: byte for byte, char in bytes_to_unicode().items()}


def vocabulary(tokenizer: Any) -> Vocabulary:
    """The :class:`Vocabulary` of a fast tokenizer (a PipelineError for a slow one, which has no offsets)."""
    convention = _convention(tokenizer)
    size = len(tokenizer)
    pieces: list[bytes | None] = [None] * size
    special = np.zeros(size, dtype=bool)
    fallback = np.zeros(size, dtype=bool)
    added = {int(i): tok for i, tok in tokenizer.added_tokens_decoder.items()}
    decoder = _byte_decoder() if convention == "byte_level" else {}
    for token, i in tokenizer.get_vocab().items():
        if i >= size:
            continue
        if i in added:  # added tokens match their literal content in the text, special or not
            pieces[i] = added[i].content.encode("utf-8")
            special[i] = bool(added[i].special)
        elif convention == "byte_level" and all(c in decoder for c in token):
            pieces[i] = bytes(decoder[c] for c in token)
        elif convention == "sentencepiece" and BYTE_PIECE.fullmatch(token):
            pieces[i] = bytes([int(BYTE_PIECE.fullmatch(token).group(1), 16)])
            fallback[i] = True
        elif convention == "sentencepiece":
            pieces[i] = token.replace("\u2581", " ").encode("utf-8")
        else:
            pieces[i] = tokenizer.convert_tokens_to_string([token]).encode("utf-8")
    if tokenizer.eos_token_id is None:
        raise PipelineError(f"{getattr(tokenizer, 'name_or_path', '')}: the tokenizer has no EOS token")
    eos = int(tokenizer.eos_token_id)
    pad = eos if tokenizer.pad_token_id is None else int(tokenizer.pad_token_id)
    bos = None if tokenizer.bos_token_id is None else int(tokenizer.bos_token_id)
    return Vocabulary(pieces, special, fallback, convention, eos, bos, pad)


def vocab_map(teacher: Vocabulary, student: Vocabulary) -> np.ndarray:
    """[V_teacher] int32: the student id spelling the same bytes as each teacher id, or -1 when none does.

    Regular ids match regular ids by their bytes (byte-level ``Ġthe`` and SentencePiece ``▁the`` both spell
    b" the"); where several student ids spell the same bytes the first regular one wins over byte-fallback pieces
    (which the student only produces for bytes nothing else covers). Special ids map by role (EOS to EOS, BOS to BOS)
    or to the student's special token of the same content; never to a regular token.
    """
    regular: dict[bytes, int] = {}
    specials: dict[bytes, int] = {}
    for fallback_pass in (False, True):
        for sid, piece in enumerate(student.pieces):
            if piece is None or bool(student.fallback[sid]) != fallback_pass:
                continue
            (specials if student.special[sid] else regular).setdefault(piece, sid)
    out = np.full(len(teacher), -1, dtype=np.int32)
    for tid, piece in enumerate(teacher.pieces):
        if piece is None:
            continue
        if tid == teacher.eos_id:
            out[tid] = student.eos_id
        elif tid == teacher.bos_id and student.bos_id is not None:
            out[tid] = student.bos_id
        elif teacher.special[tid]:
            out[tid] = specials.get(piece, -1)
        else:
            out[tid] = regular.get(piece, -1)
    return out


# -------------------------------------------------------------------------------------------------- offsets
def char_to_byte(text: str) -> np.ndarray:
    """[len(text) + 1] int64: the UTF-8 byte offset of every character offset of ``text``."""
    codepoints = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    width = 1 + (codepoints >= 0x80).astype(np.int64) + (codepoints >= 0x800) + (codepoints >= 0x10000)
    return np.concatenate([[0], np.cumsum(width)])


def document_ends(
    text: str,
    ids: Sequence[int],
    offsets: Sequence[tuple[int, int]],
    vocab: Vocabulary,
    *,
    ends_document: bool,
) -> tuple[list[int], np.ndarray]:
    """(ids, byte ends) of one tokenized text, EOS appended when it ends a document (unless it already ends in EOS).

    ``ids``/``offsets``: the fast tokenizer's output for ``text`` (``add_special_tokens=False``,
    ``return_offsets_mapping=True``). ``ends[t]`` is the byte offset in ``text.encode()`` where token ``t`` ends:
    the cumulated piece lengths when the pieces spell the text exactly, else the offset mapping's character ends in
    bytes, made non-decreasing. When the text ends a document, the last token (the appended EOS, or an EOS the text
    already ends with) ends at the text's last byte, so documents packed back to back cover every byte once.
    """
    raw = text.encode("utf-8")
    ids = [int(i) for i in ids]
    pieces = [vocab.pieces[i] if 0 <= i < len(vocab) else None for i in ids]
    if ids and None not in pieces and b"".join(pieces) == raw:
        ends = np.cumsum([len(p) for p in pieces], dtype=np.int64)
    elif ids:
        char_ends = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)[:, 1]
        ends = np.maximum.accumulate(char_to_byte(text)[np.clip(char_ends, 0, len(text))])
    else:
        ends = np.zeros(0, dtype=np.int64)
    if ends_document:
        if not ids or ids[-1] != vocab.eos_id:
            ids.append(vocab.eos_id)
            ends = np.append(ends, len(raw))
        ends[-1] = len(raw)
    return ids, ends


def char_starts(raw: bytes) -> np.ndarray:
    """[len(raw) + 1] int64: how many characters start before each byte offset of UTF-8 ``raw`` (a byte that is not
    a continuation byte 0b10xxxxxx starts a character)."""
    data = np.frombuffer(raw, dtype=np.uint8)
    return np.concatenate([[0], np.cumsum((data & 0xC0) != 0x80)])


def next_token_spans(raw: bytes, ends: np.ndarray, length: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """([seq_len], [seq_len]) int32: bytes and characters of the token that position ``t`` predicts (token t+1),
    for the ``length`` real tokens of a row whose tokens end at ``ends``; 0 where there is no next token.

    A character counts in the token holding its first byte, so the characters of a row's tokens add up to the
    characters of its text whatever the tokenization. Bits per byte and per-character perplexity divide by these.
    """
    out_bytes = np.zeros(seq_len, dtype=np.int32)
    out_chars = np.zeros(seq_len, dtype=np.int32)
    if length >= 2:
        ends = np.asarray(ends[:length], dtype=np.int64)
        starts = char_starts(raw)
        out_bytes[: length - 1] = ends[1:] - ends[:-1]
        out_chars[: length - 1] = starts[ends[1:]] - starts[ends[:-1]]
    return out_bytes, out_chars


# ------------------------------------------------------------------------------------------------- alignment
def _groups(ends: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Runs of equal values of a non-decreasing array: (first index, size) per run, run id and rank per element."""
    new = np.ones(len(ends), dtype=bool)
    new[1:] = ends[1:] != ends[:-1]
    first = np.flatnonzero(new)
    size = np.diff(np.append(first, len(ends)))
    run = np.cumsum(new) - 1
    rank = np.arange(len(ends)) - first[run]
    return first, size, run, rank


def align(teacher_ends: np.ndarray, student_ends: np.ndarray) -> np.ndarray:
    """[len(student_ends)] int64: the teacher position aligned with each student position, or -1.

    Both arrays are the byte ends of one text's real tokens (non-decreasing). Student position ``j`` is aligned with
    teacher position ``t`` when ``student_ends[j] == teacher_ends[t]``: both have read the same bytes and predict
    what follows. Positions ending at one offset (zero-byte tokens) pair in order when both sides have as many, else
    only the last of each is aligned.
    """
    teacher_ends = np.asarray(teacher_ends, dtype=np.int64)
    student_ends = np.asarray(student_ends, dtype=np.int64)
    out = np.full(len(student_ends), -1, dtype=np.int64)
    if not len(teacher_ends) or not len(student_ends):
        return out
    t_first, t_size, _, _ = _groups(teacher_ends)
    _, s_size, s_run, s_rank = _groups(student_ends)
    values = teacher_ends[t_first]
    g = np.clip(np.searchsorted(values, student_ends), 0, len(values) - 1)
    found = values[g] == student_ends
    size_t, size_s = t_size[g], s_size[s_run]
    paired = np.where(size_t == size_s, t_first[g] + s_rank, -1)
    last = np.where(s_rank == size_s - 1, t_first[g] + size_t - 1, -1)
    out[found] = np.where(size_t == size_s, paired, last)[found]
    return out


# --------------------------------------------------------------------------------------------- manifest rows
class RowTexts:
    """The manifest's text columns (``text``, ``token_ends``, ``doc_starts``) of the rows a split's cache shards hold,
    by ``sample_id``; read lazily, one manifest shard at a time (the last ``keep`` stay resident: batches come from
    one or two neighbouring shards).

    Bound to the exact files the cache was computed from: every cache shard records its manifest shard's name and
    sha256, which must be the ones ``manifest.json`` lists, and each file must still be the one the manifest stage's
    marker declares; otherwise a PipelineError names the file and what to rerun.
    """

    def __init__(self, manifest_dir: Path, cache_files: Sequence[Path], keep: int = 2) -> None:
        from pipeline import data_format
        from pipeline.cache_format import read_cache_meta
        from pipeline.rundir import MARKER, declared_outputs, file_problem

        cache_metas = [read_cache_meta(f) for f in cache_files]
        manifest_dir = Path(manifest_dir)
        manifest = data_format.read_manifest(manifest_dir)
        declared = declared_outputs(manifest_dir)
        split = cache_metas[0]["split"]
        entries, first = {}, 0
        for shard in manifest["splits"][split]["shards"]:
            entries[shard["file"]] = (first, shard)
            first += int(shard["rows"])
        self.files: list[Path] = []
        self.first: list[int] = []
        for meta in cache_metas:
            name = meta["manifest_shard"]
            if name not in entries or entries[name][1]["sha256"] != meta["manifest_sha256"]:
                raise PipelineError(
                    f"{meta['path']}: computed from manifest shard {name} (sha256 {meta['manifest_sha256'][:12]}…), "
                    f"which {manifest_dir / data_format.MANIFEST_FILE} no longer lists; rerun make cache"
                )
            problem = file_problem(manifest_dir / name, declared.get(name, {}))
            if problem:
                raise PipelineError(
                    f"{manifest_dir / name} (declared in {MARKER}): {problem}; rerun make manifest, then make cache"
                )
            self.files.append(manifest_dir / name)
            self.first.append(entries[name][0])
        order = np.argsort(self.first)
        self.files = [self.files[i] for i in order]
        self.first = [self.first[i] for i in order]
        self.keep = keep
        self._loaded: dict[int, dict[str, Any]] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_loaded": {}}

    def _shard(self, index: int) -> dict[str, Any]:
        from pipeline import data_format

        if index not in self._loaded:
            if len(self._loaded) >= self.keep:
                self._loaded.pop(next(iter(self._loaded)))
            self._loaded[index] = data_format.read_packed_text(self.files[index])
        return self._loaded[index]

    def rows(self, sample_ids: Sequence[int]) -> list[tuple[bytes, np.ndarray, np.ndarray]]:
        """(text, token_ends [T], doc_starts) of each row, in the order of ``sample_ids``."""
        out = []
        for sample_id in (int(s) for s in sample_ids):
            index = int(np.searchsorted(self.first, sample_id, side="right")) - 1
            shard = self._shard(index)
            row = sample_id - self.first[index]
            if index < 0 or not 0 <= row < len(shard["text"]) or int(shard["sample_id"][row]) != sample_id:
                raise PipelineError(f"{self.files[max(index, 0)]}: no row with sample_id {sample_id}; rerun make cache")
            out.append((shard["text"][row], shard["token_ends"][row], shard["doc_starts"][row]))
        return out


# ----------------------------------------------------------------------------------------------- student rows
def _whole_characters(raw: bytes, start: int, stop: int, first: bool, last: bool) -> tuple[int, int]:
    """``[start, stop)`` narrowed to whole UTF-8 characters at a row's edges: a row cut at a token boundary inside a
    character (byte-level BPE splits multi-byte characters) begins with continuation bytes or ends inside one."""
    if first:
        while start < stop and raw[start] & 0xC0 == 0x80:
            start += 1
    if last:
        back = stop
        while back > start and raw[back - 1] & 0xC0 == 0x80:
            back -= 1
        if back > start:
            lead = raw[back - 1]
            need = 2 if lead >= 0xC0 and lead < 0xE0 else 3 if 0xE0 <= lead < 0xF0 else 4 if lead >= 0xF0 else 1
            if stop - (back - 1) < need:
                stop = back - 1
    return start, stop


@dataclass
class StudentBatch:
    """Student rows of one batch: ids [B, Ts] and mask, each row's byte ends, and the alignment with the teacher."""

    input_ids: np.ndarray  # [B, Ts] int32, padded with the student's pad id
    attention_mask: np.ndarray  # [B, Ts] int8
    teacher_position: np.ndarray  # [B, Ts] int64: aligned teacher position, -1 where none (and at padding)
    next_bytes: np.ndarray  # [B, Ts] int32: bytes of the token each position predicts
    next_chars: np.ndarray  # [B, Ts] int32: characters of the token each position predicts
    truncated: int  # student tokens cut because a row was longer than the student's context


class StudentRows:
    """Re-tokenizes manifest rows with the student's tokenizer (module docstring, item 5)."""

    def __init__(self, tokenizer: Any, vocab: Vocabulary, teacher_eos: int, max_len: int) -> None:
        self.tokenizer, self.vocab, self.teacher_eos, self.max_len = tokenizer, vocab, teacher_eos, max_len

    def segments(
        self, text: bytes, ends: np.ndarray, doc_starts: np.ndarray, teacher_ids: np.ndarray, length: int
    ) -> list[tuple[int, int, bool]]:
        """(byte start, byte stop, ends a document) of each document piece of a row of ``length`` real tokens."""
        cuts = [int(ends[p - 1]) for p in np.asarray(doc_starts).tolist() if 0 < p <= length]
        bounds = [0, *cuts, len(text)]
        last_is_eos = length > 0 and int(teacher_ids[length - 1]) == self.teacher_eos
        pieces = []
        for i in range(len(bounds) - 1):
            last = i == len(bounds) - 2
            if last and bounds[i] == bounds[i + 1] and not last_is_eos:
                continue  # the row ends exactly where a document begins
            pieces.append((bounds[i], bounds[i + 1], last_is_eos if last else True))
        return pieces

    def build(
        self,
        rows: Sequence[tuple[bytes, np.ndarray, np.ndarray]],
        teacher_ids: np.ndarray,
        teacher_mask: np.ndarray,
    ) -> StudentBatch:
        """The student rows of a batch of manifest rows (``RowTexts.rows``) and their cached teacher ids/mask."""
        lengths = teacher_mask.astype(bool).sum(1)
        plan = []  # (row, byte start, byte stop, ends a document)
        texts = []
        for r, (text, ends, doc_starts) in enumerate(rows):
            pieces = self.segments(text, ends, doc_starts, teacher_ids[r], int(lengths[r]))
            for n, (start, stop, ends_doc) in enumerate(pieces):
                start, stop = _whole_characters(text, start, stop, n == 0, n == len(pieces) - 1)
                plan.append((r, start, stop, ends_doc))
                texts.append(text[start:stop].decode("utf-8"))
        encoded = (
            self.tokenizer(texts, add_special_tokens=False, return_attention_mask=False, return_offsets_mapping=True)
            if texts
            else {"input_ids": [], "offset_mapping": []}
        )
        ids_rows: list[list[int]] = [[] for _ in rows]
        ends_rows: list[list[np.ndarray]] = [[] for _ in rows]
        for (r, start, _, ends_doc), text, ids, offsets in zip(
            plan, texts, encoded["input_ids"], encoded["offset_mapping"], strict=True
        ):
            ids, ends = document_ends(text, ids, offsets, self.vocab, ends_document=ends_doc)
            ids_rows[r] += ids
            ends_rows[r].append(ends + start)
        longest = max((len(ids) for ids in ids_rows), default=0)
        width = max(1, min(self.max_len, -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE))
        batch = StudentBatch(
            input_ids=np.full((len(rows), width), self.vocab.pad_id, dtype=np.int32),
            attention_mask=np.zeros((len(rows), width), dtype=np.int8),
            teacher_position=np.full((len(rows), width), -1, dtype=np.int64),
            next_bytes=np.zeros((len(rows), width), dtype=np.int32),
            next_chars=np.zeros((len(rows), width), dtype=np.int32),
            truncated=0,
        )
        for r, (text, teacher_ends, _) in enumerate(rows):
            ends = np.concatenate(ends_rows[r]) if ends_rows[r] else np.zeros(0, dtype=np.int64)
            n = min(len(ids_rows[r]), width)
            batch.truncated += len(ids_rows[r]) - n
            batch.input_ids[r, :n] = ids_rows[r][:n]
            batch.attention_mask[r, :n] = 1
            batch.teacher_position[r, :n] = align(np.asarray(teacher_ends[: lengths[r]]), ends[:n])
            batch.next_bytes[r], batch.next_chars[r] = next_token_spans(text, ends, n, width)
        return batch


# ---------------------------------------------------------------------------------------------------- batches
STAT_KEYS = ("aligned_positions", "student_positions", "mapped_mass", "topk_mass", "truncated_tokens")


class XtokDataset(IterableDataset):
    """A :class:`~pipeline.cache_format.CacheDataset` whose batches are turned into the student's (item 6).

    Each cache batch (teacher rows with their cached top-k, tail, hidden states) becomes: ``input_ids`` and
    ``attention_mask`` of the student rows covering the same text; ``xtok_aligned`` [B, Ts] (the positions that meet
    a teacher position); ``topk_ids`` [B, Ts, k] as student ids (-1: the teacher's id has no student counterpart, and
    everywhere off the aligned positions), ``topk_logprobs``/``tail_logmass`` of the aligned teacher positions as
    cached; ``hidden_<i>`` [B, Ts, H] with ``xtok_hidden_mask`` (aligned positions whose teacher state is stored);
    ``embed`` unchanged; ``next_bytes``/``next_chars`` for per-byte metrics; ``xtok_stats`` (:data:`STAT_KEYS`).
    Order, sharding over ranks and workers, and resume are the cache reader's (``start_from``, ``set_epoch``).
    """

    def __init__(
        self, cache: Any, texts: RowTexts, rows: StudentRows, teacher_to_student: np.ndarray | None = None
    ) -> None:
        super().__init__()
        self.cache, self.texts, self.rows = cache, texts, rows
        self.teacher_to_student = None if teacher_to_student is None else torch.from_numpy(teacher_to_student)

    def set_epoch(self, epoch: int) -> None:
        self.cache.set_epoch(epoch)

    def start_from(self, epoch: int, batches_consumed: int) -> None:
        self.cache.start_from(epoch, batches_consumed)

    def __len__(self) -> int:
        return len(self.cache)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.cache:
            yield self.convert(batch)

    def convert(self, batch: dict[str, Any]) -> dict[str, Any]:
        """One cache batch (stored dtypes, on the CPU) as the student's batch (see the class docstring)."""
        rows = self.texts.rows(batch["sample_id"].tolist())
        student = self.rows.build(rows, batch["input_ids"].numpy(), batch["attention_mask"].numpy())
        position = torch.from_numpy(student.teacher_position)
        aligned = position >= 0
        safe = position.clamp(min=0)
        out = {key: batch[key] for key in ("sample_id", "epoch", "batch_index", "embed") if key in batch}
        out["input_ids"] = torch.from_numpy(student.input_ids)
        out["attention_mask"] = torch.from_numpy(student.attention_mask)
        out["xtok_aligned"] = aligned
        out["next_bytes"] = torch.from_numpy(student.next_bytes)
        out["next_chars"] = torch.from_numpy(student.next_chars)
        mapped_mass = topk_mass = 0.0
        if "topk_ids" in batch and self.teacher_to_student is not None:
            k = batch["topk_ids"].shape[-1]
            at = safe.unsqueeze(-1).expand(-1, -1, k)
            teacher_ids = batch["topk_ids"].gather(1, at).long()
            ids = self.teacher_to_student[teacher_ids]
            out["topk_ids"] = torch.where(aligned.unsqueeze(-1), ids, torch.full_like(ids, -1))
            out["topk_logprobs"] = batch["topk_logprobs"].gather(1, at)
            out["tail_logmass"] = batch["tail_logmass"].gather(1, safe)
            probs = out["topk_logprobs"].float().exp() * aligned.unsqueeze(-1)
            mapped_mass, topk_mass = float((probs * (out["topk_ids"] >= 0)).sum()), float(probs.sum())
        stored = batch.get("hidden_positions")
        for key in [k for k in batch if k.startswith("hidden_") and k[len("hidden_") :].isdigit()]:
            hidden = batch[key]
            if stored is None:
                index, found = safe, aligned
            else:
                index = torch.searchsorted(stored, safe).clamp(max=len(stored) - 1)
                found = aligned & (stored[index] == safe)
            out[key] = hidden.gather(1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
            out["xtok_hidden_mask"] = found
        counts = (float(aligned.sum()), float(student.attention_mask.sum()), mapped_mass, topk_mass)
        out["xtok_stats"] = torch.tensor([*counts, float(student.truncated)], dtype=torch.float64)
        return out


@dataclass
class CrossTokenizer:
    """Everything a stage needs to feed a student with another tokenizer from the cache (:func:`setup`)."""

    manifest_dir: Path
    rows: StudentRows
    teacher_to_student: np.ndarray  # [V_teacher] int32, -1: no student id spells the teacher token

    def wrap(self, cache: Any) -> XtokDataset:
        """The student's view of a cache reader (its shards' manifest rows, re-tokenized)."""
        return XtokDataset(cache, RowTexts(self.manifest_dir, cache.files), self.rows, self.teacher_to_student)

    def provenance(self, student_tokenizer: str) -> dict[str, Any]:
        """What summary and results record about how the student's rows were made."""
        return {
            "tokenizer": student_tokenizer,
            "vocab_size": len(self.rows.vocab),
            "convention": self.rows.vocab.convention,
            "rows": "each manifest row's text re-tokenized by document piece, EOS where a document ends, padded "
            f"to the batch's longest row (at most {self.rows.max_len} tokens)",
            "teacher_ids_mapped": int((self.teacher_to_student >= 0).sum()),
        }


class CacheIds(NamedTuple):
    """The vocabulary whose ids a student reads in the cache: its own, or (``other``) the teacher's, which this
    module maps to the student's; ``reader`` names it in an error."""

    other: bool
    vocab_hash: str
    vocab_size: int
    reader: str


def cache_ids(student_tokenizer: Any, teacher_tokenizer: Any) -> CacheIds:
    """Whether the student has another tokenizer than the teacher, and the vocabulary the cache must be in for it."""
    student_hash, teacher_hash = vocab_hash(student_tokenizer), vocab_hash(teacher_tokenizer)
    if student_hash == teacher_hash:
        return CacheIds(False, student_hash, vocab_size(student_tokenizer), "student's")
    return CacheIds(True, teacher_hash, vocab_size(teacher_tokenizer), "teacher's tokenizer")


def setup(teacher_tokenizer: Any, student_tokenizer: Any, manifest_dir: Path, max_len: int) -> CrossTokenizer:
    """The student rows' builder and the teacher-to-student id map for two tokenizers."""
    teacher, student = vocabulary(teacher_tokenizer), vocabulary(student_tokenizer)
    rows = StudentRows(student_tokenizer, student, teacher.eos_id, max_len)
    return CrossTokenizer(Path(manifest_dir), rows, vocab_map(teacher, student))


def setup_for_model(
    teacher_tokenizer: Any, student_tokenizer: Any, manifest_dir: Path, model_config: Any
) -> CrossTokenizer:
    """:func:`setup` with student rows at most as long as the student model's context (``max_position_embeddings``;
    unbounded when its config has none)."""
    context = int(getattr(model_config, "max_position_embeddings", 0) or 1 << 20)
    return setup(teacher_tokenizer, student_tokenizer, manifest_dir, context)


def stats_summary(totals: Sequence[float]) -> dict[str, float]:
    """aligned_fraction (aligned / real student positions), mapped_mass_fraction (teacher top-k probability on ids
    the student has, over all top-k probability at aligned positions; absent without top-k) and truncated_tokens
    from summed ``xtok_stats``."""
    values = dict(zip(STAT_KEYS, (float(v) for v in totals), strict=True))
    out = {"aligned_fraction": values["aligned_positions"] / max(values["student_positions"], 1.0)}
    if values["topk_mass"]:  # only batches that carried the teacher's top-k (response KD, evaluation)
        out["mapped_mass_fraction"] = values["mapped_mass"] / values["topk_mass"]
    return {**out, "truncated_tokens": values["truncated_tokens"]}


def teacher_row_spans(texts: RowTexts, sample_ids: Sequence[int], attention_mask: np.ndarray) -> tuple[Tensor, Tensor]:
    """``next_bytes``/``next_chars`` [B, T] of manifest rows read with the teacher's own tokens (a model that shares
    its vocabulary), as :class:`XtokDataset` gives them for a student with another tokenizer."""
    lengths = attention_mask.astype(bool).sum(1)
    seq_len = attention_mask.shape[1]
    rows = texts.rows(sample_ids)
    spans = [next_token_spans(text, ends, int(n), seq_len) for (text, ends, _), n in zip(rows, lengths, strict=True)]
    return torch.from_numpy(np.stack([b for b, _ in spans])), torch.from_numpy(np.stack([c for _, c in spans]))
