"""Graph queries and small edits every pass needs.

These are thin, well-tested wrappers over ``onnx_ir`` so that passes say what they mean
(``const_value(v)``, ``is_shared(v)``, ``replace_all_uses(old, new)``) instead of repeating the
details: Constant nodes carry weights as well as initializers (PaddlePaddle's and some torch
exports), graph outputs must keep their names when a value is replaced, and subgraphs of
If/Loop/Scan and function bodies are graphs too.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx_ir as ir

__all__ = [
    "adopt_orphan_constants",
    "all_graphs",
    "all_nodes",
    "const_tensor",
    "const_value",
    "consumers",
    "graph_output_values",
    "is_graph_output",
    "is_overridable",
    "is_shared",
    "iter_tensors",
    "make_initializer",
    "node_attr",
    "opset_version",
    "replace_all_uses",
    "keep_interface",
    "restore_interface",
    "unique_name",
]

# Attribute names a Constant node can carry its value under (ONNX opset >= 12).
_CONSTANT_ATTRS = (
    "value",
    "value_float",
    "value_floats",
    "value_int",
    "value_ints",
    "value_string",
    "value_strings",
)


# --------------------------------------------------------------------------- constants


def const_tensor(value: ir.Value | None) -> ir.TensorProtocol | None:
    """The constant tensor behind ``value``, without materializing it, or None.

    A value is constant when it is an initializer with data (``value.const_value``) or the
    output of a default-domain ``Constant`` node (any of its ``value*`` attributes). Graph
    inputs that are also initializers are *not* constant: the caller may override them.
    """
    if value is None:
        return None
    if value.const_value is not None:
        if value.is_graph_input():
            return None
        return value.const_value
    node = value.producer()
    if node is None or node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
        return None
    if len(node.attributes) != 1:
        return None
    name, attr = next(iter(node.attributes.items()))
    if attr.is_ref() or name not in _CONSTANT_ATTRS or name == "sparse_value":
        return None
    if name == "value":
        return attr.as_tensor()
    if name in ("value_float", "value_floats"):
        return ir.Tensor(np.asarray(attr.value, dtype=np.float32), name=value.name)
    if name in ("value_int", "value_ints"):
        return ir.Tensor(np.asarray(attr.value, dtype=np.int64), name=value.name)
    data = attr.value
    strings = [data] if isinstance(data, (str, bytes)) else list(data)
    encoded = [s.encode() if isinstance(s, str) else s for s in strings]
    array = np.asarray(encoded[0] if name == "value_string" else encoded, dtype=np.bytes_)
    return ir.StringTensor(array, name=value.name)


def is_overridable(value: ir.Value | None) -> bool:
    """Whether ``value`` is an initializer that is also a graph input: a default the caller may
    override at run time (older exporters write every weight so). Never treat it as a constant."""
    return value is not None and value.is_graph_input() and value.const_value is not None


def const_value(value: ir.Value | None) -> np.ndarray | None:
    """The constant array behind ``value`` (initializer or Constant node), or None.

    Returns a numpy array; for external (memory-mapped) initializers the array is a read-only
    view of the file, so copy it before writing to it. Scalars attributes (``value_float``,
    ``value_int``) give 0-d arrays, list attributes 1-d arrays; string constants give an array
    of ``bytes``.
    """
    tensor = const_tensor(value)
    if tensor is None:
        return None
    return tensor.numpy()


# --------------------------------------------------------------------------- uses


def consumers(value: ir.Value) -> list[ir.Node]:
    """Nodes that read ``value`` (deduplicated, in first-use order), subgraph captures included.

    A node that reads the value twice appears once. A node inside an If/Loop body that reads
    the value from the outer scope counts as a consumer, because onnx_ir records that use.
    """
    return list(value.consumers())


def is_graph_output(value: ir.Value) -> bool:
    """Whether ``value`` is an output of the graph that owns it."""
    return value.is_graph_output()


def is_shared(value: ir.Value) -> bool:
    """Whether more than one thing reads ``value``: several nodes, or a node and a graph output.

    A fusion that folds a weight into its consumer must refuse when the weight is shared;
    otherwise the other reader would see the folded weight.
    """
    readers = len(value.consumers())
    if value.is_graph_output():
        readers += 1
    return readers > 1


def graph_output_values(graph: ir.Graph) -> list[ir.Value]:
    """The graph's output values, in order."""
    return list(graph.outputs)


