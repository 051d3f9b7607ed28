"""Microbenchmark: does each op type pay in int8 inside an int8 region on this CPU? (issue 11)

For every op type onnxforge could keep in int8, two models of the same op on uint8 tensors
(``DQ -> op -> Q``; two-input ops read two DQs) run interleaved in one process:

* ``int8``: onnxruntime with all graph optimizations, so its QDQ transformers replace the group
  with the integer kernel (QLinearSigmoid, QLinearAdd, ...) or drop the Q/DQ of data movement;
* ``broken``: the same graph with ``session.disable_quant_qdq=1``: the op runs in float between a
  DequantizeLinear and a QuantizeLinear, which is what a float op costs in the middle of an int8
  region.

``ratio = int8 / broken`` below 1 means keeping the op in int8 pays; the table
``onnxforge/passes/quantize/kernels.py:MEASURED`` records these ratios with the CPU's int8 path.
Composite rows: ``HardSwish`` as ``x * Clip(x + 3, 0, 6) / 6`` in int8 (QLinearAdd, Clip folded
into the Q range, QLinearMul, the ``/ 6`` folded into a DQ scale) and ``HardSigmoid`` as the same
without the Mul, each against the float op between DQ and Q (the ratio of their rows).

    .venv/bin/python bench/bench_int8_ops.py [--shape 1,64,56,56] [--rounds 15] [--threads 1]

Medians of interleaved rounds; on a shared machine the ratio is what to read, not the times.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

U8 = TensorProto.UINT8
F = TensorProto.FLOAT


def _qp(prefix: str, scale: float, zp: int) -> list[onnx.TensorProto]:
    return [helper.make_tensor(prefix + "_s", F, [], [scale]), helper.make_tensor(prefix + "_z", U8, [], [zp])]


def _graph(op: str, shape: list[int]) -> onnx.ModelProto:
    """uint8 input(s) -> DQ -> op -> Q -> uint8 output (op-specific constants as initializers)."""
    n, c, h, w = shape
    inits = _qp("x", 0.05, 128) + _qp("y", 0.05, 128) + _qp("o", 0.05, 128)
    nodes = [helper.make_node("DequantizeLinear", ["x", "x_s", "x_z"], ["xf"])]
    inputs = [helper.make_tensor_value_info("x", U8, shape)]
    out_shape = list(shape)
    attrs: dict = {}
    op_inputs = ["xf"]
    if op in ("Add", "Mul", "Concat"):
        inputs.append(helper.make_tensor_value_info("y", U8, shape))
        nodes.append(helper.make_node("DequantizeLinear", ["y", "y_s", "y_z"], ["yf"]))
        op_inputs.append("yf")
        if op == "Concat":
            attrs["axis"] = 1
            out_shape[1] *= 2
    elif op == "LeakyRelu":
        attrs["alpha"] = 0.1
    elif op == "Softmax":
        attrs["axis"] = -1
    elif op in ("AveragePool", "MaxPool"):
        attrs.update(kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1])
    elif op == "GlobalAveragePool":
        out_shape = [n, c, 1, 1]
    elif op == "Resize":
        inits += [helper.make_tensor("scales", F, [4], [1, 1, 2, 2])]
        op_inputs += ["", "scales"]
        attrs["mode"] = "nearest"
        out_shape = [n, c, 2 * h, 2 * w]
    elif op == "Transpose":
        attrs["perm"] = [0, 2, 3, 1]
        out_shape = [n, h, w, c]
    elif op == "Reshape":
        inits.append(helper.make_tensor("shape", TensorProto.INT64, [2], [n, -1]))
        op_inputs.append("shape")
        out_shape = [n, c * h * w]
    elif op == "Slice":
        inits += [helper.make_tensor(k, TensorProto.INT64, [1], [v]) for k, v in
                  (("starts", 0), ("ends", c // 2), ("axes", 1))]
        op_inputs += ["starts", "ends", "axes"]
        out_shape[1] = c // 2
    if op in ("HardSwish(int8 decomposed)", "HardSigmoid(int8 decomposed)"):
        inits += [helper.make_tensor("three", F, [], [3.0])] + _qp("three_q", 3.0 / 255, 0)
        inits += _qp("h", 6.0 / 255, 0) + _qp("h6", 1.0 / 255, 0)
        nodes += [
            helper.make_node("QuantizeLinear", ["three", "three_q_s", "three_q_z"], ["three_q"]),
            helper.make_node("DequantizeLinear", ["three_q", "three_q_s", "three_q_z"], ["three_f"]),
            helper.make_node("DequantizeLinear", ["x", "x_s", "x_z"], ["xf2"]),
            helper.make_node("Add", ["xf2", "three_f"], ["a"]),
            helper.make_node("QuantizeLinear", ["a", "h_s", "h_z"], ["a_q"]),  # saturation = Clip(0, 6)
            helper.make_node("DequantizeLinear", ["a_q", "h6_s", "h6_z"], ["hs"]),  # / 6 in the scale
        ]
        if op.startswith("HardSwish"):
            nodes.append(helper.make_node("Mul", ["xf", "hs"], ["r"]))
        else:  # HardSigmoid's readers read the clip's Q directly (scale 1/255): no Q of its own
            g = helper.make_graph(nodes, op, inputs, [helper.make_tensor_value_info("a_q", U8, out_shape)], inits)
            return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    elif op == "HardSigmoid":
        nodes.append(helper.make_node("HardSigmoid", ["xf"], ["r"], alpha=1.0 / 6.0, beta=0.5))
    elif op == "HardSwish":
        nodes.append(helper.make_node("HardSwish", ["xf"], ["r"]))
    elif op == "Split":
        nodes.append(helper.make_node("Split", ["xf"], ["r", "r2"], axis=1, num_outputs=2))
        out_shape[1] = c // 2
    else:
        nodes.append(helper.make_node(op, op_inputs, ["r"], **attrs))
    nodes.append(helper.make_node("QuantizeLinear", ["r", "o_s", "o_z"], ["out"]))
    outputs = [helper.make_tensor_value_info("out", U8, out_shape)]
    if op == "Split":
        nodes.append(helper.make_node("QuantizeLinear", ["r2", "o_s", "o_z"], ["out2"]))
        outputs.append(helper.make_tensor_value_info("out2", U8, out_shape))
    g = helper.make_graph(nodes, op, inputs, outputs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 9
    return m


OPS = ["Sigmoid", "LeakyRelu", "Softmax", "Add", "Mul", "Concat", "AveragePool", "GlobalAveragePool",
       "MaxPool", "Resize", "Transpose", "Reshape", "Slice", "Split", "HardSwish", "HardSwish(int8 decomposed)",
       "HardSigmoid", "HardSigmoid(int8 decomposed)"]


def main() -> None:
    import onnxruntime as ort

    from onnxforge.runtime.bench import bench_interleaved
    from onnxforge.runtime.cpu import detect_isa
    from onnxforge.runtime.session import SessionInfo

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="1,64,56,56")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ops", default=",".join(OPS), help="comma-separated subset (names as in OPS)")
    args = ap.parse_args()
    shape = [int(x) for x in args.shape.split(",")]
    isa = detect_isa()
    print(f"CPU: {isa.model_name}; int8 path {isa.path}; onnxruntime {ort.__version__}; threads {args.threads}; "
          f"shape {shape}")
    rng = np.random.default_rng(0)
    feeds = {"x": rng.integers(0, 256, shape, dtype=np.uint8), "y": rng.integers(0, 256, shape, dtype=np.uint8)}
    broken: dict[str, float] = {}
    print("| op | int8 ms | float between DQ/Q ms | ratio | int8 kernel after fusion |")
    print("|---|---:|---:|---:|---|")
    for op in args.ops.split(","):
        model = _graph(op, shape).SerializeToString()
        sessions = {}
        for label, disable in (("int8", "0"), ("broken", "1")):
            so = ort.SessionOptions()
            so.intra_op_num_threads = args.threads
            so.log_severity_level = 3  # unused y_s/y_z initializers of one-input ops: not worth a warning
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            so.add_session_config_entry("session.disable_quant_qdq", disable)
            if label == "int8":
                path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"int8_op_{os.getpid()}.onnx")
                so.optimized_model_filepath = path
            sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
            sessions[label] = SessionInfo(sess, ["CPUExecutionProvider"], [])
        fused = onnx.load(path)
        kinds = sorted({nd.op_type for nd in fused.graph.node} - {"QuantizeLinear", "DequantizeLinear"})
        left = sum(nd.op_type in ("QuantizeLinear", "DequantizeLinear") for nd in fused.graph.node)
        names = {i.name for i in sessions["int8"].session.get_inputs()}
        res = bench_interleaved(sessions, {k: v for k, v in feeds.items() if k in names}, rounds=args.rounds,
                                per_round=5, warmup=3)
        a, b = res["int8"].p50_ms, res["broken"].p50_ms
        if op.endswith("(int8 decomposed)") and op.split("(")[0] in broken:
            b = broken[op.split("(")[0]]  # against the float op between DQ and Q (measured in its row)
        broken[op] = b
        print(f"| {op} | {a:.3f} | {b:.3f} | {a / b:.2f} | {','.join(kinds)} ({left} Q/DQ left) |", flush=True)


if __name__ == "__main__":
    main()
