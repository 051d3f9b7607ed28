"""``onnxforge.distill(...)``: rebuild the student in torch, distill, export, continue the pipeline."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxforge.distill.rebuild import RebuildResult, rebuild
from onnxforge.distill.train import KDConfig, TrainResult, train_kd
from onnxforge.errors import CalibrationDataError, OnnxforgeError

logger = logging.getLogger(__name__)

__all__ = ["DistillResult", "distill", "load_factory"]

DEFAULT_LABEL_KEYS = ("labels", "y", "y_train")


@dataclass
class DistillResult:
    model: ir.Model            # the distilled student, exported (and through ``then`` if given)
    module: Any                # the distilled torch module
    rebuild: RebuildResult
    train: TrainResult
    then_report: Any = None    # the Report of the ``then`` pipeline, if any


def load_factory(spec: str, state_dict: str | os.PathLike | None = None):
    """``"pkg.module:factory"`` or ``"path/file.py:factory"`` -> ``factory()``, with ``state_dict`` loaded.

    The state dict is read with ``torch.load(weights_only=True)`` (no pickled code)."""
    from onnxforge.torch_export import import_torch

    torch = import_torch()
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise OnnxforgeError(f"--teacher must be 'module:factory' or 'file.py:factory', got {spec!r}")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise OnnxforgeError(f"--teacher: file not found: {path}")
            mod_spec = importlib.util.spec_from_file_location(f"_onnxforge_teacher_{path.stem}", path)
            mod = importlib.util.module_from_spec(mod_spec)
            sys.modules[mod_spec.name] = mod
            mod_spec.loader.exec_module(mod)
        else:
            mod = importlib.import_module(module_name)
    except ImportError as exc:
        raise OnnxforgeError(f"--teacher: cannot import {module_name!r}: {exc}") from None
    factory = getattr(mod, attr, None)
    if not callable(factory):
        raise OnnxforgeError(f"--teacher: {module_name!r} has no callable {attr!r}")
    module = factory()
    if not isinstance(module, torch.nn.Module):
        raise OnnxforgeError(f"--teacher: {spec} returned a {type(module).__name__}, not a torch.nn.Module")
    if state_dict is not None:
        try:
            sd = torch.load(os.fspath(state_dict), map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise OnnxforgeError(f"--state-dict not found: {state_dict}") from None
        except Exception as exc:
            raise OnnxforgeError(f"--state-dict {state_dict}: cannot load: {exc}") from None
        try:
            module.load_state_dict(sd)
        except RuntimeError as exc:
            raise OnnxforgeError(f"--state-dict {state_dict} does not fit {spec}: {str(exc).splitlines()[0]}") from None
    return module.eval()


def _arrays(data: Any, student: ir.Model, labels: Any) -> tuple[list[np.ndarray], np.ndarray | None]:
    from onnxforge.runtime.data import read_npz

    if isinstance(data, (str, os.PathLike)):
        arrays = read_npz(data, "distill data")
    elif isinstance(data, Mapping):
        arrays = {str(k): np.asarray(v) for k, v in data.items()}
    else:
        raise CalibrationDataError(f"distill data must be an .npz path or a dict of arrays, got {type(data).__name__}")
    names = [v.name for v in student.graph.inputs]
    missing = [n for n in names if n not in arrays]
    if missing:
        raise CalibrationDataError(f"distill data has no array for input(s) {missing}; it has {sorted(arrays)}")
    if isinstance(labels, str):
        if labels not in arrays:
            raise CalibrationDataError(f"distill data has no labels array {labels!r}; it has {sorted(arrays)}")
        y = arrays[labels]
    elif labels is None:
        y = next((arrays[k] for k in DEFAULT_LABEL_KEYS if k in arrays), None)
    else:
        y = np.asarray(labels)
    inputs = []
    for v, n in zip(student.graph.inputs, names):
        a = arrays[n]
        if v.dtype is not None and v.dtype.is_floating_point():
            a = a.astype(v.dtype.numpy(), copy=False)
        inputs.append(a)
    if y is not None and not np.issubdtype(np.asarray(y).dtype, np.integer):
        raise CalibrationDataError(f"distill labels must be integer class ids, got {np.asarray(y).dtype}")
    return inputs, y


def distill(
    teacher: Any,
    student: Any,
    data: Any,
    *,
    labels: str | np.ndarray | None = None,
    config: KDConfig | None = None,
    then: str | None = None,
    output: str | os.PathLike | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    **config_kwargs: Any,
) -> DistillResult:
    """Distill ``teacher`` (a ``torch.nn.Module``) into the ONNX ``student`` (path or model).

    ``data``: an ``.npz`` path or a dict of arrays named like the student's inputs (sample axis first),
    plus optional integer labels (``labels``: the array or its key; by default a ``labels``/``y``/
    ``y_train`` key if present). ``config`` or keyword options (``epochs``, ``temperature``, ``alpha``,
    ``features``, ``val_fraction``, ``patience``, ...) set the training (:class:`KDConfig`). The
    distilled module is exported at the student's opset with its input/output names, then ``then``
    (a pipeline string, e.g. ``"O1,quantize-int8"``) runs with ``data`` as calibration data.
    """
    from onnxforge.ir.graph import opset_version
    from onnxforge.ir.io import load, save
    from onnxforge.torch_export import export, import_torch

    torch = import_torch()
    if not isinstance(teacher, torch.nn.Module):
        raise OnnxforgeError(f"distill: the teacher must be a torch.nn.Module, got {type(teacher).__name__}")
    if config is None:
        try:
            config = KDConfig(**config_kwargs)
        except (TypeError, ValueError) as exc:
            raise OnnxforgeError(f"distill: {exc}") from None
    elif config_kwargs:
        raise OnnxforgeError("distill: give either config or keyword options, not both")
    student_ir = load(student)
    inputs, y = _arrays(data, student_ir, labels)
    example = tuple(torch.from_numpy(np.ascontiguousarray(a[:2])) for a in inputs)
    rebuilt = rebuild(teacher, student_ir, example)
    for name in config.features:
        try:
            rebuilt.module.get_submodule(name)
        except AttributeError:
            raise OnnxforgeError(f"distill: no submodule {name!r} to match features at") from None
    try:
        trained = train_kd(rebuilt.module, teacher, inputs, y, config, progress=progress)
    except ValueError as exc:
        raise OnnxforgeError(f"distill: {exc}") from None
    opset = opset_version(student_ir) or 18
    exported = export(
        trained.module, example, opset=max(opset, 18),
        input_names=[v.name for v in student_ir.graph.inputs],
        output_names=[v.name for v in student_ir.graph.outputs],
    )
    result = DistillResult(model=exported, module=trained.module, rebuild=rebuilt, train=trained)
    if then:
        from onnxforge.api import optimize

        calibration = {v.name: a[:256] for v, a in zip(student_ir.graph.inputs, inputs)}
        piped = optimize(exported, then, calibration_data=calibration)
        result.model, result.then_report = piped.model, piped.report
    if output is not None:
        save(result.model, output)
    return result
