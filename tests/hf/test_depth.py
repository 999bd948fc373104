"""Depth pruning: blocks ranked by block influence, removed in the user's classes.

Oracles: a block made the identity scores 0 and goes first; the pruned model equals the
original run with the removed blocks skipped (logits, and greedy generation through the
KV cache); save_pretrained -> from_pretrained gives the same logits."""

from __future__ import annotations

import pytest
import torch
import torchvision

import fxslim
from fxslim.errors import ArgumentError, PassContractError
from fxslim.passes.depth import _identities, block_lists, prune_depth
from fxslim.runtime.text import lm_batches, tiny_llama

transformers = pytest.importorskip("transformers")


def _calib(n: int = 2) -> list[dict[str, torch.Tensor]]:
    return lm_batches("train", n_batches=n, batch_size=2, seq_len=32, seed=0)


def test_llama_identity_block_goes_first_and_generates(tmp_path):
    model = tiny_llama(layers=4)
    with torch.no_grad():  # layer 2 adds nothing to the stream: block influence 0
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    res = prune_depth(model, _calib(), n_remove=2)
    assert res.blocks == ["model.layers"] and res.fixed == []
    assert res.removed[0] == "model.layers.2" and abs(res.scores["model.layers.2"]) < 1e-9
    assert sorted(res.scores) == [f"model.layers.{i}" for i in range(4)]
    assert min(res.scores.values()) == res.scores[res.removed[0]]
    small = res.model
    assert type(small) is type(model) and len(small.model.layers) == 2
    assert small.config.num_hidden_layers == 2 and model.config.num_hidden_layers == 4
    assert [layer.self_attn.layer_idx for layer in small.model.layers] == [0, 1]
    assert small.model.layers[0].self_attn.o_proj.weight.data_ptr() != model.model.layers[0].self_attn.o_proj.weight.data_ptr()
    # greedy generation through the KV cache equals the original with those blocks skipped
    prompt = _calib(1)[0]["input_ids"][:1, :8]
    handles = _identities(model, res.removed)
    try:
        want = model.generate(prompt, max_new_tokens=6, do_sample=False)
    finally:
        for h in handles:
            h.remove()
    got = small.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want) and got.shape == (1, 14)
    small.save_pretrained(tmp_path / "m")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert back.config.num_hidden_layers == 2
    with torch.no_grad():
        torch.testing.assert_close(back(prompt).logits, small(prompt).logits, rtol=0, atol=0)


def test_qwen2_per_layer_types_follow():
    cfg = transformers.Qwen2Config(vocab_size=256, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   layer_types=["full_attention", "sliding_attention", "full_attention"],
                                   use_sliding_window=True, sliding_window=8)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    res = prune_depth(model, _calib(), n_remove=1)
    gone = int(res.removed[0].rpartition(".")[2])
    kept = [t for i, t in enumerate(cfg.layer_types) if i != gone]
    assert res.model.config.layer_types == kept and res.model.config.num_hidden_layers == 2


def test_gpt2_inverse_layer_scaling_is_refused():
    cfg = transformers.GPT2Config(vocab_size=256, n_positions=64, n_embd=32, n_layer=3, n_head=4,
                                  scale_attn_by_inverse_layer_idx=True)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # block 0 adds nothing: it goes, and blocks 1 and 2 are renumbered
        for proj in (model.transformer.h[0].attn.c_proj, model.transformer.h[0].mlp.c_proj):
            proj.weight.zero_()
            proj.bias.zero_()
    # GPT-2 scales each layer's attention by 1 / (layer_idx + 1), set when built: the copy
    # computes right, but from_pretrained would build layers 1, 2 as 0, 1 and scale them otherwise
    with pytest.raises(PassContractError, match="would reload differently"):
        prune_depth(model, _calib(), n_remove=1)
    cfg.scale_attn_by_inverse_layer_idx = False
    torch.manual_seed(0)
    plain = transformers.GPT2LMHeadModel(cfg).eval()
    assert prune_depth(plain, _calib(), n_remove=1).model.config.n_layer == 2


def test_resnet_keeps_its_downsampling_blocks():
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    calib = [torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    assert block_lists(model) == ["layer1", "layer2", "layer3", "layer4"]
    res = prune_depth(model, calib, n_remove=3)
    assert res.fixed == ["layer2.0", "layer3.0", "layer4.0"]
    assert not set(res.removed) & set(res.fixed) and len(res.removed) == 3
    assert sum(len(getattr(res.model, f"layer{i}")) for i in range(1, 5)) == 5
    assert type(res.model) is type(model)
    assert fxslim.count_macs(res.model, calib[0]) < fxslim.count_macs(model, calib[0])


def test_bad_requests_are_typed():
    model = tiny_llama(layers=2)
    calib = _calib(1)
    with pytest.raises(ArgumentError, match="exactly one"):
        prune_depth(model, calib)
    with pytest.raises(ArgumentError, match="exactly one"):
        prune_depth(model, calib, n_remove=1, ratio=0.5)
    with pytest.raises(ArgumentError, match="hold 2 blocks"):
        prune_depth(model, calib, n_remove=2)
    with pytest.raises(ArgumentError, match="no batches"):
        prune_depth(model, [], n_remove=1)
    with pytest.raises(ArgumentError, match="no module 'model.layer'"):
        prune_depth(model, calib, n_remove=1, blocks="model.layer")
    with pytest.raises(ArgumentError, match="list of batches"):  # one batch, not a list of them
        prune_depth(model, calib[0]["input_ids"], n_remove=1)
    with pytest.raises(ArgumentError, match="calib batch 0 .* does not run the model"):
        prune_depth(model, [{"pixel_values": torch.randn(1, 3, 8, 8)}], n_remove=1)
    assert model.config.num_hidden_layers == 2 and len(model.model.layers) == 2  # untouched
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ArgumentError, match="not a GraphModule"):
        prune_depth(fxslim.trace(torchvision.models.resnet18().eval(), x), [x], n_remove=1)


def test_timm_vit_blocks_by_ratio():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=4, num_classes=5).eval()
    calib = [torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    res = prune_depth(model, calib, ratio=0.5)
    assert res.blocks == ["blocks"] and len(res.removed) == 2
    assert type(res.model.blocks) is type(model.blocks) and len(res.model.blocks) == 2 and len(model.blocks) == 4
    handles = _identities(model, res.removed)
    try:
        with torch.no_grad():
            torch.testing.assert_close(res.model(calib[1]), model(calib[1]), rtol=1e-5, atol=1e-6)
    finally:
        for h in handles:
            h.remove()
