"""Cross-tokenizer distillation (pipeline.xtok): token bytes under both conventions, byte ends on hand-made strings
with known offsets (multi-byte characters, whitespace merges, special tokens), alignment, the mapping of teacher
top-k ids to student ids, the empty-slot KD (the same tokenizer gives today's loss exactly), and the whole chain on
tiny models with two different tokenizers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import EOS

from pipeline import losses, xtok


# --------------------------------------------------------------------------------------------------- fixtures
def sentencepiece_tokenizer():
    """A hand-made SentencePiece-style tokenizer (``▁`` for spaces, a dummy prefix, byte fallback): its tokens and
    offsets are known by construction."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for piece in ("▁", "t", "h", "e", "k", "i", "n", "g", "c", "a", "f", "th", "the", "▁the", "in", "ing", "king",
                  "▁king", "ca", "caf", "▁caf", "\n"):  # fmt: skip
        vocab.setdefault(piece, len(vocab))
    merges = [("t", "h"), ("th", "e"), ("▁", "the"), ("i", "n"), ("in", "g"), ("k", "ing"), ("▁", "king"),
              ("c", "a"), ("ca", "f"), ("▁", "caf")]  # fmt: skip
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", bos_token="<s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def byte_level(tiny_assets):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_assets["tokenizer"])


def ends_of(tokenizer, text: str, ends_document: bool = False) -> tuple[list[int], list[int]]:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, ends = xtok.document_ends(
        text, enc["input_ids"], enc["offset_mapping"], xtok.vocabulary(tokenizer), ends_document=ends_document
    )
    return ids, ends.tolist()


# ----------------------------------------------------------------------------------------------- token bytes
def test_vocabulary_spells_bytes_under_both_conventions(byte_level):
    sp = xtok.vocabulary(sentencepiece_tokenizer())
    assert sp.convention == "sentencepiece"
    ids = sentencepiece_tokenizer().convert_tokens_to_ids(["▁the", "<0xC3>", "\n", "</s>"])
    assert [sp.pieces[i] for i in ids] == [b" the", b"\xc3", b"\n", b"</s>"]
    assert sp.fallback[ids[1]] and not sp.fallback[ids[0]] and sp.special[ids[3]] and sp.eos_id == ids[3]
    bl = xtok.vocabulary(byte_level)
    assert bl.convention == "byte_level"
    assert bl.pieces[byte_level.convert_tokens_to_ids("Ġ")] == b" "  # GPT-2's byte-to-unicode table
    assert bl.pieces[byte_level.eos_token_id] == EOS.encode() and bl.special[byte_level.eos_token_id]


def test_a_slow_tokenizer_is_refused_naming_why():
    class Slow:
        name_or_path = "slow-tok"

    with pytest.raises(xtok.PipelineError, match="slow-tok: not a fast tokenizer"):
        xtok.vocabulary(Slow())


# ----------------------------------------------------------------------------------------------------- ends
def test_ends_under_offsets_with_a_dummy_prefix_and_byte_fallback():
    tok = sentencepiece_tokenizer()
    # "▁the" covers "the" (the prefix space is not in the text), é is two byte-fallback pieces of one character
    ids, ends = ends_of(tok, "the café king")
    assert tok.convert_ids_to_tokens(ids) == ["▁the", "▁caf", "<0xC3>", "<0xA9>", "▁king"]
    assert ends == [3, 7, 9, 9, 14]  # bytes: é is 2 of them; both its pieces end after the character
    ids, ends = ends_of(tok, " the\n king", ends_document=True)  # a newline between spaces, EOS appended
    assert tok.convert_ids_to_tokens(ids) == ["▁the", "\n", "▁king", "</s>"]
    assert ends == [4, 5, 10, 10]


