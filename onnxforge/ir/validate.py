"""Is this a well-formed ONNX model? Checked when a model comes in and before one goes out.

* :func:`check_input` (called by :func:`onnxforge.ir.io.load` on the parsed ``ModelProto``, before
  ``onnx_ir`` sees it): a structural walk that names the offending node -- every node input is a graph
  input, an initializer, an outer-scope value or the output of an *earlier* node (a later one means a
  cycle or nodes out of order; none means a dangling input, e.g. a dropped initializer); no value is
  defined twice; every graph output is defined; the graph has outputs; the default-domain opset is
  one onnx knows and imported once; every string field is valid UTF-8 -- then
  ``onnx.checker.check_model(full_check=True)`` (schemas, attributes, tensor sizes, types by strict
  shape inference) on a weightless view: initializers that
  are external or over 64 KiB are shown to it as typed graph inputs, their raw-data sizes checked here.
  The weights are not copied (the checker serializes what it is given), and external data is not read
  (only its locations, by :mod:`onnxforge.ir.io`).
* :func:`check_structure` is the same walk on an ``onnx_ir.Model`` (no serialization, O(nodes)); the
  pipeline runs it after every pass that changed the model, so a pass that leaves a dangling input
  or a cycle is named at once.
* :func:`check_file` runs ``onnx.checker.check_model(path, full_check=True)`` on a written file,
  which :func:`onnxforge.ir.io.save` calls on the temporary file before the atomic rename, so an
  invalid model never reaches the destination. With external data (every model over 2 GiB, and
  streamed ones) the path form reads only the graph, never the weights; an inline model (< 2 GiB) is
  parsed once more by the checker. Where shape inference would need a constant held in external data
  (a Reshape's shape) it falls back to the check without shape inference.

Every failure is one line: :class:`~onnxforge.errors.ModelLoadError` for input,
:class:`MalformedModelError` (a ``ValueError``) for the callers to wrap.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

import numpy as np
import onnx
import onnx_ir as ir
from google.protobuf.descriptor import FieldDescriptor as _FD

from onnxforge.errors import ModelLoadError

__all__ = ["MalformedModelError", "check_file", "check_input", "check_proto", "check_structure"]

_MAX_MESSAGE = 300


class MalformedModelError(ValueError):
    """A model is not well-formed ONNX; the message is one line naming the node or value."""


# --------------------------------------------------------------------------- input


def check_input(proto: onnx.ModelProto, origin: str) -> None:
    """Refuse a malformed model at load with a one-line :class:`ModelLoadError`.

    The checker sees a weightless view of ``proto`` (:func:`_checker_view`): its large and external
    initializers become typed graph inputs, after their byte sizes are checked here. So the weights
    are not copied again, and external-data files are judged only by
    :func:`onnxforge.ir.io.check_external_paths` (its own rules and errors).
    """
    try:
        _check_opsets(proto)
        _check_strings(proto, "model")
        _walk_graph_proto(proto.graph, outer=frozenset(), where="graph")
        view = _checker_view(proto)
        # External tensors elsewhere (Constant nodes, subgraphs, functions: rare) would make the
        # checker judge data files relative to the working directory; then the walk above is it.
        if not _uses_external_data(view):
            _run_checker(view)
    except MalformedModelError as exc:
        raise ModelLoadError(f"{origin} is not a valid ONNX model: {exc}") from None


def check_proto(proto: onnx.ModelProto, *, full_check: bool = True) -> None:
    """Structural walk, opset range, then ``onnx.checker`` on ``proto`` (tensors inline).

    Raises:
        MalformedModelError: the first problem found, in one line.
    """
    _check_opsets(proto)
    _check_strings(proto, "model")
    _walk_graph_proto(proto.graph, outer=frozenset(), where="graph")
    if proto.ByteSize() >= 2**31:  # checker needs the path form; the structural walk already ran
        return
    _run_checker(proto, full_check)


_MISSING_IO_SHAPE = "Field 'shape' of 'type' is required but missing"


def _run_checker(proto: onnx.ModelProto, full_check: bool = True, relax_shapes: bool = True) -> None:
    try:
        onnx.checker.check_model(proto, full_check=full_check)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        if _MISSING_IO_SHAPE in str(exc):
            # onnx.checker wants a shape on every graph input/output; onnxruntime does not (it runs
            # such models), and a user's model that onnxruntime runs must not be refused. Check a
            # copy whose shapeless inputs/outputs take their inferred types instead.
            filled = _with_inferred_io_types(proto)
            if filled is None:
                return  # nothing to infer them from: the structural walk is the check
            return _run_checker(filled, full_check, relax_shapes)
        if relax_shapes and isinstance(exc, onnx.shape_inference.InferenceError):
            # Declared shapes (value_info, graph outputs) that contradict inference are stale
            # exporter annotations: onnxruntime runs such models and the passes correct them
            # (onnxforge.ir.shapes). The model is valid if it is without them (types stay checked).
            try:
                return _run_checker(_without_declared_shapes(proto), full_check, relax_shapes=False)
            except MalformedModelError:
                pass
        raise MalformedModelError(f"onnx.checker: {_one_line(exc)}") from None
    except Exception as exc:  # other C++ errors surface as RuntimeError / ValueError
        raise MalformedModelError(f"onnx.checker: {type(exc).__name__}: {_one_line(exc)}") from None


def _without_declared_shapes(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``proto`` without the shapes of its ``value_info`` entries (all graphs), and whose
    main-graph outputs take the shapes inference gives them (where it gives none, the declared one
    stays, for the checker to judge); element types are kept."""
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)

    def strip(graph: onnx.GraphProto) -> None:
        for vi in graph.value_info:
            if vi.type.HasField("tensor_type"):
                vi.type.tensor_type.ClearField("shape")
        for node in graph.node:
            for attr in node.attribute:
                for g in [attr.g] if attr.HasField("g") else list(attr.graphs):
                    strip(g)

    strip(copy.graph)
    probe = onnx.ModelProto()
    probe.CopyFrom(copy)
    del probe.graph.output[:]  # (inference fills value_info, never the outputs' missing shapes)
    try:
        inferred = {vi.name: vi for vi in onnx.shape_inference.infer_shapes(probe).graph.value_info}
    except Exception:
        inferred = {}
    inputs = {vi.name: vi for vi in copy.graph.input}
    for vi in copy.graph.output:
        got = inputs.get(vi.name) or inferred.get(vi.name)  # an input passed through: its own type
        if vi.type.HasField("tensor_type") and got is not None and got.type.tensor_type.HasField("shape") \
                and got.type.tensor_type.elem_type == vi.type.tensor_type.elem_type:
            vi.type.tensor_type.shape.CopyFrom(got.type.tensor_type.shape)
    return copy


