"""Run a model on calibration data with intermediate values exposed, and collect them.

The model is never modified: it is serialized to a ``ModelProto`` and the named values are added to
that copy as extra graph outputs (element type from the IR, or from ONNX shape inference when the
IR has none). onnxruntime runs it with ``ORT_DISABLE_ALL`` so that the values are the graph's own,
not those of onnxruntime's fused rewrite.

Values that exist only inside an ``If``/``Loop``/``Scan`` body cannot be graph outputs; they are
reported in ``result.skipped`` with the reason instead of failing the whole collection.

``collect`` keeps every tensor (or what ``reducer`` makes of it); ``collect_stats`` streams each
tensor into a per-value reducer object (``update(name, array)``) so that, e.g., histogram
calibration over thousands of samples does not hold them all in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import onnx
import onnx_ir as ir

from onnxforge.runtime._model import ModelLike, as_ir, check_feeds, input_specs, serialize_inline
from onnxforge.runtime.data import CalibrationData
from onnxforge.runtime.session import make_session


class Reducer(Protocol):
    def update(self, name: str, array: np.ndarray) -> None: ...


class Activations(dict):
    """``{value name: [array per sample]}`` plus ``skipped: {value name: reason}``."""

    def __init__(self, *args: Any, skipped: Mapping[str, str] | None = None, n_samples: int = 0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.skipped: dict[str, str] = dict(skipped or {})
        self.n_samples = n_samples


class Stats(dict):
    """``{value name: reducer}`` plus ``skipped: {value name: reason}``."""

    def __init__(self, *args: Any, skipped: Mapping[str, str] | None = None, n_samples: int = 0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.skipped: dict[str, str] = dict(skipped or {})
        self.n_samples = n_samples


# --- built-in reducers --------------------------------------------------------------------------


class MinMax:
    """Running minimum and maximum (per tensor; per channel along ``axis`` when given)."""

    def __init__(self, axis: int | None = None):
        self.axis = axis
        self.min: np.ndarray | float | None = None
        self.max: np.ndarray | float | None = None
        self.count = 0

    def update(self, name: str, array: np.ndarray) -> None:
        array = np.asarray(array)
        if array.size == 0:
            return
        if self.axis is None:
            lo, hi = array.min(), array.max()
        else:
            moved = np.moveaxis(array, self.axis, 0).reshape(array.shape[self.axis], -1)
            lo, hi = moved.min(axis=1), moved.max(axis=1)
        self.min = lo if self.min is None else np.minimum(self.min, lo)
        self.max = hi if self.max is None else np.maximum(self.max, hi)
        self.count += 1


class ChannelMeanAbs:
    """Mean of ``|x|`` per channel (``axis``, default 1 = NCHW/NC), averaged over all samples.

    The usual activation-based importance score for channel pruning.
    """

    def __init__(self, axis: int = 1):
        self.axis = axis
        self.total: np.ndarray | None = None
        self.elements = 0

    def update(self, name: str, array: np.ndarray) -> None:
        array = np.abs(np.asarray(array, dtype=np.float64))
        moved = np.moveaxis(array, self.axis, 0).reshape(array.shape[self.axis], -1)
        sums = moved.sum(axis=1)
        self.total = sums if self.total is None else self.total + sums
        self.elements += moved.shape[1]

    @property
    def value(self) -> np.ndarray:
        if self.total is None:
            raise ValueError("ChannelMeanAbs saw no data")
        return self.total / max(self.elements, 1)


# --- exposing values ----------------------------------------------------------------------------


def _subgraph_owners(model: ir.Model) -> dict[str, str]:
    """Value names defined inside subgraphs -> a description of the node owning that subgraph."""
    owners: dict[str, str] = {}

    def visit(graph: ir.Graph, owner: str | None) -> None:
        for node in graph:
            if owner is not None:
                for out in node.outputs:
                    if out.name:
                        owners.setdefault(out.name, owner)
            for attr in node.attributes.values():
                if attr.type == ir.AttributeType.GRAPH:
                    sub = attr.value
                    label = owner or f"{node.op_type} node {node.name or '(unnamed)'!r}"
                    for v in sub.inputs:
                        if v.name:
                            owners.setdefault(v.name, label)
                    visit(sub, label)
                elif attr.type == ir.AttributeType.GRAPHS:
                    label = owner or f"{node.op_type} node {node.name or '(unnamed)'!r}"
                    for sub in attr.value:
                        for v in sub.inputs:
                            if v.name:
                                owners.setdefault(v.name, label)
                        visit(sub, label)

    visit(model.graph, None)
    return owners


def _main_graph_values(model: ir.Model) -> dict[str, ir.Value]:
    values: dict[str, ir.Value] = {}
    for v in model.graph.inputs:
        values[v.name] = v
    for name, v in model.graph.initializers.items():
        values.setdefault(name, v)
    for node in model.graph:
        for out in node.outputs:
            if out.name:
                values[out.name] = out
    return values


def expose_values(
    model: ModelLike, value_names: Sequence[str]
) -> tuple[onnx.ModelProto, list[str], dict[str, str], set[str]]:
    """A ``ModelProto`` copy of ``model`` with ``value_names`` as extra graph outputs.

    Returns ``(proto, exposed names, skipped {name: reason}, names that are graph inputs)``. Graph
    inputs are not added as outputs: their values are the feeds themselves.
    """
    model_ir = as_ir(model)
    values = _main_graph_values(model_ir)
    owners = _subgraph_owners(model_ir)
    input_names = {v.name for v in model_ir.graph.inputs}
    output_names = {v.name for v in model_ir.graph.outputs}
    proto = serialize_inline(model_ir)

    skipped: dict[str, str] = {}
    to_add: list[str] = []
    exposed: list[str] = []
    from_inputs: set[str] = set()
    for name in dict.fromkeys(value_names):  # unique, in order
        if name in values:
            exposed.append(name)
            if name in input_names and name not in model_ir.graph.initializers:
                from_inputs.add(name)
            elif name not in output_names:
                to_add.append(name)
        elif name in owners:
            skipped[name] = (
                f"defined only inside the subgraph of {owners[name]}; subgraph values cannot be exposed "
                "as graph outputs"
            )
        else:
            skipped[name] = "no value with this name in the main graph"

    elem_types: dict[str, int] = {}
    unknown = []
    for name in to_add:
        dtype = values[name].dtype
        if dtype is not None:
            elem_types[name] = int(dtype)
        else:
            unknown.append(name)
    if unknown:
        try:
            inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False)
            for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
                if vi.name in unknown and vi.type.tensor_type.elem_type:
                    elem_types[vi.name] = vi.type.tensor_type.elem_type
        except Exception:  # shape inference gives up on some custom ops: handled below
            pass
    for name in to_add:
        if name not in elem_types:
            skipped[name] = "its element type is unknown, even after ONNX shape inference"
            exposed.remove(name)
            continue
        # Element type only: a stale or wrong shape annotation would make onnxruntime complain.
        proto.graph.output.append(onnx.helper.make_tensor_value_info(name, elem_types[name], None))
    return proto, exposed, skipped, from_inputs


def _iter_samples(
    data: CalibrationData | Iterable[Mapping[str, Any]], max_samples: int | None
) -> Iterable[Mapping[str, Any]]:
    if isinstance(data, CalibrationData):
        yield from data.take(max_samples)
        return
    for i, feeds in enumerate(data):
        if max_samples is not None and i >= max_samples:
            return
        yield feeds


def _stream(
    model: ModelLike,
    data: CalibrationData | Iterable[Mapping[str, Any]],
    value_names: Sequence[str],
    providers: Sequence[str],
    max_samples: int | None,
    sink: Callable[[str, np.ndarray], None],
) -> tuple[list[str], dict[str, str], int]:
    model_ir = as_ir(model)
    proto, exposed, skipped, from_inputs = expose_values(model_ir, value_names)
    specs = input_specs(model_ir)
    fetch = [n for n in exposed if n not in from_inputs]
    session = None
    if fetch:
        session = make_session(proto, providers, optimize="disable").session
    n = 0
    for i, feeds in enumerate(_iter_samples(data, max_samples)):
        feeds = check_feeds(feeds, specs, where=f"calibration sample {i}")
        outputs = dict(zip(fetch, session.run(fetch, feeds))) if session is not None else {}
        for name in exposed:
            sink(name, feeds[name] if name in from_inputs else outputs[name])
        n += 1
    return exposed, skipped, n


def collect(
    model: ModelLike,
    data: CalibrationData | Iterable[Mapping[str, Any]],
    value_names: Sequence[str],
    *,
    providers: Sequence[str] = ("cpu",),
    max_samples: int | None = None,
    reducer: Callable[[str, np.ndarray], Any] | None = None,
) -> Activations:
    """``{value name: [array per sample]}`` for the named intermediate values of ``model``.

    ``reducer(name, array)``, when given, is applied to each array and its result is stored
    instead (e.g. ``lambda n, a: np.abs(a).max()``). Values that cannot be exposed are in
    ``result.skipped`` (name -> reason) and absent from the dict.
    """
    store: dict[str, list[Any]] = {name: [] for name in dict.fromkeys(value_names)}

    def sink(name: str, array: np.ndarray) -> None:
        store[name].append(reducer(name, array) if reducer is not None else array)

    exposed, skipped, n = _stream(model, data, value_names, providers, max_samples, sink)
    return Activations({name: store[name] for name in exposed}, skipped=skipped, n_samples=n)


def collect_stats(
    model: ModelLike,
    data: CalibrationData | Iterable[Mapping[str, Any]],
    value_names: Sequence[str],
    reducer_factory: Callable[[], Reducer],
    *,
    providers: Sequence[str] = ("cpu",),
    max_samples: int | None = None,
) -> Stats:
    """Stream every sample's value into a reducer: ``{value name: reducer}``.

    ``reducer_factory()`` is called once per value name; each tensor is passed to
    ``reducer.update(name, array)`` and then dropped. Skipped values are in ``result.skipped``.
    """
    reducers: dict[str, Reducer] = {}

    def sink(name: str, array: np.ndarray) -> None:
        if name not in reducers:
            reducers[name] = reducer_factory()
        reducers[name].update(name, array)

    exposed, skipped, n = _stream(model, data, value_names, providers, max_samples, sink)
    for name in exposed:  # a value seen on no sample still gets its (empty) reducer
        reducers.setdefault(name, reducer_factory())
    return Stats({name: reducers[name] for name in exposed}, skipped=skipped, n_samples=n)
