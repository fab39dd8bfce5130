"""Chunked LM head: loss and gradients equal the whole-logits path (fp32) for every divergence and target form, tied
and untied heads, LoRA on the head; all-masked gives 0; padding garbage stays out; evaluation chunks equal."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from test_train import final_state, make_run, read_jsonl, tiny_cache, variant_dir  # noqa: F401 (a fixture)
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline import lm_head, losses, train

V, K, B, T = 53, 5, 3, 9


def tiny_student(tied: bool, lora: bool = False, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=tied)  # fmt: skip
    model = LlamaForCausalLM(cfg)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj",
                                                 "lm_head"], init_lora_weights=False))  # fmt: skip
    return model


def batch(seed: int = 1, capture_temperature: float = 1.0) -> dict[str, torch.Tensor]:
    """A micro-batch with padding (sequence 1 ends early, sequence 2 is one token) and a teacher cache."""
    g = torch.Generator().manual_seed(seed)
    attention = torch.ones(B, T, dtype=torch.long)
    attention[1, 6:] = 0
    attention[2, 1:] = 0
    teacher = torch.log_softmax(torch.randn(B, T, V, generator=g) * 2 / capture_temperature, -1)
    top, ids = teacher.topk(K, -1)
    return {
        "input_ids": torch.randint(0, V, (B, T), generator=g),
        "attention_mask": attention,
        "topk_ids": ids,
        "topk_logprobs": top,
        "tail_logmass": losses.log1mexp(torch.logsumexp(top, -1)),
    }


def targets_for(b: dict, response: losses.ResponseOptions | None, ce_grad: bool = True) -> lm_head.HeadTargets:
    labels, ce_mask, kd_mask = lm_head.causal_targets(b["input_ids"], b["attention_mask"])
    teacher = {k: b[k] for k in lm_head.TEACHER_COLUMNS} if response else {}
    return lm_head.HeadTargets(labels, ce_mask, kd_mask, teacher, response, ce_grad)


def step(model: torch.nn.Module, b: dict, response, chunk: int) -> tuple[dict, dict]:
    """Scores and the gradient of 0.5·CE + 0.5·KD for every trainable parameter, through ``train.Distillee``."""
    distillee = train.Distillee(model, None, chunk)
    model.zero_grad(set_to_none=True)
    _, _, scores = distillee(b["input_ids"], b["attention_mask"], False, [], None, targets_for(b, response))
    total = 0.5 * scores["ce"] + 0.5 * scores.get("kd_response", 0.0)
    total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.item() for k, v in scores.items()}, grads


def assert_same(got: tuple[dict, dict], want: tuple[dict, dict], rel: float = 1e-5) -> None:
    """Scores within ``rel``; each gradient within ``rel`` of its largest entry (a relative error that does not
    blow up where a gradient entry happens to be ~0)."""
    assert got[0].keys() == want[0].keys()
    for name in want[0]:
        assert got[0][name] == pytest.approx(want[0][name], rel=rel, abs=1e-7), name
    assert got[1].keys() == want[1].keys()
    for name, g in want[1].items():
        scale = g.abs().max().item()
        assert scale > 0, f"{name}: no gradient reached it"
        assert (got[1][name] - g).abs().max().item() <= rel * scale, name


FORMS = [("tail_bucket", 1.0, 1.0), ("tail_bucket", 2.0, 2.0), ("renormalize", 1.0, 1.0), ("renormalize", 2.0, 1.0)]


@pytest.mark.parametrize("divergence", list(losses.DIVERGENCES))
@pytest.mark.parametrize("tail,temperature,capture", FORMS)
def test_chunked_equals_whole_logits_for_every_divergence_and_target_form(divergence, tail, temperature, capture):
    options = losses.ResponseOptions(divergence, temperature, tail, capture, 0.3)
    model, b = tiny_student(tied=False), batch(capture_temperature=capture)
    want = step(model, b, options, 0)
    for chunk in (4, 7):  # 27 positions: several chunks, the last one partial
        assert_same(step(model, b, options, chunk), want)


@pytest.mark.parametrize("tied,lora", [(True, False), (False, True), (True, True)])
def test_tied_embeddings_and_lora_on_the_head(tied, lora):
    model, b = tiny_student(tied, lora), batch()
    options = losses.ResponseOptions()
    want = step(model, b, options, 0)
    if lora:
        assert any("lm_head.lora_A" in name for name in want[1])  # the head's adapter gets its gradient
    else:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert_same(step(model, b, options, 5), want)
    assert_same(step(model, b, None, 5), step(model, b, None, 0))  # CE only


def test_whole_logits_path_equals_the_loss_functions():
    """``logits_chunk: 0`` is exactly ``losses.ce_and_response_kd`` / ``losses.cross_entropy`` on the logits."""
    model, b = tiny_student(tied=False), batch()
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    labels, ce_mask, kd_mask = lm_head.causal_targets(b["input_ids"], b["attention_mask"])
    options = losses.ResponseOptions(temperature=1.0, tail="renormalize")
    ce, kd = losses.ce_and_response_kd(logits, labels, ce_mask, *(b[k] for k in lm_head.TEACHER_COLUMNS), kd_mask,
                                       options)  # fmt: skip
    scores = lm_head.scores_from_logits(logits, targets_for(b, options))
    assert (scores["ce"].item(), scores["kd_response"].item()) == (ce.item(), kd.item())
    assert lm_head.scores_from_logits(logits, targets_for(b, None))["ce"].item() == pytest.approx(
        losses.cross_entropy(logits, labels, ce_mask).item(), rel=1e-7
    )


def test_all_masked_is_zero_with_zero_gradients_and_padding_garbage_stays_out():
    model, b = tiny_student(tied=False), batch()
    b["attention_mask"] = torch.zeros_like(b["attention_mask"])
    b["topk_logprobs"] = torch.full_like(b["topk_logprobs"], math.nan)
    b["tail_logmass"] = torch.full_like(b["tail_logmass"], math.inf)
    for tail, divergence in itertools.product(losses.TAIL_MODES, losses.DIVERGENCES):
        scores, grads = step(model, b, losses.ResponseOptions(divergence, tail=tail), 4)
        assert scores == {"ce": 0.0, "kd_response": 0.0}
        assert all(torch.equal(g, torch.zeros_like(g)) for g in grads.values())

    clean = batch()
    dirty = {**clean, "topk_logprobs": clean["topk_logprobs"].clone(), "tail_logmass": clean["tail_logmass"].clone()}
    dirty["topk_logprobs"][1, 6:], dirty["tail_logmass"][2, 1:] = math.nan, math.inf  # padded positions only
    got = step(model, dirty, losses.ResponseOptions(), 4)
    assert all(torch.isfinite(g).all() for g in got[1].values())
    assert_same(got, step(model, clean, losses.ResponseOptions(), 0))


def test_ce_without_weight_builds_no_graph():
    model, b = tiny_student(tied=False), batch()
    _, _, scores = train.Distillee(model, None, 4)(
        b["input_ids"], b["attention_mask"], False, [], None, targets_for(b, None, ce_grad=False)
    )
    assert not scores["ce"].requires_grad and scores["ce"].item() > 0


def test_loss_step_of_every_variant_equals_the_whole_logits_path():
    """Through ``train._loss_step``: CE, response, feature and relation components with hidden states from the
    chunked path's body (the same hidden_states as the model's own forward)."""
    from pipeline.config import FeatureKDConfig, LossConfig, RelationKDConfig, ResponseKDConfig

    student = tiny_student(tied=False)
    b = batch()
    b["hidden_1"], b["embed"] = torch.randn(B, T, 24), torch.randn(B, 24)
    loss = LossConfig(ce_weight=0.5, response=ResponseKDConfig(weight=0.5),
                      feature=FeatureKDConfig(weight=1.0, layer_pairs=[[1, 1]]),
                      relation=RelationKDConfig(weight=1.0))  # fmt: skip
    recipe = train.LossRecipe("all", loss, 1.0, [(1, 1)], 2)
    torch.manual_seed(0)
    projectors = losses.FeatureProjectors([(1, 1)], 16, 24)
    results = []
    for chunk in (0, 4):
        model = train.Distillee(student, projectors, chunk)
        model.zero_grad(set_to_none=True)
        total, comps, _ = train._loss_step(model, b, recipe, gather=False)
        total.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results.append(({k: v.item() for k, v in comps.items()}, grads))
    assert set(results[0][0]) == {"ce", "kd_response", "kd_feature", "kd_relation"}
    assert_same(results[1], results[0])


def test_recipe_checks_response_options_once():
    from pipeline.config import LossConfig, ResponseKDConfig

    bad = LossConfig(response=ResponseKDConfig(weight=0.5, temperature=2.0))  # tail bucket at τ ≠ τ_c
    with pytest.raises(ValueError, match="tail_bucket needs the capture temperature"):
        train.LossRecipe("kd", bad, 1.0, [], 2)
    assert train.LossRecipe("ce", LossConfig(), 1.0, [], 2).response is None  # unused options are not checked


def test_evaluation_chunks_equal_whole_logits():
    model, b = tiny_student(tied=True), batch()
    with torch.no_grad():
        whole = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.reshape(B * T, V)
        body, head = lm_head.body_and_head(model)
        hidden = body(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
        parts = list(lm_head.logits_in_chunks(hidden, head, 10))
    assert [rows for rows, _ in parts] == [slice(0, 10), slice(10, 20), slice(20, 27)]
    assert torch.allclose(torch.cat([logits for _, logits in parts]), whole, atol=1e-6)


def test_post_head_transforms_are_named():
    assert lm_head.post_head_transform(LlamaConfig()) is None
    assert lm_head.post_head_transform(LlamaConfig(final_logit_softcapping=30.0)) == "final_logit_softcapping"


def test_tiny_training_has_the_same_loss_curve_chunked_and_whole(tmp_path, tiny_assets, tiny_cache):  # noqa: F811
    """The train stage end to end (tiny config, 6 steps of every variant): ``train.logits_chunk`` 48 (the tiny
    config's) and 0 give the same train and validation losses within 1e-5 and the same weights."""
    curves = {}
    for chunk in (48, 0):
        cfg = make_run(tmp_path / f"chunk{chunk}", tiny_assets, tiny_cache, {"train.logits_chunk": chunk})
        assert train.main(["--config", str(cfg)]) == 0
        curves[chunk] = cfg
    for variant in ("ce", "kd", "feature", "relation"):
        got, want = (read_jsonl(variant_dir(curves[c], variant) / "metrics.jsonl") for c in (48, 0))
        assert [(r["step"], r["split"]) for r in got] == [(r["step"], r["split"]) for r in want]
        for a, b in zip(got, want, strict=True):
            for key in ("loss", "ce", "kd_response", "kd_feature", "kd_relation"):
                if key in b:
                    assert a[key] == pytest.approx(b[key], rel=1e-5), (variant, a["step"], a["split"], key)
        got_w, want_w = final_state(curves[48], variant), final_state(curves[0], variant)
        assert all(torch.allclose(got_w[k], want_w[k], rtol=0, atol=1e-5) for k in want_w), variant
