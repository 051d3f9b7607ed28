"""onnxforge.ir.infer: shape inference that does not keep replaced weights alive (streaming, issue 14)."""

import gc
import weakref

import numpy as np
import onnx_ir as ir
import pytest

from onnxforge.ir.infer import forget_removed_io, infer_shapes


def _matmul_model() -> ir.Model:
    x = ir.Value(name="x", shape=ir.Shape([2, 8]), type=ir.TensorType(ir.DataType.FLOAT))
    w = ir.Value(name="w", const_value=ir.tensor(np.ones((8, 4), np.float32), name="w"))
    node = ir.node("MatMul", [x, w], name="mm")
    node.outputs[0].name = "y"
    graph = ir.Graph([x], node.outputs, nodes=[node], initializers=[w], opset_imports={"": 18}, name="g")
    return ir.Model(graph, ir_version=10)


def _replace_weight(model: ir.Model) -> weakref.ref:
    """Swap the MatMul's weight for a new initializer, as fold-affine does; a weak ref to the old one."""
    old = model.graph.initializers["w"]
    node = next(iter(model.graph))
    model.graph.initializers.pop("w")
    new = ir.Value(name="w", const_value=ir.tensor(np.full((8, 4), 2, np.float32), name="w"))
    model.graph.register_initializer(new)
    node.replace_input_with(1, new)
    return weakref.ref(old)


def test_infer_shapes_annotates_and_keeps_the_interface():
    model = _matmul_model()
    infer_shapes(model)
    assert model.graph.outputs[0].shape == ir.Shape([2, 4])
    assert [v.name for v in model.graph.inputs] == ["x"]
    assert list(model.graph.initializers) == ["w"]


def test_a_replaced_weight_is_freed_after_shape_inference():
    model = _matmul_model()
    infer_shapes(model)
    old = _replace_weight(model)
    gc.collect()
    assert old() is None, "the graph still references the replaced initializer (its tensor stays mapped)"


def test_the_onnx_ir_pass_alone_keeps_it_alive():
    # Documents why infer_shapes exists (onnx-ir 1.1); a later onnx_ir that fixes its counter skips.
    from onnx_ir.passes.common import ShapeInferencePass

    model = _matmul_model()
    ShapeInferencePass()(model)
    old = _replace_weight(model)
    gc.collect()
    if old() is None:
        pytest.skip("this onnx_ir no longer keeps removed inputs: onnxforge.ir.infer's workaround can go")
    forget_removed_io(model)
    gc.collect()
    assert old() is None


def test_declared_shape_check_does_not_keep_weights_alive():
    # fold-constants/simplify/fuse run this check first (onnxforge.ir.shapes); before infer_shapes,
    # a 1 GiB model's O1 peak went from 0.33 GB to 1.33 GB because of it.
    from onnxforge.ir.shapes import reconcile_declared_shapes

    model = _matmul_model()
    reconcile_declared_shapes(model)
    old = _replace_weight(model)
    gc.collect()
    assert old() is None