def test_byte_level_ends_are_exact_inside_multibyte_characters(byte_level):
    text = "the king  sword\n\n  café 😀 中文"
    raw = text.encode()
    ids, ends = ends_of(byte_level, text, ends_document=True)
    vocab = xtok.vocabulary(byte_level)
    assert ids[-1] == byte_level.eos_token_id and ends[-1] == ends[-2] == len(raw)
    previous = 0
    for i, end in zip(ids[:-1], ends[:-1], strict=True):  # each token's bytes are exactly its span of the text
        assert raw[previous:end] == vocab.pieces[i]
        previous = end
    assert any(raw[end - 1] >= 0x80 and raw[end] & 0xC0 == 0x80 for end in ends[:-2]), "no split character"


def test_special_tokens_in_text_cover_their_literal_bytes(byte_level):
    text = f"king{EOS} fly"
    ids, ends = ends_of(byte_level, text, ends_document=True)
    eos = byte_level.eos_token_id
    assert ids.count(eos) == 2 and ends[ids.index(eos)] == len(f"king{EOS}".encode())
    ids, ends = ends_of(byte_level, f"fly{EOS}", ends_document=True)  # ends in EOS already: none appended
    assert ids.count(eos) == 1 and ends[-1] == len(f"fly{EOS}".encode())


def test_next_token_spans_count_bytes_and_characters():
    raw = "aé😀b".encode()  # 1 + 2 + 4 + 1 bytes, 4 characters
    ends = np.array([1, 3, 5, 7, 8])  # the emoji split in two tokens of 2 bytes
    spans_bytes, spans_chars = xtok.next_token_spans(raw, ends, 5, 6)
    assert spans_bytes.tolist() == [2, 2, 2, 1, 0, 0]
    assert spans_chars.tolist() == [1, 1, 0, 1, 0, 0]  # the emoji counts in the token holding its first byte


# ------------------------------------------------------------------------------------------------ alignment
def test_align_pairs_equal_boundaries_and_zero_width_groups():
    teacher = np.array([3, 8, 8, 12, 20])  # ..., a token and an EOS both ending at 8
    student = np.array([2, 3, 8, 8, 15, 20])
    assert xtok.align(teacher, student).tolist() == [-1, 0, 1, 2, -1, 4]
    # unequal groups at one offset: only the last of each pairs (the two fallback pieces of one character)
    assert xtok.align(np.array([5, 9]), np.array([5, 9, 9])).tolist() == [0, -1, 1]
    assert xtok.align(np.array([9, 9, 9]), np.array([9])).tolist() == [2]
    assert xtok.align(np.array([], dtype=np.int64), np.array([1, 2])).tolist() == [-1, -1]


def test_alignment_of_two_real_tokenizations(byte_level):
    text = "the king said: the café is sweet"
    t_ids, t_ends = ends_of(byte_level, text, ends_document=True)
    s_ids, s_ends = ends_of(sentencepiece_tokenizer(), text, ends_document=True)
    aligned = xtok.align(np.array(t_ends), np.array(s_ends))
    for j, t in enumerate(aligned):
        if t >= 0:
            assert s_ends[j] == t_ends[t]
    assert aligned[-1] == len(t_ends) - 1 and aligned[-2] == len(t_ends) - 2  # last word and EOS pair in order
    assert set(s_ends) & set(t_ends) == {s_ends[j] for j in np.flatnonzero(aligned >= 0)}


# -------------------------------------------------------------------------------------------------- mapping
def test_vocab_map_matches_bytes_across_conventions_and_specials_by_role(byte_level):
    sp_tok = sentencepiece_tokenizer()
    teacher, student = xtok.vocabulary(byte_level), xtok.vocabulary(sp_tok)
    mapping = xtok.vocab_map(teacher, student)
    t = byte_level.convert_tokens_to_ids
    s = sp_tok.convert_tokens_to_ids
    if "Ġthe" in byte_level.get_vocab():
        assert mapping[t("Ġthe")] == s("▁the")
    assert mapping[t("Ġ")] == s("▁")  # " " is spelt by ▁ and by <0x20>: the regular piece wins
    assert mapping[t("e")] == s("e")
    assert mapping[byte_level.eos_token_id] == sp_tok.eos_token_id  # EOS by role, whatever its text
    assert mapping[byte_level.pad_token_id] == -1  # a special with no counterpart maps to nothing
    assert (mapping == -1).any() and (mapping >= 0).any()
    identity = xtok.vocab_map(teacher, teacher)
    assert (identity == np.arange(len(teacher))).all()


