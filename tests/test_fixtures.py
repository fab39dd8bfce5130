"""The shared fixtures load like real checkpoints and the tiny config validates."""

from pipeline import config


def test_tiny_models_load_with_from_pretrained(tiny_assets):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_assets["teacher"])
    teacher = AutoModelForCausalLM.from_pretrained(tiny_assets["teacher"])
    student = AutoModelForCausalLM.from_pretrained(tiny_assets["student"])
    assert tok.eos_token_id is not None
    assert teacher.config.vocab_size == student.config.vocab_size == len(tok)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


def test_tiny_config_validates(tiny_config):
    cfg = config.load(tiny_config())
    assert set(cfg.train.variants) == {"ce", "kd", "feature", "relation"}