def _with_inferred_io_types(proto: onnx.ModelProto) -> onnx.ModelProto | None:
    """A copy of ``proto`` whose main-graph inputs/outputs without a shape take the type shape
    inference gives them; None when inference cannot give one of them a shape."""
    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
    except Exception:  # inference failures are judged by the checker proper, not here
        return None
    known = {vi.name: vi.type for vi in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]
             if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape")}
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    for vi in [*copy.graph.input, *copy.graph.output]:
        if vi.type.HasField("tensor_type") and not vi.type.tensor_type.HasField("shape"):
            if vi.name not in known:
                return None
            vi.type.CopyFrom(known[vi.name])
    return copy


def _check_strings(message, path: str) -> None:
    """Every string field holds valid UTF-8 (protobuf hands back ``bytes`` where it does not, and
    onnx_ir then fails at the first serialization, far from the cause). Tensor data are ``bytes`` or
    numeric fields, never iterated."""
    for field, value in message.ListFields():
        repeated = _is_repeated(field)
        if field.type == _FD.TYPE_MESSAGE:
            if repeated:
                for i, item in enumerate(value):
                    _check_strings(item, f"{path}.{field.name}[{i}]")
            else:
                _check_strings(value, f"{path}.{field.name}")
        elif field.type == _FD.TYPE_STRING:
            for item in value if repeated else (value,):
                if not isinstance(item, str):
                    raise MalformedModelError(f"{path}.{field.name} is not valid UTF-8: {bytes(item)[:60]!r}")


def _is_repeated(field) -> bool:
    flag = getattr(field, "is_repeated", None)  # protobuf >= 6; older ones have ``label``
    return bool(flag) if flag is not None else field.label == _FD.LABEL_REPEATED


def _uses_external_data(proto: onnx.ModelProto) -> bool:
    def in_nodes(nodes):
        for node in nodes:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    yield from sub.initializer
                    yield from in_nodes(sub.node)

    def tensors():
        yield from proto.graph.initializer
        yield from in_nodes(proto.graph.node)
        for function in proto.functions:
            yield from in_nodes(function.node)

    return any(onnx.external_data_helper.uses_external_data(t) for t in tensors())


#: Initializers larger than this (64 KiB) are shown to onnx.checker as typed graph inputs (their sizes are
#: checked in Python): the checker serializes and re-parses whatever it is given.
CHECKER_INLINE_LIMIT_BYTES = 1 << 16


