"""Demo asset preparation: GGUF -> Hugging Face conversion (on a tiny GGUF written here, so it runs in seconds; the
real SmolLM2 conversion runs in `make demo`), the student built on the teacher's tokenizer, the Shakespeare
corpus and the idempotent, atomic asset directories."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import demo_assets
from pipeline.modeling import vocab_hash

PLAY = """THE TRAGEDY OF TESTING

by Nobody

PERSONS REPRESENTED

KING, a king.
FOOL, a fool.



ACT I.

SCENE I. A hall.

[Enter KING and FOOL.]

KING.
Speak, fool.
What news?

FOOL.
None, my lord.

SCENE II. A heath.

KING.
Blow, winds.

ACT II. SCENE I. The same.

FOOL.
Nuncle, come in.
"""


def _permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (transformers reverses it on load)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, model, tokenizer) -> None:
    """Write a tiny Llama and its byte-level BPE tokenizer as an F32 GGUF, laid out as llama.cpp writes one."""
    import gguf

    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    tokens = [t for t, _ in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])]
    special = set(tokenizer.all_special_tokens)
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in special else 1 for t in tokens])  # 3: control token
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", sd["model.norm.weight"])
    names = {
        "attn_norm": "input_layernorm",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_norm": "post_attention_layernorm",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }
    for i in range(cfg.num_hidden_layers):
        hf = f"model.layers.{i}."
        writer.add_tensor(
            f"blk.{i}.attn_q.weight", _permute_qk(sd[hf + "self_attn.q_proj.weight"], cfg.num_attention_heads)
        )
        writer.add_tensor(
            f"blk.{i}.attn_k.weight", _permute_qk(sd[hf + "self_attn.k_proj.weight"], cfg.num_key_value_heads)
        )
        for g, h in names.items():
            writer.add_tensor(f"blk.{i}.{g}.weight", sd[f"{hf}{h}.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tiny_assets):
    """(gguf path, reference HF model, tokenizer): a tied-embedding tiny Llama written as GGUF."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_assets["tokenizer"])
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("gguf") / "tiny.Q.gguf"
    write_tiny_gguf(path, model, tokenizer)
    return path, model, tokenizer


def test_gguf_converts_to_plain_checkpoint_with_same_logits(tiny_gguf, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, reference, tokenizer = tiny_gguf
    out = tmp_path / "teacher"
    assert demo_assets.build_dir(
        out, demo_assets.teacher_recipe(gguf_path), lambda d: demo_assets.convert_gguf(gguf_path, d)
    )

    saved = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in saved, "a GGUF quantizer left in config.json makes reloads look for the GGUF"
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    loaded_tok = AutoTokenizer.from_pretrained(out)
    assert vocab_hash(loaded_tok) == vocab_hash(tokenizer)
    ids = tokenizer("The king speak fire. Old sword.", return_tensors="pt").input_ids
    assert torch.equal(loaded_tok("The king speak fire. Old sword.", return_tensors="pt").input_ids, ids)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=1e-5)
    # unchanged recipe: nothing is rebuilt
    assert not demo_assets.build_dir(out, demo_assets.teacher_recipe(gguf_path), lambda d: 1 / 0)


