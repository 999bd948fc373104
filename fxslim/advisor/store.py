"""The advisor's directory: per-run records (resume), saved models, side-by-side latency.

Layout of ``out_dir``::

    advise.json                         the run's settings (written first: marks the folder)
    pruned/t<target>/                   each target's one-shot pruned model (fxslim.save)
    models/t<target>/<recipe>/seed<k>/  every run's model (fxslim.save)
    records/t<target>/<recipe>/seed<k>.json   its metrics; written last, so a record means done
    onnx/<arch>.onnx                    one verified export per architecture (latency)
    results.json, results.md, accuracy_latency.png, training.png

A record is reused on a later call only when its settings (budget, target kind, val
size) are the ones asked now; files are written under temporary names and renamed.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
from pathlib import Path
from typing import Any

from torch import nn

from fxslim.errors import ArgumentError

__all__ = ["Store", "arch_key", "measure_side_by_side"]

MARK = "advise.json"


def arch_key(model: nn.Module) -> str:
    """A short fingerprint of the architecture: class and every tensor's name and shape."""
    parts = [type(model).__name__] + [
        f"{k}:{tuple(v.shape)}" for k, v in model.state_dict().items()
    ]
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:12]


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


class Store:
    """Records and models of one advisor directory."""

    def __init__(self, root: Path, settings: dict[str, Any]):
        self.root, self.settings = root, settings

    @staticmethod
    def check(root: Any) -> Path:
        """The directory as a Path: new, empty, or an earlier advisor directory (resumed)."""
        if not isinstance(root, (str, os.PathLike)):
            raise ArgumentError(f"out_dir must be a path, got {type(root).__name__}")
        path = Path(root)
        if path.exists() and not path.is_dir():
            raise ArgumentError(f"out_dir '{path}' is a file, not a folder")
        if path.is_dir() and any(path.iterdir()) and not (path / MARK).is_file():
            raise ArgumentError(
                f"out_dir '{path}' holds files the advisor did not write: give a new or empty "
                "folder, or an earlier advisor folder to resume"
            )
        return path

    def open(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        _write_json(self.root / MARK, self.settings)

    @staticmethod
    def _t(target: float) -> str:
        return f"t{target:g}"

    def record_path(self, target: float, recipe: str, seed: int) -> Path:
        return self.root / "records" / self._t(target) / recipe / f"seed{seed}.json"

    def model_dir(self, target: float, recipe: str, seed: int) -> Path:
        return self.root / "models" / self._t(target) / recipe / f"seed{seed}"

    def pruned_dir(self, target: float) -> Path:
        return self.root / "pruned" / self._t(target)

    def finished(self, target: float, recipe: str, seed: int) -> dict[str, Any] | None:
        """The record of a finished run with today's settings, else None."""
        path = self.record_path(target, recipe, seed)
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return (
            rec
            if rec.get("settings") == self.settings and (self.root / rec["model"]).is_dir()
            else None
        )

    def write_record(self, rec: dict[str, Any]) -> None:
        _write_json(
            self.record_path(rec["target"], rec["recipe"], rec["seed"]),
            rec | {"settings": self.settings},
        )

    def write(self, name: str, obj: Any) -> Path:
        path = self.root / name
        if isinstance(obj, (bytes, str)):
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_bytes(obj) if isinstance(obj, bytes) else tmp.write_text(obj)
            os.replace(tmp, path)
        else:
            _write_json(path, obj)
        return path


def measure_side_by_side(
    models: dict[str, nn.Module],
    example_inputs: Any,
    *,
    threads: int,
    runs: int,
    onnx_dir: Path | None,
    rounds: int = 5,
) -> dict[str, dict[str, float]]:
    """Median latency (ms) of each model in torch (and onnxruntime with `onnx_dir`), timed in
    alternating rounds so that the machine's drift hits every model alike; the first model
    is the reference of each round's ratio (median of the per-round ratios)."""
    from fxslim.passes.export import export_onnx
    from fxslim.runtime.measure import measure_latency, onnx_latency

    paths = {}
    if onnx_dir is not None:
        for key, m in models.items():
            path = onnx_dir / f"{key}.onnx"
            if not path.is_file():
                # batch 1 is what is timed; onnxruntime folds and fuses the graph itself
                export_onnx(
                    m, example_inputs, path, overwrite=True, simplify=False, dynamic_batch=False
                )
            paths[key] = path
    per = max(runs // rounds, 3)
    times: dict[str, dict[str, list[float]]] = {k: {"torch": [], "ort": []} for k in models}
    for _ in range(rounds):
        for key, m in models.items():
            times[key]["torch"].append(
                measure_latency(m, example_inputs, runs=per, warmup=2, threads=threads)["median_ms"]
            )
            if key in paths:
                times[key]["ort"].append(
                    onnx_latency(
                        str(paths[key]), example_inputs, threads=threads, runs=per, warmup=2
                    )["median_ms"]
                )
    ref = next(iter(models))
    out = {}
    for key, t in times.items():
        ratios = [a / b for a, b in zip(t["torch"], times[ref]["torch"])]
        out[key] = {"torch_ms": statistics.median(t["torch"]), "ratio": statistics.median(ratios)}
        if t["ort"]:
            out[key] |= {
                "ort_ms": statistics.median(t["ort"]),
                "ort_ratio": statistics.median(a / b for a, b in zip(t["ort"], times[ref]["ort"])),
            }
    return out
