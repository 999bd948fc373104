"""The channel-coupling graph.

Every dimension of every tensor in the fx graph gets a *space* (an index set of its
size). Op rules (``fxslim.graph.rules``) relate spaces:

* identity: two spaces are the same index set (residual add, BatchNorm, ReLU ...):
  they are merged with union-find into one *class*;
* index maps: element ``ia[k]`` of space A is coupled to element ``ib[k]`` of space B
  (cat offsets, split ranges, flatten strides, grouped-conv groups, attention heads).

The coupled elements form connected components (computed with scipy over all
elements): each component is one *unit*, the smallest set of channels that can be
removed together without breaking any op. Units that touch the same set of classes
form a ``ChannelGroup``; a group's channels are its units. A group is pinned when one
of its classes is pinned (model input/output, spatial dims, an op with no rule, an
ignored layer) and the reason names the op and the module path.

The class-level structure is kept as a networkx graph (`CouplingGraph.graph`): one node
per class with members or links, one edge per index map.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from torch import fx, nn

from fxslim.errors import PassContractError
from fxslim.utils import sorted_unique

__all__ = ["Builder", "ChannelGroup", "CouplingGraph", "Member", "where"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Member:
    """One tensor dim that a group's pruning changes.

    Attributes:
        kind: "param" or "buffer" (sliced), "attr" (a module attribute such as
            "layer1.0.conv1.out_channels") or "literal" (a size written in a graph node's
            arguments; target is the node name, dim the tensor dim it sizes).
        target: qualified name in the traced module (e.g. "layer1.0.conv1.weight").
        dim: the dimension that loses entries.
        role: "out" (a producer: weight rows), "in" (a consumer: weight columns),
            "norm" (per-channel affine/statistics), or "attr"/"literal".
    """

    kind: str
    target: str
    dim: int
    role: str = "norm"

    @property
    def module(self) -> str:
        return self.target.rsplit(".", 1)[0] if "." in self.target else ""


@dataclass
class ChannelGroup:
    """A set of coupled channels: pruning unit ``i`` removes it from every member.

    Attributes:
        id: index in the list returned by `channel_groups`.
        size: number of prunable units (channels, heads or conv groups).
        members: every (parameter or buffer, dim) that loses entries.
        prunable: False when pinned.
        reason: why it is pinned (names the op and the module path), else None.
        stat: True when a statistic over channels passes through the group (LayerNorm,
            softmax, mean over channels): removing even dead channels changes values.
        root: a representative member, the first producer when there is one.
    """

    id: int
    size: int
    members: list[Member]
    prunable: bool
    reason: str | None
    stat: bool
    root: Member | None
    # class id -> for each element of that class, the unit ordinal in this group or -1
    unit_of: dict[int, np.ndarray] = field(default_factory=dict, repr=False)
    # member -> class id (members of one class share the class's element indexing)
    member_class: dict[Member, int] = field(default_factory=dict, repr=False)
    # classes whose element i is unit i (unit_of is arange(size)): the common case
    identity: set[int] = field(default_factory=set, repr=False)

    def channels_of(self, member: Member, units: Iterable[int]) -> np.ndarray:
        """Indices along `member.dim` that removing `units` removes."""
        cls = self.member_class[member]
        mask = np.isin(self.unit_of[cls], np.asarray(list(units), dtype=np.int64))
        return np.nonzero(mask)[0]

    def units_of(self, member: Member, indices: Iterable[int]) -> np.ndarray:
        """Unit ordinals that contain the given indices of `member` (-1 when foreign)."""
        cls = self.member_class[member]
        return self.unit_of[cls][np.asarray(list(indices), dtype=np.int64)]

    def __str__(self) -> str:
        state = "prunable" if self.prunable else f"pinned: {self.reason}"
        root = f"{self.root.target}[{self.root.dim}]" if self.root else "-"
        return f"group {self.id}: {self.size} channels, root {root}, {len(self.members)} members, {state}"


def where(node: fx.Node, gm: fx.GraphModule | None = None) -> str:
    """A user-facing location for a node: the op and the module path it sits in."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target) if gm is not None else None
        op = type(mod).__name__ if mod is not None else "module"
        return f"{op} at '{node.target}'"
    if node.op == "call_function":
        op = getattr(node.target, "__name__", str(node.target))
        owner = getattr(node.target, "autograd_function", None)
        if owner is not None:  # a custom autograd Function's apply, kept whole by the trace
            op = f"{owner.__name__}.{op}"
    elif node.op == "call_method":
        op = f".{node.target}()"
    else:
        op = node.op
    stack = node.meta.get("nn_module_stack")
    path = next(reversed(stack.values()))[0] if stack else ""
    return f"'{op}' at '{path or '<top level>'}' (node {node.name})"


