"""Manifest stage on small local JSON/Parquet datasets: record shapes, mixture, filters, split, packing, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import corpus_texts, write_config

from pipeline import data_format, manifest, xtok
from pipeline.config import SourceConfig
from pipeline.modeling import vocab_hash


# ------------------------------------------------------------------------------------------------- helpers
def write_jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def write_parquet(path: Path, records: list[dict]) -> str:
    pq.write_table(pa.Table.from_pylist(records), path)
    return str(path)


def source(data_files: str, fmt: str = "json", **kw) -> dict:
    return {"path": fmt, "data_files": data_files, **kw}


@pytest.fixture
def tokenizer(tiny_assets):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_assets["tokenizer"])


def run_stage(config: Path, capsys, *args: str) -> tuple[int, str]:
    code = manifest.main(["--config", str(config), *args])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def out_dir(config: Path) -> Path:
    return config.parent / "runs" / "tiny" / "manifest"


def load_split(out: Path, split: str) -> dict:
    """All shards of a split concatenated, checked against manifest.json on the way."""
    meta = data_format.read_manifest(out, verify_checksums=True)
    parts = [data_format.read_packed_shard(p) for p in data_format.shard_paths(meta, out, split)]
    if not parts:
        return {"input_ids": np.zeros((0, meta["seq_len"]), np.int32), "rows": [], "manifest": meta}
    return {
        "input_ids": np.concatenate([p["input_ids"] for p in parts]),
        "attention_mask": np.concatenate([p["attention_mask"] for p in parts]),
        "sample_id": np.concatenate([p["sample_id"] for p in parts]),
        "doc_starts": [d for p in parts for d in p["doc_starts"]],
        "rows": [len(p["sample_id"]) for p in parts],
        "metas": [p["meta"] for p in parts],
        "manifest": meta,
    }


def file_bytes(out: Path) -> dict[str, bytes]:
    return {
        p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix in (".parquet", ".json") and p.stem[0] != "_"
    }


# ------------------------------------------------------------------------------------------ records -> text
def test_record_shapes_keep_all_content(tokenizer):
    render = manifest.chat_renderer(tokenizer, use_template=True)
    cases = {
        "text": {"text": "Plain words."},
        "alpaca": {"instruction": "Translate.", "input": "Bonjour", "output": "Hello"},
        "prompt_response": {"prompt": "Two plus two?", "response": "Four."},
        "messages": {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Look"}, {"type": "image", "text": None}]},
                {"role": "assistant", "content": "A cat."},
            ]
        },
        "sharegpt": {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello there"}]},
    }
    shapes = {name: manifest.record_shape(rec, "auto") for name, rec in cases.items()}
    assert {name: s[0] for name, s in shapes.items()} == {name: name for name in cases}
    assert shapes["text"][1] == "Plain words."
    assert render(shapes["alpaca"][1]) == ("<|user|>Translate.\n\nBonjour<|end|><|assistant|>Hello<|end|>", False)
    assert render(shapes["prompt_response"][1])[0] == "<|user|>Two plus two?<|end|><|assistant|>Four.<|end|>"
    assert render(shapes["messages"][1])[0] == "<|system|>Be brief.<|end|><|user|>Look<|end|><|assistant|>A cat.<|end|>"
    assert render(shapes["sharegpt"][1])[0] == "<|user|>Hi<|end|><|assistant|>Hello there<|end|>"
    plain = manifest.chat_renderer(tokenizer, use_template=False)
    assert plain(shapes["sharegpt"][1]) == ("User: Hi\n\nAssistant: Hello there", False)
    # a record of no known shape, or of the wrong shape for a forced format, is not guessed at
    for rec in ({"body": "x"}, {"messages": []}, {"messages": [{"content": "no role"}]}, {"instruction": "no output"}):
        assert manifest.record_shape(rec, "auto") is None
    assert manifest.record_shape({"text": "t"}, "messages") is None
    assert manifest.record_shape({"prompt": "p", "response": "r", "text": "t"}, "text") == ("text", "t")


def test_template_that_rejects_a_conversation_falls_back_to_plain(tokenizer):
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    )
    render = manifest.chat_renderer(tokenizer, use_template=True)
    assert render([{"role": "user", "content": "a"}]) == ("[user]a", False)
    assert render([{"role": "system", "content": "s"}, {"role": "user", "content": "a"}]) == (
        "System: s\n\nUser: a",
        True,
    )


def test_dated_chat_template_renders_the_same_every_day(tokenizer):
    tokenizer.chat_template = (  # the date logic of the Llama-3.1 template
        '{%- if not date_string is defined %}{%- set date_string = strftime_now("%d %b %Y") %}{%- endif %}'
        "Today: {{ date_string }}|{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    render = manifest.chat_renderer(tokenizer, use_template=True)
    assert render([{"role": "user", "content": "a"}]) == (f"Today: {manifest.TEMPLATE_DATE}|a", False)


def test_normalise_and_split_are_pure():
    assert manifest.normalise("  Hello\tWORLD \n") == manifest.normalise("hello world") == "hello world"
    assert manifest.normalise("ﬁne") == "fine"  # NFKC folds the ligature
    texts = [f"document {i}" for i in range(4000)]
    flags = [manifest.is_validation(manifest.normalise(t), 0, 0.1) for t in texts]
    assert 0.08 < np.mean(flags) < 0.12
    assert flags == [manifest.is_validation(manifest.normalise(t), 0, 0.1) for t in texts]
    assert flags != [manifest.is_validation(manifest.normalise(t), 1, 0.1) for t in texts]


# --------------------------------------------------------------------------------------------------- mixture
def test_document_mixture_follows_weights_until_a_source_runs_out():
    sizes, weights = (3000, 20000), (0.3, 0.7)
    sources = [
        manifest.Source(SourceConfig(path="x", weight=w), f"s{i}", "x", iter([{}] * n), {})
        for i, (n, w) in enumerate(zip(sizes, weights, strict=True))
    ]
    state: dict[str, str] = {}
    picks = np.array([i for i, _ in manifest._mixture(sources, manifest.Mixer(list(weights), "documents", 0), state)])
    assert state["stop_reason"] == "source 0 exhausted"
    assert (picks == 0).sum() == 3000
    assert abs((picks == 0).mean() - 0.3) < 0.015


def test_token_mixture_holds_token_shares_at_every_point():
    """Deficit scheduling: short and long documents, weights 0.8/0.2 of the tokens; the shares hold after 100
    documents as after 5000, and a source whose documents are all dropped (zero tokens) would be read until it
    runs out rather than skew the others."""
    tokens_per_doc = (10, 60)
    mixer = manifest.Mixer([0.8, 0.2, 0.0], "tokens", 0)
    picks, totals = mixer.picks(), np.zeros(3)
    for n in range(1, 5001):
        i = next(picks)
        mixer.kept(i, 4 * tokens_per_doc[i])  # tokenized one chunk later, as in the stage
        if n % 64 == 0:
            mixer.tokenized(0, 0, 0)
        mixer.tokenized(i, 4 * tokens_per_doc[i], tokens_per_doc[i])
        totals[i] += tokens_per_doc[i]
        if n in (100, 5000):
            np.testing.assert_allclose(totals / totals.sum(), [0.8, 0.2, 0.0], atol=60 / totals.sum() + 1e-9)


def test_mixture_weights_are_token_shares_by_default(tmp_path, tiny_config, capsys):
    """The issue's case: weights 0.8/0.2, documents of 10 vs 60 words. Tokens (default) keep 0.8/0.2 of the tokens
    (documents: 0.8/0.2 of the documents, 0.40/0.60 of the tokens); realised shares are in manifest.json and the
    summary line."""
    short = write_jsonl(tmp_path / "short.jsonl", [{"text": f"short {i} " + "word " * 8} for i in range(6000)])
    long = write_jsonl(tmp_path / "long.jsonl", [{"text": f"long {i} " + "word " * 58} for i in range(3000)])
    sources = [source(short, weight=0.8), source(long, weight=0.2)]
    common = {"manifest.sources": sources, "manifest.max_tokens": 50000, "manifest.val_fraction": 0.0}
    config = tiny_config(**common)
    code, text = run_stage(config, capsys)
    assert code == 0, text
    meta = data_format.read_manifest(out_dir(config))
    shares = [s["counts"]["token_share"] for s in meta["sources"]]
    np.testing.assert_allclose(shares, [0.8, 0.2], atol=0.01)
    assert [s["target_share"] for s in meta["sources"]] == [0.8, 0.2] and meta["mixture"] == "tokens"
    assert f"token share {shares[0]:.3f} (target 0.800 of tokens)" in text
    config = tiny_config(**common, **{"manifest.mixture": "documents"})
    assert run_stage(config, capsys)[0] == 0
    meta = data_format.read_manifest(out_dir(config))
    kept = np.array([s["counts"]["kept"] for s in meta["sources"]])
    np.testing.assert_allclose(kept / kept.sum(), [0.8, 0.2], atol=0.03)
    assert meta["sources"][1]["counts"]["token_share"] > 0.5  # long documents dominate the tokens


def test_mixture_proportions_with_cap_streaming_and_parquet(tmp_path, tiny_config, capsys):
    files = []
    for s in range(3):
        records = [{"text": f"source {s} document {i} " + "word " * (i % 7)} for i in range(2500)]
        files.append(
            write_jsonl(tmp_path / f"s{s}.jsonl", records) if s else write_parquet(tmp_path / "s0.parquet", records)
        )
    sources = [
        source(files[0], "parquet", weight=5.0),
        source(files[1], weight=3.0, streaming=True),
        source(files[2], weight=2.0),
    ]
    config = tiny_config(**{"manifest.sources": sources, "manifest.max_samples": 3000, "manifest.val_fraction": 0.0})
    code, text = run_stage(config, capsys)
    assert code == 0, text
    meta = data_format.read_manifest(out_dir(config))
    kept = np.array([s["counts"]["kept"] for s in meta["sources"]])
    assert kept.sum() == 3000 and meta["counts"]["stop_reason"] == "max_samples reached"
    np.testing.assert_allclose(kept / 3000, [0.5, 0.3, 0.2], atol=0.035)
    assert [s["target_share"] for s in meta["sources"]] == [0.5, 0.3, 0.2]
    assert meta["sources"][1]["fingerprint"] is None and meta["sources"][0]["fingerprint"]
    assert meta["sources"][0]["data_files"][0]["sha256"] == data_format.file_sha256(Path(files[0]))
    assert meta["splits"]["val"] == {"rows": 0, "docs": 0, "tokens": 0, "padding": 0, "shards": []}


def test_tokenize_with_worker_processes_matches_single_process(tokenizer):
    texts = corpus_texts(2 * manifest.MIN_DOCS_PER_PROC, seed=5)
    eos = tokenizer.eos_token_id
    vocab = xtok.vocabulary(tokenizer)
    single, single_ends = manifest.tokenize_texts(texts, tokenizer, vocab, num_proc=1)
    multi, multi_ends = manifest.tokenize_texts(texts, tokenizer, vocab, num_proc=2)
    assert len(single) == len(multi) == len(single_ends) == len(texts)
    assert all(np.array_equal(a, b) for a, b in zip(single, multi, strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(single_ends, multi_ends, strict=True))
    assert single[3].tolist() == tokenizer(texts[3], add_special_tokens=False)["input_ids"] + [eos]
    assert single_ends[3][-1] == single_ends[3][-2] == len(texts[3].encode())  # EOS ends where its document does
    ids, _ = manifest.tokenize_texts(["a", "b" + tokenizer.eos_token], tokenizer, vocab, 1)
    assert ids[1].tolist().count(eos) == 1


def test_rows_keep_the_text_their_tokens_cover(tiny_config, capsys, tokenizer):
    """Format 2: every row's text is the bytes its tokens spell, back to back across documents and rows."""
    config = tiny_config({"manifest.max_samples": 60, "manifest.val_fraction": 0.0})
    assert run_stage(config, capsys)[0] == 0
    out = out_dir(config)
    meta = data_format.read_manifest(out)
    vocab = xtok.vocabulary(tokenizer)
    assert meta["format_version"] == 2 and meta["tokenizer"]["convention"] == "byte_level"
    stream = b""
    for path in data_format.shard_paths(meta, out, "train"):
        tokens, text = data_format.read_packed_shard(path), data_format.read_packed_text(path)
        for ids, mask, raw, ends in zip(tokens["input_ids"], tokens["attention_mask"], text["text"],
                                        text["token_ends"], strict=True):  # fmt: skip
            pieces = [b"" if i == vocab.eos_id else vocab.pieces[i] for i in ids[mask.astype(bool)]]
            assert b"".join(pieces) == raw
            assert np.array_equal(np.cumsum([len(p) for p in pieces]), ends[: len(pieces)])
            stream += raw
    records = [json.loads(line)["text"] for line in Path(meta["sources"][0]["data_files"][0]["file"]).open()]
    assert stream == "".join(records[:60]).encode()  # every document's bytes once, in order


