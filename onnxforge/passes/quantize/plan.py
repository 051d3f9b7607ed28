"""Planning for ``quantize-int8``: which tensors get a QuantizeLinear/DequantizeLinear pair.

For the chosen nodes, :func:`plan_tensors` lists the activations to calibrate, the constants of int8
ops quantized from their values, the outputs of scale-sharing ops (they reuse their input's
qparams), the activations folded into a producer's Q range, and which tensors are rewired for every
reader (a quantized producer: onnxruntime fuses ``DQ -> op -> Q`` only when every reader reads the
DQ).
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from onnxforge.ir.graph import const_value
from onnxforge.passes.quantize.analysis import _DATA_INPUT, Analysis, _index, _is_float, _Positions, _role

# ------------------------------------------------------------------------------ planning


@dataclasses.dataclass
class Plan:
    """What to rewrite: quantized node indices, folded activations, per-tensor qparams sources."""

    chosen: set[int]
    folds: dict[int, int]  # activation node index -> producer node index it folds into
    calibrated: list[str]  # tensors whose range comes from calibration
    shared: list[tuple[str, str]]  # (output tensor, input tensor) of scale-sharing ops, in order
    constants: list[str]  # constant inputs of int8 ops, quantized from their values
    rewire_all: set[str]  # tensors produced by a quantized node: every reader reads the DQ
    quantized_consumers: dict[str, set[int]]  # tensor -> quantized node indices reading it
    int32_bias: bool = True  # onnxruntime's integer kernels want int32 bias; TensorRT keeps it float
    reduce_range: bool = True  # 7-bit weights behind uint8 inputs that could saturate u8s8 (see .isa)
    rescaled: list[tuple[str, str, float]] = dataclasses.field(default_factory=list)  # (out, in, factor)
    # (out, in, factor) of share (factor 1) and rescale ops in graph order: out's qparams are in's, scaled
    derived: list[tuple[str, str, float]] = dataclasses.field(default_factory=list)
    # weight initializer -> per-channel scale fixed by a rounding fit (.gptq); a floor of the scale
    weight_scales: dict[str, object] = dataclasses.field(default_factory=dict)

    def tensor_order(self) -> list[str]:
        return list(dict.fromkeys(list(self.calibrated) + list(self.constants) + [o for o, _ in self.shared]))


def plan_tensors(model: ir.Model, analysis: Analysis, chosen: set[int], *, target: str) -> Plan:
    nodes = list(model.graph)
    pos = _Positions(nodes)
    infos = analysis.infos
    folds: dict[int, int] = {}
    calibrated: dict[str, None] = {}
    shared: list[tuple[str, str]] = []
    constants: dict[str, None] = {}
    rewire_all: set[str] = set()
    qcons: dict[str, set[int]] = {}
    trt = target == "tensorrt"

    def out_tensor(idx: int) -> str:
        """The tensor a quantized node's output Q sits on (after a folded activation)."""
        out = nodes[idx].outputs[0]
        uses = out.uses()
        if not trt and len(uses) == 1 and not out.is_graph_output():
            c = uses[0].node
            ci = _index(c, pos)
            if _role(infos, ci) == "fold":
                folds[ci] = idx
                return c.outputs[0].name
        return out.name

    rescaled: list[tuple[str, str, float]] = []
    derived: list[tuple[str, str, float]] = []
    rescale_outs: set[str] = set()
    for idx in sorted(chosen):
        if infos[idx].role == "rescale":
            rescale_outs.add(nodes[idx].outputs[0].name)
    for idx in sorted(chosen):
        node = nodes[idx]
        info = infos[idx]
        if info.role == "dynamic":  # quantized by its kernel at run time: no Q/DQ (see .recurrent)
            continue
        if info.role == "rescale":
            # no Q/DQ of its own: its readers read its input's Q through a DQ with the scale times factor
            v = node.inputs[info.data_input]
            qcons.setdefault(v.name, set()).add(idx)
            rescaled.append((node.outputs[0].name, v.name, float(info.factor)))
            derived.append(rescaled[-1])
            continue
        for j, v in enumerate(node.inputs):
            if v is None or not _is_float(v):
                continue
            if v.name in rescale_outs:  # qparams derived from the rescale's input (see .rewrite)
                qcons.setdefault(v.name, set()).add(idx)
                continue
            if info.role == "weighted" and j in (info.weight_input, info.bias_input):
                continue
            if info.role == "share" and j != _DATA_INPUT:
                continue
            if info.op_type == "Resize" and j != 0:
                continue
            if trt and info.role == "int8":
                # TensorRT fuses Conv + residual Add: only the skip branch gets Q/DQ.
                p = v.producer()
                if p is not None and _role(infos, _index(p, pos)) == "weighted":
                    continue
            qcons.setdefault(v.name, set()).add(idx)
            if const_value(v) is not None:
                constants[v.name] = None
            elif info.role != "share":
                calibrated[v.name] = None
        if trt:
            continue
        if info.op_type in ("Gemm", "MatMul") and nodes[idx].outputs[0].is_graph_output():
            # Model outputs (logits) stay float: a uint8 Q on them erases the small differences
            # between classes; onnxruntime still fuses DQ -> Gemm/MatMul with a float output
            # (QGemm / MatMulIntegerToFloat).
            continue
        if info.role == "share" and len(node.outputs) > 1:
            # Split: every output keeps the input's qparams (onnxruntime drops the Q/DQ only then)
            for o in node.outputs:
                if _is_float(o) and o.name:
                    rewire_all.add(o.name)
                    shared.append((o.name, node.inputs[0].name))
                    derived.append((o.name, node.inputs[0].name, 1.0))
            continue
        out = out_tensor(idx)
        rewire_all.add(out)
        if info.role == "share":
            shared.append((out, node.inputs[0].name))
            derived.append((out, node.inputs[0].name, 1.0))
        else:
            calibrated[out] = None
    # inputs of share ops that are not produced by a quantized node need their own range
    produced = set(rewire_all)
    for out, src in shared:
        if src not in produced and src not in calibrated and src not in rescale_outs:
            calibrated[src] = None
    return Plan(set(chosen), folds, list(calibrated), shared, list(constants), rewire_all, qcons, int32_bias=not trt,
                rescaled=rescaled, derived=derived)

