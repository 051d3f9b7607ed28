"""The data model of channel dependency analysis: elements, layouts, spaces, cuts, the union-find
that ties elements into classes, and the groups pruning acts on (see :mod:`.dependency` for how a
sweep over the graph fills it in)."""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Any

import numpy as np
import onnx_ir as ir


@dataclasses.dataclass
class Layout:
    """Which axis of a tensor carries pruned channels, and the element at each position."""

    axis: int
    rank: int
    elems: np.ndarray  # int64, len == size of the axis
    # ``tiled``: the axis is ``batch x len(elems)`` merged (position ``p`` carries ``elems[p % n]``),
    # as when attention heads are folded into the batch axis; only Transpose and Reshape accept it.
    tiled: bool = False


@dataclasses.dataclass
class Space:
    """A prunable channel dimension: the output channels of ``node`` (or a blocked filler)."""

    index: int
    start: int  # first element id
    size: int
    node: ir.Node | None
    value: ir.Value | None
    filler: bool = False

    @property
    def elems(self) -> np.ndarray:
        return np.arange(self.start, self.start + self.size, dtype=np.int64)


@dataclasses.dataclass
class Cut:
    """Something to slice when elements are removed.

    kind ``param``: constant ``value`` (initializer or Constant output) along ``axis``;
    kind ``shape``: entry ``axis`` of the 1-D shape/sizes constant ``value`` read by ``node`` input
    ``input_index`` becomes the number of kept positions;
    kind ``split``: output ``axis`` of Split ``node``; kind ``group``: the ``group`` attribute of ``node``.
    ``role`` says what the slice is for importance (``out_weight``, ``in_weight``, ``bias``,
    ``bn_scale``, ``bn``, ``other``).
    """

    kind: str
    node: ir.Node
    value: ir.Value | None
    axis: int
    elems: np.ndarray
    role: str = "other"
    input_index: int = -1


class UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []

    def add(self, n: int) -> int:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return start

    def find(self, x: int) -> int:
        parent = self.parent
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:
            parent[x], x = root, parent[x]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            if ra < rb:
                self.parent[rb] = ra
            else:
                self.parent[ra] = rb

    def roots(self) -> np.ndarray:
        return np.array([self.find(i) for i in range(len(self.parent))], dtype=np.int64)


@dataclasses.dataclass
class Group:
    """A connected set of spaces whose channels are pruned together; ``classes`` are the units."""

    index: int
    spaces: list[Space]
    classes: np.ndarray  # root ids of the prunable (unblocked) classes
    all_classes: np.ndarray  # every class root, blocked ones included
    blocked: dict[int, str]  # class root -> reason
    unit_size: int = 1  # elements per class per space (1 = channels; >1 = attention heads)

    @property
    def name(self) -> str:
        return ", ".join(s.node.name or s.node.op_type for s in self.spaces if s.node is not None)


class Dependency:
    """The result of :func:`analyze`: spaces, cuts, ties, blocked elements and layouts per value."""

    def __init__(self, model: ir.Model) -> None:
        self.model = model
        self.uf = UnionFind()
        self.spaces: list[Space] = []
        self.elem_space: list[int] = []
        self.cuts: list[Cut] = []
        self.layouts: dict[ir.Value, Layout] = {}
        self.blocked: dict[int, str] = {}
        self.block_nodes: dict[int, ir.Node] = {}
        self.shapes: dict[str, tuple | None] = {}
        self.opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
        self._groups: list[Group] | None = None

    # --- construction ---------------------------------------------------------------------------

    def new_space(self, node: ir.Node | None, value: ir.Value | None, size: int, filler: bool = False) -> Space:
        start = self.uf.add(size)
        space = Space(len(self.spaces), start, size, node, value, filler)
        self.spaces.append(space)
        self.elem_space.extend([space.index] * size)
        return space

    def block(self, elems: np.ndarray | None, reason: str, node: ir.Node | None = None) -> None:
        if elems is None:
            return
        for e in np.asarray(elems).ravel().tolist():
            if e not in self.blocked:
                self.blocked[e] = reason
                if node is not None:
                    self.block_nodes[e] = node

    def tie(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.tolist(), b.tolist()):
            self.uf.union(x, y)

    def cut(self, kind: str, node: ir.Node, value: ir.Value | None, axis: int, elems: np.ndarray,
            role: str = "other", input_index: int = -1) -> None:
        self.cuts.append(Cut(kind, node, value, axis, np.asarray(elems, dtype=np.int64), role, input_index))

    # --- queries --------------------------------------------------------------------------------

    def roots(self) -> np.ndarray:
        return self.uf.roots()

    def groups(self) -> list[Group]:
        """Connected spaces, their classes, and which classes are blocked (and why)."""
        if self._groups is not None:
            return self._groups
        roots = self.roots()
        # Spaces are connected when any of their elements share a class.
        space_uf = UnionFind()
        space_uf.add(len(self.spaces))
        first_space_of_root: dict[int, int] = {}
        for e, r in enumerate(roots.tolist()):
            s = self.elem_space[e]
            if r in first_space_of_root:
                space_uf.union(first_space_of_root[r], s)
            else:
                first_space_of_root[r] = s
        members: dict[int, list[Space]] = defaultdict(list)
        for s in self.spaces:
            members[space_uf.find(s.index)].append(s)
        groups = []
        for spaces in members.values():
            if all(s.filler for s in spaces):
                continue
            elems = np.concatenate([s.elems for s in spaces])
            elem_roots = roots[elems]
            all_classes = np.unique(elem_roots)
            blocked: dict[int, str] = {}
            for e, r in zip(elems.tolist(), elem_roots.tolist()):
                if e in self.blocked and r not in blocked:
                    blocked[r] = self.blocked[e]
            for s in spaces:
                if s.filler:
                    for r in np.unique(roots[s.elems]).tolist():
                        blocked.setdefault(r, "channels from an input that is not prunable")
            prunable = np.array([r for r in all_classes.tolist() if r not in blocked], dtype=np.int64)
            real = [s for s in spaces if not s.filler]
            unit = max(1, int(round(max(s.size for s in real) / max(1, len(np.unique(roots[real[0].elems]))))))
            groups.append(Group(len(groups), spaces, prunable, all_classes, blocked, unit))
        self._groups = groups
        return groups

    def describe(self) -> list[dict[str, Any]]:
        rows = []
        for g in self.groups():
            rows.append({
                "group": g.index,
                "layers": [s.node.name for s in g.spaces if s.node is not None and not s.filler],
                "channels": int(len(g.all_classes)),
                "prunable": int(len(g.classes)),
                "blocked": sorted(set(g.blocked.values())),
            })
        return rows
