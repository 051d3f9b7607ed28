"""Private helpers shared by the runtime modules: model forms, input specs, feed validation.

A "model" here is any of ``onnx_ir.Model``, ``onnx.ModelProto``, serialized ``bytes`` or a path
(``str``/``os.PathLike``; the only form that works for models over 2 GB with external data).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import onnx
import onnx_ir as ir

from onnxforge.errors import CalibrationDataError, ModelLoadError

ModelLike = Union[ir.Model, onnx.ModelProto, bytes, str, os.PathLike]

# Above this many bytes of weights a model cannot travel as one protobuf message (2 GB limit);
# it goes to onnxruntime as a file with external data instead.
_PROTO_LIMIT_BYTES = 1_800_000_000

_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int16)": np.int16,
    "tensor(int8)": np.int8,
    "tensor(uint64)": np.uint64,
    "tensor(uint32)": np.uint32,
    "tensor(uint16)": np.uint16,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
    "tensor(string)": np.object_,
}


def is_path(model: Any) -> bool:
    return isinstance(model, (str, os.PathLike))


def as_ir(model: ModelLike) -> ir.Model:
    """The model as ``onnx_ir.Model`` (no copy when it already is one)."""
    if isinstance(model, ir.Model):
        return model
    if isinstance(model, onnx.ModelProto):
        return ir.serde.deserialize_model(model)
    if isinstance(model, (bytes, bytearray)):
        try:
            return ir.serde.deserialize_model(onnx.load_from_string(bytes(model)))
        except Exception as exc:  # protobuf raises DecodeError and friends
            raise ModelLoadError(f"bytes given as a model are not a valid ONNX model: {exc}") from exc
    if is_path(model):
        path = Path(model)
        if not path.is_file():
            raise ModelLoadError(f"model file not found: {path}")
        try:
            return ir.load(path)
        except Exception as exc:
            raise ModelLoadError(f"cannot load {path} as ONNX: {exc}") from exc
    raise TypeError(f"expected onnx_ir.Model, onnx.ModelProto, bytes or a path, got {type(model).__name__}")


def _ir_weight_bytes(model: ir.Model) -> tuple[int, bool]:
    """Total initializer bytes and whether any initializer lives in an external file."""
    total, external = 0, False
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is None:
            continue
        if isinstance(tensor, ir.ExternalTensor):
            external = True
        try:
            total += tensor.nbytes
        except Exception:  # a tensor type without nbytes: count nothing, not fatal
            pass
    return total, external


def _read_inline(proto: onnx.TensorProto, tensor: ir.TensorProtocol) -> None:
    """Replace ``proto``'s external-data reference with ``tensor``'s bytes (read now)."""
    proto.raw_data = tensor.tobytes()
    proto.data_location = onnx.TensorProto.DEFAULT
    del proto.external_data[:]


def tensor_proto_inline(tensor: ir.TensorProtocol) -> onnx.TensorProto:
    """``TensorProto`` of ``tensor`` with its data inline (an external tensor's bytes are read)."""
    proto = ir.serde.serialize_tensor(tensor)
    if proto.data_location == onnx.TensorProto.EXTERNAL:
        _read_inline(proto, tensor)
    return proto


def serialize_inline(model: ir.Model) -> onnx.ModelProto:
    """``ModelProto`` of ``model`` with every main-graph initializer's data inline.

    Tensors an ``onnx_ir`` model loaded lazily from external files would otherwise serialize as
    references relative to their own folder, which onnxruntime cannot resolve for a model given as
    bytes (or written elsewhere).
    """
    proto = ir.serde.serialize_model(model)
    for tensor_proto in proto.graph.initializer:
        if tensor_proto.data_location != onnx.TensorProto.EXTERNAL:
            continue
        value = model.graph.initializers.get(tensor_proto.name)
        if value is None or value.const_value is None:
            continue
        _read_inline(tensor_proto, value.const_value)
    return proto


class OrtSource:
    """What to hand to ``onnxruntime.InferenceSession``: bytes, or a path to a (temporary) file.

    Use as a context manager; a temporary copy written for a large model is removed on exit
    (onnxruntime has read or mapped the weights by then).
    """

    def __init__(self, model: ModelLike):
        self._tmpdir: str | None = None
        if is_path(model):
            self.arg: bytes | str = os.fspath(model)
        elif isinstance(model, (bytes, bytearray)):
            self.arg = bytes(model)
        elif isinstance(model, onnx.ModelProto):
            if model.ByteSize() < _PROTO_LIMIT_BYTES:
                self.arg = model.SerializeToString()
            else:
                self._tmpdir = tempfile.mkdtemp(prefix="onnxforge-")
                path = os.path.join(self._tmpdir, "model.onnx")
                onnx.save_model(model, path, save_as_external_data=True, location="model.onnx.data")
                self.arg = path
        elif isinstance(model, ir.Model):
            size, external = _ir_weight_bytes(model)
            if size < _PROTO_LIMIT_BYTES and not external:
                self.arg = ir.serde.serialize_model(model).SerializeToString()
            else:
                # External tensors are referenced relative to their own folder, which bytes cannot
                # express; write a self-contained copy instead.
                self._tmpdir = tempfile.mkdtemp(prefix="onnxforge-")
                path = os.path.join(self._tmpdir, "model.onnx")
                ir.save(model, path, external_data="model.onnx.data")
                self.arg = path
        else:
            raise TypeError(
                f"expected onnx_ir.Model, onnx.ModelProto, bytes or a path, got {type(model).__name__}"
            )

    def close(self) -> None:
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def __enter__(self) -> OrtSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class InputSpec:
    """One graph input as feeds must match it. ``shape`` entries: int (fixed), str (symbolic), None."""

    name: str
    dtype: np.dtype | None
    shape: tuple[int | str | None, ...] | None
    optional: bool = False  # an input with an initializer default (old opsets list weights as inputs)


def input_specs(model: ModelLike | ir.Model) -> dict[str, InputSpec]:
    """Input specs of ``model``, in graph order."""
    model = as_ir(model)
    specs = {}
    for value in model.graph.inputs:
        dtype = None
        if value.dtype is not None:
            try:
                dtype = np.dtype(value.dtype.numpy())
            except Exception:  # bfloat16, float8: no plain numpy dtype
                dtype = None
        shape = None
        if value.shape is not None:
            shape = tuple(d if isinstance(d, int) else (d.value if d.value else None) for d in value.shape)
        optional = value.name in model.graph.initializers
        specs[value.name] = InputSpec(value.name, dtype, shape, optional)
    return specs


def session_input_specs(session: Any) -> dict[str, InputSpec]:
    """Input specs as an ``onnxruntime.InferenceSession`` reports them."""
    specs = {}
    for arg in session.get_inputs():
        dtype = _ORT_TYPES.get(arg.type)
        shape = tuple(arg.shape) if arg.shape is not None else None
        specs[arg.name] = InputSpec(arg.name, np.dtype(dtype) if dtype else None, shape, False)
    return specs


def check_input_names(names: Iterable[str], specs: Mapping[str, InputSpec], where: str) -> None:
    """Every required input is named and no unknown one is, or a CalibrationDataError saying which."""
    names = list(names)
    required = [n for n, s in specs.items() if not s.optional]
    missing = [n for n in required if n not in names]
    extra = [n for n in names if n not in specs]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing input(s) {missing}")
        if extra:
            parts.append(f"unknown input(s) {extra}")
        raise CalibrationDataError(f"{where}: {' and '.join(parts)}; the model's inputs are {required}")


def check_feeds(
    feeds: Mapping[str, Any], specs: Mapping[str, InputSpec], *, where: str = "feeds"
) -> dict[str, np.ndarray]:
    """Validate ``feeds`` against ``specs``; returns numpy arrays, cast where that loses nothing real.

    - every required input must be fed, no unknown name may be fed;
    - the rank and every fixed dimension must match (symbolic dims accept any size, so
      variable-length inputs are fine);
    - a float array fed to a float input of another width (float64 data for a float32 input, the
      numpy default) is cast, likewise integer to integer; any other dtype mismatch is an error.
    """
    if not isinstance(feeds, Mapping):
        raise CalibrationDataError(
            f"{where}: expected a dict of input name -> array, got {type(feeds).__name__}"
        )
    check_input_names(feeds, specs, where)
    out = {}
    for name, value in feeds.items():
        spec = specs[name]
        array = np.asarray(value)
        if spec.dtype is not None and array.dtype != spec.dtype:
            same_kind = (
                np.issubdtype(array.dtype, np.floating) and np.issubdtype(spec.dtype, np.floating)
            ) or (np.issubdtype(array.dtype, np.integer) and np.issubdtype(spec.dtype, np.integer))
            if not same_kind:
                raise CalibrationDataError(
                    f"{where}: input {name!r} expects {spec.dtype}, got {array.dtype}"
                )
            array = array.astype(spec.dtype)
        if spec.shape is not None:
            if array.ndim != len(spec.shape):
                raise CalibrationDataError(
                    f"{where}: input {name!r} expects rank {len(spec.shape)} {_fmt_shape(spec.shape)}, "
                    f"got shape {tuple(array.shape)}"
                )
            for axis, (want, got) in enumerate(zip(spec.shape, array.shape)):
                if isinstance(want, int) and want >= 0 and want != got:
                    raise CalibrationDataError(
                        f"{where}: input {name!r} axis {axis} must be {want}, got shape {tuple(array.shape)} "
                        f"(model expects {_fmt_shape(spec.shape)})"
                    )
        out[name] = array
    return out


def _fmt_shape(shape: tuple[int | str | None, ...]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"