class Builder:
    """Collects spaces, identities, index maps, members and pins while rules run."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.sizes: list[int] = []
        self.parent: list[int] = []
        self.labels: list[str] = []
        self.pins: dict[int, str] = {}
        self.stat: set[int] = set()
        self.links: list[tuple[int, np.ndarray, int, np.ndarray]] = []
        self.members: dict[int, list[Member]] = defaultdict(list)
        self.member_space: dict[tuple[str, int], int] = {}
        # dims of tensors fetched by get_attr that no rule has claimed yet: they become
        # "norm" members at the end unless a layer rule names their role or says they
        # carry no channels (a kernel dim, a vocabulary)
        self.pending: dict[tuple[str, int], str] = {}
        # node name -> the weight whose kept share scales its MACs (conv, linear)
        self.weights: dict[str, str] = {}
        # node name -> (projection weight, heads space) of an attention op: its projection
        # MACs scale with the weight's kept share, its attention MACs with the kept heads
        self.attention: dict[str, tuple[str, int]] = {}
        # splits of one dim into factors, coupled at the end (see `defer_split`)
        self.splits: list[tuple[int, list[int], str]] = []
        self.out: dict[fx.Node, Any] = {}
        self.touched_modules: set[str] = set()
        # spaces whose size follows the input's shape (batch, spatial): graph size
        # arguments for them stay symbolic, all others become literals after a prune
        self.dynamic: set[int] = set()

    # -- spaces ---------------------------------------------------------------------------
    def new(self, size: int, label: str, pin: str | None = None) -> int:
        sid = len(self.sizes)
        self.sizes.append(int(size))
        self.parent.append(sid)
        self.labels.append(label)
        if pin:
            self.pins[sid] = pin
        return sid

    def fresh(self, shape: tuple[int, ...], label: str, pin: str | None, dynamic: bool = False) -> list[int]:
        """New spaces for every dim of a tensor of `shape`."""
        out = [self.new(s, f"{label}:{d}", pin) for d, s in enumerate(shape)]
        if dynamic:
            self.dynamic.update(out)
        return out

    def find(self, s: int) -> int:
        parent = self.parent
        root = s
        while parent[root] != root:
            root = parent[root]
        while parent[s] != root:
            parent[s], s = root, parent[s]
        return root

    def union(self, a: int, b: int) -> int:
        """Declare spaces `a` and `b` the same index set."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if self.sizes[ra] != self.sizes[rb]:
            raise PassContractError(
                f"pass author: identity between spaces of different sizes "
                f"{self.labels[a]}({self.sizes[ra]}) and {self.labels[b]}({self.sizes[rb]})"
            )
        self.parent[rb] = ra
        return ra

    def link(self, a: int, ia: np.ndarray, b: int, ib: np.ndarray) -> None:
        """Couple element ``ia[k]`` of space `a` with element ``ib[k]`` of space `b`."""
        self.links.append((a, np.asarray(ia, dtype=np.int64), b, np.asarray(ib, dtype=np.int64)))

    def tie_blocks(self, s: int, block: int) -> None:
        """Couple every element of `s` with the others of its contiguous block."""
        idx = np.arange(self.sizes[s])
        self.link(s, idx, s, (idx // block) * block)

    def pin(self, s: int, reason: str) -> None:
        self.pins.setdefault(s, reason)

    def is_pinned(self, s: int) -> bool:
        root = self.find(s)
        return any(self.find(p) == root for p in self.pins)

    def mark_stat(self, s: int) -> None:
        self.stat.add(s)

    def member(self, s: int, kind: str, target: str, dim: int, role: str = "norm") -> None:
        """Record that (target, dim) loses the entries that space `s` loses."""
        key = (target, dim)
        if key in self.member_space:  # a shared parameter couples its call sites
            self.union(self.member_space[key], s)
            if self.pending.pop(key, None) is not None:  # fetched by get_attr: its role is known now
                self.members[s].append(Member(kind, target, dim, role))
                self.touched_modules.add(target.rsplit(".", 1)[0] if "." in target else "")
            return
        self.member_space[key] = s
        self.members[s].append(Member(kind, target, dim, role))
        self.touched_modules.add(target.rsplit(".", 1)[0] if "." in target else "")

    def attr_dim(self, s: int, kind: str, target: str, dim: int) -> None:
        """A dim of a tensor fetched by get_attr: a member unless a rule says otherwise."""
        self.member_space[(target, dim)] = s
        self.pending[(target, dim)] = kind

    def not_channels(self, target: str, dim: int, reason: str) -> None:
        """(target, dim) carries no channels (a kernel or vocabulary dim): never sliced."""
        key = (target, dim)
        self.pending.pop(key, None)
        if key in self.member_space:
            self.pin(self.member_space[key], reason)

    def defer_split(self, src: int, factors: list[int], reason: str) -> None:
        """`src` is split into `factors` (outermost first, row-major). One factor will carry
        its channels: the outermost that is not pinned once every rule has run, so that
        ops after the split (an unbind of q/k/v, a merge with another dim) decide it."""
        self.splits.append((src, factors, reason))

    def resolve_splits(self) -> None:
        pinned = {self.find(p) for p in self.pins}  # no unions from here on: roots are stable
        for src, factors, reason in self.splits:
            sizes = [self.sizes[s] for s in factors]
            cands = [k for k, s in enumerate(factors) if sizes[k] > 1 and self.find(s) not in pinned]
            k = cands[0] if cands and self.find(src) not in pinned else 0
            inner = int(np.prod(sizes[k + 1:]))
            f = np.arange(self.sizes[src])
            self.link(src, f, factors[k], (f // inner) % sizes[k])
            for j, s in enumerate(factors):
                if j != k:
                    self.pin(s, reason)
                    pinned.add(self.find(s))
        self.splits.clear()

    def flush_pending(self) -> None:
        """Unclaimed get_attr dims become members (a layer scale, a class token)."""
        for (target, dim), kind in self.pending.items():
            s = self.member_space[(target, dim)]
            self.members[s].append(Member(kind, target, dim, "norm"))
            self.touched_modules.add(target.rsplit(".", 1)[0] if "." in target else "")
        self.pending.clear()

    def note(self, s: int, kind: str, target: str, dim: int) -> None:
        """Record a module attribute or graph literal that follows space `s` (no slicing)."""
        self.members[s].append(Member(kind, target, dim, kind))

    def module_members(self, s: int, path: str, mod: nn.Module, specs: Iterable[tuple[str, int, str]]) -> None:
        """Members for module attributes that exist: specs of (attr name, dim, role)."""
        for name, dim, role in specs:
            t = getattr(mod, name, None)
            if t is None:
                continue
            kind = "param" if isinstance(t, nn.Parameter) else "buffer"
            full = f"{path}.{name}" if path else name
            self.member(s, kind, full, dim, role)

    def pin_struct(self, struct: Any, reason: str) -> None:
        for s in iter_spaces(struct):
            self.pin(s, reason)

    def finish(self) -> CouplingGraph:
        self.resolve_splits()
        self.flush_pending()
        return CouplingGraph.build(self)


def iter_spaces(struct: Any):
    """Every space id in a (nested) output structure."""
    if struct is None:
        return
    if isinstance(struct, int):
        yield struct
        return
    for x in struct:
        yield from iter_spaces(x)


class CouplingGraph:
    """The result of the channel analysis: classes, units, groups and the networkx view."""

    def __init__(self) -> None:
        self.groups: list[ChannelGroup] = []
        self.graph = nx.Graph()
        self.class_size: dict[int, int] = {}
        self.class_of: list[int] = []
        self.node_spaces: dict[str, Any] = {}
        self.builder: Builder | None = None
        self.dynamic_classes: set[int] = set()

    @classmethod
    def build(cls, b: Builder) -> CouplingGraph:
        cg = cls()
        cg.builder = b
        n_spaces = len(b.sizes)
        roots = np.array([b.find(s) for s in range(n_spaces)], dtype=np.int64)
        cg.class_of = roots
        class_ids = sorted_unique(roots)
        sizes = np.array(b.sizes, dtype=np.int64)
        offset = np.zeros(n_spaces, dtype=np.int64)
        csizes = sizes[class_ids]
        offs = np.concatenate([[0], np.cumsum(csizes)[:-1]])
        offset[class_ids] = offs
        total = int(csizes.sum())
        for c, s in zip(class_ids.tolist(), csizes.tolist()):
            cg.class_size[c] = s

        pin_reason: dict[int, str] = {}
        for s, reason in b.pins.items():
            pin_reason.setdefault(int(roots[s]), reason)
        stat_classes = {int(roots[s]) for s in b.stat}
        cg.dynamic_classes = {int(roots[s]) for s in b.dynamic}
        members: dict[int, list[Member]] = defaultdict(list)
        for s, ms in b.members.items():
            members[int(roots[s])].extend(ms)

        g = cg.graph
        rows, cols = [], []
        for a, ia, bb, ib in b.links:
            ra, rb = int(roots[a]), int(roots[bb])
            if len(ia) == 0:
                continue
            if ia.max() >= sizes[ra] or ib.max() >= sizes[rb]:
                raise PassContractError(
                    f"pass author: index map out of range between {b.labels[a]} and {b.labels[bb]}"
                )
            rows.append(ia + offset[ra])
            cols.append(ib + offset[rb])
            if ra != rb:
                g.add_edge(ra, rb)
                g.edges[ra, rb].setdefault("maps", []).append((ia, ib))
        for c, ms in members.items():
            g.add_node(c, size=cg.class_size[c], members=ms)
        for c in g.nodes:
            g.nodes[c]["size"] = cg.class_size[c]
            g.nodes[c]["pinned"] = pin_reason.get(c)
            g.nodes[c]["stat"] = c in stat_classes
            g.nodes[c]["label"] = b.labels[c]

        if rows:
            r = np.concatenate(rows)
            c_ = np.concatenate(cols)
            adj = coo_matrix((np.ones(len(r), dtype=np.int8), (r, c_)), shape=(total, total))
            _, labels = connected_components(adj, directed=False)
        else:
            labels = np.arange(total)

        # Only units that touch a class with members matter; follow the links from them.
        member_classes = set(members)
        relevant: set[int] = set()
        for comp in nx.connected_components(g):
            if not member_classes.isdisjoint(comp):
                relevant |= comp
        relevant |= member_classes
        relevant_list = sorted(relevant)
        if not relevant_list:
            return cg

        # unit -> the set of classes it touches (its signature), vectorised: each class
        # gets a random 64-bit key and a unit's signature hash is the sum of its classes'
        rng = np.random.default_rng(0)
        keys = rng.integers(1, np.iinfo(np.int64).max, size=len(relevant_list), dtype=np.int64)
        elem_unit = np.concatenate([labels[offset[c]: offset[c] + cg.class_size[c]] for c in relevant_list])
        elem_cls = np.repeat(np.arange(len(relevant_list)), [cg.class_size[c] for c in relevant_list])
        n_cls = len(relevant_list)
        pair = sorted_unique(elem_unit * n_cls + elem_cls)  # distinct (unit, class) pairs
        pu, pc = pair // n_cls, pair % n_cls
        units, start = np.unique(pu, return_index=True)
        with np.errstate(over="ignore"):
            sig_hash = np.add.reduceat(keys[pc], start)
        _, rep, sig_index = np.unique(sig_hash, return_index=True, return_inverse=True)
        ends = np.append(start[1:], len(pc))
        ordinal = np.full(total, -1, dtype=np.int64)
        in_sig = np.zeros(total, dtype=bool)  # scratch: units of the signature at hand

        for k, r in enumerate(rep.tolist()):
            sig = tuple(relevant_list[i] for i in pc[start[r]: ends[r]].tolist())
            if not any(c in member_classes for c in sig):
                continue
            ms = [m for c in sig for m in members.get(c, ())]
            if not any(m.kind == "param" for m in ms):
                continue  # nothing to slice but buffers of pinned spaces
            sig_units = units[sig_index == k]
            # order units by their first element in the first member class
            anchor = next(c for c in sig if c in members)
            lab = labels[offset[anchor]: offset[anchor] + cg.class_size[anchor]]
            in_sig[sig_units] = True
            lab = lab[in_sig[lab]]
            in_sig[sig_units] = False
            _, first = np.unique(lab, return_index=True)
            order = lab[np.sort(first)]
            ordinal[order] = np.arange(len(order))
            unit_of = {c: ordinal[labels[offset[c]: offset[c] + cg.class_size[c]]] for c in sig}
            ordinal[order] = -1
            reasons = [pin_reason[c] for c in sig if c in pin_reason]
            outs = [m for m in ms if m.role == "out"] or [m for m in ms if m.kind == "param"]
            root = min(outs, key=lambda m: b.member_space.get((m.target, m.dim), 1 << 60))
            grp = ChannelGroup(
                id=len(cg.groups),
                size=len(order),
                members=ms,
                prunable=not reasons and len(order) > 1,
                reason=reasons[0] if reasons else (None if len(order) > 1 else "a single channel"),
                stat=any(c in stat_classes for c in sig),
                root=root,
                unit_of=unit_of,
                member_class={m: c for c in sig for m in members.get(c, ())},
                identity={c for c, u in unit_of.items()
                          if len(u) == len(order) and (u == np.arange(len(order))).all()},
            )
            cg.groups.append(grp)
        cg.groups.sort(key=lambda grp: _member_order(grp, b))
        for i, grp in enumerate(cg.groups):
            grp.id = i
        return cg

    def group_of(self, target: str, dim: int) -> ChannelGroup | None:
        """The group whose member is (target, dim), e.g. ("layer1.0.conv1.weight", 0)."""
        for grp in self.groups:
            for m in grp.members:
                if m.target == target and m.dim == dim:
                    return grp
        return None

    def is_dynamic(self, space: int) -> bool:
        """True when the space's size follows the input's shape (batch, spatial dims)."""
        return int(self.class_of[space]) in self.dynamic_classes

    def new_size(self, space: int, removed: dict[int, np.ndarray]) -> int:
        """Size of a space after removing the masked elements of its class."""
        c = int(self.class_of[space])
        mask = removed.get(c)
        return self.class_size[c] - (int(mask.sum()) if mask is not None else 0)


def _member_order(grp: ChannelGroup, b: Builder) -> int:
    """Sort groups in graph order of their root member's space creation."""
    if grp.root is None:
        return 1 << 60
    return b.member_space.get((grp.root.target, grp.root.dim), 1 << 60)
