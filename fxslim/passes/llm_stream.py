"""Streamed structured pruning of a sharded LLM checkpoint: `llm_prune`.

Three steps, none of which holds the model: the plan from the config on the meta device
(`fxslim.passes.llm_plan`), the scores one decoder layer at a time
(`fxslim.passes.llm_scores`), and the rewrite one tensor at a time: every shard of the
input gives a shard of the same name whose tensors are the input's sliced by the plan
(a tensor the plan leaves alone is copied as bytes), then the updated ``config.json``,
the index and the checkpoint's other files (tokenizer, generation config).

Atomic: everything is written into a hidden folder beside the output, marked by an
``FXSLIM_INCOMPLETE`` file, and renamed to the output at the end. A failure removes it;
a killed run leaves only that marked hidden folder: the output is absent, never a
half-written folder that looks complete. The input is only read. An existing non-empty
output is refused before any work unless ``overwrite``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fxslim._args import choice, fraction
from fxslim.errors import ArgumentError
from fxslim.passes import _shards as S
from fxslim.passes.llm_plan import LLMPlan, decoder_groups, make_llm_plan, meta_model
from fxslim.passes.prune import _slice

__all__ = [
    "IMPORTANCES",
    "INCOMPLETE",
    "LLMPruneReport",
    "calibration_ids",
    "llm_prune",
    "write_pruned",
]

logger = logging.getLogger(__name__)

IMPORTANCES = ("magnitude", "wanda", "flap")
INCOMPLETE = "FXSLIM_INCOMPLETE"
_WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass
class LLMPruneReport:
    """What `llm_prune` did: per layer kept heads and MLP channels, sizes, times."""

    output: str
    rows: list[tuple[int, int, int, int, int]]
    params: tuple[int, int]
    bytes: tuple[int, int]
    seconds: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "output": self.output,
            "params_before": self.params[0],
            "params_after": self.params[1],
            "bytes_before": self.bytes[0],
            "bytes_after": self.bytes[1],
            "seconds": self.seconds,
            "layers": [
                dict(zip(("layer", "kv_heads", "kv_heads_kept", "mlp", "mlp_kept"), r))
                for r in self.rows
            ],
        }

    def __str__(self) -> str:
        out = ["| layer | kv heads | kept | MLP channels | kept |", "|---|---|---|---|---|"]
        out += [f"| {i} | {h} | {hk} | {m} | {mk} |" for i, h, hk, m, mk in self.rows]
        p0, p1 = self.params
        out.append(
            f"\nparams {_count(p0)} -> {_count(p1)} ({p1 / max(p0, 1):.3f}); "
            f"{self.bytes[1] / 2**30:.2f} GiB written to {self.output}; "
            + ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items())
        )
        return "\n".join(out)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _check_paths(checkpoint: Path, out: Path, overwrite: bool) -> None:
    if not checkpoint.is_dir() or not (checkpoint / "config.json").is_file():
        raise ArgumentError(
            f"{checkpoint} is not a Hugging Face checkpoint folder (no config.json)"
        )
    if out.resolve() == checkpoint.resolve() or checkpoint.resolve() in out.resolve().parents:
        raise ArgumentError(f"the output {out} must lie outside the checkpoint {checkpoint}")
    if out.exists() and not out.is_dir():
        raise ArgumentError(f"the output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ArgumentError(
            f"the output {out} exists and is not empty: give another folder or overwrite=True "
            "(--overwrite)"
        )


def _layout(entries: dict[str, S.TensorEntry], files: list[str], plan: LLMPlan) -> dict[str, list]:
    per_file: dict[str, list] = {f: [] for f in files}
    for e in sorted(entries.values(), key=lambda e: (e.file.name, e.start)):
        per_file[e.file.name].append((e.name, e.dtype, plan.shape(e.name, e.shape)))
    return per_file


def write_pruned(
    checkpoint: Path,
    tmp: Path,
    entries: dict[str, S.TensorEntry],
    files: list[str],
    plan: LLMPlan,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Write the pruned shards, config, index and the checkpoint's other files into `tmp`;
    returns the bytes of tensor data written."""
    weight_map, total = {}, 0
    for i, (name, layout) in enumerate(_layout(entries, files, plan).items()):
        w = S.ShardWriter(tmp / name, layout)
        for tname, _, _ in layout:
            cuts = plan.keep.get(tname)
            if cuts:
                w.write(tname, _slice(S.read_tensor(entries[tname]), cuts))
            else:
                w.copy(tname, entries[tname])
            weight_map[tname] = name
        w.close()
        total += w.total
        if progress:
            progress(i)
    if (checkpoint / S.INDEX).is_file() or len(files) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / S.INDEX).write_text(json.dumps(index, indent=2) + "\n")
    plan.config.save_pretrained(tmp)
    for p in sorted(checkpoint.iterdir()):
        if (
            p.is_file()
            and p.name not in ("config.json", S.INDEX)
            and not p.name.endswith(_WEIGHT_FILES)
        ):
            shutil.copy2(p, tmp / p.name)
    return total


def _discard(folder: Path) -> None:
    """Remove a failed run's work folder (a killed run never gets here: its folder stays
    hidden and marked incomplete)."""
    shutil.rmtree(folder, ignore_errors=True)