def _checker_view(proto: onnx.ModelProto, limit: int = CHECKER_INLINE_LIMIT_BYTES) -> onnx.ModelProto:
    """``proto`` without its large or external main-graph initializers (typed graph inputs instead)."""
    view = onnx.ModelProto()
    view.ir_version = proto.ir_version
    view.opset_import.extend(proto.opset_import)
    view.functions.extend(proto.functions)
    view.metadata_props.extend(proto.metadata_props)
    src, graph = proto.graph, view.graph
    graph.name = src.name
    graph.node.extend(src.node)
    graph.input.extend(src.input)
    graph.output.extend(src.output)
    graph.value_info.extend(src.value_info)
    graph.sparse_initializer.extend(src.sparse_initializer)
    inputs = {v.name for v in src.input}
    for tensor in src.initializer:
        if onnx.external_data_helper.uses_external_data(tensor) or tensor.ByteSize() > limit:
            _check_tensor_size(tensor)
            if tensor.name not in inputs:
                graph.input.append(
                    onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))
                )
        else:
            graph.initializer.append(tensor)
    return view


def _check_tensor_size(tensor: onnx.TensorProto) -> None:
    """Raw data of an inline tensor has exactly the bytes its dtype and shape need."""
    if onnx.external_data_helper.uses_external_data(tensor) or not tensor.HasField("raw_data"):
        return
    try:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    except Exception:  # noqa: BLE001 -- an unknown data type: the checker on the rest will say
        raise MalformedModelError(f"initializer {tensor.name!r} has unknown data type {tensor.data_type}") from None
    count = 1
    for d in tensor.dims:
        count *= int(d)
    bits = {onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4}.get(tensor.data_type)
    if bits is None and getattr(onnx.TensorProto, "FLOAT4E2M1", None) == tensor.data_type:
        bits = 4
    expected = (count * bits + 7) // 8 if bits else count * np.dtype(dtype).itemsize
    if np.dtype(dtype).kind in "OSU":  # strings are never raw data
        raise MalformedModelError(f"initializer {tensor.name!r}: a string tensor cannot hold raw data")
    if len(tensor.raw_data) != expected:
        raise MalformedModelError(
            f"initializer {tensor.name!r}: {len(tensor.raw_data)} bytes of raw data for shape "
            f"{list(tensor.dims)} of {onnx.TensorProto.DataType.Name(tensor.data_type)} (needs {expected})"
        )


def _check_opsets(proto: onnx.ModelProto) -> None:
    latest = onnx.defs.onnx_opset_version()
    seen: dict[str, int] = {}
    for opset in proto.opset_import:
        domain = "" if opset.domain == "ai.onnx" else opset.domain
        if domain in seen:
            raise MalformedModelError(
                f"opset domain {opset.domain or 'ai.onnx'!r} is imported twice (versions {seen[domain]} "
                f"and {opset.version}); which one applies is undefined"
            )
        seen[domain] = opset.version
        if opset.domain in ("", "ai.onnx"):
            if not 1 <= opset.version <= latest:
                raise MalformedModelError(
                    f"default-domain opset {opset.version} is outside 1..{latest} (what onnx "
                    f"{onnx.__version__} knows)"
                )


def _node_label(node: onnx.NodeProto, index: int) -> str:
    return f"node {node.name or f'#{index}'!r} ({node.op_type})"


def _walk_graph_proto(graph: onnx.GraphProto, outer: frozenset[str], where: str) -> None:
    defined = set(outer)
    for value in graph.input:
        defined.add(value.name)
    for tensor in graph.initializer:
        defined.add(tensor.name)
    for tensor in graph.sparse_initializer:
        defined.add(tensor.values.name)
    produced = {out for node in graph.node for out in node.output if out}
    for i, node in enumerate(graph.node):
        for name in node.input:
            if name and name not in defined:
                raise MalformedModelError(_undefined(where, _node_label(node, i), name, name in produced))
        for attr in node.attribute:
            subgraphs = [attr.g] if attr.HasField("g") else list(attr.graphs)
            for sub in subgraphs:
                _walk_graph_proto(sub, frozenset(defined), f"{where} > {_node_label(node, i)} attribute {attr.name!r}")
        for name in node.output:
            if not name:
                continue
            if name in defined and name not in outer:
                raise MalformedModelError(
                    f"{where}: {_node_label(node, i)} defines {name!r}, which is already defined "
                    "(duplicate definition)"
                )
            defined.add(name)
    _check_outputs(where, [o.name for o in graph.output], defined, is_main=where == "graph")


