"""fxslim: compiler-style structured pruning for PyTorch.

The first calls a user needs::

    import fxslim
    gm = fxslim.trace(model, x)                       # torch.fx graph + shapes
    groups = fxslim.channel_groups(model, x)          # what is coupled, what is pinned
    small = fxslim.prune_channels(model, x, {"layer1.0.conv1": [3, 7]})
    small = fxslim.prune(model, x, ratio=0.5, ignore=["fc"])
    print(fxslim.compare({"original": model, "pruned": small}, x))
"""

# Names are imported on first use (PEP 562), so that `import fxslim.cli` and `fxslim --help`
# do not pay for torch: the command line parses and checks its arguments first.
_LAZY = {
    "ArgumentError": "fxslim.errors",
    "ChannelGroup": "fxslim.graph.coupling",
    "ConfigError": "fxslim.errors",
    "CouplingGraph": "fxslim.graph.coupling",
    "DropIdentitiesPass": "fxslim.passes.drop_identity",
    "ExportError": "fxslim.errors",
    "ExportReport": "fxslim.passes.export",
    "FoldBatchNormPass": "fxslim.passes.fold_bn",
    "FoldConstantsPass": "fxslim.passes.fold_constants",
    "FuseLinearPass": "fxslim.passes.fuse_linear",
    "FxslimError": "fxslim.errors",
    "LowRankPass": "fxslim.passes.lowrank",
    "Member": "fxslim.graph.coupling",
    "Pass": "fxslim.passes.base",
    "PassContractError": "fxslim.errors",
    "PassManager": "fxslim.passes.base",
    "PassResult": "fxslim.passes.base",
    "PinnedChannelsError": "fxslim.errors",
    "PlanMismatchError": "fxslim.errors",
    "PrunePlan": "fxslim.passes.prune",
    "RuleError": "fxslim.errors",
    "SaveLoadError": "fxslim.errors",
    "SpecError": "fxslim.errors",
    "TraceError": "fxslim.errors",
    "UnsupportedOpError": "fxslim.errors",
    "advise": "fxslim.advisor.core",
    "analyze": "fxslim.graph.analysis",
    "apply_plan": "fxslim.passes.prune",
    "channel_groups": "fxslim.graph.analysis",
    "compare": "fxslim.runtime.compare",
    "count_macs": "fxslim.runtime.measure",
    "count_params": "fxslim.runtime.measure",
    "distill": "fxslim.passes.distill",
    "export_onnx": "fxslim.passes.export",
    "fold_batchnorm": "fxslim.passes.fold_bn",
    "fold_constants": "fxslim.passes.fold_constants",
    "llm_prune": "fxslim.passes.llm_stream",
    "load": "fxslim.passes.saveload",
    "make_plan": "fxslim.passes.prune",
    "measure_latency": "fxslim.runtime.measure",
    "onnx_accuracy": "fxslim.passes.quantize",
    "prune": "fxslim.passes.policy",
    "prune_and_distill": "fxslim.passes.distill",
    "prune_channels": "fxslim.passes.prune",
    "prune_depth": "fxslim.passes.depth",
    "quantize_onnx": "fxslim.passes.quantize",
    "register_rule": "fxslim.graph.rules",
    "save": "fxslim.passes.saveload",
    "save_pt2": "fxslim.passes.saveload",
    "thin_copy": "fxslim.passes.distill",
    "trace": "fxslim.graph.trace",
}

_SUBPACKAGES = ("advisor", "graph", "passes", "runtime", "pipeline", "errors", "utils", "cli")

__version__ = "0.1.0"

__all__ = [
    "ArgumentError",
    "ChannelGroup",
    "ConfigError",
    "CouplingGraph",
    "DropIdentitiesPass",
    "ExportError",
    "ExportReport",
    "FoldBatchNormPass",
    "FoldConstantsPass",
    "FuseLinearPass",
    "FxslimError",
    "LowRankPass",
    "Member",
    "Pass",
    "PassContractError",
    "PassManager",
    "PassResult",
    "PinnedChannelsError",
    "PlanMismatchError",
    "PrunePlan",
    "RuleError",
    "SaveLoadError",
    "SpecError",
    "TraceError",
    "UnsupportedOpError",
    "advise",
    "analyze",
    "apply_plan",
    "channel_groups",
    "compare",
    "count_macs",
    "count_params",
    "distill",
    "export_onnx",
    "fold_batchnorm",
    "fold_constants",
    "llm_prune",
    "load",
    "make_plan",
    "measure_latency",
    "onnx_accuracy",
    "prune",
    "prune_and_distill",
    "prune_channels",
    "prune_depth",
    "quantize_onnx",
    "register_rule",
    "save",
    "save_pt2",
    "thin_copy",
    "trace",
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name in _SUBPACKAGES:  # `fxslim.graph.rules.elementwise` after a bare `import fxslim`:
        import importlib  # import what the eager package used to, so every submodule is there

        for module in set(_LAZY.values()):
            importlib.import_module(module)
        return importlib.import_module(f"fxslim.{name}")
    raise AttributeError(f"module 'fxslim' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
