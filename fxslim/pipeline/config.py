"""Pipeline configs (YAML or TOML), validated with pydantic before anything runs.

    model: digits                 # a model spec (fxslim.pipeline.specs)
    data: digits                  # default: the built-in data of a built-in model
    inputs: [1, 1, 8, 8]          # a shape or package.module:function; default: the data's
    seed: 0
    threads: 1
    steps:                        # an ordered list; each entry is `kind: {options}` or `kind`
      - finetune: {epochs: 3}
      - prune: {ratio: 0.5, ignore: [fc]}
      - distill: {epochs: 2}
      - export
      - benchmark: {batch_sizes: [1, 8]}
      - report

Unknown keys are errors (a misspelt option must not be silently ignored). Every problem
is reported at once, each with the path of the offending entry (``steps[1].prune.ratio``)
and its line: ``pipeline.yaml:7: steps[1].prune.ratio: ...`` (YAML and TOML alike).
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from fxslim.errors import ConfigError, FxslimError
from fxslim.pipeline.lines import toml_lines, yaml_lines

__all__ = ["STEP_KINDS", "Pipeline", "Step", "load_config", "parse_config"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PruneOptions(_Strict):
    """Options of `fxslim.prune`; one of ratio / target_macs / target_latency (default ratio 0.5)."""

    ratio: float | None = Field(None, ge=0.0, lt=1.0)
    target_macs: float | None = Field(None, gt=0.0, lt=1.0)
    target_latency: float | None = Field(None, gt=0.0, lt=1.0)
    importance: Literal["l1", "l2", "bn", "lamp", "random"] = "l1"
    global_ranking: bool = False
    round_to: PositiveInt = 1
    ignore: list[str] = []
    latency_backend: Literal["torch", "onnxruntime"] = "torch"

    @model_validator(mode="after")
    def _one_target(self) -> PruneOptions:
        given = [k for k in ("ratio", "target_macs", "target_latency") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of ratio, target_macs, target_latency, got {given}")
        return self


class DistillOptions(_Strict):
    """Options of `fxslim.distill`; the teacher is the model before the first prune step."""

    epochs: PositiveInt = 2
    lr: PositiveFloat = 2e-3
    alpha: float = Field(0.9, ge=0.0, le=1.0)
    temperature: PositiveFloat = 4.0
    features: list[str] = []


class FinetuneOptions(_Strict):
    """Training with labels only (AdamW, cosine schedule)."""

    epochs: PositiveInt = 3
    lr: PositiveFloat = 3e-3


class FoldOptions(_Strict):
    """Equivalent rewrites: drop identities, fold BatchNorm and parameter-only subgraphs,
    fuse Linear pairs (exact)."""

    fuse_linear: bool = True
    fold_constants: bool = True


class LowRankOptions(_Strict):
    """`LowRankPass`: one of energy / rank_ratio / target_params (default rank_ratio 0.5)."""

    energy: float | None = Field(None, gt=0.0, le=1.0)
    rank_ratio: float | None = Field(None, gt=0.0, le=1.0)
    target_params: float | None = Field(None, gt=0.0, le=1.0)
    layers: list[str] | None = None

    @model_validator(mode="after")
    def _one_rule(self) -> LowRankOptions:
        given = [k for k in ("energy", "rank_ratio", "target_params") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of energy, rank_ratio, target_params, got {given}")
        return self


class ExportOptions(_Strict):
    """`fxslim.export_onnx` of the current model (and of the baseline, for the report)."""

    opset: int | None = Field(None, ge=7)
    simplify: bool = True
    tol: PositiveFloat = 1e-4
    baseline: bool = True


class BenchmarkOptions(_Strict):
    """Latency of every stage in torch and (for exported files) onnxruntime."""

    batch_sizes: list[PositiveInt] = [1]
    threads: PositiveInt = 1
    runs: PositiveInt = 30
    warmup: NonNegativeInt = 5
    onnxruntime: bool = True


class ReportOptions(_Strict):
    """The Markdown and HTML report."""

    title: str | None = None


STEP_KINDS: dict[str, type[_Strict]] = {
    "finetune": FinetuneOptions, "prune": PruneOptions, "distill": DistillOptions,
    "export": ExportOptions, "benchmark": BenchmarkOptions, "report": ReportOptions,
    "fold": FoldOptions, "lowrank": LowRankOptions,
}
MODEL_STEPS = ("finetune", "prune", "distill", "fold", "lowrank")  # the steps that produce a new model


class Step(_Strict):
    kind: str
    options: Any


class Pipeline(_Strict):
    """A whole pipeline config."""

    name: str | None = None
    model: str
    arch: str | None = None
    data: str | None = None
    inputs: list[PositiveInt] | str | None = None
    seed: int = 0
    threads: PositiveInt = 1
    out: str | None = None
    steps: list[Step] = Field(min_length=1)

    @field_validator("model", "arch")
    @classmethod
    def _model_form(cls, v: str | None) -> str | None:
        from fxslim.pipeline.specs import check_model_spec

        if v is not None:
            try:
                check_model_spec(v)
            except FxslimError as exc:
                raise ValueError(str(exc)) from None
        return v

    @model_validator(mode="after")
    def _defaults(self) -> Pipeline:
        from fxslim.pipeline.specs import BUILTIN, check_model_spec

        if check_model_spec(self.model) == "saved" and not self.arch:
            raise ValueError(f"model '{self.model}' is a saved fxslim directory: give `arch:`, the spec of "
                             "the original architecture")
        if self.data is None and self.model in BUILTIN:
            object.__setattr__(self, "data", self.model)
        if self.data is None and self.arch in BUILTIN:
            object.__setattr__(self, "data", self.arch)
        return self


def _where(path: tuple, lines: dict[tuple, int] | None, source: str) -> str:
    shown = ""
    for p in path:
        shown += f"[{p}]" if isinstance(p, int) else (f".{p}" if shown else str(p))
    line = None
    if lines:
        for cut in range(len(path), -1, -1):  # the nearest enclosing entry with a known line
            if path[:cut] in lines:
                line = lines[path[:cut]]
                break
    return f"{source}:{line}: {shown or '(top level)'}" if line else f"{source}: {shown or '(top level)'}"


# pydantic's names for the members of a union and for validators: not part of the path
_TAG = re.compile(r"^(str|int|float|bool|none|list|dict|function-(after|before|wrap|plain))$|[\[\-]")


def _errors(exc: ValidationError, prefix: tuple) -> list[tuple[tuple, str]]:
    """(path, message) per problem. Of a union (``inputs: [1, 3, 224, 224] | "pkg:fn"``) only
    the member that matches the value's type speaks, when it has something to say."""
    found = []
    for e in exc.errors():
        tagged = any(isinstance(x, str) and _TAG.search(x) for x in e["loc"])
        loc = prefix + tuple(x for x in e["loc"] if not (isinstance(x, str) and _TAG.search(x)))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        found.append((loc, msg, tagged and e["type"].endswith("_type")))
    return [(loc, msg) for loc, msg, other_member in found
            if not (other_member and any(not o and lo[:len(loc)] == loc for lo, _, o in found))]


