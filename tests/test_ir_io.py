"""onnxforge.ir.io: load/save round trips, external data, path safety, atomic writes, errors."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from onnxforge.errors import ModelLoadError, ModelSaveError, UnsafePathError, UnsupportedModelError
from onnxforge.ir import io
from onnxforge.testing.numerics import run

import torch


# --------------------------------------------------------------------------- fixtures


class ConvLinear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.fc = torch.nn.Linear(8 * 6 * 6, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


@pytest.fixture(scope="module")
def exported() -> tuple[bytes, dict[str, np.ndarray], np.ndarray]:
    """A real dynamo export of a small Conv+Linear model (as bytes), a feed and torch's output."""
    torch.manual_seed(0)
    module = ConvLinear().eval()
    x = torch.randn(1, 3, 8, 8)
    program = torch.onnx.export(module, (x,), dynamo=True, verbose=False)
    with torch.no_grad():
        expected = module(x).numpy()
    data = ir.serde.serialize_model(program.model).SerializeToString()
    return data, {program.model.graph.inputs[0].name: x.numpy()}, expected


@pytest.fixture
def model(exported) -> ir.Model:
    return io.load(exported[0])


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _arrays(model: ir.Model) -> dict[str, np.ndarray]:
    return {name: np.array(v.const_value.numpy()) for name, v in model.graph.initializers.items()}


