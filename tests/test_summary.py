"""onnxforge.ir.summary: numbers checked against hand-computed parameters and FLOPs."""

from __future__ import annotations

import io as pyio
import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from onnxforge.ir import io
from onnxforge.ir.summary import node_work, quick_stats, summarize

import torch


class ConvNet(torch.nn.Module):
    """x [N, 3, 8, 8] -> Conv -> grouped Conv -> ConvTranspose -> mean -> Linear -> MatMul.

    Hand count, per sample (MACs = output elements x reduction length):
      conv   Conv2d(3, 8, 3, pad 1)          out [8, 8, 8]  512 x 27       = 13,824  params 216 + 8
      group  Conv2d(8, 8, 3, pad 1, g=4)     out [8, 8, 8]  512 x 18       =  9,216  params 144 + 8
      up     ConvTranspose2d(8, 4, 2, s=2)   in  [8, 8, 8]  512 x (4 x 4)  =  8,192  params 128 + 4
      fc     Linear(4, 5)                    out [5]        5 x 4          =     20  params  20 + 5
      proj   MatMul [5] x [5, 6]             out [6]        6 x 5          =     30  params  30
    """

    MACS = {"Conv": 13824 + 9216, "ConvTranspose": 8192, "Gemm": 20, "MatMul": 30}
    FLOAT_PARAMS = 224 + 152 + 132 + 25 + 30

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.group = torch.nn.Conv2d(8, 8, 3, padding=1, groups=4)
        self.up = torch.nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.fc = torch.nn.Linear(4, 5)
        self.proj = torch.nn.Parameter(torch.randn(5, 6))

    def forward(self, x):
        y = torch.relu(self.group(torch.relu(self.conv(x))))
        y = self.up(y).mean((2, 3))
        return self.fc(y) @ self.proj


@pytest.fixture(scope="module")
def exported() -> bytes:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    batch = torch.export.Dim("batch")
    program = torch.onnx.export(
        ConvNet().eval(), (x,), dynamo=True, verbose=False, dynamic_shapes=({0: batch},)
    )
    return ir.serde.serialize_model(program.model).SerializeToString()


@pytest.fixture
def model(exported) -> ir.Model:
    return io.load(exported)


def _float_bytes(model: ir.Model) -> int:
    return sum(
        v.const_value.nbytes
        for v in model.graph.initializers.values()
        if v.const_value.dtype.is_floating_point()
    )


def _all_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values())


def test_hand_computed_params_and_flops(model):
    s = summarize(model)
    # int64 initializers of the export (Reshape shapes, ReduceMean axes) are not parameters.
    assert any(v.dtype == ir.DataType.INT64 for v in model.graph.initializers.values())
    assert s.param_count == ConvNet.FLOAT_PARAMS
    assert s.param_bytes == 4 * ConvNet.FLOAT_PARAMS == _float_bytes(model)
    assert s.op_histogram["Conv"] == 2
    assert s.op_histogram["ConvTranspose"] == 1
    assert s.flops_by_op == {op: 2 * macs for op, macs in sorted(ConvNet.MACS.items(), key=lambda kv: -kv[1])}
    assert s.flops == 2 * sum(ConvNet.MACS.values())
    assert s.flops_exact
    assert s.symbolic_dims_as_one  # the batch dim counted as 1
    assert s.node_count == len(model.graph) == sum(s.op_histogram.values())
    assert s.graph_count == 1


def test_node_work_per_node_at_the_given_batch(model):
    """Per-node MACs and per-value elements at a batch size given by name: the hand count times the batch."""
    (batch,) = [d.value for d in model.graph.inputs[0].shape if isinstance(d, ir.SymbolicDim)]
    macs, elements = node_work(model, {batch: 3})
    assert len(macs) == len(model.graph)
    by_op = {}
    for node, m in zip(model.graph, macs):
        if m:
            by_op[node.op_type] = by_op.get(node.op_type, 0) + m
    assert by_op == {op: 3 * m for op, m in ConvNet.MACS.items()}
    first_conv = next(n for n in model.graph if n.op_type == "Conv")
    assert elements[first_conv.inputs[0].name] == 3 * 3 * 8 * 8
    assert elements[first_conv.outputs[0].name] == 3 * 8 * 8 * 8
    assert elements[model.graph.outputs[0].name] == 3 * 6


def test_interface_with_symbolic_dims(model):
    s = summarize(model)
    assert s.ir_version == model.ir_version
    assert s.producer.startswith("pytorch")
    assert s.opset_imports[""] == model.opset_imports[""]
    (inp,) = s.inputs
    assert inp.dtype == "float"
    assert isinstance(inp.shape[0], str) and inp.shape[1:] == [3, 8, 8]
    (out,) = s.outputs
    assert out.shape[-1] == 6


