"""``convert-fp16``: float16 weights and compute, with numerically sensitive ops kept in float32.

The rewrite, in the spirit of onnxconverter-common's ``float16.convert_float_to_float16`` (as
vendored in ``onnxruntime.transformers.float16``) but on ``onnx_ir`` so that it composes with the
pipeline and reports what it did:

1. Every node that touches a float32 tensor is put in one of two regions:

   - **float32** (kept): its op is in ``keep_ops`` (default: Softmax/LogSoftmax, the normalizations,
     every Reduce*, Exp, Pow, Resize, and ops the float16 converters traditionally block: TopK,
     CumSum, Range, NonMaxSuppression, RoiAlign, Upsample), its name is in ``keep_nodes``, it is not a
     standard ONNX op (no schema says it accepts float16), its ONNX schema does not allow float16 at
     one of its float inputs/outputs (e.g. ``NonMaxSuppression``), or it holds a subgraph
     (``If``/``Loop``/``Scan`` bodies are left as they are);
   - **float16**: everything else.

   Nodes without float inputs (``Constant``, ``Cast`` from an integer, ``ConstantOfShape``, random
   generators) follow their readers: float16 if any reader wants float16.

2. Each float value gets the type of the region that produces it (graph inputs: float32 with
   ``keep_io_types``). Where a reader wants the other type, one ``Cast`` per (value, type) is
   inserted right after the producer. Inputs whose schema fixes ``tensor(float)`` (Resize's
   ``scales``) always read float32. With ``keep_io_types`` the model's inputs and outputs stay
   float32: a Cast follows each input and precedes each output (the output keeps its name).

3. Float32 initializers and Constant tensors that some float16 reader uses are stored as float16,
   values outside the float16 range clamped to ±65504 (instead of overflowing to inf); the others
   (e.g. LayerNormalization's scale and bias) stay float32.

Lossy. float16 has an 11-bit significand (relative rounding 2^-11 ≈ 4.9e-4 per operation) and a
range of ±65504. The stated bound is ``tolerance`` = 1e-2: max absolute output error relative to
the output's largest magnitude. Measured on the zoo models (digits_cnn, mobilenetv3_style with
depthwise convs, HardSwish and squeeze-excitation, yolo_style, a 2-layer BERT-style encoder at 128
tokens): 2e-4 to 4.4e-4, so the bound leaves a 20x margin for deeper models; badly scaled models
can still do worse (check with ``--verify`` or ``onnxforge compare``).

The result runs on onnxruntime's CPU provider, which computes ops it has no float16 kernel for in
float32 behind casts of its own (slower than the float32 model: up to 15x on mobilenetv3_style, see
BENCHMARKS.md). The pass is for GPU targets (CUDA, TensorRT), where float16 halves the weight
bytes and memory traffic and runs on tensor cores.

Why not call ``onnxruntime.transformers.float16.convert_float_to_float16``: it works on
``ModelProto`` (a round trip out of ``onnx_ir`` in the middle of the pipeline), blocks ops by a
fixed list instead of their ONNX schemas, names Casts by string concatenation, and records nothing
about what it kept in float32 or why. Its choices that are kept here: Casts at the region
boundaries shared per value, ``keep_io_types``, Resize's ``scales`` left float32, clamping to the
float16 range, initializers used only by float32 nodes left float32.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_ir as ir

from onnxforge.errors import UnsupportedModelError
from onnxforge.ir.graph import unique_name
from onnxforge.ir.io import release, spill
from onnxforge.passes.base import Pass, PassStats
from onnxforge.passes.registry import register_pass

logger = logging.getLogger(__name__)

__all__ = ["ConvertFloat16Pass", "DEFAULT_KEEP_OPS"]

DEFAULT_KEEP_OPS: tuple[str, ...] = (
    # Normalizers and reductions: sums of many terms lose digits and can overflow 65504.
    "Softmax",
    "LogSoftmax",
    "LayerNormalization",
    "GroupNormalization",
    "InstanceNormalization",
    "LpNormalization",
    "MeanVarianceNormalization",
    "ReduceMean",
    "ReduceSum",
    "ReduceSumSquare",
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "ReduceProd",
    # Range-sensitive elementwise ops: exp(12) > 65504; x**2 of a 256 overflows.
    "Exp",
    "Pow",
    # Coordinate arithmetic: pixel positions above 2048 are not representable exactly in float16.
    "Resize",
    "Upsample",
    "RoiAlign",
    "NonMaxSuppression",
    "TopK",
    "CumSum",
    "Range",
)

_FLOAT = ir.DataType.FLOAT
_FLOAT16 = ir.DataType.FLOAT16
_FP16_MAX = float(np.finfo(np.float16).max)
_STANDARD_DOMAINS = ("", "ai.onnx")
# Readers that only look at a tensor's shape: any element type will do, so no Cast for them.
_SHAPE_ONLY_OPS = {"Shape", "Size"}
# Ops whose float output type is set by an attribute rather than by a float input.
_DTYPE_ATTR_OPS = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "EyeLike"}


def _is_float(value: ir.Value | None) -> bool:
    return value is not None and value.dtype == _FLOAT


def _attr_value(node: ir.Node, name: str):
    attr = node.attributes.get(name)
    return None if attr is None or attr.is_ref() else attr.value


def _has_subgraph(node: ir.Node) -> bool:
    return any(
        attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
        for attr in node.attributes.values()
        if not attr.is_ref()
    )


def _to_float16(array: np.ndarray) -> tuple[np.ndarray, int]:
    """``array`` as float16, finite values clamped into float16's range; also the clamp count."""
    array = np.asarray(array, dtype=np.float32)
    finite = np.isfinite(array)
    over = finite & (np.abs(array) > _FP16_MAX)
    clamped = int(np.count_nonzero(over))
    if clamped:
        array = np.where(over, np.sign(array) * _FP16_MAX, array)
    return array.astype(np.float16), clamped


