"""Knowledge distillation: recover a pruned ONNX student by fine-tuning it against its teacher.

    >>> result = onnxforge.distill(teacher_module, "pruned.onnx", "train.npz", labels="y_train",
    ...                            then="quantize-int8", output="student.onnx")

:mod:`~onnxforge.distill.rebuild` maps the student's initializers back onto a copy of the torch module
(at the student's widths); :mod:`~onnxforge.distill.train` fine-tunes it with a KD loss;
:mod:`~onnxforge.distill.api` ties them together, exports, and continues the pipeline.

Without a torch module: :mod:`~onnxforge.distill.graph_module` runs the ONNX student itself in torch
(weights as parameters) and :func:`~onnxforge.distill.graph_kd.distill_graph` distills it against an
ONNX teacher on unlabeled inputs (the ``distill`` pass, ``onnxforge.passes.prune.distill``).
"""

from onnxforge.distill.api import DistillResult, distill, load_factory
from onnxforge.distill.graph_kd import GraphDistillResult, distill_graph
from onnxforge.distill.graph_module import graph_module
from onnxforge.distill.rebuild import RebuildResult, rebuild, student_weights
from onnxforge.distill.train import EpochStats, KDConfig, TrainResult, train_kd

__all__ = [
    "DistillResult",
    "EpochStats",
    "GraphDistillResult",
    "KDConfig",
    "RebuildResult",
    "TrainResult",
    "distill",
    "distill_graph",
    "graph_module",
    "load_factory",
    "rebuild",
    "student_weights",
    "train_kd",
]
