"""Streamed pruning of a sharded checkpoint (`fxslim.passes.llm_stream`) equals the
in-memory `fxslim.prune` bit for bit, reloads with from_pretrained, is atomic, refuses
bad inputs before any work, and runs from the command line."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

import fxslim
from fxslim.errors import ArgumentError, FxslimError
from fxslim.passes import _shards, llm_stream
from fxslim.passes.calibrated import FLAPImportance, WandaImportance
from fxslim.passes.llm_plan import IGNORE, llm_overrides
from fxslim.passes.llm_stream import INCOMPLETE, llm_prune
from fxslim.runtime.text import lm_batches, tiny_llama

T = pytest.importorskip("transformers")

HEADS, MLP = 0.25, 0.5
SHAPES = {
    "gqa": {"heads": 8, "kv_heads": 4},
    "mha": {"heads": 8, "kv_heads": 8, "tie_word_embeddings": True},
}


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for name, kw in SHAPES.items():
        model = tiny_llama(hidden=64, layers=2, intermediate=96, seed=1, **kw)
        folder = tmp_path_factory.mktemp(name) / "ckpt"
        model.save_pretrained(folder, max_shard_size="40KB")  # several shards
        out[name] = (model, folder)
    return out


def _calib():
    return lm_batches("train", n_batches=2, batch_size=4, seq_len=32, seed=3)


@pytest.mark.parametrize(
    "shape,importance",
    [("gqa", "magnitude"), ("mha", "wanda")],  # FLAP: Wanda's path, another score
)
def test_streamed_equals_in_memory_prune_and_reloads(checkpoints, tmp_path, shape, importance):
    model, folder = checkpoints[shape]
    assert len(list(folder.glob("*.safetensors"))) >= 3
    before = _hashes(folder)
    calib = _calib()
    report = llm_prune(
        folder,
        tmp_path / "out",
        HEADS,
        MLP,
        importance=importance,
        calib=[b["input_ids"] for b in calib],
    )
    crit = {"magnitude": None, "wanda": WandaImportance, "flap": FLAPImportance}[importance]
    x = {"input_ids": calib[0]["input_ids"][:1, :8]}
    ref = fxslim.prune(
        model,
        x,
        0.0,
        ignore=list(IGNORE),
        overrides=llm_overrides("model.layers", 2, HEADS, MLP),
        importance=crit([{"input_ids": b["input_ids"]} for b in calib]) if crit else None,
    )
    again = T.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    a, b = ref.state_dict(), again.state_dict()
    assert set(a) == set(b)
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a), (
        "streamed != in-memory"
    )
    kv = SHAPES[shape]["kv_heads"]
    assert [r[1:] for r in report.rows] == [(kv, kv - int(kv * HEADS), 96, 48)] * 2
    c = again.config
    assert (
        c.num_key_value_heads,
        c.num_attention_heads,
        c.head_dim,
        c.intermediate_size,
        c.hidden_size,
    ) == (kv - int(kv * HEADS), 8 - 8 * int(kv * HEADS) // kv, 8, 48, 64)
    # 6 of 8 heads with hidden 64: transformers' LlamaConfig refuses it, the same decoder loads as Mistral
    assert type(again).__name__ == "MistralForCausalLM"
    ids = calib[1]["input_ids"][:2, :16]
    with torch.inference_mode():
        torch.testing.assert_close(
            again(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=1e-5, atol=1e-5
        )
        out = again.generate(ids[:1], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 19)
    assert _hashes(folder) == before  # the input is only read
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        [p.name for p in folder.iterdir()]
    )  # same shards, index, config, generation config
    if importance != "magnitude":  # the criterion mattered: magnitude keeps other channels
        mag = llm_prune(folder, tmp_path / "mag", HEADS, MLP)
        assert mag.rows == report.rows
        m = T.AutoModelForCausalLM.from_pretrained(tmp_path / "mag").state_dict()
        assert not all(torch.equal(m[k], b[k]) for k in b)


def test_whole_head_counts_stay_llama(checkpoints, tmp_path):
    _, folder = checkpoints["gqa"]
    llm_prune(folder, tmp_path / "out", 0.5, 0.25)
    again = T.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert type(again) is T.LlamaForCausalLM
    assert (
        again.config.num_key_value_heads,
        again.config.num_attention_heads,
        again.config.intermediate_size,
    ) == (2, 4, 72)


def test_a_failed_write_leaves_no_output_and_the_input_unchanged(
    checkpoints, tmp_path, monkeypatch
):
    _, folder = checkpoints["gqa"]
    before = _hashes(folder)
    closed = []

    def crash(self):
        closed.append(1)
        if len(closed) == 2:
            raise OSError("disk full (simulated)")
        return real(self)

    real = _shards.ShardWriter.close
    monkeypatch.setattr(_shards.ShardWriter, "close", crash)
    with pytest.raises(OSError, match="simulated"):
        llm_prune(folder, tmp_path / "out", HEADS, MLP)
    assert len(closed) == 2
    assert list(tmp_path.iterdir()) == []  # neither the output nor the hidden work folder
    assert _hashes(folder) == before


def test_a_killed_run_leaves_only_a_marked_incomplete_folder(checkpoints, tmp_path, monkeypatch):
    # a killed process runs no cleanup: simulated by a crash after the first shard whose
    # cleanup is switched off, which leaves exactly what SIGKILL would
    _, folder = checkpoints["gqa"]
    before = _hashes(folder)
    real = _shards.ShardWriter.close

    def killed(self):
        real(self)
        raise KeyboardInterrupt  # the kill

    monkeypatch.setattr(_shards.ShardWriter, "close", killed)
    monkeypatch.setattr(llm_stream, "_discard", lambda folder: None)
    with pytest.raises(KeyboardInterrupt):
        llm_prune(folder, tmp_path / "out", HEADS, MLP)
    assert not (tmp_path / "out").exists()
    (left,) = tmp_path.iterdir()  # the hidden work folder, marked
    assert left.name.startswith(".out.") and (left / INCOMPLETE).is_file()
    assert len(list(left.glob("*.safetensors"))) == 1 and not (left / "config.json").exists()
    assert _hashes(folder) == before
    monkeypatch.undo()
    llm_prune(folder, tmp_path / "out", HEADS, MLP)  # a rerun is not blocked by the leftover
    assert (tmp_path / "out" / "config.json").is_file() and not (
        tmp_path / "out" / INCOMPLETE
    ).exists()


def test_bad_inputs_are_typed_errors_before_any_work(checkpoints, tmp_path, monkeypatch):
    _, folder = checkpoints["gqa"]
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")

    def no_work(*a, **k):
        raise AssertionError("work started")

    monkeypatch.setattr("fxslim.passes.llm_stream.decoder_groups", no_work)
    bad = [
        ({"out": full}, "not empty"),
        ({"checkpoint": tmp_path / "nothing"}, "no config.json"),
        ({"heads": 1.0}, "heads"),
        ({"mlp": -0.1}, "mlp"),
        ({"importance": "taylor"}, "importance"),
        ({"importance": "wanda"}, "needs calib"),
        ({"importance": "wanda", "calib": [torch.full((1, 8), 999)]}, "vocabulary"),
        ({"out": folder / "inside"}, "outside"),
    ]
    for change, words in bad:
        kw = {"checkpoint": folder, "out": tmp_path / "out", **change}
        with pytest.raises(FxslimError, match=words) as info:
            llm_prune(kw.pop("checkpoint"), kw.pop("out"), **kw)
        assert isinstance(info.value, ArgumentError)
    assert (full / "keep.txt").read_text() == "mine" and not (tmp_path / "out").exists()


def test_cli_llm_prune(checkpoints, tmp_path, capsys):
    from fxslim.cli import main

    _, folder = checkpoints["gqa"]
    text = tmp_path / "calib.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 200)
    argv = [
        "llm-prune",
        str(folder),
        str(tmp_path / "out"),
        "--heads",
        "0.5",
        "--mlp",
        "0.5",
        "--calib",
        str(text),
        "--calib-tokens",
        "8,32",
        "--json",
        "--quiet",
        "--threads",
        "1",
    ]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["importance"] == "wanda" and result["params_after"] < result["params_before"]
    assert [(r["kv_heads_kept"], r["mlp_kept"]) for r in result["layers"]] == [(2, 48)] * 2
    assert T.AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.intermediate_size == 48
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and "not an empty folder" in capsys.readouterr().err
