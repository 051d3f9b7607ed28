"""Load and save ONNX models safely.

* :func:`load` accepts a path, bytes, an ``onnx.ModelProto`` or an ``onnx_ir.Model``. External
  data stays on disk (``onnx_ir.ExternalTensor``, memory-mapped on first use). Before anything
  is read, every external-data location in the main graph, subgraphs and functions is checked:
  absolute paths, ``..`` that leaves the model's folder and symlinks that resolve outside it are
  refused with :class:`~onnxforge.errors.UnsafePathError`; missing or too short data files give
  :class:`~onnxforge.errors.ModelLoadError`.
* :func:`save` is atomic: the model (and its external data) is written into a temporary folder
  next to the destination and moved into place with ``os.replace``. On failure nothing is left
  behind and an existing destination is untouched. Saving onto the file the model was loaded
  from is safe: tensors that still read the old data file are detached from it first (they keep
  the old file's memory map, which survives the replace on POSIX).
* Output is deterministic: the same model gives byte-identical files.
* Models bigger than memory stream: external tensors stay memory-mapped (never copied on load or
  when counted), :func:`spilling` gives passes a scratch data file that new large weights are
  written to as they are made (:func:`spill`), and :func:`save` copies external tensors into the
  new data file in the kernel (``copy_file_range``), one tensor at a time, sharded on request.
  No protobuf message ever holds the weights, so its 2 GiB limit does not apply.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Union

import numpy as np
import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError
from onnx_ir import external_data as ir_external_data
from onnx_ir import serde

from onnxforge.errors import ModelLoadError, ModelSaveError, UnsafePathError, UnsupportedModelError
from onnxforge.ir.graph import iter_tensors

__all__ = [
    "DEFAULT_EXTERNAL_THRESHOLD_BYTES",
    "DEFAULT_TENSOR_THRESHOLD_BYTES",
    "EXTERNAL_SOURCE_KEY",
    "PROTOBUF_LIMIT_BYTES",
    "SOURCE_PATH_KEY",
    "check_external_paths",
    "SpillStore",
    "clone",
    "deep_copy",
    "has_external_data",
    "largest_tensor_bytes",
    "load",
    "model_to_bytes",
    "model_to_proto",
    "release",
    "same_bytes",
    "save",
    "spill",
    "spill_model",
    "spilling",
    "tensor_bytes",
    "tensor_digest",
]

ModelSource = Union[str, os.PathLike, bytes, bytearray, memoryview, onnx.ModelProto, ir.Model]

#: ``model.meta`` key under which :func:`load` records the file a model came from.
SOURCE_PATH_KEY = "onnxforge.source_path"
#: ``model.meta`` key set by :func:`load` when the model's weights were in external data: :func:`save`
#: keeps them external even after every original tensor was replaced (e.g. by quantized ones).
EXTERNAL_SOURCE_KEY = "onnxforge.external_source"
#: protobuf cannot serialize a message of 2 GiB or more.
PROTOBUF_LIMIT_BYTES = 2**31
#: :func:`save` switches to external data above this many tensor bytes (2 GiB less 1 MiB of
#: headroom for the graph itself).
DEFAULT_EXTERNAL_THRESHOLD_BYTES = 2**31 - 2**20
#: When writing external data, tensors of at most this many bytes stay inside the .onnx file.
DEFAULT_TENSOR_THRESHOLD_BYTES = 1024


# --------------------------------------------------------------------------- load


def load(
    source: ModelSource,
    *,
    base_dir: str | os.PathLike | None = None,
    load_external_data: bool = False,
) -> ir.Model:
    """Load a model from a path, bytes, an ``onnx.ModelProto`` or an ``onnx_ir.Model``.

    Args:
        source: the model. An ``ir.Model`` is returned as is (no copy; see :func:`clone`).
        base_dir: folder that external-data locations are relative to. Defaults to the model
            file's folder for a path, and to the current directory for bytes/protos.
        load_external_data: read external tensors into memory now (default: leave them on disk,
            memory-mapped lazily when a pass needs the values).

    Raises:
        ModelLoadError: missing/empty/truncated/non-ONNX file, missing or short external data.
        UnsafePathError: an external-data location escapes ``base_dir``.
    """
    if isinstance(source, ir.Model):
        return source
    if isinstance(source, onnx.ModelProto):
        proto, origin = source, "the given ModelProto"
        default_dir = os.getcwd()
    elif isinstance(source, (bytes, bytearray, memoryview)):
        origin = "the given bytes"
        proto = _parse_bytes(bytes(source), origin)
        default_dir = os.getcwd()
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        origin = str(path)
        proto = _parse_bytes(_read_model_file(path), origin)
        default_dir = str(path.resolve().parent)
    else:
        raise TypeError(
            f"load() takes a path, bytes, onnx.ModelProto or onnx_ir.Model, not {type(source).__name__}"
        )
    folder = os.fspath(base_dir) if base_dir is not None else default_dir
    # Malformed graphs (cycles, dangling inputs, bad opsets, wrong dtypes) are refused in one
    # line before onnx_ir sees them (onnxforge.ir.validate).
    from onnxforge.ir.validate import check_input

    check_input(proto, origin)
    try:
        model = serde.deserialize_model(proto)
    except Exception as exc:  # serde raises assorted errors on malformed graphs
        raise ModelLoadError(f"{origin} is not a valid ONNX model: {_one_line(exc)}") from exc
    _keep_input_shapes(model, proto)
    _set_base_dir(model, folder)
    check_external_paths(model, folder)
    if load_external_data:
        _materialize_external(model)
    if isinstance(source, (str, os.PathLike)):
        # Not serialized; lets the summary report file sizes.
        model.meta[SOURCE_PATH_KEY] = str(Path(source).resolve())
    if has_external_data(model, min_bytes=DEFAULT_TENSOR_THRESHOLD_BYTES + 1):
        model.meta[EXTERNAL_SOURCE_KEY] = True
    return model


def _keep_input_shapes(model: ir.Model, proto: onnx.ModelProto) -> None:
    """A graph input that is also a graph output is one value in onnx_ir, and the output's declared
    shape (possibly stale) wins over the input's: give it back the input's, which is what the caller
    feeds (onnxruntime would refuse the feeds otherwise)."""
    outputs = {v.name for v in model.graph.outputs}
    for value, vi in zip(model.graph.inputs, proto.graph.input):
        if value.name in outputs and vi.type.HasField("tensor_type"):
            value.shape = serde.deserialize_type_proto_for_shape(vi.type)


def _read_model_file(path: Path) -> bytes:
    if not path.exists():
        raise ModelLoadError(f"model file not found: {path}")
    if path.is_dir():
        raise ModelLoadError(f"{path} is a directory, not an ONNX model file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"cannot read model file {path}: {exc.strerror or exc}") from exc
    if not data:
        raise ModelLoadError(f"{path} is empty (0 bytes), not an ONNX model")
    return data


def _parse_bytes(data: bytes, origin: str) -> onnx.ModelProto:
    if not data:
        raise ModelLoadError(f"{origin} is empty (0 bytes), not an ONNX model")
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise ModelLoadError(
            f"{origin} is not a valid ONNX model (truncated or not protobuf): {_one_line(exc)}"
        ) from exc
    # protobuf accepts many byte strings (e.g. some text); a model always has a graph and an IR
    # version, and a truncated file typically loses its trailing fields (opset_import).
    if proto.ir_version <= 0 or not proto.HasField("graph") or not proto.opset_import:
        missing = [
            name
            for name, ok in (
                ("ir_version", proto.ir_version > 0),
                ("graph", proto.HasField("graph")),
                ("opset_import", bool(proto.opset_import)),
            )
            if not ok
        ]
        raise ModelLoadError(
            f"{origin} is not a valid ONNX model (truncated or not protobuf): "
            f"missing {', '.join(missing)}"
        )
    return proto


def _set_base_dir(model: ir.Model, base_dir: str) -> None:
    for _graph, _owner, _attr, tensor in iter_tensors(model):
        if isinstance(tensor, ir.ExternalTensor):
            tensor.base_dir = base_dir


def _is_within(path: str, folder: str) -> bool:
    folder = folder.rstrip(os.sep) or os.sep
    return path == folder or path.startswith(folder + os.sep) or folder == os.sep


def check_external_paths(model: ir.Model, base_dir: str | os.PathLike) -> None:
    """Refuse external-data locations that escape ``base_dir``; check the data files exist.

    Reads no tensor data: only the locations, and ``os.stat`` of the files. Covers
    initializers and tensor attributes in the main graph, subgraphs and function bodies.

    Raises:
        UnsafePathError: an absolute location, ``..`` leaving the folder, or a symlink (of the
            file or of a folder on the way) that resolves outside the folder.
        ModelLoadError: the data file is missing, not a file, or shorter than offset + length.
    """
    folder = os.path.abspath(os.fspath(base_dir))
    real_folder = os.path.realpath(folder)
    for _graph, _owner, _attr, tensor in iter_tensors(model):
        if not isinstance(tensor, ir.ExternalTensor):
            continue
        location = os.fspath(tensor.location)
        name = tensor.name or "<unnamed>"
        if os.path.isabs(location) or location.startswith(("/", "\\")) or ":" in location[:3]:
            raise UnsafePathError(
                f"tensor {name!r}: external data location {location!r} is an absolute path; "
                "ONNX requires it to be relative to the model's folder"
            )
        joined = os.path.normpath(os.path.join(folder, location))
        if not _is_within(joined, folder):
            raise UnsafePathError(
                f"tensor {name!r}: external data location {location!r} points outside the "
                f"model's folder {folder}"
            )
        real = os.path.realpath(joined)
        if not _is_within(real, real_folder):
            raise UnsafePathError(
                f"tensor {name!r}: external data location {location!r} resolves (via a symlink) "
                f"to {real}, outside the model's folder {real_folder}"
            )
        try:
            st = os.stat(real)
        except FileNotFoundError:
            raise ModelLoadError(
                f"external data file {location!r} of tensor {name!r} not found in {folder}"
            ) from None
        except OSError as exc:
            raise ModelLoadError(
                f"cannot read external data file {location!r} of tensor {name!r}: "
                f"{exc.strerror or exc}"
            ) from exc
        if not os.path.isfile(real):
            raise ModelLoadError(
                f"external data location {location!r} of tensor {name!r} is not a file"
            )
        if st.st_nlink > 1:
            # onnx_ir refuses these when reading (a hard link can smuggle in any file on the
            # same filesystem); say so now rather than in the middle of a pass.
            raise UnsafePathError(
                f"tensor {name!r}: external data file {location!r} has {st.st_nlink} hard links; "
                "refusing it (a hard link can point outside the model's folder). Copy the file "
                "so it has a single link"
            )
        end = (tensor.offset or 0) + (
            tensor.length if tensor.length is not None else tensor.nbytes
        )
        if st.st_size < end:
            raise ModelLoadError(
                f"external data file {location!r} is truncated: tensor {name!r} needs bytes up "
                f"to {end}, the file has {st.st_size}"
            )


def _materialize_external(model: ir.Model) -> None:
    """Replace every external tensor by an in-memory copy (reads the data now)."""
    for _graph, owner, attr_name, tensor in list(iter_tensors(model)):
        if isinstance(tensor, ir.ExternalTensor):
            _set_tensor(owner, attr_name, tensor, _to_memory(tensor, copy=True))


# --------------------------------------------------------------------------- tensor swapping


def _to_memory(tensor: ir.ExternalTensor, *, copy: bool) -> ir.Tensor:
    array = tensor.numpy()
    if copy:
        array = np.array(array, copy=True)
    return ir.Tensor(
        array,
        dtype=tensor.dtype,
        name=tensor.name,
        doc_string=tensor.doc_string,
        metadata_props=dict(tensor.metadata_props) or None,
    )


def _set_tensor(owner: ir.Value | ir.Node, attr_name: str, old, new) -> None:
    """Put ``new`` where ``old`` is: an initializer's const_value or a node's tensor attribute."""
    if isinstance(owner, ir.Value):
        owner.const_value = new
        return
    attr = owner.attributes[attr_name]
    if attr.type == ir.AttributeType.TENSOR:
        owner.attributes[attr_name] = ir.AttrTensor(attr_name, new, doc_string=attr.doc_string)
    else:
        tensors = [new if t is old else t for t in attr.value]
        owner.attributes[attr_name] = ir.AttrTensors(attr_name, tensors, doc_string=attr.doc_string)


@contextlib.contextmanager
def _swap_external(
    model: ir.Model, *, copy: bool, keep_initializers_above: int | None = None
) -> Iterator[None]:
    """Temporarily replace external tensors by in-memory ones; put the originals back on exit.

    With ``keep_initializers_above``, external initializers larger than that many bytes stay
    as they are (they are about to be streamed into a new data file without being read).
    """
    swapped = []
    for _graph, owner, attr_name, tensor in list(iter_tensors(model)):
        if not isinstance(tensor, ir.ExternalTensor):
            continue
        if (
            keep_initializers_above is not None
            and attr_name == ""
            and tensor.nbytes > keep_initializers_above
        ):
            continue
        memory = _to_memory(tensor, copy=copy)
        _set_tensor(owner, attr_name, tensor, memory)
        swapped.append((owner, attr_name, tensor, memory))
    try:
        yield
    finally:
        for owner, attr_name, tensor, memory in reversed(swapped):
            _set_tensor(owner, attr_name, memory, tensor)


def _detach_from_files(model: ir.Model, paths: list[Path]) -> int:
    """Make tensors that read one of ``paths`` independent of it before it is replaced.

    The replacement is an in-memory tensor over the *current* memory map of the file: after
    ``os.replace`` the old inode stays alive while mapped, so nothing is copied into RAM.
    """
    targets = [p for p in paths if p.exists()]
    if not targets:
        return 0
    count = 0
    for _graph, owner, attr_name, tensor in list(iter_tensors(model)):
        if not isinstance(tensor, ir.ExternalTensor):
            continue
        try:
            hit = any(os.path.samefile(tensor.path, p) for p in targets)
        except OSError:
            continue
        if hit:
            _set_tensor(owner, attr_name, tensor, _to_memory(tensor, copy=False))
            count += 1
    return count


# --------------------------------------------------------------------------- sizes


def tensor_bytes(model: ir.Model) -> int:
    """Total bytes of all tensors stored in the model (initializers and tensor attributes).

    Uses dtypes and shapes only; reads no external data.
    """
    total = 0
    for _graph, _owner, _attr, tensor in iter_tensors(model):
        try:
            total += int(tensor.nbytes)
        except Exception:  # e.g. string tensors of unknown size
            continue
    return total


def largest_tensor_bytes(model: ir.Model) -> int:
    """Bytes of the largest tensor in the model (shapes only; reads no data)."""
    largest = 0
    for _graph, _owner, _attr, tensor in iter_tensors(model):
        try:
            largest = max(largest, int(tensor.nbytes))
        except Exception:  # e.g. string tensors of unknown size
            continue
    return largest


def has_external_data(model: ir.Model, *, min_bytes: int = 0) -> bool:
    """Whether any tensor of at least ``min_bytes`` lives in an external file (reads no data).

    Tensors moved to a spill file (:func:`spill`) do not count: where a pass put its output says
    nothing about how the user stores the model.
    """
    return any(
        isinstance(t, ir.ExternalTensor) and t.nbytes >= min_bytes and not t.meta.get(_SPILLED_KEY)
        for _g, _o, _a, t in iter_tensors(model)
    )


# --------------------------------------------------------------------------- streaming

#: While :func:`spilling` is active, tensors of at least this many bytes go to the spill file.
DEFAULT_SPILL_THRESHOLD_BYTES = 1 << 20
_SPILL_FILE = "spill.data"
_SPILLED_KEY = "onnxforge.spilled"  # in ExternalTensor.meta (not serialized)
_SPILL_ALIGN = 64  # numpy reads the memory map in place: keep every tensor aligned
_ACTIVE_SPILL: contextvars.ContextVar["SpillStore | None"] = contextvars.ContextVar(
    "onnxforge_spill", default=None
)


class SpillStore:
    """An append-only scratch data file that large tensors are moved to as passes produce them.

    :meth:`spill` writes an in-memory tensor's bytes at the end of the file and returns an
    ``ir.ExternalTensor`` reading them back through a memory map, so a pass that rewrites every
    weight holds one new weight in anonymous memory at a time instead of all of them. The file
    lives in a private folder (``.onnxforge-spill-*``) that :meth:`close` removes: save the model
    before closing (tensors not mapped yet cannot be read afterwards).
    """

    def __init__(self, folder: str | os.PathLike | None = None,
                 threshold_bytes: int = DEFAULT_SPILL_THRESHOLD_BYTES) -> None:
        try:
            self.folder = Path(tempfile.mkdtemp(prefix=".onnxforge-spill-", dir=folder))
        except OSError:
            # e.g. the output folder does not exist: save() reports that; spill to the temp dir.
            self.folder = Path(tempfile.mkdtemp(prefix=".onnxforge-spill-"))
        self.path = self.folder / _SPILL_FILE
        self.threshold_bytes = threshold_bytes
        self.tensors = 0
        self.bytes_written = 0
        self._file = open(self.path, "wb")

    def spill(self, tensor):
        """``tensor`` moved to the spill file (an ``ir.ExternalTensor``), or as is when it is
        already external, smaller than the threshold, a string tensor, or the store is closed."""
        if (
            self._file.closed
            or isinstance(tensor, ir.ExternalTensor)
            or tensor.dtype == ir.DataType.STRING
            or tensor.nbytes < self.threshold_bytes
        ):
            return tensor
        f = self._file
        offset = -(-f.tell() // _SPILL_ALIGN) * _SPILL_ALIGN
        f.seek(offset)
        tensor.tofile(f)
        length = f.tell() - offset
        f.flush()  # readers memory-map the file: the bytes must be in it now
        self.tensors += 1
        self.bytes_written += length
        spilled = ir.ExternalTensor(
            _SPILL_FILE,
            offset,
            length,
            tensor.dtype,
            shape=ir.Shape(list(tensor.shape)),
            name=tensor.name,
            doc_string=tensor.doc_string,
            metadata_props=dict(tensor.metadata_props) or None,
            base_dir=str(self.folder),
        )
        spilled.meta[_SPILLED_KEY] = True
        return spilled

    def close(self) -> None:
        """Close and delete the spill file (memory maps already open stay valid on POSIX)."""
        if not self._file.closed:
            self._file.close()
        shutil.rmtree(self.folder, ignore_errors=True)


@contextlib.contextmanager
def spilling(
    folder: str | os.PathLike | None = None, threshold_bytes: int = DEFAULT_SPILL_THRESHOLD_BYTES
) -> Iterator[SpillStore]:
    """Within the block, :func:`spill` moves new large tensors to a scratch file in ``folder``.

    ``with spilling(out_dir): pipeline.run(model); save(model, out)`` keeps the working set of a
    pipeline at a few tensors. Pick a folder on the same disk as the output; save inside the block.
    """
    store = SpillStore(folder, threshold_bytes)
    token = _ACTIVE_SPILL.set(store)
    try:
        yield store
    finally:
        _ACTIVE_SPILL.reset(token)
        store.close()


def spill(tensor):
    """Move ``tensor`` to the active spill file (see :func:`spilling`); without one, return it."""
    store = _ACTIVE_SPILL.get()
    return tensor if store is None else store.spill(tensor)


def spill_model(model: ir.Model) -> int:
    """Spill every large in-memory initializer (main graph, subgraphs, functions); how many.

    The pipeline calls this after each pass as a safety net for passes that do not spill their
    tensors themselves: their new weights then stay in memory for one pass, not for the run.
    """
    if _ACTIVE_SPILL.get() is None:
        return 0
    count = 0
    for _graph, owner, attr_name, tensor in list(iter_tensors(model)):
        if attr_name or isinstance(tensor, ir.ExternalTensor):
            continue
        moved = spill(tensor)
        if moved is not tensor:
            owner.const_value = moved
            count += 1
    return count


def release(tensor) -> None:
    """Unmap an external tensor's file (a later read maps it again). No-op for other tensors.

    Every ``ir.ExternalTensor`` maps its data file on first use and keeps the pages it touched
    resident until released; a pass that has finished with a weight releases it.
    """
    if isinstance(tensor, ir.ExternalTensor):
        try:
            tensor.release()
        except BufferError:
            # Someone still holds a numpy view of the map: it stays mapped until they drop it
            # (the pages are file-backed; the kernel reclaims them under pressure).
            pass


#: Chunk size for reading tensor bytes (hashing, comparing) without mapping a whole tensor.
READ_CHUNK_BYTES = 16 << 20


def iter_tensor_chunks(tensor, chunk_bytes: int = READ_CHUNK_BYTES) -> Iterator[memoryview]:
    """The tensor's bytes (as stored: little-endian, 4-bit types packed) in chunks.

    An external tensor is read from its file with ``readinto`` into one reused buffer: nothing is
    memory-mapped, so its pages never count in this process's RSS (the page cache holds them). An
    in-memory tensor yields views of its own buffer (no copy when it is contiguous). The chunks of
    an external tensor are only valid until the next one is produced.
    """
    if isinstance(tensor, ir.ExternalTensor):
        # the same containment rule as load() (a model built in memory was never checked)
        folder = os.path.realpath(os.fspath(tensor.base_dir) or os.getcwd())
        if os.path.isabs(os.fspath(tensor.location)) or not _is_within(
            os.path.realpath(tensor.path), folder
        ):
            raise UnsafePathError(
                f"tensor {tensor.name!r}: external data location {os.fspath(tensor.location)!r} "
                f"is outside its folder {folder}"
            )
        length = tensor.length if tensor.length is not None else tensor.nbytes
        buf = bytearray(min(chunk_bytes, max(length, 1)))
        view = memoryview(buf)
        with open(tensor.path, "rb") as f:
            f.seek(tensor.offset or 0)
            left = length
            while left > 0:
                n = f.readinto(view[: min(len(buf), left)])
                if not n:
                    raise ModelLoadError(
                        f"external data of tensor {tensor.name!r} ends early in {tensor.path}"
                    )
                left -= n
                yield view[:n]
        return
    if tensor.dtype == ir.DataType.STRING:
        # Strings have no byte layout (``tobytes`` refuses them): each element, length-prefixed,
        # so that ["ab", "c"] and ["a", "bc"] differ.
        data = memoryview(b"".join(len(s).to_bytes(8, "little") + s for s in _string_items(tensor)))
    elif tensor.dtype.bitwidth < 8:
        data = memoryview(tensor.tobytes())  # small in practice; packing needs a copy anyway
    else:
        # a uint8 view, not ``memoryview.cast``: the buffer protocol knows no bfloat16 / float8
        data = memoryview(np.ascontiguousarray(tensor.numpy()).reshape(-1).view(np.uint8))
    for start in range(0, len(data), chunk_bytes):
        yield data[start : start + chunk_bytes]


def _string_items(tensor) -> list[bytes]:
    items = tensor.string_data() if hasattr(tensor, "string_data") else tensor.numpy().reshape(-1).tolist()
    return [s.encode() if isinstance(s, str) else bytes(s) for s in items]


def tensor_digest(tensor) -> str:
    """SHA-512 of the tensor's bytes, read in chunks (see :func:`iter_tensor_chunks`)."""
    import hashlib

    h = hashlib.sha512()
    for chunk in iter_tensor_chunks(tensor):
        h.update(chunk)
    return h.hexdigest()