def parse_config(raw: Any, source: str = "<config>", lines: dict[tuple, int] | None = None) -> Pipeline:
    """A validated `Pipeline` from parsed YAML/TOML data, or ConfigError listing every problem."""
    problems: list[tuple[tuple, str]] = []
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a pipeline config is a mapping (model:, data:, steps: ...), "
                          f"got {type(raw).__name__}")
    steps_raw = raw.get("steps")
    steps: list[Step] = []
    if isinstance(steps_raw, list):
        for i, entry in enumerate(steps_raw):
            if isinstance(entry, str):
                kind, opts = entry, {}
            elif isinstance(entry, dict) and len(entry) == 1:
                kind, opts = next(iter(entry.items()))
                opts = {} if opts is None else opts
            else:
                problems.append((("steps", i), "a step is `kind` or `kind: {options}` with one kind, got "
                                 f"{entry!r}"[:200]))
                continue
            if kind not in STEP_KINDS:
                near = difflib.get_close_matches(str(kind), list(STEP_KINDS), n=1)
                problems.append((("steps", i), f"unknown step '{kind}'"
                                 + (f" (closest: {near[0]})" if near else "")
                                 + f"; steps are: {', '.join(STEP_KINDS)}"))
                continue
            fields = STEP_KINDS[kind].model_fields
            try:
                steps.append(Step(kind=kind, options=STEP_KINDS[kind].model_validate(opts)))
            except ValidationError as exc:
                for loc, msg in _errors(exc, ("steps", i, kind)):
                    if msg == "unknown key":
                        near = difflib.get_close_matches(str(loc[-1]), list(fields), n=1)
                        msg += f" (closest: {near[0]})" if near else f"; accepted: {', '.join(fields)}"
                    problems.append((loc, msg))
    top = dict(raw)
    top["steps"] = steps if isinstance(steps_raw, list) else steps_raw
    try:
        config = Pipeline.model_validate(top)
    except ValidationError as exc:
        for loc, msg in _errors(exc, ()):
            if loc[:1] == ("steps",) and isinstance(steps_raw, list) and (len(loc) > 1 or steps_raw):
                continue  # steps were checked one by one above
            if msg == "unknown key":
                near = difflib.get_close_matches(str(loc[-1]), list(Pipeline.model_fields), n=1)
                msg += f" (closest: {near[0]})" if near else ""
            problems.append((loc, msg))
        config = None
    if problems:
        text = "\n".join(f"  {_where(loc, lines, source)}: {msg}" for loc, msg in problems)
        raise ConfigError(f"{source}: {len(problems)} problem(s) in the pipeline config; nothing was run:\n{text}")
    assert config is not None
    return config


def load_config(path: str | Path) -> Pipeline:
    """Read and validate a .yaml/.yml/.toml pipeline config; ConfigError on any problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config '{path}' does not exist or is not a file")
    text = path.read_text()
    lines = None
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        lines = yaml_lines(text)
    elif path.suffix == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            raise ConfigError(f"{path}: TOML configs need Python >= 3.11; use YAML") from None
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        lines = toml_lines(text)
    else:
        raise ConfigError(f"config '{path}' must end in .yaml, .yml or .toml")
    config = parse_config(raw, str(path), lines)
    if config.name is None:
        config = config.model_copy(update={"name": path.stem})
    return config