def test_student_shares_teacher_tokenizer_and_special_ids(tiny_assets, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    shape = {**demo_assets.STUDENT_SHAPE, "hidden_size": 32, "num_hidden_layers": 2, "intermediate_size": 64}
    demo_assets.build_student(tiny_assets["teacher"], tmp_path / "s", shape=shape, seed=3)
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    teacher = AutoModelForCausalLM.from_pretrained(tiny_assets["teacher"])
    assert student.config.vocab_size == teacher.config.vocab_size
    assert student.config.eos_token_id == teacher.config.eos_token_id
    assert student.config.hidden_size == 32 and student.config.tie_word_embeddings
    assert student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()
    assert vocab_hash(AutoTokenizer.from_pretrained(tmp_path / "s")) == vocab_hash(
        AutoTokenizer.from_pretrained(tiny_assets["teacher"])
    )


def test_failed_build_leaves_nothing_and_changed_recipe_rebuilds(tmp_path):
    out = tmp_path / "asset"

    def broken(d: Path) -> None:
        (d / "weights.bin").write_bytes(b"half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        demo_assets.build_dir(out, {"v": 1}, broken)
    assert not out.exists() and list(tmp_path.iterdir()) == []

    assert demo_assets.build_dir(out, {"v": 1}, lambda d: (d / "w").write_text("one"))
    assert not demo_assets.build_dir(out, {"v": 1}, lambda d: (d / "w").write_text("two"))
    assert (out / "w").read_text() == "one"
    with pytest.raises(RuntimeError):  # a failed rebuild keeps the previous complete version
        demo_assets.build_dir(out, {"v": 2}, broken)
    assert (out / "w").read_text() == "one"
    assert demo_assets.build_dir(out, {"v": 2}, lambda d: (d / "w").write_text("two"))
    assert (out / "w").read_text() == "two" and not (out / "weights.bin").exists()


def test_passages_skip_front_matter_and_never_cross_scenes():
    got = list(demo_assets.passages(PLAY, lines_per_record=3))
    assert [(a, s) for a, s, _ in got] == [
        ("ACT I", "SCENE I. A hall."),
        ("ACT I", "SCENE I. A hall."),
        ("ACT I", "SCENE II. A heath."),
        ("ACT II", "ACT II. SCENE I. The same."),
    ]
    text = "\n".join(p for _, _, p in got)
    assert "PERSONS REPRESENTED" not in text and "SCENE" not in text
    assert "Speak, fool." in got[0][2] and "None, my lord." in got[1][2]


def test_corpus_reads_through_datasets_json_and_is_rebuilt_when_tampered(tmp_path):
    from datasets import load_dataset

    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "metadata.txt").write_text("[testing_gut]\ntitle = The Tragedy of Testing\n")
    (texts / "testing_gut.txt").write_text(PLAY)
    (texts / "testing_gut_f.txt").write_text(PLAY)  # folio duplicate: skipped
    (texts / "sonnets_gut.txt").write_text("Shall I compare thee\n\nto a summer's day\n")  # no acts: skipped
    out = tmp_path / "data"

    records = demo_assets.corpus_records(texts)
    recipe = demo_assets.write_corpus(texts, out)
    assert demo_assets.corpus_is_valid(out, texts)

    ds = load_dataset("json", data_files=str(out / "train.jsonl"), split="train")
    assert ds.num_rows == len(records) == recipe["records"] > 0
    assert set(ds.column_names) == {"text", "play", "title", "act", "scene"}
    assert set(ds["title"]) == {"The Tragedy of Testing"}

    with open(out / "train.jsonl", "a") as fh:
        fh.write('{"text": "tampered"}\n')
    assert not demo_assets.corpus_is_valid(out, texts)


def test_xtok_student_has_its_own_byte_level_tokenizer_trained_on_the_corpus(tiny_assets, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline import xtok

    shape = {**demo_assets.STUDENT_SHAPE, "hidden_size": 32, "num_hidden_layers": 2, "intermediate_size": 64}
    for name in ("a", "b"):
        demo_assets.build_xtok_student(tiny_assets["corpus"], tmp_path / name, shape=shape, vocab_size=320, seed=3)
    tok = AutoTokenizer.from_pretrained(tmp_path / "a")
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    assert tok.is_fast and xtok.vocabulary(tok).convention == "byte_level" and len(tok) == 320
    assert student.config.vocab_size == len(tok) and student.config.eos_token_id == tok.eos_token_id
    assert vocab_hash(tok) != vocab_hash(AutoTokenizer.from_pretrained(tiny_assets["tokenizer"]))
    # the same corpus gives the same tokenizer and weights (a rebuilt asset is the same asset)
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert demo_assets.xtok_student_recipe(tiny_assets["corpus"])["tokenizer"]["vocab_size"] == demo_assets.XTOK_VOCAB