def test_quick_stats_agrees_with_summary(model):
    s = summarize(model)
    assert quick_stats(model) == {"nodes": s.node_count, "params": s.param_count, "param_bytes": s.param_bytes}


def test_constant_node_weights_count_the_same(model):
    from onnxforge.testing.zoo import constants_as_nodes

    s = summarize(model)
    c = summarize(constants_as_nodes(model))
    assert c.param_count == s.param_count and c.param_bytes == s.param_bytes
    assert c.flops == s.flops and c.flops_exact
    assert c.op_histogram["Constant"] == len(model.graph.initializers)


def test_to_dict_is_json_and_render_prints_tables(model):
    s = summarize(model)
    d = json.loads(json.dumps(s.to_dict()))
    assert d["flops"] == s.flops and d["inputs"][0]["shape"][1:] == [3, 8, 8]
    assert d["params"] == d["param_count"] == ConvNet.FLOAT_PARAMS and d["nodes"] == s.node_count
    from rich.console import Console

    console = Console(file=pyio.StringIO(), width=120, record=True)
    s.render(console)
    text = console.export_text()
    for needle in ("Conv", "ConvTranspose", "FLOPs", "parameters", s.inputs[0].shape[0], "counted as 1"):
        assert needle in text


def test_file_size_includes_external_data(model, tmp_path):
    path = io.save(model, tmp_path / "m.onnx", external_data=True, tensor_threshold_bytes=0)
    loaded = io.load(path)
    s = summarize(loaded)
    expected = (tmp_path / "m.onnx").stat().st_size + (tmp_path / "m.onnx.data").stat().st_size
    assert s.file_size == expected
    assert s.external_data_bytes == _all_bytes(model)
    assert summarize(model).file_size is None
    assert summarize(loaded, path=path).file_size == expected
    assert summarize(model, path=path).file_size == (tmp_path / "m.onnx").stat().st_size
    # Summarizing reads no tensor data.
    assert all(v.const_value.raw is None for v in loaded.graph.initializers.values())


# --------------------------------------------------------------------------- hand-built graphs


def _model(nodes, inputs, outputs, initializers=(), opsets=(("", 18),)):
    g = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets], ir_version=10)
    # Straight to the IR: these graphs leave output shapes out on purpose, which io.load's checker refuses.
    return ir.serde.deserialize_model(proto)


def _vi(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def _w(name, shape):
    return helper.make_tensor(name, TensorProto.FLOAT, shape, np.zeros(shape, np.float32).ravel().tolist())


def test_shapes_from_shape_inference():
    """The Relu output has no recorded shape; onnx shape inference supplies it."""
    m = _model(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("MatMul", ["r", "w"], ["y"])],
        [_vi("x", [2, 3])],
        [_vi("y", None)],
        [_w("w", [3, 4])],
    )
    s = summarize(m)
    assert s.flops == 2 * 2 * 4 * 3 and s.flops_exact


def test_unknown_shapes_make_flops_inexact():
    m = _model(
        [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Conv", ["x4", "k"], ["z"])],
        [_vi("x", None), _vi("x4", None)],
        [_vi("y", None), _vi("z", None)],
        [_w("w", [3, 4]), _w("k", [2, 1, 3, 3])],
    )
    s = summarize(m)
    assert not s.flops_exact and s.flops == 0 and len(s.flops_unknown_nodes) == 2


def test_gemm_transposes_and_batched_matmul_broadcast():
    m = _model(
        [
            helper.make_node("Gemm", ["a", "b"], ["g"], transA=1, transB=1),
            helper.make_node("MatMul", ["p", "q"], ["mm"]),
        ],
        [_vi("a", [3, 2]), _vi("b", [4, 3]), _vi("p", [2, 1, 3, 4]), _vi("q", [5, 4, 6])],
        [_vi("g", None), _vi("mm", None)],
    )
    s = summarize(m)
    # Gemm: A^T [2, 3] x B^T [3, 4] -> 2*4*3 MACs; MatMul: out [2, 5, 3, 6] x K=4
    assert s.flops_by_op == {"MatMul": 2 * (2 * 5 * 3 * 6 * 4), "Gemm": 2 * (2 * 4 * 3)}
    assert s.flops_exact and not s.symbolic_dims_as_one


def test_subgraphs_and_custom_domains_are_counted():
    then = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["t"])], "then", [], [_vi("t", [1, 2, 8])], [_w("w", [16, 8])]
    )
    other = helper.make_graph(
        [
            helper.make_node(
                "MatMulNBits", ["x", "qw", "sc"], ["e"], domain="com.microsoft", K=16, N=8, bits=4, block_size=16
            )
        ],
        "else",
        [],
        [_vi("e", [1, 2, 8])],
    )
    m = _model(
        [helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)],
        [_vi("c", [], TensorProto.BOOL), _vi("x", [1, 2, 16])],
        [_vi("y", [1, 2, 8])],
        [
            helper.make_tensor("qw", TensorProto.UINT8, [8, 1, 8], np.zeros(64, np.uint8).tobytes(), raw=True),
            _w("sc", [8]),
        ],
        opsets=(("", 18), ("com.microsoft", 1)),
    )
    s = summarize(m)
    assert s.op_histogram == {"If": 1, "MatMul": 1, "com.microsoft::MatMulNBits": 1}
    assert s.graph_count == 3 and s.node_count == 3
    assert s.flops_by_op == {"MatMul": 2 * 2 * 8 * 16, "com.microsoft::MatMulNBits": 2 * 2 * 8 * 16}
    assert s.param_count == 16 * 8 + 64 + 8  # subgraph weight, packed 4-bit bytes, scales
    assert quick_stats(m)["nodes"] == 3