def _listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def _assert_close(actual, expected, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        np.testing.assert_allclose(a, e, rtol=rtol, atol=atol)


# --------------------------------------------------------------------------- round trips


def test_inline_round_trip_keeps_values_and_outputs(model, exported, tmp_path):
    _data, feeds, expected = exported
    path = io.save(model, tmp_path / "m.onnx")
    assert path == tmp_path / "m.onnx"
    assert _listing(tmp_path) == ["m.onnx"]
    reloaded = io.load(path)
    before, after = _arrays(model), _arrays(reloaded)
    assert before.keys() == after.keys()
    for name in before:
        np.testing.assert_array_equal(before[name], after[name])
    _assert_close(run(reloaded, feeds), [expected])


def test_external_round_trip_is_lazy_and_identical(model, exported, tmp_path):
    _data, feeds, expected = exported
    io.save(model, tmp_path / "m.onnx", external_data=True)
    assert _listing(tmp_path) == ["m.onnx", "m.onnx.data"]
    reloaded = io.load(tmp_path / "m.onnx")
    weight = reloaded.graph.initializers["fc.weight"].const_value
    assert isinstance(weight, ir.ExternalTensor)
    assert weight.raw is None, "external data must not be read at load time"
    assert os.path.samefile(weight.path, tmp_path / "m.onnx.data")
    for name, array in _arrays(model).items():
        np.testing.assert_array_equal(array, reloaded.graph.initializers[name].const_value.numpy())
    # onnxruntime reads the saved file with its external data.
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    _assert_close(session.run(None, feeds), [expected])
    # And model_to_bytes inlines the lazily loaded tensors.
    _assert_close(run(io.model_to_bytes(reloaded), feeds), [expected])


def test_small_tensors_stay_inline_with_external_data(model, tmp_path):
    io.save(model, tmp_path / "m.onnx", external_data=True, tensor_threshold_bytes=100)
    proto = onnx.load(tmp_path / "m.onnx", load_external_data=False)
    external = {t.name for t in proto.graph.initializer if t.data_location == TensorProto.EXTERNAL}
    # conv.weight (864 B) and fc.weight (11520 B) go out; biases (32 B, 40 B) stay in.
    assert {"conv.weight", "fc.weight"} <= external
    assert "conv.bias" not in external and "fc.bias" not in external


def test_large_model_switches_to_external_data_automatically(model, tmp_path):
    """Simulates the >2 GB case: above ``size_threshold_bytes`` the save goes external."""
    total = io.tensor_bytes(model)
    io.save(model, tmp_path / "small.onnx")  # default threshold: 2 GiB - 1 MiB
    assert _listing(tmp_path) == ["small.onnx"]
    io.save(model, tmp_path / "big.onnx", size_threshold_bytes=total - 1)
    assert "big.onnx.data" in _listing(tmp_path)
    io.save(model, tmp_path / "forced.onnx", size_threshold_bytes=total - 1, external_data=False)
    assert "forced.onnx.data" not in _listing(tmp_path)
    for name in ("big.onnx", "forced.onnx"):
        for key, array in _arrays(model).items():
            np.testing.assert_array_equal(array, _arrays(io.load(tmp_path / name))[key])


def test_inline_save_over_protobuf_limit_says_use_external_data(model, tmp_path, monkeypatch):
    monkeypatch.setattr(io, "PROTOBUF_LIMIT_BYTES", 1000)
    with pytest.raises(ModelSaveError, match="2 GiB.*external_data=True"):
        io.save(model, tmp_path / "m.onnx", external_data=False)
    assert _listing(tmp_path) == []


def test_model_to_bytes_over_limit_says_pass_a_path(model, monkeypatch):
    monkeypatch.setattr(io, "PROTOBUF_LIMIT_BYTES", 1000)
    with pytest.raises(UnsupportedModelError, match="pass the path"):
        io.model_to_bytes(model)
    with pytest.raises(UnsupportedModelError):
        io.model_to_proto(model)


def test_custom_data_name_and_one_file_per_tensor(model, tmp_path):
    io.save(model, tmp_path / "a.onnx", external_data=True, external_data_name="weights.bin")
    assert _listing(tmp_path) == ["a.onnx", "weights.bin"]
    sub = tmp_path / "b"
    sub.mkdir()
    io.save(model, sub / "b.onnx", external_data=True, all_tensors_to_one_file=False, tensor_threshold_bytes=0)
    data_files = [n for n in _listing(sub) if n != "b.onnx"]
    assert len(data_files) == len(model.graph.initializers)
    reloaded = io.load(sub / "b.onnx")
    for name, array in _arrays(model).items():
        np.testing.assert_array_equal(array, reloaded.graph.initializers[name].const_value.numpy())


@pytest.mark.parametrize("bad", ["../w.bin", "/tmp/w.bin", "sub/w.bin", "m.onnx"])
def test_bad_external_data_name_is_refused(model, tmp_path, bad):
    with pytest.raises(ModelSaveError, match="external_data_name"):
        io.save(model, tmp_path / "m.onnx", external_data=True, external_data_name=bad)
    assert _listing(tmp_path) == []


def test_save_is_deterministic(model, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for folder in ("a", "b"):
        io.save(model, tmp_path / folder / "m.onnx", external_data=True, tensor_threshold_bytes=0)
        io.save(model, tmp_path / folder / "inline.onnx")
    for name in ("m.onnx", "m.onnx.data", "inline.onnx"):
        assert _sha(tmp_path / "a" / name) == _sha(tmp_path / "b" / name)
    # Saving a reloaded model gives the same bytes again.
    io.save(io.load(tmp_path / "a" / "m.onnx"), tmp_path / "b" / "m.onnx", external_data=True, tensor_threshold_bytes=0)
    assert _sha(tmp_path / "a" / "m.onnx.data") == _sha(tmp_path / "b" / "m.onnx.data")
    assert _sha(tmp_path / "a" / "m.onnx") == _sha(tmp_path / "b" / "m.onnx")


def test_load_external_data_reads_everything_now(model, tmp_path):
    io.save(model, tmp_path / "m.onnx", external_data=True)
    loaded = io.load(tmp_path / "m.onnx", load_external_data=True)
    (tmp_path / "m.onnx.data").unlink()
    for value in loaded.graph.initializers.values():
        assert not isinstance(value.const_value, ir.ExternalTensor)
    for name, array in _arrays(model).items():
        np.testing.assert_array_equal(array, loaded.graph.initializers[name].const_value.numpy())


def test_load_sources(exported, tmp_path):
    data, feeds, expected = exported
    proto = onnx.ModelProto.FromString(data)
    from_proto = io.load(proto)
    from_bytes = io.load(bytearray(data))
    assert io.load(from_proto) is from_proto
    for m in (from_proto, from_bytes):
        _assert_close(run(m, feeds), [expected])
    with pytest.raises(TypeError):
        io.load(42)  # type: ignore[arg-type]


def test_model_to_proto_inlines_external_tensors(model, tmp_path):
    io.save(model, tmp_path / "m.onnx", external_data=True, tensor_threshold_bytes=0)
    lazy = io.load(tmp_path / "m.onnx")
    proto = io.model_to_proto(lazy)
    assert all(t.data_location != TensorProto.EXTERNAL for t in proto.graph.initializer)
    onnx.checker.check_model(proto)
    # The model itself still points at its file.
    assert isinstance(lazy.graph.initializers["fc.weight"].const_value, ir.ExternalTensor)


def test_clone_is_independent_in_structure(model):
    copy = io.clone(model)
    assert copy is not model and copy.graph is not model.graph
    first = next(iter(copy.graph))
    copy.graph.remove(first, safe=False)
    assert len(copy.graph) == len(model.graph) - 1
    name = "fc.bias"
    copy.graph.initializers[name].const_value = ir.tensor(np.zeros(10, np.float32), name=name)
    assert np.any(model.graph.initializers[name].const_value.numpy() != 0)


# --------------------------------------------------------------------------- the input is never modified


def _optimize(model: ir.Model) -> None:
    """Stand-in for a pipeline: rewrite every float initializer (x * 2) and drop nothing."""
    for value in model.graph.initializers.values():
        array = value.const_value.numpy()
        if array.dtype == np.float32:
            value.const_value = ir.tensor(array * 2, name=value.name)


@pytest.mark.parametrize("external", [False, True])
def test_input_file_untouched_by_load_optimize_save(model, tmp_path, external):
    src = tmp_path / "src"
    src.mkdir()
    io.save(model, src / "m.onnx", external_data=external, tensor_threshold_bytes=0)
    hashes = {p.name: _sha(p) for p in src.iterdir()}
    loaded = io.load(src / "m.onnx")
    _optimize(loaded)
    io.save(loaded, tmp_path / "out.onnx", external_data=external, tensor_threshold_bytes=0)
    io.save(loaded, src / "other.onnx", external_data=external, tensor_threshold_bytes=0)
    for name, digest in hashes.items():
        assert _sha(src / name) == digest, f"{name} was modified"


def test_save_onto_own_source_with_lazy_external_data(model, exported, tmp_path):
    """The model still reads m.onnx.data lazily while m.onnx.data is being rewritten."""
    _data, feeds, _expected = exported
    path = tmp_path / "m.onnx"
    io.save(model, path, external_data=True, tensor_threshold_bytes=0)
    original = _arrays(model)
    lazy = io.load(path)
    # Make half of the tensors new (in memory) and keep the rest reading the old file lazily.
    lazy.graph.initializers["fc.bias"].const_value = ir.tensor(
        np.full(10, 7, np.float32), name="fc.bias"
    )
    # A different threshold moves the small tensors inline: every offset in the new data file
    # differs from the old one, so a tensor still reading the old offsets would read garbage.
    io.save(lazy, path, external_data=True, tensor_threshold_bytes=100)
    assert _listing(tmp_path) == ["m.onnx", "m.onnx.data"]
    assert (tmp_path / "m.onnx.data").stat().st_size == 864 + 11520
    reloaded = io.load(path)
    for name, array in original.items():
        want = np.full(10, 7, np.float32) if name == "fc.bias" else array
        np.testing.assert_array_equal(reloaded.graph.initializers[name].const_value.numpy(), want)
        # The in-memory model is still valid too (it kept the old file's memory map).
        np.testing.assert_array_equal(lazy.graph.initializers[name].const_value.numpy(), want)
    # Save once more, in a different layout (one file per tensor), still from the same source.
    io.save(lazy, path, external_data=True, external_data_name="w.bin")
    np.testing.assert_array_equal(
        io.load(path).graph.initializers["fc.weight"].const_value.numpy(), original["fc.weight"]
    )
    _assert_close(run(io.model_to_bytes(lazy), feeds), run(io.model_to_bytes(io.load(path)), feeds), rtol=0, atol=0)


def test_save_inline_onto_own_source(model, tmp_path):
    path = tmp_path / "m.onnx"
    io.save(model, path, external_data=True, tensor_threshold_bytes=0)
    lazy = io.load(path)
    io.save(lazy, path, external_data=False)
    reloaded = io.load(path)
    for name, array in _arrays(model).items():
        np.testing.assert_array_equal(reloaded.graph.initializers[name].const_value.numpy(), array)


# --------------------------------------------------------------------------- atomic writes


def test_failed_write_leaves_destination_untouched(model, tmp_path, monkeypatch):
    path = tmp_path / "m.onnx"
    io.save(model, path)
    digest = _sha(path)

    def broken_write(target: Path, data: bytes) -> None:
        with open(target, "wb") as f:
            f.write(data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io, "_write_bytes", broken_write)
    with pytest.raises(ModelSaveError, match="No space left on device") as info:
        io.save(model, path)
    assert "\n" not in str(info.value)
    assert _sha(path) == digest
    assert _listing(tmp_path) == ["m.onnx"], "no temporary file may be left behind"


def test_failed_external_data_write_leaves_both_files_untouched(model, tmp_path, monkeypatch):
    path = tmp_path / "m.onnx"
    io.save(model, path, external_data=True, tensor_threshold_bytes=0)
    digests = {p.name: _sha(p) for p in tmp_path.iterdir()}
    import onnx_ir.external_data as ext

    real = ext._write_tensor_at
    calls = []

    def failing_writer(tensor, file, offset):
        calls.append(tensor.name)
        if len(calls) == 2:  # midway: after the first tensor was written
            raise OSError(28, "No space left on device")
        real(tensor, file, offset)

    monkeypatch.setattr(ext, "_write_tensor_at", failing_writer)
    changed = io.load(path)
    _optimize(changed)
    with pytest.raises(ModelSaveError, match="cannot save"):
        io.save(changed, path, external_data=True, tensor_threshold_bytes=0)
    assert len(calls) == 2
    assert {p.name: _sha(p) for p in tmp_path.iterdir()} == digests
    assert _listing(tmp_path) == ["m.onnx", "m.onnx.data"]


def test_save_errors_are_one_clear_line(model, tmp_path):
    with pytest.raises(ModelSaveError, match="does not exist"):
        io.save(model, tmp_path / "missing" / "m.onnx")
    (tmp_path / "folder.onnx").mkdir()
    with pytest.raises(ModelSaveError, match="is a folder"):
        io.save(model, tmp_path / "folder.onnx")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores permissions")
def test_save_into_read_only_folder(model, tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        with pytest.raises(ModelSaveError, match="permission"):
            io.save(model, folder / "m.onnx")
    finally:
        folder.chmod(stat.S_IRWXU)


# --------------------------------------------------------------------------- load errors


def test_load_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="model file not found: .*nope.onnx"):
        io.load(tmp_path / "nope.onnx")


def test_load_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="is a directory"):
        io.load(tmp_path)


def test_load_empty_file(tmp_path):
    (tmp_path / "e.onnx").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="empty"):
        io.load(tmp_path / "e.onnx")
    with pytest.raises(ModelLoadError, match="empty"):
        io.load(b"")


