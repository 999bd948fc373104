"""fxslim: compiler-style structured pruning for PyTorch.

The first calls a user needs::

    import fxslim
    gm = fxslim.trace(model, x)                       # torch.fx graph + shapes
    groups = fxslim.channel_groups(model, x)          # what is coupled, what is pinned
    small = fxslim.prune_channels(model, x, {"layer1.0.conv1": [3, 7]})
    small = fxslim.prune(model, x, ratio=0.5, ignore=["fc"])
    print(fxslim.compare({"original": model, "pruned": small}, x))
"""

from fxslim.errors import (
    ArgumentError,
    ExportError,
    FxslimError,
    PassContractError,
    PinnedChannelsError,
    PlanMismatchError,
    RuleError,
    SaveLoadError,
    TraceError,
    UnsupportedOpError,
)
from fxslim.graph.analysis import analyze, channel_groups
from fxslim.graph.coupling import ChannelGroup, CouplingGraph, Member
from fxslim.graph.rules import register_rule
from fxslim.graph.trace import trace
from fxslim.passes.base import Pass, PassManager, PassResult
from fxslim.passes.distill import distill, prune_and_distill, thin_copy
from fxslim.passes.export import ExportReport, export_onnx
from fxslim.passes.policy import prune
from fxslim.passes.prune import PrunePlan, apply_plan, make_plan, prune_channels
from fxslim.passes.saveload import load, save, save_pt2
from fxslim.runtime.compare import compare
from fxslim.runtime.measure import count_macs, count_params, measure_latency

__version__ = "0.1.0"

__all__ = [
    "ArgumentError",
    "ChannelGroup",
    "CouplingGraph",
    "ExportError",
    "ExportReport",
    "FxslimError",
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
    "TraceError",
    "UnsupportedOpError",
    "analyze",
    "apply_plan",
    "channel_groups",
    "compare",
    "count_macs",
    "count_params",
    "distill",
    "export_onnx",
    "load",
    "make_plan",
    "measure_latency",
    "prune",
    "prune_and_distill",
    "prune_channels",
    "register_rule",
    "save",
    "save_pt2",
    "thin_copy",
    "trace",
]