def test_mapped_topk_slots_carry_student_ids():
    """What XtokDataset does with a cache batch's top-k: teacher ids through the map, -1 off the aligned positions."""
    mapping = torch.tensor([2, -1, 0, 1])
    topk = torch.tensor([[[0, 1], [2, 3]]])  # one row, 2 teacher positions, k = 2
    aligned_to = torch.tensor([[1, -1, 0]])  # 3 student positions
    safe = aligned_to.clamp(min=0)
    ids = mapping[topk.gather(1, safe.unsqueeze(-1).expand(-1, -1, 2))]
    ids = torch.where((aligned_to >= 0).unsqueeze(-1), ids, -1)
    assert ids.tolist() == [[[0, 1], [-1, -1], [2, -1]]]


# ------------------------------------------------------------------------------------------------------ loss
def _kd_inputs(seed: int = 0, vocab: int = 11, k: int = 4):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 5, vocab, generator=gen, requires_grad=True)
    teacher = torch.log_softmax(torch.randn(2, 5, vocab, generator=gen) * 2, -1)
    top, ids = teacher.topk(k, -1)
    tail = losses.log1mexp(torch.logsumexp(top, -1))
    labels = torch.randint(0, vocab, (2, 5), generator=gen)
    mask = torch.ones(2, 5, dtype=torch.bool)
    return logits, labels, ids, top, tail, mask


@pytest.mark.parametrize(
    "options",
    [
        losses.ResponseOptions(),
        losses.ResponseOptions("reverse_kl"),
        losses.ResponseOptions(tail="renormalize", temperature=2.0),
        losses.ResponseOptions("jsd", jsd_beta=0.3),
    ],
    ids=["forward_kl", "reverse_kl", "renormalize_tau2", "jsd"],
)
def test_identity_case_gives_exactly_todays_loss(options):
    """Without an empty slot (the same tokenizer) the terms are bit for bit the ones computed without any slot
    masking (``mapped=None``: the code path before cross-tokenizer students)."""
    logits, labels, ids, top, tail, mask = _kd_inputs()
    ce, kd = losses.ce_and_response_terms(logits, labels, ids, top, tail, mask, options)
    picked = torch.log_softmax(logits.float(), -1).gather(-1, torch.cat([labels.unsqueeze(-1), ids], -1))
    today = losses.response_divergence(picked[..., 1:], torch.zeros_like(picked[..., 0]), top, tail, mask, options)
    assert torch.equal(ce, -picked[..., 0]) and torch.equal(kd, today)


def test_empty_slots_are_masked_and_their_mass_joins_the_tail():
    logits, labels, ids, top, tail, mask = _kd_inputs()
    empty = ids.clone()
    empty[..., 1] = -1  # the teacher's second choice has no student token
    _, kd = losses.ce_and_response_kd(logits, labels, mask, empty, top, tail, mask, losses.ResponseOptions())
    # by hand: classes = the 3 mapped slots + one bucket with the tail and the empty slot's mass
    logq = torch.log_softmax(logits.float(), -1)
    keep = [0, 2, 3]
    q = logq.gather(-1, ids[..., keep])
    q = torch.cat([q, torch.log1p(-q.exp().sum(-1, keepdim=True))], -1)
    p = torch.cat([top[..., keep], torch.logaddexp(tail, top[..., 1]).unsqueeze(-1)], -1)
    expected = (p.exp() * (p - q)).sum(-1).mean()
    torch.testing.assert_close(kd, expected, rtol=1e-5, atol=1e-6)
    kd.backward()
    assert torch.isfinite(logits.grad).all()
    # every slot empty and no position aligned: zero; every slot empty at aligned positions: finite
    none = torch.full_like(ids, -1)
    options = losses.ResponseOptions()
    assert losses.ce_and_response_kd(logits, labels, mask, none, top, tail, ~mask, options)[1].item() == 0.0
    assert torch.isfinite(losses.ce_and_response_kd(logits, labels, mask, none, top, tail, mask, options)[1])