def same_bytes(a, b) -> bool:
    """Whether two tensors hold the same bytes (same dtype and shape assumed), chunk by chunk."""
    if a.dtype != b.dtype or tuple(a.shape) != tuple(b.shape):
        return False
    left, right = iter_tensor_chunks(a), iter_tensor_chunks(b)
    pending = b""
    for chunk in left:
        chunk = bytes(chunk)  # one chunk at a time: the other side may reuse its buffer
        while len(pending) < len(chunk):
            nxt = next(right, None)
            if nxt is None:
                return False
            pending += bytes(nxt)
        if pending[: len(chunk)] != chunk:
            return False
        pending = pending[len(chunk) :]
    return not pending and next(right, None) is None


# --------------------------------------------------------------------------- save


def save(
    model: ir.Model,
    path: str | os.PathLike,
    *,
    external_data: bool | None = None,
    size_threshold_bytes: int = DEFAULT_EXTERNAL_THRESHOLD_BYTES,
    external_data_name: str | None = None,
    all_tensors_to_one_file: bool = True,
    tensor_threshold_bytes: int = DEFAULT_TENSOR_THRESHOLD_BYTES,
    max_shard_size_bytes: int | None = None,
) -> Path:
    """Write ``model`` to ``path`` atomically; returns the path written.

    Args:
        external_data: True: store tensors larger than ``tensor_threshold_bytes`` in a separate
            file; False: everything inside the .onnx (fails above protobuf's 2 GiB); None
            (default): external data when the tensors total more than ``size_threshold_bytes``
            or when the model was loaded from external data (:func:`load` marks it) or any
            tensor above ``tensor_threshold_bytes`` is external: such a model is streamed, never
            inlined in memory. (Spilled tensors do not count: a model given inline stays inline
            below the threshold.)
        size_threshold_bytes: the automatic switch to external data (default 2 GiB - 1 MiB).
        external_data_name: data file name, in the same folder (default ``<file name>.data``).
        all_tensors_to_one_file: False writes one data file per tensor
            (``<name>-00001-of-000NN.data``, ...).
        tensor_threshold_bytes: with external data, tensors up to this size stay inline.
        max_shard_size_bytes: with external data, start a new data file
            (``model-00001-of-000NN.onnx.data``, ...) when the current one would exceed this size
            (a single larger tensor gets a file of its own).

    With external data, memory stays at about one tensor: external tensors are copied file to
    file by the kernel, in-memory ones are written one at a time, and the .onnx holds no weights.

    The model object is not modified, except that tensors reading a data file that this call
    replaces are re-pointed at that file's current memory map (same values).

    Raises:
        ModelSaveError: destination folder missing or not writable, path is a folder, model
            too large for protobuf without external data, or the write failed. The destination
            is untouched and no temporary file is left behind.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.exists():
        raise ModelSaveError(f"cannot save to {path}: folder {folder} does not exist")
    if not folder.is_dir():
        raise ModelSaveError(f"cannot save to {path}: {folder} is not a folder")
    if path.is_dir():
        raise ModelSaveError(f"cannot save to {path}: it is a folder; give a file name")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ModelSaveError(f"cannot save to {path}: no permission to write in {folder}")

    if external_data is None:
        use_external = (
            tensor_bytes(model) > size_threshold_bytes
            or bool(model.meta.get(EXTERNAL_SOURCE_KEY))
            or has_external_data(model, min_bytes=tensor_threshold_bytes + 1)
        )
    else:
        use_external = external_data
    if max_shard_size_bytes is not None and max_shard_size_bytes <= 0:
        raise ModelSaveError(f"max_shard_size_bytes must be > 0, got {max_shard_size_bytes}")
    data_name = external_data_name or f"{path.name}.data"
    if use_external:
        if os.path.isabs(data_name) or os.path.basename(data_name) != data_name or data_name in (
            ".",
            "..",
        ):
            raise ModelSaveError(
                f"external_data_name {data_name!r} must be a plain file name (it is stored next "
                "to the model)"
            )
        if data_name == path.name:
            raise ModelSaveError(
                f"external_data_name {data_name!r} must differ from the model file name"
            )

    try:
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder))
    except OSError as exc:
        raise ModelSaveError(f"cannot save to {path}: {exc.strerror or exc}") from exc
    try:
        tmp_model = tmp_dir / path.name
        if use_external:
            payload = _serialize_external(
                model,
                tmp_dir,
                data_name,
                tensor_threshold_bytes=tensor_threshold_bytes,
                max_shard_size_bytes=(
                    max_shard_size_bytes
                    if max_shard_size_bytes is not None
                    else (None if all_tensors_to_one_file else 1)
                ),
            )
        else:
            payload = _serialize_inline(model, what=f"save {path}")
        _write_bytes(tmp_model, payload)
        # Never put a model onnx.checker rejects in place (onnxforge.ir.validate); the path form
        # sees the external data written beside it and does not load the weights again.
        from onnxforge.ir.validate import MalformedModelError, check_file

        try:
            check_file(tmp_model)
        except MalformedModelError as exc:
            raise ModelSaveError(
                f"refusing to save {path}: the model is not valid ONNX ({exc}); nothing was written"
            ) from None
        # An empty data file means no tensor went external: do not create it.
        data_files = sorted(
            p.name for p in tmp_dir.iterdir() if p.name != path.name and p.stat().st_size > 0
        )
        destinations = [folder / name for name in data_files] + [path]
        _detach_from_files(model, destinations)
        # Data first, then the model that refers to it.
        for name in data_files:
            os.replace(tmp_dir / name, folder / name)
        os.replace(tmp_model, path)
    except ModelSaveError:
        raise
    except OSError as exc:
        raise ModelSaveError(f"cannot save to {path}: {exc.strerror or exc}") from exc
    except Exception as exc:
        raise ModelSaveError(f"cannot save to {path}: {_one_line(exc)}") from exc
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return path


def _write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and flush it to disk (a seam for tests)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _serialize_inline(model: ir.Model, *, what: str) -> bytes:
    with _swap_external(model, copy=False):
        proto = serde.serialize_model(model)
    try:
        data = proto.SerializeToString(deterministic=True)
    except ValueError as exc:  # "Message onnx.ModelProto exceeds maximum protobuf size of 2GB"
        raise ModelSaveError(
            f"cannot {what}: the model is larger than protobuf's 2 GiB limit; save it with "
            "external_data=True"
        ) from exc
    if len(data) >= PROTOBUF_LIMIT_BYTES:
        raise ModelSaveError(
            f"cannot {what}: the model is larger than protobuf's 2 GiB limit; save it with "
            "external_data=True"
        )
    return data


def _serialize_external(
    model: ir.Model,
    folder: Path,
    data_name: str,
    *,
    tensor_threshold_bytes: int,
    max_shard_size_bytes: int | None,
) -> bytes:
    """Write the large initializers into ``folder/data_name``; return the .onnx bytes.

    Tensor attributes (Constant nodes) stay inline; external ones, and external initializers
    that now fall below the threshold, are read for the occasion (in-memory copies, so that
    onnx_ir never has to release a memory map someone else may still be reading).
    """
    initializers = [v for g in _graphs_for_save(model) for v in g.initializers.values()]
    originals = [v.const_value for v in initializers]
    try:
        with _swap_external(model, copy=True, keep_initializers_above=tensor_threshold_bytes):
            ir_external_data.unload_from_model(
                model,
                os.fspath(folder),
                data_name,
                size_threshold_bytes=tensor_threshold_bytes,
                max_shard_size_bytes=max_shard_size_bytes,
            )
            proto = serde.serialize_model(model)
    finally:
        for value, tensor in zip(initializers, originals):
            value.const_value = tensor
    data = proto.SerializeToString(deterministic=True)
    if len(data) >= PROTOBUF_LIMIT_BYTES:
        raise ModelSaveError(
            "the graph is larger than 2 GiB even with its initializers stored externally "
            "(large Constant nodes?); fold Constant nodes into initializers first"
        )
    return data


def _graphs_for_save(model: ir.Model):
    # unload_from_model covers model.graphs() (main graph and its subgraphs), not functions.
    return list(model.graphs())


# --------------------------------------------------------------------------- conversions


def model_to_proto(model: ir.Model) -> onnx.ModelProto:
    """An ``onnx.ModelProto`` with every tensor inline (external data is read).

    Raises:
        UnsupportedModelError: the model is larger than protobuf's 2 GiB limit.
    """
    _check_fits_protobuf(model, "convert the model to a ModelProto")
    with _swap_external(model, copy=False):
        return serde.serialize_model(model)


def model_to_bytes(model: ir.Model) -> bytes:
    """The model serialized with every tensor inline, e.g. for ``onnxruntime.InferenceSession``.

    Raises:
        UnsupportedModelError: the model is larger than protobuf's 2 GiB limit; save it with
            :func:`save` (external data) and give onnxruntime the path instead.
    """
    _check_fits_protobuf(model, "serialize the model to bytes")
    with _swap_external(model, copy=False):
        proto = serde.serialize_model(model)
    try:
        return proto.SerializeToString(deterministic=True)
    except ValueError as exc:
        raise UnsupportedModelError(_too_large("serialize the model to bytes")) from exc


def _too_large(what: str) -> str:
    return (
        f"cannot {what}: the model is larger than protobuf's 2 GiB limit; save it with "
        "onnxforge.ir.save(model, path) (external data) and pass the path instead"
    )


def _check_fits_protobuf(model: ir.Model, what: str) -> None:
    if tensor_bytes(model) >= PROTOBUF_LIMIT_BYTES:
        raise UnsupportedModelError(_too_large(what))


def deep_copy(model: ir.Model) -> ir.Model:
    """A copy sharing no tensor with ``model`` (for passes that rewrite arrays in place).

    In-memory tensors are copied. External tensors (a model loaded with external data, or weights a
    pass moved to the spill file) are copied as references to the same file, which is not read:
    serialization keeps a reference's relative ``location`` but drops the folder it is relative to,
    so each copy gets its original's ``base_dir`` back. (A bare ``deserialize_model(serialize_model(m))``
    resolves those references against the working directory: quantize-int8 failed on a spilled
    detector with ``No such file or directory: 'spill.data'``.)
    """
    copy = serde.deserialize_model(serde.serialize_model(model))
    for (*_, original), (*_, copied) in zip(iter_tensors(model), iter_tensors(copy)):
        if isinstance(original, ir.ExternalTensor) and isinstance(copied, ir.ExternalTensor):
            copied.base_dir = original.base_dir
    return copy


def clone(model: ir.Model) -> ir.Model:
    """An independent copy of the model's structure (graphs, nodes, values, attributes).

    Tensors are *shared*, not copied, so cloning a multi-GB model costs no memory and external
    data stays on disk. onnx_ir treats tensors as immutable: passes replace a value's
    ``const_value`` rather than write into its array, and then the original is unaffected.
    Writing into a shared ``ir.Tensor``'s numpy array in place would show through both models.
    """
    return model.clone()


# --------------------------------------------------------------------------- misc


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else type(exc).__name__
    return first if len(first) <= 300 else first[:297] + "..."
