"""The built-in text (stdlib source, byte-level), its batches, and perplexity against
Hugging Face's own loss."""

from __future__ import annotations

import math
import sysconfig
from pathlib import Path

import pytest
import torch
from torch import nn

import fxslim
from fxslim.runtime.text import (
    SPLITS,
    TokenRows,
    lm_batches,
    perplexity,
    stdlib_bytes,
    tiny_llama,
    token_rows,
    train_lm,
)

pytest.importorskip("transformers")


def test_splits_are_whole_files_and_batches_are_seeded():
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    sizes = {s: len(stdlib_bytes(s)) for s in SPLITS}
    assert all(sizes.values()) and sum(sizes.values()) == sum(len(p.read_bytes()) for p in files)
    assert sizes["train"] > 2 * (sizes["val"] + sizes["test"])  # 8:1:1 by files
    a, b = lm_batches("val", 2, 3, 16, seed=0), lm_batches("val", 2, 3, 16, seed=0)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))
    assert not torch.equal(a[0]["input_ids"], lm_batches("val", 2, 3, 16, seed=1)[0]["input_ids"])
    ids = a[0]["input_ids"]
    assert ids.shape == (3, 16) and ids.dtype == torch.int64 and torch.equal(a[0]["labels"], ids)
    text = bytes(stdlib_bytes("val").tolist())
    assert bytes(ids[0].tolist()) in text  # a window of the split's own text
    with pytest.raises(fxslim.ArgumentError, match="split"):
        lm_batches("tset")


class Uniform(nn.Module):
    def forward(self, input_ids):
        return torch.zeros(*input_ids.shape, 256)


def test_perplexity_is_exp_of_the_models_own_loss():
    batches = lm_batches("test", 2, 2, 32)
    assert perplexity(Uniform(), batches) == pytest.approx(256.0, rel=1e-6)  # no information: the vocabulary
    model = tiny_llama(hidden=16, layers=1, heads=2, kv_heads=1, intermediate=16, seq_len=32)
    masked = [{**b, "labels": b["labels"].clone()} for b in batches]
    for b in masked:
        b["labels"][:, :20] = -100  # not counted, as HF's loss does not count them
    for data in (batches, masked):
        with torch.inference_mode():
            hf = [float(model(**b).loss) for b in data]  # equal token counts per batch: the mean of means
        assert perplexity(model, data) == pytest.approx(math.exp(sum(hf) / len(hf)), rel=1e-5)
    assert perplexity(model, masked) != pytest.approx(perplexity(model, batches), rel=1e-3)
    # the rows distill trains on: position t's logits against byte t + 1, HF's loss again
    (ids, nxt), b = token_rows(batches)[0], batches[0]
    with torch.inference_mode():
        rows = TokenRows(model)(ids)
        assert rows.shape == (2 * 31, 256)
        assert float(nn.functional.cross_entropy(rows, nxt)) == pytest.approx(float(model(**b).loss), rel=1e-5)


def test_a_short_training_learns_bytes():
    torch.manual_seed(0)
    model = tiny_llama(hidden=16, layers=1, heads=2, kv_heads=1, intermediate=32, seq_len=32)
    val = lm_batches("val", 2, 8, 32)
    before = perplexity(model, val)
    info = train_lm(model, steps=40, batch_size=8, seq_len=32, lr=1e-2, warmup=5)
    after = perplexity(model, val)
    assert before > 200 and after < 0.25 * before, (before, after)
    assert info["steps"] == 40 and not model.training
