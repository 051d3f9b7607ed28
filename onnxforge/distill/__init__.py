"""Knowledge distillation: recover a pruned ONNX student by fine-tuning it against its teacher.

    >>> result = onnxforge.distill(teacher_module, "pruned.onnx", "train.npz", labels="y_train",
    ...                            then="quantize-int8", output="student.onnx")

:mod:`~onnxforge.distill.rebuild` maps the student's initializers back onto a copy of the torch module
(at the student's widths); :mod:`~onnxforge.distill.train` fine-tunes it with a KD loss;
:mod:`~onnxforge.distill.api` ties them together, exports, and continues the pipeline.
"""

from onnxforge.distill.api import DistillResult, distill, load_factory
from onnxforge.distill.rebuild import RebuildResult, rebuild, student_weights
from onnxforge.distill.train import EpochStats, KDConfig, TrainResult, train_kd

__all__ = [
    "DistillResult",
    "EpochStats",
    "KDConfig",
    "RebuildResult",
    "TrainResult",
    "distill",
    "load_factory",
    "rebuild",
    "student_weights",
    "train_kd",
]