def replace_all_uses(old: ir.Value, new: ir.Value) -> None:
    """Make every reader of ``old`` read ``new`` instead, keeping graph output names stable.

    If ``old`` is a graph output, ``new`` takes its place in the outputs *and* its name, so the
    model's interface does not change (callers feed and fetch by name). If ``new`` is itself a
    graph input or already a graph output (its name is part of the interface, or a value cannot
    be listed twice), an ``Identity`` node named after ``old`` is inserted instead.
    """
    if old is new:
        return
    if old.is_graph_output():
        graph = old.graph
        assert graph is not None
        name = old.name
        target = new
        if new.is_graph_input() or new.is_graph_output() or new.is_initializer():
            identity = ir.node("Identity", inputs=[new], num_outputs=1)
            target = identity.outputs[0]
            target.type = old.type or new.type
            target.shape = old.shape or new.shape
            _insert_before_first_use_or_append(graph, identity)
        old.name = None  # free the name before giving it to the replacement
        old.replace_all_uses_with(target, replace_graph_outputs=True)
        target.name = name
    else:
        old.replace_all_uses_with(new)


def restore_interface(graph: ir.Graph, inputs: list[str | None], outputs: list[str | None]) -> int:
    """Give ``graph``'s inputs and outputs the names ``inputs`` / ``outputs`` again. Returns the fixes.

    Callers fetch and feed by name, so a pass must not rename the interface. Wrapped passes sometimes
    do: onnxscript's constant folder replaces an output listed twice by a copy named ``<name>_1``, or
    an output computed as ``Reshape(Reshape(x))`` by the input ``x`` itself, renaming the *input*.
    Repairs: an input gets its name back; an output listing points back at the value that still has
    its name, else an unshared node output is renamed, else (a graph input, an initializer or a value
    listed under another name) an ``Identity`` named after the output is inserted.
    """
    fixes = 0
    for value, name in zip(graph.inputs, inputs):
        if name and value.name != name:
            value.name = name
            fixes += 1
    for i, name in enumerate(outputs):
        value = graph.outputs[i]
        if not name or value.name == name:
            continue
        fixes += 1
        holder = next((v for v in graph.outputs if v.name == name), None)
        if holder is not None:
            graph.outputs[i] = holder
            continue
        listed_elsewhere = any(v is value for j, v in enumerate(graph.outputs) if j != i and outputs[j] != name)
        if value.is_graph_input() or value.is_initializer() or listed_elsewhere:
            identity = ir.node("Identity", inputs=[value], num_outputs=1)
            copy = identity.outputs[0]
            copy.type, copy.shape = value.type, value.shape
            graph.append(identity)
            identity.name = unique_name(graph, f"{name}_identity")
            copy.name = name
            graph.outputs[i] = copy
        else:
            value.name = name
    return fixes


class keep_interface:  # noqa: N801 - used as a context manager, named for what it does
    """``with keep_interface(graph):`` — :func:`restore_interface` with the names from before."""

    def __init__(self, graph: ir.Graph):
        self.graph = graph
        self.fixes = 0

    def __enter__(self) -> "keep_interface":
        self.inputs = [v.name for v in self.graph.inputs]
        self.outputs = [v.name for v in self.graph.outputs]
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.fixes = restore_interface(self.graph, self.inputs, self.outputs)


def _insert_before_first_use_or_append(graph: ir.Graph, node: ir.Node) -> None:
    graph.append(node)
    producer = node.inputs[0].producer() if node.inputs and node.inputs[0] is not None else None
    if producer is not None and producer.graph is graph:
        graph.remove(node)
        graph.insert_after(producer, node)
    if not node.name:
        node.name = unique_name(graph, "Identity")


# --------------------------------------------------------------------------- traversal


def all_graphs(model: ir.Model) -> Iterator[ir.Graph]:
    """The main graph, every subgraph (If/Loop/Scan bodies, recursively) and function bodies."""
    seen: set[int] = set()
    tops = [model.graph] + [function.graph for function in model.functions.values()]
    for top in tops:
        for graph in (top, *top.subgraphs()):
            if id(graph) not in seen:
                seen.add(id(graph))
                yield graph


def all_nodes(model: ir.Model) -> Iterator[ir.Node]:
    """Every node of :func:`all_graphs`, graph by graph."""
    for graph in all_graphs(model):
        yield from graph


