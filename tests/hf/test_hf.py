"""Hugging Face transformers models through the torch.export capture: channel groups for
heads (GQA-aware), MLP and hidden size; both oracles; `fxslim.prune` at ratio 0.5.

Tiny configs, random weights, no downloads. Hidden-size groups pass statistics over
channels (LayerNorm/RMSNorm), so they are proven by slicing consistency and shapes; the
head and MLP groups by the dead-channel oracle (DESIGN.md).
"""

from __future__ import annotations

import pytest
import torch

import fxslim
from tests.helpers import ATOL, RTOL, check_oracles
from tests.hf.models import NAMES, build

pytest.importorskip("transformers")

# per model: (embedding weight, a layer's q/k/v/o weights and their out dim, MLP in/out
# weights, the head's output weight, kv heads, intermediate size)
LAYOUT = {
    "bert": ("bert.embeddings.word_embeddings.weight", "bert.encoder.layer.0.attention.self.{}.weight",
             ("query", "key", "value"), "bert.encoder.layer.0.attention.output.dense.weight",
             ("bert.encoder.layer.0.intermediate.dense.weight",), "classifier.weight", 4, 48),
    "roberta": ("roberta.embeddings.word_embeddings.weight", "roberta.encoder.layer.0.attention.self.{}.weight",
                ("query", "key", "value"), "roberta.encoder.layer.0.attention.output.dense.weight",
                ("roberta.encoder.layer.0.intermediate.dense.weight",), "classifier.out_proj.weight", 4, 48),
    "distilbert": ("distilbert.embeddings.word_embeddings.weight", "distilbert.transformer.layer.0.attention.{}.weight",
                   ("q_lin", "k_lin", "v_lin"), "distilbert.transformer.layer.0.attention.out_lin.weight",
                   ("distilbert.transformer.layer.0.ffn.lin1.weight",), "classifier.weight", 4, 48),
    "vit": ("vit.embeddings.patch_embeddings.projection.weight", "vit.layers.0.attention.{}.weight",
            ("q_proj", "k_proj", "v_proj"), "vit.layers.0.attention.o_proj.weight",
            ("vit.layers.0.mlp.fc1.weight",), "classifier.weight", 4, 48),
    "gpt2": ("transformer.wte.weight", "transformer.h.0.attn.{}.weight", ("c_attn",),
             "transformer.h.0.attn.c_proj.weight", ("transformer.h.0.mlp.c_fc.weight",), None, 4, 128),
    "llama": ("model.embed_tokens.weight", "model.layers.0.self_attn.{}.weight", ("q_proj", "k_proj", "v_proj"),
              "model.layers.0.self_attn.o_proj.weight",
              ("model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"), "lm_head.weight", 2, 96),
    "qwen2": ("model.embed_tokens.weight", "model.layers.0.self_attn.{}.weight", ("q_proj", "k_proj", "v_proj"),
              "model.layers.0.self_attn.o_proj.weight",
              ("model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"), "lm_head.weight", 2, 96),
}


def _group(cg, target, dim):
    grp = cg.group_of(target, dim)
    assert grp is not None, f"no group has {target}[{dim}]"
    return grp


# every model with sdpa; the eager attention of the three families whose code differs
# (BERT's, GPT-2's own, Llama's eager_attention_forward with GQA). All 14 pass; the CI
# budget takes these 10 (each a few seconds).
CASES = [(n, "sdpa") for n in NAMES] + [("bert", "eager"), ("gpt2", "eager"), ("llama", "eager")]


