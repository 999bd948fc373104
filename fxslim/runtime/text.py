"""Built-in offline text and a tiny Llama for it: the LLM counterpart of the digits.

Text: the Python standard library's own ``.py`` files (``sysconfig.get_paths()["stdlib"]``,
top level, sorted), read as bytes, so it exists on every machine without a download (its
exact content follows the Python version). Each file goes whole to one split by a stable
hash of its name (``crc32(name) % 10``: 0 test, 1 validation, else train), so the splits
share no file and a file added by a newer Python moves no other file.

Tokens are bytes (vocabulary 256, no tokenizer). A batch is a dict ``{"input_ids",
"labels"}`` of (batch, seq_len) int64 tensors with ``labels == input_ids``: the model
shifts them, as Hugging Face causal LMs do, so ``model(**batch).loss`` is the mean
next-byte cross-entropy.

`fxslim.distill` takes (inputs, labels) batches and a tensor of logits with classes on
dim 1: `TokenRows` wraps a causal LM as a classifier of positions (``logits[:, :-1]`` as
(batch * (seq - 1), vocab) rows) and `token_rows` turns batches into ``(input_ids, next
tokens)``, so its logit KD is token-level KL and its labels are the next bytes.

Perplexity over batches is ``exp(sum of token losses / number of predicted tokens)``:
position t of ``logits`` predicts ``labels[t + 1]``; labels of -100 are not counted.
"""

from __future__ import annotations

import math
import sysconfig
import time
import zlib
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fxslim._args import choice, positive_int
from fxslim.errors import ArgumentError

__all__ = ["SPLITS", "TokenRows", "lm_batches", "perplexity", "stdlib_bytes", "tiny_llama", "token_rows", "train_lm"]

SPLITS = ("train", "val", "test")


def _split_of(name: str) -> str:
    h = zlib.crc32(name.encode()) % 10
    return "test" if h == 0 else "val" if h == 1 else "train"


@lru_cache(maxsize=3)
def stdlib_bytes(split: str) -> torch.Tensor:
    """The bytes of the stdlib files of one split, concatenated in name order (uint8, 1-D)."""
    choice("split", split, SPLITS)
    root = Path(sysconfig.get_paths()["stdlib"])
    parts = [p.read_bytes() for p in sorted(root.glob("*.py")) if _split_of(p.name) == split]
    return torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8)


def lm_batches(split: str = "train", n_batches: int = 8, batch_size: int = 8, seq_len: int = 128,
               seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Token batches ``{"input_ids", "labels"}`` of one split.

    Windows of `seq_len` bytes start at seeded random offsets (`seed` picks the
    calibration sample for train, a fixed evaluation sample for val/test).

    Example:
        >>> calib = lm_batches("train", n_batches=4, seed=1)
        >>> perplexity(model, lm_batches("test"))
    """
    choice("split", split, SPLITS)
    for name, v in (("n_batches", n_batches), ("batch_size", batch_size), ("seq_len", seq_len)):
        positive_int(name, v)
    data = stdlib_bytes(split)
    if len(data) <= seq_len:
        raise ArgumentError(f"the {split} split has {len(data)} bytes, fewer than seq_len={seq_len}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(data) - seq_len, (n_batches, batch_size), generator=g)
    offsets = torch.arange(seq_len)
    out = []
    for row in starts:
        ids = data[row[:, None] + offsets].long()
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def tiny_llama(hidden: int = 64, layers: int = 2, heads: int = 8, kv_heads: int = 2, intermediate: int = 192,
               seq_len: int = 128, seed: int = 0, **config: Any) -> nn.Module:
    """A byte-level ``LlamaForCausalLM`` (vocabulary 256, grouped-query attention), random
    weights from `seed`, in eval mode. `config` goes to ``LlamaConfig``."""
    import transformers as T

    torch.manual_seed(seed)
    cfg = T.LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
                        max_position_embeddings=seq_len, **{"attn_implementation": "sdpa", **config})
    return T.LlamaForCausalLM(cfg).eval()


def example_ids(seq_len: int = 32) -> torch.Tensor:
    """One row of `seq_len` validation bytes as token ids (1, seq_len): example inputs for
    the tiny LLM in pipeline configs (``inputs: fxslim.runtime.text:example_ids``)."""
    return lm_batches("val", n_batches=1, batch_size=1, seq_len=seq_len)[0]["input_ids"]


class TokenRows(nn.Module):
    """A causal LM as a classifier of positions: ``input_ids -> logits[:, :-1]`` flattened
    to (batch * (seq - 1), vocab). Shares the LM's parameters: training it trains the LM.

    Example:
        >>> fxslim.distill(TokenRows(small), TokenRows(model), token_rows(lm_batches("train", 150)), epochs=1)
    """

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        logits = _logits(self.lm(input_ids=input_ids))
        return logits[:, :-1].reshape(-1, logits.shape[-1])


def token_rows(batches: Iterable[dict[str, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(input_ids, next tokens flattened)`` pairs for a `TokenRows` model."""
    return [(b["input_ids"], b["input_ids"][:, 1:].reshape(-1)) for b in batches]


def _logits(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, dict) and "logits" in out:
        return out["logits"]
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ArgumentError(f"the model's output ({type(out).__name__}) holds no logits")


@torch.inference_mode()
def perplexity(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> float:
    """``exp`` of the mean next-token cross-entropy over every predicted token of `batches`.

    The model is called with ``input_ids`` (and ``attention_mask`` when a batch has one);
    its logits (a tensor, or an output with ``.logits``) at position t score
    ``labels[t + 1]`` (``input_ids`` when a batch has no labels); -100 is ignored.
    """
    was = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for b in batches:
            if not isinstance(b, dict) or "input_ids" not in b:
                raise ArgumentError(f"batches must be dicts with 'input_ids', got {type(b).__name__}")
            kwargs = {k: b[k] for k in ("input_ids", "attention_mask") if k in b}
            logits = _logits(model(**kwargs)).float()
            labels = b.get("labels", b["input_ids"])[:, 1:]
            losses = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                     ignore_index=-100, reduction="none")
            total += float(losses.double().sum())  # summed in float64: many tokens
            count += int((labels != -100).sum())
    finally:
        model.train(was)
    if count == 0:
        raise ArgumentError("perplexity needs at least one predicted token")
    return math.exp(total / count)


def train_lm(model: nn.Module, steps: int = 600, batch_size: int = 16, seq_len: int = 128, lr: float = 3e-3,
             seed: int = 0, warmup: int = 30) -> dict[str, float]:
    """Train in place on the train split (AdamW, linear warm-up, cosine decay, gradients
    clipped at 1); returns ``{"steps", "seconds", "loss"}`` (the last 20 steps' mean).

    Example:
        >>> model = tiny_llama(); train_lm(model, steps=600)
        >>> perplexity(model, lm_batches("test"))
    """
    positive_int("steps", steps)
    data = lm_batches("train", n_batches=steps, batch_size=batch_size, seq_len=seq_len, seed=seed + 10_000)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))

    def factor(i: int) -> float:
        if i < warmup:
            return (i + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (i - warmup) / max(steps - warmup, 1)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    model.train()
    t0, recent = time.perf_counter(), []
    for b in data:
        loss = model(**b).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        recent = (recent + [float(loss.detach())])[-20:]
    model.eval()
    return {"steps": steps, "seconds": time.perf_counter() - t0, "loss": sum(recent) / len(recent)}
