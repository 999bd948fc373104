"""Pruned Hugging Face models stay their own class with an updated config: generate(),
save_pretrained() -> from_pretrained() and fxslim.save/load give the same logits."""

from __future__ import annotations

import pytest
import torch
from torch import fx

import fxslim
from fxslim.passes.keep_classes import keep_classes
from fxslim.utils import fxslim_meta
from tests.hf.models import _text

T = pytest.importorskip("transformers")

RTOL, ATOL = 1e-5, 1e-6


def _llama():
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=32,
                        tie_word_embeddings=True, attn_implementation="sdpa")
    return T.LlamaForCausalLM(cfg).eval(), _text(64)


def test_llama_gqa_keeps_its_class_generates_and_round_trips(tmp_path):
    model, x = _llama()
    gm = fxslim.prune(model, x, 0.5, keep_classes=False)
    small = keep_classes(model, gm, x)  # prune's default last step
    assert type(small) is T.LlamaForCausalLM and isinstance(gm, fx.GraphModule)
    c = small.config
    assert (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size) == (
        32, 4, 1, 8, 48)  # whole kv heads with their query groups; head_dim untouched
    assert model.config.hidden_size == 64 and model.model.layers[0].self_attn.q_proj.out_features == 64
    assert small.lm_head.weight is small.model.embed_tokens.weight  # still tied
    with torch.inference_mode():
        logits = small(**x).logits
        torch.testing.assert_close(logits, gm(**x).logits, rtol=RTOL, atol=ATOL)
        out = small.generate(x["input_ids"][:1], attention_mask=x["attention_mask"][:1], max_new_tokens=3,
                             do_sample=False, pad_token_id=0)
    assert out.shape == (1, x["input_ids"].shape[1] + 3)
    assert out[0, x["input_ids"].shape[1]] == logits[0, -1].argmax()  # greedy: the pruned model's own choice

    small.save_pretrained(tmp_path / "hf")
    again = T.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(again) is T.LlamaForCausalLM and again.lm_head.weight is again.model.embed_tokens.weight
    with torch.inference_mode():
        assert torch.equal(again(**x).logits, logits)

    fxslim.save(small, tmp_path / "fx")
    loaded = fxslim.load(tmp_path / "fx", model=_llama()[0])
    assert type(loaded) is T.LlamaForCausalLM and loaded.config.num_key_value_heads == 1
    with torch.inference_mode():
        assert torch.equal(loaded(**x).logits, logits)
    assert fxslim_meta(loaded)["fxslim_source"] == fxslim_meta(small)["fxslim_source"]


def test_bert_round_trips_through_from_pretrained(tmp_path):
    from tests.hf.models import build

    model, x = build("bert")
    small = fxslim.prune(model, x, 0.5)
    assert type(small) is T.BertForSequenceClassification
    assert (small.config.hidden_size, small.config.num_attention_heads, small.config.intermediate_size) == (16, 2, 24)
    small.save_pretrained(tmp_path)
    again = T.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    with torch.inference_mode():
        assert torch.equal(again(**x).logits, small(**x).logits)


def test_uneven_layers_fall_back_and_say_what_to_do():
    model, x = _llama()
    small = fxslim.prune(model, x, 0.5, overrides={"model.layers.0.mlp.up_proj": 0.25})
    assert isinstance(small, fx.GraphModule)
    reason = small.meta["fxslim_form_reason"]
    assert "intermediate_size" in reason and "one ratio per layer type" in reason