def calibration_ids(
    checkpoint: str | os.PathLike,
    text_file: str | os.PathLike | None = None,
    n: int = 32,
    seq_len: int = 128,
    batch_size: int = 8,
) -> list[torch.Tensor]:
    """`n` windows of `seq_len` tokens, evenly spaced over a text, in batches of `batch_size`.

    The text is `text_file`, else the built-in stdlib text (`fxslim.runtime.text`); it is
    tokenized by the checkpoint's own tokenizer when the folder has one, else read as
    bytes (token id = byte, for byte-level models).
    """
    from fxslim.runtime.text import stdlib_bytes

    checkpoint = Path(checkpoint)
    try:
        raw = (
            Path(text_file).read_bytes()
            if text_file is not None
            else bytes(stdlib_bytes("train").numpy())
        )
    except OSError as exc:
        raise ArgumentError(f"cannot read the calibration text {text_file}: {exc}") from exc
    if any((checkpoint / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(checkpoint)
        ids = torch.tensor(tok(raw.decode("utf-8", "replace"))["input_ids"], dtype=torch.long)
    else:
        ids = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()
    if len(ids) < seq_len:
        raise ArgumentError(
            f"the calibration text has {len(ids)} tokens, fewer than one window of {seq_len}"
        )
    starts = torch.linspace(0, len(ids) - seq_len, n).long()
    windows = torch.stack([ids[s : s + seq_len] for s in starts.tolist()])
    return list(windows.split(batch_size))


def _criterion(importance: str) -> Any:
    from fxslim.passes.calibrated import FLAPImportance, WandaImportance
    from fxslim.passes.importance import MagnitudeImportance

    if importance == "magnitude":
        return MagnitudeImportance(p=1)
    return (WandaImportance if importance == "wanda" else FLAPImportance)([{}])


def llm_prune(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    heads: float = 0.25,
    mlp: float = 0.5,
    *,
    importance: str = "magnitude",
    calib: Iterable[torch.Tensor] | None = None,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
) -> LLMPruneReport:
    """Prune attention heads and MLP channels of a sharded safetensors checkpoint, streamed.

    Args:
        checkpoint: a folder written by ``save_pretrained`` (Llama-shaped decoder layers).
        out: the output folder (absent or empty, or `overwrite`).
        heads: share of key/value heads (each with its query heads) removed per layer.
        mlp: share of MLP channels removed per layer.
        importance: "magnitude" (L1 of the weights), "wanda" or "flap" (activation-aware,
            from `calib`; see ``fxslim.passes.calibrated``).
        calib: token id batches, (batch, seq) each (`fxslim.passes.llm_calib.calibration_ids`).
        dtype: the dtype the layers run in for activation-aware scores.
        overwrite: replace a non-empty `out`.
        progress: called as ``progress(stage, done, total)`` after each layer or shard.

    Returns:
        An `LLMPruneReport` (print it for the table).

    Example:
        >>> print(llm_prune("llama-7b", "llama-7b-pruned", heads=0.25, mlp=0.5))
    """
    from fxslim.passes.llm_scores import calibrated_scores, magnitude_scores, trim_heap

    checkpoint, out = Path(checkpoint), Path(out)
    fraction("heads", heads)
    fraction("mlp", mlp)
    choice("importance", importance, IMPORTANCES)
    _check_paths(checkpoint, out, overwrite)
    batches = None
    if importance != "magnitude":
        batches = list(calib) if calib is not None else None
        if not batches or not all(isinstance(b, torch.Tensor) and b.dim() == 2 for b in batches):
            raise ArgumentError(
                f"importance {importance!r} needs calib: a list of (batch, seq) token id tensors"
            )
    entries, files = S.checkpoint_entries(checkpoint)
    times, t0 = {}, time.perf_counter()
    model = meta_model(checkpoint)
    vocab = getattr(model.config, "vocab_size", None)
    if batches and any(b.dtype.is_floating_point or int(b.min()) < 0 for b in batches):
        raise ArgumentError("calibration batches must hold token ids (non-negative integers)")
    if batches and vocab and max(int(b.max()) for b in batches) >= vocab:
        raise ArgumentError(
            f"calibration token ids reach {max(int(b.max()) for b in batches)}, beyond the "
            f"vocabulary of {vocab}: tokenize with the checkpoint's tokenizer"
        )
    dg = decoder_groups(model)
    n = len(dg.heads)
    times["capture"] = time.perf_counter() - t0
    trim_heap()  # the capture's graph is garbage now

    def tick(stage: str, total: int) -> Callable[[int], None] | None:
        return (lambda i: progress(stage, i + 1, total)) if progress else None

    crit = _criterion(importance)
    t0 = time.perf_counter()
    if batches is None:
        scores = magnitude_scores(entries, dg, crit, tick("score", n))
    else:
        scores = calibrated_scores(model, entries, dg, crit, batches, dtype, tick("calibrate", n))
    times["score"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    plan = make_llm_plan(model, dg, scores, heads, mlp)
    times["plan"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.fxslim-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    (tmp / INCOMPLETE).write_text(
        "written by fxslim llm_prune; a folder holding this file is not complete\n"
    )
    try:
        written = write_pruned(checkpoint, tmp, entries, files, plan, tick("write", len(files)))
        (tmp / INCOMPLETE).unlink()
        if out.exists():
            shutil.rmtree(out)  # empty, or overwrite was asked
        os.replace(tmp, out)
    except BaseException:
        _discard(tmp)
        raise
    times["write"] = time.perf_counter() - t0
    before = sum(e.end - e.start for e in entries.values())
    count = {e.name: (e.shape, plan.shape(e.name, e.shape)) for e in entries.values()}
    params = tuple(sum(int(torch.Size(s[k]).numel()) for s in count.values()) for k in (0, 1))
    logger.info("pruned %s into %s (%d layers)", checkpoint, out, n)
    return LLMPruneReport(str(out), plan.rows, params, (before, written), times)