def iter_tensors(model: ir.Model) -> Iterator[tuple[ir.Graph, ir.Value | ir.Node, str, Any]]:
    """Every tensor stored in the model: ``(graph, owner, attr_name, tensor)``.

    ``owner`` is the initializer value (``attr_name == ""``) or the node whose tensor attribute
    (``value`` of Constant, or any TENSOR/TENSORS attribute) holds it. Covers subgraphs and
    function bodies. Reading the tuple does not load external data.
    """
    for graph in all_graphs(model):
        for value in graph.initializers.values():
            if value.const_value is not None:
                yield graph, value, "", value.const_value
        for node in graph:
            for name, attr in node.attributes.items():
                if attr.is_ref() or attr.value is None:
                    continue
                if attr.type == ir.AttributeType.TENSOR:
                    yield graph, node, name, attr.value
                elif attr.type == ir.AttributeType.TENSORS:
                    for tensor in attr.value:
                        yield graph, node, name, tensor


# --------------------------------------------------------------------------- names and edits


def _taken_names(graph: ir.Graph) -> set[str]:
    # Names must be unique across a graph and its subgraphs (outer-scope capture is by name).
    names: set[str] = set()
    graphs = [graph, *graph.subgraphs()]
    for g in graphs:
        names.update(v.name for v in g.inputs if v.name)
        names.update(v.name for v in g.outputs if v.name)
        names.update(g.initializers.keys())
        for node in g:
            if node.name:
                names.add(node.name)
            names.update(v.name for v in node.outputs if v.name)
    return names


def unique_name(graph: ir.Graph, base: str, *, taken: set[str] | None = None) -> str:
    """``base`` if no value or node in ``graph`` (and its subgraphs) uses it, else ``base_1``, ...

    Pass ``taken`` (a set you keep updated) to avoid rescanning the graph in a loop.
    """
    names = _taken_names(graph) if taken is None else taken
    candidate = base
    i = 0
    while candidate in names:
        i += 1
        candidate = f"{base}_{i}"
    if taken is not None:
        taken.add(candidate)
    return candidate


def adopt_orphan_constants(model: ir.Model) -> int:
    """Register, under fresh names, constant values that nodes read but no graph holds. Returns how many.

    onnxscript's rewriter adds a rule's new initializers by name and *overwrites* an existing one of
    the same name (``RewriteRuleSet._apply_to_graph_or_function``: its "already exists" check only
    ``continue``\ s an inner loop). The names rules invent (``<W>_bias``, ``<x>_min``,
    ``<value>/shape``) can be taken, and the overwritten value's readers are left with an input no
    graph defines. Run after applying rules; a no-op when nothing was overwritten.
    """
    adopted = 0
    taken: set[str] | None = None
    for graph in (model.graph, *model.graph.subgraphs()):
        for node in graph:
            for value in node.inputs:
                if value is None or value.const_value is None or value.producer() is not None:
                    continue
                if value.is_initializer() or value.is_graph_input():
                    continue
                if taken is None:
                    taken = _taken_names(model.graph)
                value.name = unique_name(graph, value.name or "constant", taken=taken)
                graph.register_initializer(value)
                adopted += 1
    return adopted


def make_initializer(graph: ir.Graph, name: str, array: np.ndarray | ir.TensorProtocol) -> ir.Value:
    """Add ``array`` to ``graph`` as an initializer under a unique name derived from ``name``.

    The value gets the tensor's dtype and shape. Returns the new value.
    """
    tensor = array if isinstance(array, ir.TensorProtocol) else ir.tensor(np.asarray(array))
    unique = unique_name(graph, name)
    tensor.name = unique
    value = ir.Value(
        name=unique,
        shape=ir.Shape(tensor.shape),
        type=ir.TensorType(tensor.dtype),
        const_value=tensor,
    )
    graph.register_initializer(value)
    return value


def opset_version(model: ir.Model, domain: str = "") -> int | None:
    """The opset version the model imports for ``domain`` ("" and "ai.onnx" are the same)."""
    imports = model.opset_imports
    if domain in ("", "ai.onnx"):
        return imports.get("", imports.get("ai.onnx"))
    return imports.get(domain)


def node_attr(node: ir.Node, name: str, default: Any = None) -> Any:
    """The Python value of attribute ``name`` of ``node`` (ints, floats, lists, tensors, graphs).

    Returns ``default`` when the attribute is absent or is a reference to a function
    attribute. Tensor attributes are returned as numpy arrays.
    """
    attr = node.attributes.get(name)
    if attr is None or attr.is_ref():
        return default
    if attr.type == ir.AttributeType.TENSOR:
        return attr.value.numpy()
    if attr.type in (ir.AttributeType.INTS, ir.AttributeType.FLOATS, ir.AttributeType.STRINGS):
        return list(attr.value)
    return attr.value