class _Schemas:
    """Which inputs/outputs of a node accept float16, per the ONNX schema at the model's opset."""

    def __init__(self, opsets: dict[str, int]):
        self._opset = opsets.get("", opsets.get("ai.onnx", onnx.defs.onnx_opset_version()))
        self._cache: dict[tuple[str, str], onnx.defs.OpSchema | None] = {}

    def get(self, node: ir.Node) -> onnx.defs.OpSchema | None:
        if node.domain not in _STANDARD_DOMAINS:
            return None
        key = (node.op_type, node.domain)
        if key not in self._cache:
            try:
                self._cache[key] = onnx.defs.get_schema(node.op_type, self._opset, "")
            except onnx.defs.SchemaError:
                self._cache[key] = None
        return self._cache[key]

    @staticmethod
    def _formal(params, index: int):
        if not params:
            return None
        if index < len(params):
            return params[index]
        last = params[-1]
        return last if last.option == onnx.defs.OpSchema.FormalParameterOption.Variadic else None

    @staticmethod
    def _allows(schema: onnx.defs.OpSchema, formal) -> tuple[bool, bool]:
        """(accepts float16, fixed to tensor(float))."""
        if formal is None:
            return False, False
        type_str = formal.type_str
        for constraint in schema.type_constraints:
            if constraint.type_param_str == type_str:
                return "tensor(float16)" in constraint.allowed_type_strs, False
        return type_str == "tensor(float16)", type_str == "tensor(float)"

    def input(self, schema: onnx.defs.OpSchema, index: int) -> tuple[bool, bool]:
        return self._allows(schema, self._formal(schema.inputs, index))

    def output(self, schema: onnx.defs.OpSchema, index: int) -> tuple[bool, bool]:
        return self._allows(schema, self._formal(schema.outputs, index))