# ------------------------------------------------------------------------------------- shapes end to end
def test_every_record_shape_from_json_and_parquet(tmp_path, tiny_config, capsys, tokenizer):
    n = 40
    sources = [
        source(
            write_jsonl(tmp_path / "t.jsonl", [{"body": f"plain text {i}"} for i in range(n)]), fields={"text": "body"}
        ),
        source(
            write_parquet(
                tmp_path / "a.parquet",
                [{"instruction": "no output", "input": None, "output": None}]  # first, so it is surely drawn
                + [
                    {"instruction": f"do {i}", "input": "" if i % 2 else f"in {i}", "output": f"out {i}"}
                    for i in range(n)
                ],
            ),
            "parquet",
        ),
        source(
            write_jsonl(tmp_path / "p.jsonl", [{"question": f"q {i}", "answer": f"a {i}"} for i in range(n)]),
            format="prompt_response",
            fields={"prompt": "question", "response": "answer"},
        ),
        source(
            write_jsonl(
                tmp_path / "m.jsonl",
                [
                    {"messages": [{"role": "user", "content": [{"type": "text", "text": f"part {i}"}]}]}
                    for i in range(n)
                ],
            )
        ),
        source(
            write_jsonl(
                tmp_path / "s.jsonl",
                [
                    {"conversations": [{"from": "human", "value": f"hey {i}"}, {"from": "gpt", "value": "yo"}]}
                    for i in range(n)
                ],
            ),
            streaming=True,
        ),
    ]
    config = tiny_config(**{"manifest.sources": sources, "manifest.val_fraction": 0.0})
    code, text = run_stage(config, capsys)
    assert code == 0, text
    meta = data_format.read_manifest(out_dir(config))
    shapes = [{k: v for k, v in s["counts"]["shapes"].items() if v} for s in meta["sources"]]
    assert [list(s) for s in shapes] == [["text"], ["alpaca"], ["prompt_response"], ["messages"], ["sharegpt"]]
    assert meta["counts"]["dropped"]["unmatched"] == meta["sources"][1]["counts"]["dropped"]["unmatched"] == 1
    counts = meta["counts"]
    assert counts["read"] == counts["kept"] + sum(counts["dropped"].values())
    assert meta["sources"][2]["fields"] == {"prompt": "question", "response": "answer"}
    decoded = tokenizer.decode(load_split(out_dir(config), "train")["input_ids"].reshape(-1))
    for expected in ("plain text 0", "<|user|>do 0\n\nin 0<|end|><|assistant|>out 0", "<|user|>q 0<|end|>"):
        assert expected in decoded
    assert "<|user|>part 0<|end|>" in decoded and "<|user|>hey 0<|end|><|assistant|>yo<|end|>" in decoded
    assert "manifest:" in text and "kept" in text and "shards" in text and "tokens/s" in text


