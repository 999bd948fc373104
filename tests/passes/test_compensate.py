"""FLAP's bias compensation: exact where the removed inputs are constant; a Llama without
biases gets them from its config and reloads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fxslim
from fxslim.passes.calibrated import FLAPImportance
from fxslim.passes.compensate import compensate_bias

pytest.importorskip("transformers")

HEADS_ONLY = ["model.embed_tokens", "model.layers.0.mlp.gate_proj"]  # hidden size and MLP stay whole


def _llama(**config):
    from fxslim.runtime.text import tiny_llama

    return tiny_llama(hidden=32, layers=1, heads=4, kv_heads=2, intermediate=32, seq_len=16, **config)


def _calib():
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, 256, (4, 16), generator=g)} for _ in range(2)]


def test_constant_head_removed_exactly():
    model = _llama(attention_bias=True)
    attn = model.model.layers[0].self_attn
    with torch.no_grad():  # key/value head 1 reads nothing: its values, so query heads 2 and 3's outputs, are b_v
        attn.v_proj.weight[8:] = 0
        attn.v_proj.bias[8:] = torch.linspace(-1, 1, 8)
    calib = _calib()
    flap = FLAPImportance(calib)
    small = fxslim.prune(model, calib[0], ratio=0.5, importance=flap, ignore=HEADS_ONLY)
    assert small.config.num_key_value_heads == 1 and small.config.hidden_size == 32
    assert torch.equal(small.model.layers[0].self_attn.v_proj.bias, attn.v_proj.bias[:8])  # the constant head went
    fixed = compensate_bias(model, small, flap.stats)
    with torch.inference_mode():
        for b in calib:
            want, got, bare = (m(**b).logits for m in (model, fixed, small))
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), float((got - want).abs().max())
            assert not torch.allclose(bare, want, rtol=1e-3, atol=1e-3)
    assert torch.equal(small.model.layers[0].self_attn.o_proj.bias, attn.o_proj.bias)  # small is left as it was


def test_biases_from_the_config_and_reload(tmp_path):
    model, calib = _llama(), _calib()
    assert model.model.layers[0].self_attn.o_proj.bias is None
    flap = FLAPImportance(calib)
    small = fxslim.prune(model, calib[0], ratio=0.5, importance=flap, ignore=HEADS_ONLY)
    fixed = compensate_bias(model, small, flap.stats, layers=["o_proj"])
    assert fixed.config.attention_bias and not small.config.attention_bias
    attn, o_w = fixed.model.layers[0].self_attn, model.model.layers[0].self_attn.o_proj.weight.detach().double()
    kept = fxslim.utils.fxslim_meta(small)["fxslim_keep"]["model.layers.0.self_attn.o_proj.weight:1"]
    gone = np.setdiff1d(np.arange(32), kept)
    n, s1, _ = flap.stats["model.layers.0.self_attn.o_proj"]
    want = o_w[:, gone] @ (s1[gone] / n)  # W_R E[x_R]
    torch.testing.assert_close(attn.o_proj.bias.double(), want, rtol=1e-5, atol=1e-6)
    assert not attn.q_proj.bias.any() and not attn.v_proj.bias.any()  # the other new biases are zero
    fixed.save_pretrained(tmp_path)
    again = type(model).from_pretrained(tmp_path).eval()
    with torch.inference_mode():
        assert torch.equal(again(**calib[0]).logits, fixed(**calib[0]).logits)
    with pytest.raises(fxslim.ArgumentError, match="statistics"):
        compensate_bias(model, small)
    with pytest.raises(fxslim.ArgumentError, match="record"):
        compensate_bias(model, model, flap.stats)