@pytest.mark.parametrize("fraction", [0.5, 0.9, 0.1])
def test_load_truncated_file(exported, tmp_path, fraction):
    data = exported[0]
    path = tmp_path / "t.onnx"
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(ModelLoadError, match=r"t.onnx is not a valid ONNX model \(truncated or not protobuf\)") as info:
        io.load(path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "content",
    [b"hello, this is not a model\n", b"\x89PNG\r\n\x1a\n" + bytes(range(256)), b"{\"graph\": 1}"],
)
def test_load_non_onnx_file(tmp_path, content):
    path = tmp_path / "x.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match="is not a valid ONNX model") as info:
        io.load(path)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- external data path safety


def _external_tensor(name: str, location: str, values: np.ndarray) -> TensorProto:
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(values.shape))
    tensor.data_location = TensorProto.EXTERNAL
    for key, val in (("location", location), ("offset", "0"), ("length", str(values.nbytes))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, val
    return tensor


def _external_model(location: str, where: str = "main") -> onnx.ModelProto:
    """y = x + w with ``w`` stored at ``location``: as an initializer of the main graph, of an
    If branch, as a Constant node's value, or inside a model-local function."""
    w = np.arange(4, dtype=np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    tensor = _external_tensor("w", location, w)
    functions = []
    initializers = []
    opsets = [helper.make_opsetid("", 18)]
    if where == "main":
        nodes = [helper.make_node("Add", ["x", "w"], ["y"])]
        initializers = [tensor]
    elif where == "constant":
        nodes = [
            helper.make_node("Constant", [], ["w"], value=tensor),
            helper.make_node("Add", ["x", "w"], ["y"]),
        ]
    elif where == "subgraph":
        branch_out = helper.make_tensor_value_info("b", TensorProto.FLOAT, [4])
        then = helper.make_graph([helper.make_node("Add", ["x", "w"], ["b"])], "then", [], [branch_out], [tensor])
        other = helper.make_graph([helper.make_node("Identity", ["x"], ["b"])], "else", [], [branch_out])
        cond = helper.make_tensor("c", TensorProto.BOOL, [], [True])
        nodes = [helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)]
        initializers = [cond]
    elif where == "function":
        body = [
            helper.make_node("Constant", [], ["w"], value=tensor),
            helper.make_node("Add", ["a", "w"], ["o"]),
        ]
        functions = [helper.make_function("local", "AddW", ["a"], ["o"], body, opsets)]
        nodes = [helper.make_node("AddW", ["x"], ["y"], domain="local")]
        opsets = opsets + [helper.make_opsetid("local", 1)]
    else:  # pragma: no cover
        raise ValueError(where)
    graph = helper.make_graph(nodes, "g", [x], [y], initializers)
    return helper.make_model(graph, opset_imports=opsets, functions=functions, ir_version=10)


def _write_model(folder: Path, proto: onnx.ModelProto, name: str = "m.onnx") -> Path:
    path = folder / name
    path.write_bytes(proto.SerializeToString())
    return path


@pytest.fixture
def no_data_reads(monkeypatch):
    """Fail the test if any external tensor data is read."""

    def forbidden(self, *args, **kwargs):
        raise AssertionError(f"external data of {self.name} was read")

    monkeypatch.setattr(ir.ExternalTensor, "_load", forbidden)
    monkeypatch.setattr(ir.ExternalTensor, "tofile", forbidden)


@pytest.mark.parametrize("where", ["main", "constant", "subgraph", "function"])
def test_valid_external_data_loads_everywhere(tmp_path, where):
    (tmp_path / "w.bin").write_bytes(np.arange(4, dtype=np.float32).tobytes())
    model = io.load(_write_model(tmp_path, _external_model("w.bin", where)))
    x = np.ones(4, np.float32)
    np.testing.assert_array_equal(run(io.model_to_bytes(model), {"x": x})[0], x + np.arange(4))


@pytest.mark.parametrize("where", ["main", "constant", "subgraph", "function"])
@pytest.mark.parametrize("location", ["../secret.bin", "sub/../../secret.bin", "ABS"])
def test_escaping_locations_are_refused_before_reading(tmp_path, no_data_reads, where, location):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.arange(4, dtype=np.float32).tobytes())
    loc = str(secret) if location == "ABS" else location
    path = _write_model(model_dir, _external_model(loc, where))
    with pytest.raises(UnsafePathError, match="w") as info:
        io.load(path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("where", ["main", "subgraph", "function"])
def test_symlink_out_of_folder_is_refused(tmp_path, no_data_reads, where):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.arange(4, dtype=np.float32).tobytes())
    (model_dir / "w.bin").symlink_to(secret)
    path = _write_model(model_dir, _external_model("w.bin", where))
    with pytest.raises(UnsafePathError, match="symlink"):
        io.load(path)