@pytest.mark.parametrize(("name", "attn"), CASES)
def test_groups_oracles_and_prune(name, attn, tmp_path):
    model, x = build(name, attn)
    captured = fxslim.trace(model, x, share_weights=True)  # one capture, reused below
    assert captured.meta["fxslim_capture"]["kind"] == "export"
    _, cg, _ = check_oracles(captured, x, expect_prunable=5)  # dead-channel + slicing oracles
    emb, qkv, names, o_proj, mlp_in, head, kv_heads, inter = LAYOUT[name]
    conv1d = name == "gpt2"  # Conv1D: weights stored (in, out)
    # heads: q, k, v rows and o's columns are one group of whole key/value heads (GQA: each
    # with its query heads); head_dim and rotary stay whole
    heads = _group(cg, qkv.format(names[0]), 1 if conv1d else 0)
    assert heads.prunable and not heads.stat and heads.size == kv_heads, str(heads)
    for n in names[1:]:
        assert _group(cg, qkv.format(n), 0) is heads
    assert _group(cg, o_proj, 0 if conv1d else 1) is heads
    # MLP intermediate channels (gate and up together for SwiGLU)
    mlp = _group(cg, mlp_in[0], 1 if conv1d else 0)
    assert mlp.prunable and mlp.size == inter and all(_group(cg, w, 0) is mlp for w in mlp_in[1:])
    # hidden size: one group from the embedding through every norm and projection (a statistic)
    hidden = _group(cg, emb, 0 if name == "vit" else 1)
    assert hidden.prunable and hidden.stat
    assert _group(cg, qkv.format(names[0]), 0 if conv1d else 1) is hidden
    assert _group(cg, o_proj, 1 if conv1d else 0) is hidden
    if head is not None:  # the classifier / lm_head output is pinned
        out = _group(cg, head, 0)
        assert not out.prunable and "output" in out.reason

    small = fxslim.prune(model if (name, attn) == ("llama", "sdpa") else captured, x, ratio=0.5)
    with torch.inference_mode():
        want, got = model(**x), small(**x)
    assert got.logits.shape == want.logits.shape and torch.isfinite(got.logits).all()
    kept = sum(p.numel() for p in small.parameters()) / sum(p.numel() for p in model.parameters())
    assert kept < 0.75, kept
    if attn == "sdpa":
        _keeps_class_and_round_trips(model, small, x, tmp_path)


def _keeps_class_and_round_trips(model, small, x, tmp_path):
    """The user's class back, rebuilt from an updated config: equal to the proven graph,
    generate() for the causal LMs, save_pretrained -> from_pretrained with the same logits."""
    from fxslim.passes.keep_classes import keep_classes

    ours = small if isinstance(small, type(model)) else keep_classes(model, small, x)
    assert type(ours) is type(model), fxslim.utils.fxslim_meta(ours).get("fxslim_form_reason")
    with torch.inference_mode():
        logits = ours(**x).logits
        torch.testing.assert_close(logits, small(**x).logits, rtol=RTOL, atol=ATOL)
        if hasattr(ours, "generate") and ours.can_generate():
            ids = x["input_ids"][:1]
            out = ours.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False,
                                pad_token_id=0)
            assert out.shape == (1, ids.shape[1] + 2)
            assert out[0, ids.shape[1]] == ours(input_ids=ids).logits[0, -1].argmax()  # its own greedy choice
    ours.save_pretrained(tmp_path / "hf")
    again = type(model).from_pretrained(tmp_path / "hf").eval()
    with torch.inference_mode():
        assert torch.equal(again(**x).logits, logits)


def test_capture_matches_model_checks_shapes_and_saves(tmp_path):
    model, x = build("llama", "sdpa")
    gm = fxslim.trace(model, x)
    short = {k: v[:, :5] for k, v in x.items()}
    with torch.inference_mode():
        assert torch.allclose(gm(**x).logits, model(**x).logits, rtol=RTOL, atol=ATOL)
        with pytest.raises(fxslim.TraceError, match="captured by torch.export"):
            gm(**short)
    small = fxslim.prune(gm, x, ratio=0.5)
    with torch.inference_mode(), pytest.raises(fxslim.TraceError, match="shape"):
        small(**short)  # the pruned module is specialised to the example's shapes too
    fxslim.save(small, tmp_path / "s")
    again = fxslim.load(tmp_path / "s", model=build("llama", "sdpa")[0])
    with torch.inference_mode():
        assert torch.equal(again(**x).logits, small(**x).logits)