@register_pass("convert-fp16")
class ConvertFloat16Pass(Pass):
    """Convert float32 weights and compute to float16, keeping sensitive ops and the model's I/O in float32.

    Options:
        keep_ops: op types computed in float32 (inputs cast up, outputs cast down); None means
            :data:`DEFAULT_KEEP_OPS`. Give ``[]`` to convert every op that has a float16 schema.
        keep_nodes: node names computed in float32 (for a layer that measures badly).
        keep_io_types: keep the model's float inputs and outputs float32 (Casts at the edges), so
            callers feed and fetch the same arrays as before.

    Lossy; the bound is ``tolerance`` (max abs error / max |output|), see the module docstring.
    """

    lossless = False
    tolerance = 1e-2

    def __init__(
        self,
        keep_ops: list[str] | None = None,
        keep_nodes: list[str] | None = None,
        keep_io_types: bool = True,
    ):
        super().__init__()
        self.keep_ops = keep_ops
        self.keep_nodes = keep_nodes
        self.keep_io_types = keep_io_types

    # ------------------------------------------------------------------ driver

    def run(self, model: ir.Model, stats: PassStats) -> bool:
        graph = model.graph
        self._ensure_types(model, stats)
        keep_ops = set(DEFAULT_KEEP_OPS if self.keep_ops is None else self.keep_ops)
        keep_nodes = set(self.keep_nodes or ())
        schemas = _Schemas(dict(model.opset_imports))

        # 1. Regions. fp16 nodes; everything that touches floats and is not in it stays float32.
        fp16_nodes: set[ir.Node] = set()
        sources: list[ir.Node] = []  # nodes with float outputs but no float inputs
        for node in graph:
            float_in = [i for i, v in enumerate(node.inputs) if _is_float(v)]
            float_out = [i for i, v in enumerate(node.outputs) if _is_float(v)]
            if not float_in and not float_out:
                continue
            if node.domain in _STANDARD_DOMAINS and (
                (not float_in and node.op_type in ("Constant", "Cast", "ConstantOfShape", *_DTYPE_ATTR_OPS))
                or (node.op_type == "Cast" and _attr_value(node, "to") == _FLOAT)
            ):
                sources.append(node)
                continue
            reason = self._keep_reason(node, float_in, float_out, keep_ops, keep_nodes, schemas)
            if reason is None:
                fp16_nodes.add(node)
            elif node.op_type not in _SHAPE_ONLY_OPS:
                stats.skip(node, reason)
                stats.count("nodes_kept_fp32")

        # 2. What type each reader wants.
        def wants(node: ir.Node, index: int) -> ir.DataType | None:
            """Type ``node`` wants at input ``index``; None: whatever it is given."""
            if node.graph is graph and (node.op_type in _SHAPE_ONLY_OPS or node.op_type == "Cast"):
                # Shape/Size read no elements; Cast reads any type (and casting float32 straight to
                # its target loses nothing that a float16 detour would keep).
                return None
            if node.graph is not graph or node not in fp16_nodes:
                return _FLOAT
            schema = schemas.get(node)
            assert schema is not None
            accepts, fixed = schemas.input(schema, index)
            return _FLOAT16 if accepts and not fixed else _FLOAT

        io_type = _FLOAT if self.keep_io_types else _FLOAT16
        output_values = {id(v) for v in graph.outputs}

        def reader_types(value: ir.Value) -> set[ir.DataType]:
            types = {wants(use.node, use.idx) for use in value.uses()}
            if id(value) in output_values:
                types.add(io_type)
            types.discard(None)
            return types

        # Sources follow their readers; so do float initializers.
        for node in sources:
            if any(_FLOAT16 in reader_types(v) for v in node.outputs if _is_float(v)):
                fp16_nodes.add(node)

        # Only values that were float32 on the way in are ours to retype and cast; a model that is
        # already partly float16 keeps those parts as they are.
        was_float = {id(v) for v in graph.inputs if _is_float(v)}
        was_float |= {id(v) for v in graph.initializers.values() if _is_float(v)}
        was_float |= {id(v) for node in graph for v in node.outputs if _is_float(v)}

        changed = False
        # 3. Retype outputs of float16 nodes and rewrite their type-setting attributes.
        for node in graph:
            if node not in fp16_nodes:
                continue
            if self._retype_node(node, stats):
                stats.count("nodes_fp16")
                changed = True

        # 4. Float32 initializers read in float16 become float16.
        for value in list(graph.initializers.values()):
            if not _is_float(value) or value.is_graph_input() or value.const_value is None:
                continue
            if _FLOAT16 in reader_types(value):
                # One weight at a time: the float16 copy goes to the spill file (when one is
                # active) and the float32 original is unmapped, so memory stays at one tensor.
                old = value.const_value
                array, clamped = _to_float16(old.numpy())
                value.const_value = spill(ir.tensor(array, name=value.name))
                release(old)
                value.dtype = _FLOAT16
                stats.count("initializers_fp16")
                stats.count("weights_fp16_bytes", array.nbytes)
                del array, old
                if clamped:
                    stats.count("weights_clamped", clamped)
                changed = True

        # 5. Graph inputs without keep_io_types are fed float16.
        if not self.keep_io_types:
            for value in graph.inputs:
                if _is_float(value) and value.name not in graph.initializers:
                    value.dtype = _FLOAT16
                    changed = True

        # 6. Casts where a reader wants the other type; graph outputs keep their names and types.
        taken = _names(graph)
        cast_cache: dict[tuple[int, ir.DataType], ir.Value] = {}
        values = [*graph.inputs, *graph.initializers.values()]
        values += [v for node in graph for v in node.outputs]
        for value in values:
            if id(value) not in was_float:
                continue
            for use in list(value.uses()):
                want = wants(use.node, use.idx)
                if want is None or want == value.dtype:
                    continue
                cast = self._cast(graph, value, want, cast_cache, taken, stats)
                use.node.replace_input_with(use.idx, cast)
                changed = True
        for i, value in enumerate(list(graph.outputs)):
            if id(value) in was_float and value.dtype != io_type:
                name = value.name
                value.name = unique_name(graph, f"{name}_{'fp16' if value.dtype == _FLOAT16 else 'fp32'}",
                                         taken=taken)
                cast = self._cast(graph, value, io_type, cast_cache, taken, stats, name=name)
                graph.outputs[i] = cast
                changed = True

        stats.details["keep_ops"] = sorted(keep_ops)
        logger.info(
            "convert-fp16: %d nodes float16, %d kept float32, %d initializers converted, %d casts",
            stats.counts["nodes_fp16"], stats.counts["nodes_kept_fp32"],
            stats.counts["initializers_fp16"], stats.counts["casts_inserted"],
        )
        return changed

    # ------------------------------------------------------------------ pieces

    def _ensure_types(self, model: ir.Model, stats: PassStats) -> None:
        """Element types of all values are needed to know what is float; infer them if missing."""

        def untyped() -> list[str]:
            return [
                v.name or "<unnamed>"
                for node in model.graph
                for v in node.outputs
                if v.dtype is None and (v.uses() or v.is_graph_output())
            ]

        if not untyped():
            return
        ir.passes.common.ShapeInferencePass(strict_mode=False)(model)
        stats.note("some element types were unknown: ran ONNX shape inference first")
        missing = untyped()
        if missing:
            raise UnsupportedModelError(
                f"convert-fp16: cannot tell the element type of {len(missing)} value(s) "
                f"(e.g. {missing[:3]}) even after ONNX shape inference; run 'onnxforge optimize' "
                f"with shape inference fixed, or list their producers in keep_nodes"
            )

    def _keep_reason(self, node, float_in, float_out, keep_ops, keep_nodes, schemas) -> str | None:
        if node.op_type in keep_ops and node.domain in _STANDARD_DOMAINS:
            return "numerically sensitive op kept in float32 (keep_ops)"
        if node.name and node.name in keep_nodes:
            return "node kept in float32 (keep_nodes)"
        if _has_subgraph(node):
            return "control flow with a subgraph is left in float32 (its body is not converted)"
        schema = schemas.get(node)
        if schema is None:
            return f"no ONNX schema for {node.domain or 'ai.onnx'}::{node.op_type}; kept in float32"
        for i in float_in:
            accepts, fixed = schemas.input(schema, i)
            if not accepts and not fixed:
                return f"ONNX schema of {node.op_type} has no float16 at input {i}"
        for i in float_out:
            accepts, _ = schemas.output(schema, i)
            if not accepts:
                return f"ONNX schema of {node.op_type} has no float16 at output {i}"
        return None

    def _retype_node(self, node: ir.Node, stats: PassStats) -> bool:
        """Make a float16-region node produce float16; whether any output changed type."""
        retyped = False
        for value in node.outputs:
            if _is_float(value):
                value.dtype = _FLOAT16
                retyped = True
        if not retyped:
            return False  # only reads floats (e.g. a Cast to int): nothing to rewrite
        op = node.op_type
        if op == "Cast" and node.attributes.get("to") is not None:
            if node.attributes["to"].value == _FLOAT:
                node.attributes["to"] = ir.AttrInt64("to", _FLOAT16)
        elif op == "Constant":
            self._convert_constant(node, stats)
        elif op == "ConstantOfShape":
            attr = node.attributes.get("value")
            if attr is None:
                node.attributes["value"] = ir.AttrTensor("value", ir.tensor(np.zeros(1, np.float16)))
            elif attr.value.dtype == _FLOAT:
                array, _ = _to_float16(attr.value.numpy())
                node.attributes["value"] = ir.AttrTensor("value", ir.tensor(array))
        elif op in _DTYPE_ATTR_OPS:
            attr = node.attributes.get("dtype")
            if attr is not None and attr.value == _FLOAT:
                node.attributes["dtype"] = ir.AttrInt64("dtype", _FLOAT16)
            elif attr is None and op in ("RandomNormal", "RandomUniform"):
                node.attributes["dtype"] = ir.AttrInt64("dtype", _FLOAT16)
        return True

    @staticmethod
    def _convert_constant(node: ir.Node, stats: PassStats) -> None:
        (name, attr), = node.attributes.items()
        if name == "value":
            array = attr.value.numpy()
        elif name in ("value_float", "value_floats"):
            array = np.asarray(attr.value, dtype=np.float32)
        else:  # not a float constant; its output was not float
            return
        array16, clamped = _to_float16(array)
        node.attributes.clear()
        node.attributes["value"] = ir.AttrTensor("value", ir.tensor(array16))
        stats.count("constants_fp16")
        if clamped:
            stats.count("weights_clamped", clamped)

    @staticmethod
    def _cast(
        graph: ir.Graph,
        value: ir.Value,
        to: ir.DataType,
        cache: dict[tuple[int, ir.DataType], ir.Value],
        taken: set[str],
        stats: PassStats,
        name: str | None = None,
    ) -> ir.Value:
        key = (id(value), to)
        if key in cache and name is None:
            return cache[key]
        suffix = "fp16" if to == _FLOAT16 else "fp32"
        out_name = name or unique_name(graph, f"{value.name}_to_{suffix}", taken=taken)
        node = ir.node(
            "Cast",
            [value],
            {"to": ir.AttrInt64("to", to)},
            name=unique_name(graph, f"{value.name}_cast_{suffix}", taken=taken),
        )
        out = node.outputs[0]
        out.name = out_name
        out.dtype = to
        out.shape = value.shape
        producer = value.producer()
        if producer is not None and producer.graph is graph:
            graph.insert_after(producer, node)
        elif len(graph) > 0:
            graph.insert_before(graph.node(0), node)
        else:
            graph.append(node)
        if name is None:
            cache[key] = out
        stats.count("casts_inserted")
        return out


def _names(graph: ir.Graph) -> set[str]:
    """Every value and node name of ``graph`` and its subgraphs (for :func:`unique_name`)."""
    names: set[str] = set(graph.initializers)
    for g in (graph, *graph.subgraphs()):
        names.update(v.name for v in (*g.inputs, *g.outputs) if v.name)
        for node in g:
            if node.name:
                names.add(node.name)
            names.update(v.name for v in node.outputs if v.name)
    return names


def convert_float16(model: ir.Model, **options) -> ir.Model:
    """Convenience: run :class:`ConvertFloat16Pass` on ``model`` in place and return it."""
    ConvertFloat16Pass(**options)(model)
    return model

