"""strip-metadata: exporter debug info goes, model metadata and outputs stay."""

import onnx_ir as ir

import onnxforge
from onnxforge.passes import create_pass
from onnxforge.testing import numerics


def test_strip_metadata_on_exported_model(demo_model_path):
    original = onnxforge.load(demo_model_path)
    model = onnxforge.load(demo_model_path)
    model.metadata_props["provenance"] = "kept"
    assert any(node.metadata_props for node in model.graph), "the dynamo export should carry node metadata"
    result = create_pass("strip-metadata")(model)
    assert result.modified and result.stats.counts["nodes_cleared"] == len(model.graph)
    assert not any(node.metadata_props or node.doc_string for node in model.graph)
    assert model.metadata_props["provenance"] == "kept"
    before = len(ir.serde.serialize_model(original).SerializeToString())
    after = len(ir.serde.serialize_model(model).SerializeToString())
    assert after < before
    numerics.assert_outputs_close(original, model, numerics.random_inputs(original), rtol=0, atol=0)
    assert create_pass("strip-metadata")(model).modified is False
