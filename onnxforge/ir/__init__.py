"""The ir layer: load/save (external data, path safety, atomic writes), graph queries, summary."""

from __future__ import annotations

from onnxforge.ir.graph import (
    all_graphs,
    all_nodes,
    const_tensor,
    const_value,
    consumers,
    graph_output_values,
    is_graph_output,
    is_shared,
    iter_tensors,
    make_initializer,
    node_attr,
    opset_version,
    replace_all_uses,
    unique_name,
)
from onnxforge.ir.io import (
    check_external_paths,
    clone,
    load,
    model_to_bytes,
    model_to_proto,
    save,
    tensor_bytes,
)
from onnxforge.ir.summary import ModelSummary, TensorInfo, quick_stats, summarize

__all__ = [
    "ModelSummary",
    "TensorInfo",
    "quick_stats",
    "summarize",
    "all_graphs",
    "all_nodes",
    "check_external_paths",
    "clone",
    "const_tensor",
    "const_value",
    "consumers",
    "graph_output_values",
    "is_graph_output",
    "is_shared",
    "iter_tensors",
    "load",
    "make_initializer",
    "model_to_bytes",
    "model_to_proto",
    "node_attr",
    "opset_version",
    "replace_all_uses",
    "save",
    "tensor_bytes",
    "unique_name",
]