def test_constant_float_attributes_are_parameters_int64_ones_are_not():
    m = _model(
        [
            helper.make_node("Constant", [], ["a"], value_floats=[1.0, 2.0, 3.0]),
            helper.make_node("Constant", [], ["b"], value_int=4),
            helper.make_node("Constant", [], ["c"], value_float=0.5),
            helper.make_node("Constant", [], ["d"], value_ints=[1, 2]),
            helper.make_node("Constant", [], ["s"], value_string="hi"),
            helper.make_node("Add", ["x", "a"], ["y"]),
        ],
        [_vi("x", [3])],
        [_vi("y", [3])],
    )
    stats = quick_stats(m)
    assert stats == {"nodes": 6, "params": 4, "param_bytes": 4 * 4}


def test_quantized_weights_count_shape_tensors_do_not():
    m = _model(
        [
            helper.make_node("ConvInteger", ["x", "w"], ["c"]),
            helper.make_node("Reshape", ["c", "shape"], ["y"]),
        ],
        [_vi("x", [1, 2, 5, 5], TensorProto.UINT8)],
        [_vi("y", None, TensorProto.INT32)],
        [
            helper.make_tensor("w", TensorProto.INT8, [4, 2, 3, 3], np.ones(72, np.int8).tobytes(), raw=True),
            helper.make_tensor("shape", TensorProto.INT64, [2], [1, -1]),
        ],
        opsets=(("", 10),),
    )
    s = summarize(m)
    assert (s.param_count, s.param_bytes) == (72, 72)
    # ConvInteger: out [1, 4, 3, 3] x (2 * 3 * 3)
    assert s.flops_by_op == {"ConvInteger": 2 * 36 * 18} and s.flops_exact


# --------------------------------------------------------------------------- --dim: symbolic H/W