def _undefined(where: str, label: str, name: str, later: bool) -> str:
    if later:
        return (
            f"{where}: {label} reads {name!r} before any node produces it "
            "(a cycle, or nodes not in topological order)"
        )
    return (
        f"{where}: {label} reads {name!r}, which no node, graph input or initializer defines "
        "(a dangling input, e.g. a missing initializer)"
    )


def _check_outputs(where: str, outputs: list[str], defined: Iterable[str], is_main: bool) -> None:
    if not outputs:
        raise MalformedModelError(f"{where} has no outputs")
    defined = set(defined)
    for name in outputs:
        if not name or name not in defined:
            raise MalformedModelError(
                f"{where}: output {name!r} is not produced by any node, input or initializer"
            )


# --------------------------------------------------------------------------- in-memory model


def check_structure(model: ir.Model) -> None:
    """The structural walk on an ``onnx_ir`` model (main graph, subgraphs, functions).

    Raises:
        MalformedModelError: a node reads a value produced later (cycle / order), or one that no
            node, graph input or initializer defines (dangling); two values share a name; a graph
            output is undefined; or the main graph has no outputs.
    """
    _walk_graph(model.graph, outer_values=set(), outer_names=set(), where="graph")
    for function in model.functions.values():
        where = f"function {function.domain}::{function.name}"
        _walk_graph(function, outer_values=set(), outer_names=set(), where=where, is_function=True)


def _walk_graph(graph, outer_values: set, outer_names: set, where: str, is_function: bool = False) -> None:
    available = set(outer_values)
    names: dict[str, ir.Value] = {}

    def define(value: ir.Value, what: str) -> None:
        available.add(value)
        name = value.name
        if not name:
            return
        other = names.get(name)
        if other is not None and other is not value:
            raise MalformedModelError(f"{where}: {what} defines {name!r}, which another value already defines "
                                      "(duplicate definition)")
        names[name] = value

    for value in graph.inputs:
        define(value, f"input {value.name!r}")
    if not is_function:
        for value in graph.initializers.values():
            define(value, f"initializer {value.name!r}")
    nodes = list(graph)
    node_ids = {id(n) for n in nodes}
    for i, node in enumerate(nodes):
        label = f"node {node.name or f'#{i}'!r} ({node.op_type})"
        for value in node.inputs:
            if value is None or value in available:
                continue
            if value.name in outer_names and value.producer() is None and not value.is_graph_input():
                continue  # an outer-scope reference by name onnx_ir could not resolve to an object
            producer = value.producer()
            later = producer is not None and id(producer) in node_ids
            raise MalformedModelError(_undefined(where, label, value.name or "<unnamed>", later))
        for attr in node.attributes.values():
            subgraphs = []
            if attr.type == ir.AttributeType.GRAPH:
                subgraphs = [attr.value]
            elif attr.type == ir.AttributeType.GRAPHS:
                subgraphs = list(attr.value)
            for sub in subgraphs:
                _walk_graph(sub, available, outer_names | set(names), f"{where} > {label} attribute {attr.name!r}")
        for value in node.outputs:
            define(value, label)
    if not graph.outputs and not is_function and where == "graph":
        raise MalformedModelError(f"{where} has no outputs")
    for value in graph.outputs:
        if value not in available:
            raise MalformedModelError(
                f"{where}: output {value.name!r} is not produced by any node, input or initializer"
            )


# --------------------------------------------------------------------------- written file


def check_file(path: str | os.PathLike) -> None:
    """``onnx.checker.check_model(path, full_check=True)``: the path form reads external data
    locations relative to the file and works above protobuf's 2 GiB limit.

    Raises:
        MalformedModelError: the checker's first complaint, in one line.
    """
    try:
        try:
            onnx.checker.check_model(os.fspath(path), full_check=True)
        except onnx.shape_inference.InferenceError as exc:
            # Shape inference cannot read constant inputs (a Reshape's shape) from external data
            # files; then the check without shape inference is what the path form can do.
            if "external tensors" not in str(exc):
                raise
            onnx.checker.check_model(os.fspath(path), full_check=False)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise MalformedModelError(f"onnx.checker: {_one_line(exc)}") from None
    except Exception as exc:  # other C++ errors surface as RuntimeError / ValueError
        raise MalformedModelError(f"onnx.checker: {type(exc).__name__}: {_one_line(exc)}") from None


def _one_line(exc: BaseException) -> str:
    text = re.sub(r"\s+", " ", str(exc)).strip() or type(exc).__name__
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 3] + "..."