# ------------------------------------------------------------------------------------ filters, packing, split
def test_dedup_and_length_filters_count_each_reason(tmp_path, tiny_config, capsys):
    texts = ["Alpha beta gamma.", "alpha   BETA gamma.", "Alpha beta gamma.", "", "   ", "tiny", "x" * 300, "Kept one."]
    texts.append(None)  # a null text is an empty document, not a record of unknown shape
    config = tiny_config(
        **{
            "manifest.sources": [source(write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts]))],
            "manifest.min_chars": 5,
            "manifest.max_chars": 200,
            "manifest.val_fraction": 0.0,
        }
    )
    code, text = run_stage(config, capsys)
    assert code == 0, text
    counts = data_format.read_manifest(out_dir(config))["counts"]
    assert counts["dropped"] == {
        "unmatched": 0, "empty": 3, "too_short": 1, "too_long": 1, "duplicate": 2, "over_cap": 0,
    }  # fmt: skip
    assert counts["kept"] == 2 and counts["read"] == len(texts)


def test_packing_invariants_and_disjoint_heldout_split(tmp_path, tiny_config, tiny_assets, capsys, tokenizer):
    config = tiny_config(**{"manifest.rows_per_shard": 5, "manifest.val_fraction": 0.2})
    code, text = run_stage(config, capsys)
    assert code == 0, text
    out = out_dir(config)
    meta = data_format.read_manifest(out)
    assert meta["tokenizer"]["vocab_hash"] == vocab_hash(tokenizer)
    texts = [json.loads(line)["text"] for line in tiny_assets["corpus"].read_text().splitlines()]
    eos, seq_len = tokenizer.eos_token_id, meta["seq_len"]
    expected = {"train": [], "val": []}
    for t in texts:  # one source, no drops: documents arrive in file order
        val = manifest.is_validation(manifest.normalise(t), 0, 0.2)
        expected["val" if val else "train"].append(tokenizer(t, add_special_tokens=False)["input_ids"] + [eos])
    assert expected["train"] and expected["val"]
    assert not {tuple(d) for d in expected["train"]} & {tuple(d) for d in expected["val"]}
    for split, docs in expected.items():
        got = load_split(out, split)
        ids, mask = got["input_ids"], got["attention_mask"]
        flat_mask = mask.reshape(-1)
        real = int(flat_mask.sum())
        # the mask is 1 on a prefix and 0 only in the padded tail of the split's last row
        assert flat_mask[:real].all() and not flat_mask[real:].any() and len(flat_mask) - real < seq_len
        # every token of every document exactly once, in order
        np.testing.assert_array_equal(ids.reshape(-1)[:real], np.concatenate(docs))
        starts = np.cumsum([0] + [len(d) for d in docs[:-1]])
        got_starts = np.concatenate([row * seq_len + d for row, d in enumerate(got["doc_starts"])])
        np.testing.assert_array_equal(got_starts, starts)
        np.testing.assert_array_equal(got["sample_id"], np.arange(len(ids)))
        assert got["rows"][:-1] == [5] * (len(got["rows"]) - 1) and 0 < got["rows"][-1] <= 5
        assert [m["shard_index"] for m in got["metas"]] == list(range(len(got["rows"])))
        assert {m["split"] for m in got["metas"]} == {split}
        info = meta["splits"][split]
        assert (info["rows"], info["docs"], info["tokens"]) == (len(ids), len(docs), real)
    assert not (out / ".staging").exists()


