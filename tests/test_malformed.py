"""Malformed input: refused at load in one line (exit 2, input untouched), or a valid output; an
invalid model is never written (issue 13). The mutator is bench/fuzz_malformed.py's (long runs there)."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxforge
from onnxforge.errors import ModelLoadError, ModelSaveError
from onnxforge.ir.validate import MalformedModelError, check_proto, check_structure

REPO = pathlib.Path(__file__).resolve().parent.parent


def _fuzz_module():
    spec = importlib.util.spec_from_file_location("fuzz_malformed", REPO / "bench" / "fuzz_malformed.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


fuzz = _fuzz_module()
SLICE_MODELS = ("conv_bn", "digits_cnn", "resnet_style")
SLICE = list(fuzz.cases(2 * len(fuzz.MUTATIONS) * len(SLICE_MODELS), seed=0, names=SLICE_MODELS))


@pytest.fixture(scope="module")
def sources():
    return fuzz.model_bytes(SLICE_MODELS)


@pytest.mark.parametrize("model, kind, seed", SLICE, ids=[f"{m}-{k}-{s}" for m, k, s in SLICE])
def test_mutated_model_is_refused_cleanly_or_optimized_validly(sources, tmp_path, model, kind, seed):
    """Before: 41 of 300 such cases exited 0 having written a model onnx.checker rejects."""
    data, what = fuzz.mutate(sources[model], kind, np.random.default_rng(seed))
    out = fuzz.run_case(data, tmp_path, model=model, kind=kind, seed=seed, what=what)
    assert out.ok, (out.status, what, out.detail)
    if kind in ("cycle", "empty_graph", "dangling_input", "wrong_dtype"):
        # these mutations always break the model: the refusal is at load, in one line
        assert out.status == "refused" and "is not a valid ONNX model" in out.detail, (what, out.detail)


def test_mutator_is_deterministic(sources):
    a = fuzz.mutate(sources["conv_bn"], "byte_flip", np.random.default_rng(3))
    b = fuzz.mutate(sources["conv_bn"], "byte_flip", np.random.default_rng(3))
    assert a == b and a[0] != sources["conv_bn"]


# --------------------------------------------------------------------------- the checks, one by one


def chain(n_nodes: int = 3) -> onnx.ModelProto:
    """x -> Relu -> Relu ... -> y (float [2, 3]), with a weight W added at the end."""
    nodes, prev = [], "x"
    for i in range(n_nodes):
        nodes.append(helper.make_node("Relu", [prev], [f"h{i}"], name=f"relu{i}"))
        prev = f"h{i}"
    nodes.append(helper.make_node("Add", [prev, "W"], ["y"], name="add"))
    graph = helper.make_graph(
        nodes, "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        initializer=[numpy_helper.from_array(np.ones((2, 3), np.float32), "W")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def refused(proto: onnx.ModelProto) -> str:
    with pytest.raises(ModelLoadError) as e:
        onnxforge.load(proto.SerializeToString())
    message = str(e.value)
    assert "\n" not in message and message.startswith("the given bytes is not a valid ONNX model: ")
    return message


def test_valid_model_passes():
    check_proto(chain())
    check_structure(onnxforge.load(chain()))


def test_cycle_names_the_node():
    proto = chain()
    proto.graph.node[0].input[0] = "h2"
    assert "node 'relu0' (Relu) reads 'h2' before any node produces it (a cycle" in refused(proto)


def test_dangling_input_and_dropped_initializer():
    proto = chain()
    del proto.graph.initializer[:]
    assert "node 'add' (Add) reads 'W', which no node, graph input or initializer defines" in refused(proto)


def test_empty_graph():
    proto = chain()
    del proto.graph.node[:]
    assert "output 'y' is not produced by any node" in refused(proto)
    del proto.graph.output[:]
    assert "graph has no outputs" in refused(proto)


def test_duplicate_definition():
    proto = chain()
    proto.graph.node[1].output[0] = "h0"
    assert "defines 'h0', which is already defined" in refused(proto)


@pytest.mark.parametrize("version", [0, 999])
def test_bad_opset(version):
    proto = chain()
    proto.opset_import[0].version = version
    assert f"opset {version} is outside 1.." in refused(proto)


def test_opset_imported_twice():
    """onnx.checker accepts two default-domain imports; which version applies is undefined."""
    proto = chain()
    proto.opset_import.add(domain="", version=16)
    assert "opset domain 'ai.onnx' is imported twice (versions 17 and 16)" in refused(proto)


def test_invalid_utf8_in_a_string_field_is_refused_at_load():
    """Found by the fuzzer (a byte flip in a metadata key): protobuf returns bytes, and onnx_ir then
    failed at every serialization -- shape inference logged a traceback, save failed far from the cause."""
    proto = chain()
    proto.graph.input[0].metadata_props.add(key="pkg.torch.kind", value="USER_INPUT")
    data = proto.SerializeToString().replace(b"pkg.torch.kind", b"pkg.torch.k\x87nd")
    with pytest.raises(ModelLoadError, match=r"graph.input\[0\].metadata_props\[0\].key is not valid UTF-8"):
        onnxforge.load(data)


def test_wrong_dtype_is_refused_by_the_checker():
    proto = chain()
    proto.graph.input[0].type.tensor_type.elem_type = TensorProto.INT64
    assert "onnx.checker" in refused(proto)


def test_large_initializer_sizes_are_checked_without_the_checker():
    """Initializers over 64 KiB are not handed to onnx.checker (it copies them); their raw data is
    still checked against dtype and shape."""
    rows = 600  # 600 x 512 float32 = 1.2 MB
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, rows])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 512])],
        initializer=[numpy_helper.from_array(np.ones((rows, 512), np.float32), "W")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert onnxforge.load(proto).graph.initializers["W"].const_value.numpy().shape == (rows, 512)
    proto.graph.initializer[0].data_type = TensorProto.DOUBLE
    assert f"initializer 'W': {rows * 512 * 4} bytes of raw data for shape [{rows}, 512] of DOUBLE" in refused(proto)
    proto.graph.initializer[0].data_type = TensorProto.FLOAT
    proto.graph.input[0].type.tensor_type.elem_type = TensorProto.INT32  # the checker still sees types
    assert "onnx.checker" in refused(proto)


def test_outer_scope_reference_in_a_subgraph_is_fine():
    then_g = helper.make_graph([helper.make_node("Relu", ["h0"], ["t"])], "then", [],
                               [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2, 3])])
    else_g = helper.make_graph([helper.make_node("Neg", ["h0"], ["e"])], "else", [],
                               [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2, 3])])
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["h0"]),
         helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)],
        "if", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
               helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model = onnxforge.load(proto)
    check_structure(model)
    # a subgraph reading an outer name that nothing defines is refused, naming where
    proto.graph.node[0].output[0] = "h1"
    message = refused(proto)
    assert "(If) attribute '" in message and "reads 'h0', which no node" in message


def test_check_structure_on_ir_names_dangling_and_order():
    model = onnxforge.load(chain())
    model.graph.initializers.pop("W")
    with pytest.raises(MalformedModelError, match="node 'add' \\(Add\\) reads 'W', which no node"):
        check_structure(model)
    model = onnxforge.load(chain())
    nodes = list(model.graph)
    model.graph.remove(nodes[0])
    model.graph.append(nodes[0])  # relu0 now after its consumer
    with pytest.raises(MalformedModelError, match="node 'relu1' \\(Relu\\) reads 'h0' before any node produces it"):
        check_structure(model)


def test_save_refuses_an_invalid_model_and_leaves_the_destination(tmp_path):
    dest = tmp_path / "out.onnx"
    dest.write_bytes(b"previous content")
    model = onnxforge.load(chain())
    model.graph.initializers.pop("W")  # dangling: what a buggy pass could leave behind
    with pytest.raises(ModelSaveError, match="refusing to save .*not valid ONNX .*nothing was written"):
        onnxforge.save(model, dest)
    assert dest.read_bytes() == b"previous content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]  # no temporary left behind


def test_save_refuses_external_data_model_with_a_bad_graph(tmp_path):
    """The path form of the check runs on the temporary folder, external data included."""
    model = onnxforge.load(chain())
    onnxforge.save(model, tmp_path / "ok.onnx", external_data=True, tensor_threshold_bytes=0)
    assert onnxforge.load(tmp_path / "ok.onnx").graph.initializers["W"].const_value.numpy().sum() == 6
    add = next(n for n in model.graph if n.op_type == "Add")
    add.replace_input_with(1, ir.Value(name="ghost"))
    with pytest.raises(ModelSaveError, match="not valid ONNX"):
        onnxforge.save(model, tmp_path / "bad.onnx", external_data=True, tensor_threshold_bytes=0)
    assert not (tmp_path / "bad.onnx").exists() and not (tmp_path / "bad.onnx.data").exists()


def test_output_without_shape_field_is_accepted_like_onnxruntime_does(tmp_path):
    """onnx.checker wants a shape on every graph output; onnxruntime runs models without one, so
    neither load nor the checked save may refuse them."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    from onnxforge.ir import io
    from onnxforge.passes.manager import Pipeline
    from onnxforge.testing.numerics import assert_outputs_close

    g = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    model = io.load(proto)
    Pipeline("O1").run(model)
    out = tmp_path / "out.onnx"
    io.save(model, out)
    assert_outputs_close(proto, onnx.load(out), {"x": np.array([-1.0, 2.0], np.float32)})