@pytest.fixture(scope="module")
def hw_model_bytes() -> bytes:
    """ConvNet exported with symbolic batch, height and width (like a detector)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    dims = {0: torch.export.Dim("batch"), 2: torch.export.Dim("height", min=2), 3: torch.export.Dim("width", min=2)}
    program = torch.onnx.export(ConvNet().eval(), (x,), dynamo=True, verbose=False, dynamic_shapes=(dims,))
    return ir.serde.serialize_model(program.model).SerializeToString()


def _hand_flops(n: int, h: int, w: int) -> int:
    # Conv/ConvTranspose MACs scale with the pixels (hand counts above are for 8x8); fc and proj do not.
    spatial = ConvNet.MACS["Conv"] + ConvNet.MACS["ConvTranspose"]
    return 2 * n * (spatial * h * w // 64 + ConvNet.MACS["Gemm"] + ConvNet.MACS["MatMul"])


def test_dim_values_size_symbolic_height_and_width(hw_model_bytes):
    model = io.load(hw_model_bytes)
    plain = summarize(model)
    assert plain.symbolic_dims_as_one and plain.flops < _hand_flops(1, 8, 8)
    sized = summarize(model, dim_values={"batch": 3, "height": 16, "width": 32})
    assert sized.flops == _hand_flops(3, 16, 32)
    assert sized.flops_exact and not sized.symbolic_dims_as_one
    assert sized.inputs[0].shape == [3, 3, 16, 32]
    assert sized.outputs[0].shape == [3, 6]
    assert sized.to_dict()["dim_values"] == {"batch": 3, "height": 16, "width": 32}
    # a dim left symbolic still counts as 1, and says so
    partial = summarize(model, dim_values={"height": 16, "width": 32})
    assert partial.symbolic_dims_as_one and partial.flops == _hand_flops(1, 16, 32)


def test_dim_values_unknown_name_lists_the_real_ones(hw_model_bytes):
    with pytest.raises(ValueError, match="'heigth'.*batch, height, width"):
        summarize(io.load(hw_model_bytes), dim_values={"heigth": 16})


def test_inspect_dim_from_the_cli(hw_model_bytes, tmp_path):
    from click.testing import CliRunner

    from onnxforge.cli import main

    path = tmp_path / "hw.onnx"
    path.write_bytes(hw_model_bytes)
    r = CliRunner().invoke(main, ["inspect", str(path), "--dim", "height=16", "--dim", "width=32", "--dim",
                                  "batch=3", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["flops"] == _hand_flops(3, 16, 32)
    r = CliRunner().invoke(main, ["inspect", str(path)])
    assert "symbolic dims counted as 1: give sizes with --dim height=N --dim width=N" in r.stdout
    r = CliRunner().invoke(main, ["inspect", str(path), "--dim", "height=16", "--dim", "width=32"])
    assert "with height=16, width=32; symbolic batch counted as 1: per sample" in r.stdout
    r = CliRunner().invoke(main, ["inspect", str(path), "--dim", "h=16"])
    assert r.exit_code == 2 and "the model's are: batch, height, width" in r.stderr
    r = CliRunner().invoke(main, ["inspect", str(path), "--dim", "height=x"])
    assert r.exit_code == 2 and "not an integer" in r.stderr


def test_shape_arithmetic_is_followed_past_div():
    """TorchScript's ``chunk``: Slice ends = Shape(x)[1] / 2. ONNX data propagation stops at the Div; the
    summary folds that arithmetic on its copy, so the Conv after it is counted at its real size."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "one"], ["c"], axis=0),
        helper.make_node("Div", ["c", "two"], ["half"]),
        helper.make_node("Unsqueeze", ["half", "zero_axis"], ["end"]),
        helper.make_node("Slice", ["x", "zero", "end", "one_axis"], ["first"]),
        helper.make_node("Conv", ["first", "w"], ["y"], pads=[1, 1, 1, 1]),
    ]
    ints = [helper.make_tensor(n, TensorProto.INT64, dims, vals) for n, dims, vals in (
        ("one", [], [1]), ("two", [], [2]), ("zero_axis", [1], [0]), ("zero", [1], [0]), ("one_axis", [1], [1]))]
    m = _model(nodes, [_vi("x", ["N", 4, "H", "W"])], [_vi("y", None)], [_w("w", [8, 2, 3, 3])] + ints)
    macs = lambda n, h, w: n * 8 * h * w * 2 * 9  # out [N, 8, H, W], weight [8, 2, 3, 3]
    sized = summarize(m, dim_values={"N": 2, "H": 8, "W": 16})
    assert sized.flops == 2 * macs(2, 8, 16) and not sized.symbolic_dims_as_one
    # the same graph with static sizes (no --dim) is exact too
    static = _model(nodes, [_vi("x", [1, 4, 5, 5])], [_vi("y", None)], [_w("w", [8, 2, 3, 3])] + ints)
    s = summarize(static)
    assert s.flops == 2 * macs(1, 5, 5) and s.flops_exact and not s.symbolic_dims_as_one


def _paddle_style(model_bytes: bytes) -> ir.Model:
    """The model with its input's dims as paddle2onnx writes them: -1 batch, unnamed height and width,
    and the -1 left on the output too."""
    proto = onnx.load_from_string(model_bytes)
    for vi in list(proto.graph.input) + list(proto.graph.output):
        for i, d in enumerate(vi.type.tensor_type.shape.dim):
            if d.HasField("dim_param"):
                d.Clear()
                if i == 0:
                    d.dim_value = -1
    del proto.graph.value_info[:]
    return io.load(proto.SerializeToString())


def test_minus_one_dims_are_unknown_and_a_feed_shape_sizes_them(hw_model_bytes):
    """paddle2onnx's -1 "dynamic" dims are unknown sizes, never a negative count (the quantizer's
    latency model read -7.9e16 for a PP-OCR classifier); a feed's shape sizes every dim of an input."""
    model = _paddle_style(hw_model_bytes)
    macs, elements = node_work(model)
    assert all(m is None or m >= 0 for m in macs) and all(v >= 0 for v in elements.values())
    assert summarize(model).flops >= 0
    macs, elements = node_work(model, None, {model.graph.inputs[0].name: (3, 3, 16, 32)})
    assert 2 * sum(m for m in macs if m) == _hand_flops(3, 16, 32)
    assert elements[model.graph.outputs[0].name] == 3 * 6