def test_token_cap_stops_at_a_document_boundary(tmp_path, tiny_config, capsys):
    config = tiny_config(**{"manifest.max_tokens": 1000, "manifest.val_fraction": 0.0})
    code, text = run_stage(config, capsys)
    assert code == 0, text
    meta = data_format.read_manifest(out_dir(config))
    counts = meta["counts"]
    assert 900 < counts["tokens"] <= 1000 and counts["stop_reason"] == "max_tokens reached"
    assert counts["dropped"]["over_cap"] >= 1
    assert load_split(out_dir(config), "train")["attention_mask"].sum() == counts["tokens"]


# ---------------------------------------------------------------------------------------- determinism, reruns
def test_same_config_and_data_give_identical_bytes(tmp_path, tiny_assets, capsys):
    data = tmp_path / "data"
    data.mkdir()
    texts = corpus_texts(300, seed=3)
    mixture = [
        source(write_jsonl(data / "a.jsonl", [{"text": t} for t in texts[:150]]), weight=2.0),
        source(write_parquet(data / "b.parquet", [{"prompt": t, "response": "ok"} for t in texts[150:]]), "parquet"),
        source(str(data / "a.jsonl"), streaming=True, weight=0.5),
    ]
    outs = []
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
        config = write_config(tmp_path / name, tiny_assets, {"manifest.sources": mixture, "manifest.max_samples": 200})
        code, text = run_stage(config, capsys)
        assert code == 0, text
        outs.append(file_bytes(out_dir(config)))
    assert outs[0] == outs[1] and len(outs[0]) > 3


