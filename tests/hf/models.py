"""Tiny Hugging Face transformers models from configs (random weights, no downloads)."""

from __future__ import annotations

import torch

SEQ = 7


def _text(vocab: int, batch: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (batch, SEQ), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0  # a padded row: the mask path is exercised
    return {"input_ids": ids, "attention_mask": mask}


def build(name: str, attn: str = "sdpa"):
    """(model in eval mode, example inputs as users hold them) for one zoo name."""
    import transformers as T

    torch.manual_seed(0)
    common = {"attn_implementation": attn}
    if name == "bert":
        cfg = T.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=48, max_position_embeddings=32, num_labels=3, **common)
        return T.BertForSequenceClassification(cfg).eval(), _text(64)
    if name == "roberta":
        cfg = T.RobertaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=48, max_position_embeddings=32, num_labels=3, **common)
        return T.RobertaForSequenceClassification(cfg).eval(), _text(64)
    if name == "distilbert":
        cfg = T.DistilBertConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, hidden_dim=48,
                                 max_position_embeddings=32, num_labels=3, **common)
        return T.DistilBertForSequenceClassification(cfg).eval(), _text(64)
    if name == "vit":
        cfg = T.ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
                          num_attention_heads=4, intermediate_size=48, num_labels=3, **common)
        g = torch.Generator().manual_seed(0)
        return T.ViTForImageClassification(cfg).eval(), {"pixel_values": torch.randn(2, 3, 16, 16, generator=g)}
    if name == "gpt2":
        cfg = T.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4, **common)
        return T.GPT2LMHeadModel(cfg).eval(), _text(64)
    if name == "llama":  # grouped-query attention: 8 query heads share 2 key/value heads
        cfg = T.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                            num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=32, **common)
        return T.LlamaForCausalLM(cfg).eval(), _text(64)
    if name == "qwen2":  # q/k/v projections with biases
        cfg = T.Qwen2Config(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                            num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=32, **common)
        return T.Qwen2ForCausalLM(cfg).eval(), _text(64)
    raise KeyError(name)


NAMES = ("bert", "roberta", "distilbert", "vit", "gpt2", "llama", "qwen2")