def test_symlinked_folder_out_of_model_folder_is_refused(tmp_path, no_data_reads):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "w.bin").write_bytes(np.arange(4, dtype=np.float32).tobytes())
    (model_dir / "data").symlink_to(outside, target_is_directory=True)
    path = _write_model(model_dir, _external_model("data/w.bin"))
    with pytest.raises(UnsafePathError):
        io.load(path)


def test_symlink_inside_folder_is_allowed(tmp_path):
    (tmp_path / "real.bin").write_bytes(np.arange(4, dtype=np.float32).tobytes())
    (tmp_path / "w.bin").symlink_to(tmp_path / "real.bin")
    model = io.load(_write_model(tmp_path, _external_model("w.bin")))
    np.testing.assert_array_equal(model.graph.initializers["w"].const_value.numpy(), np.arange(4))


def test_model_folder_reached_through_a_symlink_is_fine(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "w.bin").write_bytes(np.arange(4, dtype=np.float32).tobytes())
    _write_model(real, _external_model("w.bin"))
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    model = io.load(tmp_path / "link" / "m.onnx")
    np.testing.assert_array_equal(model.graph.initializers["w"].const_value.numpy(), np.arange(4))


def test_hard_linked_external_data_file_is_refused(tmp_path, no_data_reads):
    (tmp_path / "elsewhere.bin").write_bytes(np.arange(4, dtype=np.float32).tobytes())
    os.link(tmp_path / "elsewhere.bin", tmp_path / "w.bin")
    with pytest.raises(UnsafePathError, match="hard links"):
        io.load(_write_model(tmp_path, _external_model("w.bin")))