def test_rerun_is_a_noop_force_redoes_and_changed_data_reruns(tmp_path, tiny_config, capsys):
    data = tmp_path / "c.jsonl"
    write_jsonl(data, [{"text": t} for t in corpus_texts(60, seed=9)])
    config = tiny_config(**{"manifest.sources": [source(str(data))], "manifest.val_fraction": 0.1})
    assert run_stage(config, capsys)[0] == 0
    out = out_dir(config)
    marker = (out / "_COMPLETE.json").read_text()
    before = file_bytes(out)
    code, text = run_stage(config, capsys)
    assert code == 0 and "already complete" in text and (out / "_COMPLETE.json").read_text() == marker
    code, text = run_stage(config, capsys, "--force")
    assert code == 0 and "already complete" not in text and file_bytes(out) == before
    write_jsonl(data, [{"text": t} for t in corpus_texts(30, seed=9)])
    code, text = run_stage(config, capsys)
    assert code == 0 and "already complete" not in text
    after = data_format.read_manifest(out, verify_checksums=True)
    assert after["counts"]["read"] == 30
    listed = {s["file"] for split in after["splits"].values() for s in split["shards"]}
    assert {p.name for p in out.glob("*.parquet")} == listed  # shards of the larger earlier run are gone


# --------------------------------------------------------------------------------------------- bad input
@pytest.fixture
def bad_inputs(tmp_path, tiny_assets):
    """name -> (overrides, text the error must contain, exit code)."""
    from transformers import AutoTokenizer

    no_eos = tmp_path / "no_eos_tokenizer"
    tok = AutoTokenizer.from_pretrained(tiny_assets["tokenizer"])
    tok.eos_token = None
    tok.save_pretrained(no_eos)
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "fine"}\n{"text": "broken\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    other = write_jsonl(tmp_path / "other.jsonl", [{"body": "x", "id": 1}])
    return {
        "unknown dataset": (
            {"manifest.sources.0.path": "no-such-org/no-such-dataset"},
            "no-such-org/no-such-dataset",
            1,
        ),
        "unknown split": ({"manifest.sources.0.split": "validation"}, "validation", 1),
        "missing file": (
            {"manifest.sources.0.data_files": str(tmp_path / "nope.jsonl")},
            f"manifest.sources.0.data_files: no file matches '{tmp_path / 'nope.jsonl'}'",
            1,
        ),
        "glob matching nothing": (
            {"manifest.sources.0.data_files": str(tmp_path / "none-*.jsonl")},
            f"manifest.sources.0.data_files: no file matches '{tmp_path / 'none-*.jsonl'}'",
            1,
        ),
        "empty file": (
            {"manifest.sources.0.data_files": str(empty)},
            f"manifest.sources.0.data_files: no records in {empty} (empty file)",
            1,
        ),
        "unreadable file": (
            {"manifest.sources.0.data_files": str(bad_json)},
            f"{bad_json}:2: malformed JSON (Invalid control character at, column 17)",
            1,
        ),
        "unreadable streamed file": (
            {"manifest.sources.0.data_files": str(bad_json), "manifest.sources.0.streaming": True},
            f"{bad_json}:2: malformed JSON",
            1,
        ),
        "mapping names a missing column": (
            {"manifest.sources.0.fields": {"text": "content"}},
            "manifest.sources.0.fields.text: column 'content' not found",
            1,
        ),
        "forced format without its columns": (
            {"manifest.sources.0.format": "messages"},
            "manifest.sources.0.format: messages records need column(s) messages",
            1,
        ),
        "no column of a known shape": ({"manifest.sources.0.data_files": other}, "columns: body, id", 1),
        "unknown canonical field": ({"manifest.sources.0.fields": {"txt": "text"}}, "fields.txt: unknown field", 2),
        "weights all zero": ({"manifest.sources.0.weight": 0.0}, "weights summing to a positive number", 2),
        "negative weight": ({"manifest.sources.0.weight": -1.0}, "manifest.sources.0.weight", 2),
        "tokenizer without EOS": ({"teacher.tokenizer": str(no_eos)}, "teacher.tokenizer: " + str(no_eos), 2),
        "empty after filtering": ({"manifest.min_chars": 100000}, "no training document left", 1),
        "seq_len above teacher positions": ({"manifest.seq_len": 512}, "max_position_embeddings 256", 2),
        "empty held-out split": ({"manifest.val_fraction": 1e-6}, "manifest.val_fraction", 1),
    }


def test_each_bad_input_fails_clearly_and_leaves_outputs_intact(tmp_path, tiny_config, bad_inputs, capsys):
    good = tiny_config()
    assert run_stage(good, capsys)[0] == 0
    out = out_dir(good)
    before = file_bytes(out)
    for name, (overrides, message, exit_code) in bad_inputs.items():
        config = tiny_config(**overrides)
        code, text = run_stage(config, capsys, "--force")
        assert code == exit_code, f"{name}: exit {code}\n{text}"
        assert message in text, f"{name}: {message!r} not in\n{text}"
        assert "Traceback" not in text, name
        assert file_bytes(out) == before, f"{name} damaged the earlier manifest"
        assert not (out / ".staging").exists(), name


def test_failed_first_run_leaves_no_shards(tmp_path, tiny_config, capsys):
    config = tiny_config(**{"manifest.min_chars": 100000})
    code, text = run_stage(config, capsys)
    assert code == 1 and "no training document left" in text
    out = out_dir(config)
    assert not list(out.glob("*.parquet")) and not (out / "manifest.json").exists()
    assert not (out / "_COMPLETE.json").exists() and not (out / ".staging").exists()
    shutil.rmtree(out)


def test_manifest_format_version_is_part_of_the_stage_identity(monkeypatch):
    """A manifest written in an older format is rebuilt by a plain rerun, not skipped as complete."""
    from pipeline import config
    from pipeline.config import section_hash

    cfg = config.from_dict({"run_name": "r", "teacher": {"name_or_path": "t"}, "student": {"name_or_path": "s"}})
    before = section_hash(manifest.SPEC.sections(cfg, None))
    monkeypatch.setattr(manifest.data_format, "PACKED_FORMAT_VERSION", data_format.PACKED_FORMAT_VERSION + 1)
    assert section_hash(manifest.SPEC.sections(cfg, None)) != before
