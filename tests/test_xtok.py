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
    [{}, {"divergence": "reverse_kl"}, {"tail": "renormalize", "temperature": 2.0}, {"divergence": "jsd"}],
)
def test_identity_case_gives_exactly_todays_loss(options):
    logits, labels, ids, top, tail, mask = _kd_inputs()
    ce_mask = mask.clone()
    ce_mask[:, -1] = False
    today = losses.ce_and_response_kd(logits, labels, ce_mask, ids, top, tail, mask, **options)
    cross = xtok.ce_and_response_kd(logits, labels, ce_mask, ids, top, tail, mask, **options)
    assert torch.equal(today[0], cross[0]) and torch.equal(today[1], cross[1])


def test_empty_slots_are_masked_and_their_mass_joins_the_tail():
    logits, labels, ids, top, tail, mask = _kd_inputs()
    empty = ids.clone()
    empty[..., 1] = -1  # the teacher's second choice has no student token
    _, kd = xtok.ce_and_response_kd(logits, labels, mask, empty, top, tail, mask)
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
    # every slot empty and no position aligned: finite, and zero without aligned positions
    _, none = xtok.ce_and_response_kd(logits, labels, mask, torch.full_like(ids, -1), top, tail, mask.logical_not())
    assert none.item() == 0.0


def test_uld_adds_the_sorted_distance_of_the_unmapped_mass():
    logits, labels, ids, top, tail, mask = _kd_inputs()
    empty = ids.clone()
    empty[..., 2:] = -1
    _, bucket = xtok.ce_and_response_kd(logits, labels, mask, empty, top, tail, mask)
    _, uld = xtok.ce_and_response_kd(logits, labels, mask, empty, top, tail, mask, unmapped="uld")
    logq = torch.log_softmax(logits.float(), -1)
    others = logq.scatter(-1, ids[..., :2], -float("inf")).topk(4, -1).values.exp()
    teacher = torch.cat([top[..., 2:].exp(), torch.zeros_like(top[..., :2])], -1).sort(-1, descending=True).values
    torch.testing.assert_close(uld - bucket, (teacher - others).abs().sum(-1).mean(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="unmapped"):
        xtok.ce_and_response_kd(logits, labels, mask, empty, top, tail, mask, unmapped="drop")