def test_uld_adds_the_sorted_distance_of_the_unmapped_mass():
    logits, labels, ids, top, tail, mask = _kd_inputs()
    empty = ids.clone()
    empty[..., 2:] = -1
    bucket = losses.ce_and_response_kd(logits, labels, mask, empty, top, tail, mask, losses.ResponseOptions())[1]
    uld_options = losses.ResponseOptions(unmapped="uld")
    uld = losses.ce_and_response_kd(logits, labels, mask, empty, top, tail, mask, uld_options)[1]
    logq = torch.log_softmax(logits.float(), -1)
    others = logq.scatter(-1, ids[..., :2], -float("inf")).topk(4, -1).values.exp()
    teacher = torch.cat([top[..., 2:].exp(), torch.zeros_like(top[..., :2])], -1).sort(-1, descending=True).values
    torch.testing.assert_close(uld - bucket, (teacher - others).abs().sum(-1).mean(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="unmapped: expected one of tail_bucket, uld"):
        losses.ResponseOptions(unmapped="drop")


# ------------------------------------------------------------------------------------------- the whole chain
def train_sentencepiece_tokenizer(texts: list[str], vocab_size: int):
    """A SentencePiece-convention BPE (``▁``, dummy prefix, byte-fallback pieces in the vocabulary) trained on
    ``texts``: another tokenizer than the fixtures' byte-level one, with other boundaries and other conventions."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    base = Tokenizer(models.BPE())
    base.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    specials = ["<unk>", "<s>", "</s>"]
    base.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                        show_progress=False))  # fmt: skip
    spec = json.loads(base.to_str())["model"]
    vocab = dict(spec["vocab"])
    vocab.update({f"<0x{b:02X}>": len(vocab) + b for b in range(256) if f"<0x{b:02X}>" not in vocab})
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = base.pre_tokenizer
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", bos_token="<s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def xtok_student(tiny_assets, tmp_path_factory):
    """A tiny random Llama with its own SentencePiece-style tokenizer (the teacher's is byte-level BPE)."""
    from conftest import build_llama, corpus_texts

    out = tmp_path_factory.mktemp("xtok_student") / "student"
    build_llama(out, train_sentencepiece_tokenizer(corpus_texts(300, seed=7), 300), hidden=32, layers=2, seed=3)
    return out


CHAIN = {
    "manifest.max_samples": 90,
    "train.threads": 1,
    "train.max_steps": 4,
    "train.checkpoint_every": 2,
    "train.eval_every": 4,
    "evaluate.local_tasks": False,
    "cache.hidden_every_n": 2,
    "train.variants": {
        "ce": {},
        "kd": {"ce_weight": 0.5, "response": {"weight": 0.5}, "feature": {"weight": 0.1, "layer_pairs": [[2, 3]]}},
        "kd_uld": {"ce_weight": 0.5, "response": {"weight": 0.5, "unmapped": "uld"}},
        "relation": {"relation": {"weight": 1.0}},
    },
}


@pytest.fixture(scope="module")
def chain(tiny_assets, xtok_student, tmp_path_factory):
    """manifest -> cache -> train -> evaluate with a student whose tokenizer differs, each stage's real main()."""
    from conftest import write_config

    from pipeline import cache, evaluate, manifest, train

    root = tmp_path_factory.mktemp("xtok_chain")
    cfg = write_config(root, tiny_assets, {**CHAIN, "student.name_or_path": str(xtok_student)})
    codes = {stage.__name__: stage.main(["--config", str(cfg)]) for stage in (manifest, cache, train, evaluate)}
    return {"config": cfg, "run": root / "runs" / "tiny", "codes": codes}


def test_chain_trains_and_evaluates_a_student_with_another_tokenizer(chain, xtok_student):
    import json

    from transformers import AutoTokenizer

    from pipeline.modeling import vocab_hash

    assert set(chain["codes"].values()) == {0}, chain["codes"]
    run = chain["run"]
    for variant in CHAIN["train.variants"]:
        summary = json.loads((run / "train" / variant / "summary.json").read_text())
        assert summary["steps"] == 4 and np.isfinite(summary["final_train_loss"])
        assert summary["student_rows"]["convention"] == "sentencepiece"
        assert 0.5 < summary["val_aligned_fraction"] <= 1.0
        final = AutoTokenizer.from_pretrained(run / "train" / variant / "final")
        assert vocab_hash(final) == vocab_hash(AutoTokenizer.from_pretrained(xtok_student))
    kd = json.loads((run / "train" / "kd" / "summary.json").read_text())
    assert kd["final_train_kd_response"] > 0 and kd["final_train_kd_feature"] > 0
    assert 0.5 < kd["val_mapped_mass_fraction"] <= 1.0
    uld = json.loads((run / "train" / "kd_uld" / "summary.json").read_text())
    assert uld["final_train_kd_response"] > kd["final_train_kd_response"] * 0.5  # the ULD term adds to the KD term
    results = {m: json.loads((run / "evaluate" / m / "results.json").read_text()) for m in ("ce", "kd", "teacher")}
    for name, result in results.items():
        intrinsic = result["intrinsic"]
        assert 0 < intrinsic["bits_per_byte"] < 20 and intrinsic["char_ppl"] > 1, name
    assert "aligned_fraction" not in results["teacher"]["intrinsic"]
    assert 0.5 < results["kd"]["intrinsic"]["aligned_fraction"] <= 1.0
    assert 0.5 < results["kd"]["intrinsic"]["mapped_mass_fraction"] <= 1.0
    assert results["kd"]["student_rows"]["vocab_size"] == len(AutoTokenizer.from_pretrained(xtok_student))
    # the same held-out text, measured in bytes by either tokenization (each row's first token is not predicted)
    student_bytes, teacher_bytes = (results[m]["intrinsic"]["heldout_bytes"] for m in ("kd", "teacher"))
    assert abs(student_bytes - teacher_bytes) < 0.05 * teacher_bytes


def _cache_dataset(run, split: str = "train", **kw):
    from pipeline.cache_format import CacheDataset, list_cache_shards

    columns = ["sample_id", "input_ids", "attention_mask", "topk_ids", "topk_logprobs", "tail_logmass"]
    return CacheDataset(list_cache_shards(run / "cache", split), batch_size=4, columns=columns, **kw)


def test_student_rows_cover_the_teacher_rows_text_and_resume_in_order(chain, xtok_student):
    from transformers import AutoTokenizer

    run = chain["run"]
    cross = xtok.setup(
        AutoTokenizer.from_pretrained(_teacher_path(chain)), AutoTokenizer.from_pretrained(xtok_student),
        run / "manifest", 256,
    )  # fmt: skip
    data = cross.wrap(_cache_dataset(run, seed=0, shuffle=True))
    batches = [data.convert(b) for b in _first(data.cache, 3)]
    student = cross.rows.tokenizer
    texts = xtok.RowTexts(run / "manifest", data.cache.files)
    for batch in batches:
        for r, (text, _, _) in enumerate(texts.rows(batch["sample_id"].tolist())):
            ids = batch["input_ids"][r][batch["attention_mask"][r].bool()].tolist()
            # the same text, other tokens (up to SentencePiece's dummy prefix space before each document)
            assert "".join(student.decode(ids, skip_special_tokens=True).split()) == "".join(text.decode().split())
        aligned = batch["xtok_aligned"]
        assert aligned.any() and not aligned[batch["attention_mask"] == 0].any()
        assert (batch["topk_ids"][~aligned] == -1).all() and (batch["topk_ids"][aligned] >= 0).any()
    data.start_from(0, 2)  # resume after two batches: the third comes next
    resumed = next(iter(data))
    assert torch.equal(resumed["input_ids"], batches[2]["input_ids"])
    assert torch.equal(resumed["topk_ids"], batches[2]["topk_ids"])


def _teacher_path(chain) -> str:
    import yaml

    return yaml.safe_load(chain["config"].read_text())["teacher"]["name_or_path"]


def _first(dataset, n: int) -> list:
    out = []
    for batch in dataset:
        out.append(batch)
        if len(out) == n:
            return out
    return out


def test_identity_through_the_data_path_gives_todays_loss(chain):
    """The teacher's own tokenizer as the 'other' one: rows re-tokenize to the teacher's ids (a row that begins
    inside a word may not: BPE merges depend on the whole word), every position of those aligns, every id maps to
    itself, and the KD loss is today's to the last bit."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.cache_format import to_compute
    from pipeline.lm_head import causal_targets

    run = chain["run"]
    tok = AutoTokenizer.from_pretrained(_teacher_path(chain))
    cross = xtok.setup(tok, tok, run / "manifest", 256)
    assert (cross.teacher_to_student == np.arange(len(tok))).all()
    data = cross.wrap(_cache_dataset(run, shuffle=False))
    model = AutoModelForCausalLM.from_pretrained(_teacher_path(chain))
    rows = same = 0
    for cached in _first(data.cache, 6):
        ours = data.convert(cached)
        width = cached["input_ids"].shape[1]
        keep = [r for r in range(len(cached["input_ids"]))
                if torch.equal(ours["input_ids"][r, :width].long(), cached["input_ids"][r].long())]  # fmt: skip
        rows, same = rows + len(cached["input_ids"]), same + len(keep)
        if not keep:
            continue
        today = to_compute({k: v[keep] for k, v in cached.items() if isinstance(v, torch.Tensor)}, "cpu")
        other = to_compute({k: v[keep][:, :width] for k, v in ours.items() if k != "xtok_stats" and
                            isinstance(v, torch.Tensor) and v.ndim >= 2}, "cpu")  # fmt: skip
        assert other["xtok_aligned"][today["attention_mask"].bool()].all()
        with torch.no_grad():
            logits = model(input_ids=today["input_ids"], attention_mask=today["attention_mask"]).logits
        labels, ce_mask, kd_mask = causal_targets(today["input_ids"], today["attention_mask"])
        options = losses.ResponseOptions()
        expected = losses.ce_and_response_kd(logits, labels, ce_mask, today["topk_ids"], today["topk_logprobs"],
                                             today["tail_logmass"], kd_mask, options)  # fmt: skip
        got = losses.ce_and_response_kd(logits, labels, ce_mask, other["topk_ids"], other["topk_logprobs"],
                                        other["tail_logmass"], other["xtok_aligned"], options)  # fmt: skip
        assert torch.equal(expected[0], got[0]) and torch.equal(expected[1], got[1])
    assert same >= 0.8 * rows, f"{same} of {rows} rows re-tokenized to the teacher's ids"


def test_sampled_targets_for_a_student_with_another_tokenizer_are_refused_at_check(tiny_assets, xtok_student, tmp_path):
    """Draws are teacher-vocabulary ids over the whole distribution: only the top-k is mapped, so validation refuses
    sampled (and online) targets for such a student before anything runs."""
    from conftest import write_config

    from pipeline import config, validate

    overrides = {
        "student.name_or_path": str(xtok_student),
        "cache.targets": "sampled",
        "train.variants": {"ce": {}, "kd": {"ce_weight": 0.5, "response": {"weight": 0.5, "targets": "sampled"}}},
    }
    cfg = config.load(write_config(tmp_path, tiny_assets, overrides), [])
    with pytest.raises(config.ConfigError, match="train.variants.kd.response.targets: sampled targets are in the"):
        validate.check(cfg)
