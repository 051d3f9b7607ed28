"""The student's intermediate values on calibration data, computed incrementally.

An execution engine for layer-wise re-fitting (``reconstruct``): the values a layer reads are
computed from cached values by running only the subgraph in between, and a layer whose weights
changed drops what lies downstream of it. Lives in ``runtime`` because it only runs models.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir


class StudentValues:
    """The student's intermediate values on the calibration data, at its *current* weights,
    computed incrementally.

    ``reconstruct`` needs each layer's input after the earlier layers were re-fitted; running the
    whole student once per layer costs a full forward pass (plus serialization and a session) per
    layer. Instead, values are cached per calibration feed, and a request runs only the nodes
    between the cached values (or graph inputs) and the requested ones; re-fitting a layer drops
    the cached values downstream of it (:meth:`invalidate`). onnxruntime runs the same kernels on
    the same inputs (``ORT_DISABLE_ALL``), so the values are those of a full run.

    Falls back to a full :func:`~onnxforge.runtime.activations.collect` when the subgraph needs
    something this cannot cut (a node with a subgraph attribute, a model-local function, a value
    of unknown type).
    """

    def __init__(self, model: ir.Model, data, max_samples: int | None):
        self.model, self.data, self.max_samples = model, data, max_samples
        self.cache: dict[str, list[np.ndarray]] = {}
        self.runs = {"subgraph": 0, "full": 0, "nodes": 0}
        self._order = {id(n): i for i, n in enumerate(model.graph)}
        self._values = {}
        for v in model.graph.inputs:
            self._values[v.name] = v
        for n in model.graph:
            for o in n.outputs:
                if o.name:
                    self._values[o.name] = o

    def get(self, names: list[str]) -> dict[str, list[np.ndarray]]:
        from onnxforge.runtime.activations import collect

        if any(v.name in names for v in self.model.graph.inputs):
            self._inputs()
        missing = [n for n in dict.fromkeys(names) if n not in self.cache]
        if missing:
            proto = self._subgraph(missing)
            if proto is None:
                got = collect(self.model, self.data, missing, max_samples=self.max_samples)
                self.runs["full"] += 1
            else:
                got = self._run(proto, missing)
            self.cache.update(got)
        return {n: self.cache[n] for n in names if n in self.cache}

    def keep(self, names: set[str]) -> None:
        """Drop cached values other than ``names`` and the graph inputs."""
        inputs = {v.name for v in self.model.graph.inputs}
        for n in list(self.cache):
            if n not in names and n not in inputs:
                del self.cache[n]

    def invalidate(self, node: ir.Node) -> None:
        """``node``'s weights changed: forget every cached value computed from its outputs."""
        seen: set[int] = set()
        stack = list(node.outputs)
        while stack:
            v = stack.pop()
            self.cache.pop(v.name, None)
            for user in v.consumers():
                if id(user) not in seen:
                    seen.add(id(user))
                    stack.extend(user.outputs)

    def _inputs(self) -> dict[str, list[np.ndarray]]:
        from onnxforge.runtime.activations import collect

        names = [v.name for v in self.model.graph.inputs]
        if not all(n in self.cache for n in names):
            self.cache.update(collect(self.model, self.data, names, max_samples=self.max_samples))
        return {n: self.cache[n] for n in names}

    def _subgraph(self, targets: list[str]):
        """A ``ModelProto`` computing ``targets`` from cached values, or None (use a full run)."""
        import onnx

        from onnxforge.runtime._model import tensor_proto_inline

        graph = self.model.graph
        graph_inputs = {v.name for v in graph.inputs}
        nodes: dict[int, ir.Node] = {}
        feeds: list[ir.Value] = []
        inits: dict[str, ir.Value] = {}
        stack = [self._values.get(n) for n in targets]
        seen: set[str] = set()
        while stack:
            v = stack.pop()
            if v is None:
                return None
            if v.name in seen:
                continue
            seen.add(v.name)
            producer = v.producer()
            if v.name in self.cache or v.name in graph_inputs:
                feeds.append(v)
            elif producer is None:
                if v.const_value is None or graph.initializers.get(v.name) is not v:
                    return None
                inits[v.name] = v
            else:
                if producer.domain not in ("", "ai.onnx") or any(
                        a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
                        for a in producer.attributes.values()):
                    return None
                nodes[id(producer)] = producer
                stack.extend(i for i in producer.inputs if i is not None)
        if any(v.name in graph_inputs for v in feeds):
            self._inputs()
        order = sorted(nodes.values(), key=lambda n: self._order.get(id(n), math.inf))
        def elem_type(v: ir.Value) -> int:
            if v.name in self.cache:
                return onnx.helper.np_dtype_to_tensor_dtype(self.cache[v.name][0].dtype)
            return int(v.dtype) if v.dtype is not None else 0

        proto = onnx.helper.make_model(
            onnx.helper.make_graph(
                [ir.serde.serialize_node(n) for n in order], "reconstruct_student",
                [onnx.helper.make_tensor_value_info(v.name, elem_type(v), None) for v in feeds],
                [onnx.ValueInfoProto(name=n) for n in targets],
                # inline: the proto goes to onnxruntime as bytes, where external references cannot resolve
                [tensor_proto_inline(v.const_value) for v in inits.values()]),
            opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in self.model.opset_imports.items()],
            ir_version=self.model.ir_version)
        for t, v in zip(proto.graph.initializer, inits.values()):
            t.name = v.name
        # Element types of the targets (exported graphs often carry none for intermediate values).
        known = {n: int(self._values[n].dtype) for n in targets if self._values[n].dtype is not None}
        if len(known) < len(targets):
            try:
                inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False)
            except Exception:  # e.g. a custom op shape inference does not know: run the whole model
                return None
            for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
                if vi.name in targets and vi.type.tensor_type.elem_type:
                    known.setdefault(vi.name, vi.type.tensor_type.elem_type)
        if len(known) < len(targets):
            return None
        del proto.graph.output[:]
        proto.graph.output.extend(onnx.helper.make_tensor_value_info(n, known[n], None) for n in targets)
        self._feeds = [v.name for v in feeds]
        self.runs["nodes"] += len(order)
        return proto

    def _run(self, proto, targets: list[str]) -> dict[str, list[np.ndarray]]:
        from onnxforge.runtime.session import make_session

        self.runs["subgraph"] += 1
        if not self._feeds:  # constants only
            out = make_session(proto, optimize="disable").session.run(targets, {})
            return {n: [a] for n, a in zip(targets, out)}
        session = make_session(proto, optimize="disable").session
        n_batches = len(self.cache[self._feeds[0]])
        got: dict[str, list[np.ndarray]] = {n: [] for n in targets}
        for b in range(n_batches):
            outs = session.run(targets, {n: self.cache[n][b] for n in self._feeds})
            for n, a in zip(targets, outs):
                got[n].append(a)
        return got