def test_no_empty_data_file_when_nothing_goes_external(model, tmp_path):
    io.save(model, tmp_path / "m.onnx", external_data=True, tensor_threshold_bytes=10**9)
    assert _listing(tmp_path) == ["m.onnx"]


def test_missing_external_data_file(tmp_path, no_data_reads):
    path = _write_model(tmp_path, _external_model("w.bin"))
    with pytest.raises(ModelLoadError, match="external data file 'w.bin' of tensor 'w' not found"):
        io.load(path)


def test_truncated_external_data_file(tmp_path, no_data_reads):
    (tmp_path / "w.bin").write_bytes(b"\0" * 8)  # 16 bytes needed
    path = _write_model(tmp_path, _external_model("w.bin"))
    with pytest.raises(ModelLoadError, match="truncated"):
        io.load(path)


def test_bytes_with_external_data_resolve_against_base_dir(tmp_path):
    (tmp_path / "w.bin").write_bytes(np.arange(4, dtype=np.float32).tobytes())
    data = _external_model("w.bin").SerializeToString()
    model = io.load(data, base_dir=tmp_path)
    np.testing.assert_array_equal(model.graph.initializers["w"].const_value.numpy(), np.arange(4))
    with pytest.raises(UnsafePathError):
        io.load(_external_model("../w.bin").SerializeToString(), base_dir=tmp_path / "sub")
