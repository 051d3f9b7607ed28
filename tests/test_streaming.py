"""Models bigger than memory (issue 14): lazy external data, spilling, streaming passes, sharded saves.

The models are small exports (the zoo's ``mlp``: three Gemm layers) saved with external data; a
small spill threshold makes every weight take the large-model code paths. What is checked is the
mechanism, not the size: weights are read one at a time and unmapped after use, new weights go to
the spill file as they are made, results are bit-identical to the in-memory run, and no protobuf
ever has to hold the weights.
"""

from __future__ import annotations

import json
import os
import weakref

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxforge.errors import UnsupportedModelError
from onnxforge.ir import io
from onnxforge.ir.graph import iter_tensors
from onnxforge.ir.summary import quick_stats
from onnxforge.passes import PassContext, create_pass
from onnxforge.passes.manager import Pipeline
from onnxforge.runtime import memory
from onnxforge.testing.numerics import ort_session, random_inputs

SPILL_THRESHOLD = 1024  # bytes: every weight of the test MLP (>= 5 KB) is "large"


@pytest.fixture()
def external_mlp(zoo_model, tmp_path):
    """The zoo MLP saved with every tensor in ``mlp.onnx.data``; returns the path."""
    path = tmp_path / "src" / "mlp.onnx"
    path.parent.mkdir()
    io.save(zoo_model("mlp"), path, external_data=True, tensor_threshold_bytes=0)
    return path


def run(model, feeds) -> dict[str, np.ndarray]:
    """Outputs by name (onnxruntime, ORT_DISABLE_ALL); external data is read into the bytes."""
    session = ort_session(io.model_to_bytes(model))
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def assert_same_outputs(expected: dict, got: dict, atol: float = 0.0, rtol: float = 0.0) -> None:
    assert sorted(expected) == sorted(got), "outputs are compared by name"
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=rtol, atol=atol, err_msg=name)


def _externals(model):
    return [t for _g, _o, _a, t in iter_tensors(model) if isinstance(t, ir.ExternalTensor)]


class _MapTracker:
    """Counts reads of external tensors and the most weights memory-mapped at the same time."""

    def __init__(self, monkeypatch):
        self.reads: dict[str, int] = {}
        self.max_weights_mapped = 0
        self._live: weakref.WeakSet = weakref.WeakSet()
        original = ir.ExternalTensor.numpy
        tracker = self

        def numpy(tensor):
            array = original(tensor)
            tracker._live.add(tensor)
            tracker.reads[tensor.name] = tracker.reads.get(tensor.name, 0) + 1
            mapped = sum(1 for t in tracker._live if t.raw is not None and t.name.endswith("weight"))
            tracker.max_weights_mapped = max(tracker.max_weights_mapped, mapped)
            return array

        monkeypatch.setattr(ir.ExternalTensor, "numpy", numpy)


# --------------------------------------------------------------------------- load, sizes


def test_load_and_stats_leave_external_tensors_unread(external_mlp, monkeypatch):
    tracker = _MapTracker(monkeypatch)
    model = io.load(external_mlp)
    externals = _externals(model)
    assert len(externals) == 6
    stats = quick_stats(model)
    assert stats["params"] == sum(t.size for t in externals)
    assert io.tensor_bytes(model) == sum(t.nbytes for t in externals)
    assert io.largest_tensor_bytes(model) == 128 * 128 * 4
    assert io.has_external_data(model, min_bytes=1000)
    assert tracker.reads == {} and all(t.raw is None for t in externals)


# --------------------------------------------------------------------------- spilling


def test_spill_writes_large_tensors_progressively_and_reads_them_back(tmp_path):
    rng = np.random.default_rng(0)
    big = [rng.standard_normal((33, 17)).astype(np.float32) for _ in range(3)]
    small = ir.tensor(np.ones(4, np.float32), name="small")
    assert io.spill(ir.tensor(big[0])) is not None  # no store active: returned as is
    with io.spilling(tmp_path, threshold_bytes=SPILL_THRESHOLD) as store:
        assert store.folder.parent == tmp_path
        assert io.spill(small) is small
        spilled = []
        for i, array in enumerate(big):
            t = io.spill(ir.tensor(array, name=f"w{i}"))
            spilled.append(t)
            assert isinstance(t, ir.ExternalTensor) and t.name == f"w{i}"
            # written now, not at the end: the file already holds every tensor so far
            assert store.tensors == i + 1
            assert os.path.getsize(store.path) >= t.offset + array.nbytes
            assert t.offset % 64 == 0
        for t, array in zip(spilled, big):
            np.testing.assert_array_equal(t.numpy(), array)
        assert io.spill(spilled[0]) is spilled[0]  # already external
        folder = store.folder
    assert not folder.exists(), "the spill folder is removed when the block ends"


def test_spill_outside_a_store_is_a_no_op():
    t = ir.tensor(np.zeros((512, 512), np.float32))
    assert io.spill(t) is t
    model = ir.Model(ir.Graph([], [], nodes=[]), ir_version=10)
    assert io.spill_model(model) == 0


def test_pipeline_spills_weights_of_passes_that_keep_them_in_memory(zoo_model, tmp_path):
    """fold-affine creates new in-memory weights; the pipeline moves them to disk after the pass."""
    model = zoo_model("linear_affine")
    feeds = random_inputs(model, seed=0)
    expected = run(io.clone(model), feeds)
    with io.spilling(tmp_path, threshold_bytes=SPILL_THRESHOLD) as store:
        result = Pipeline("fold-affine").run(model)
        assert result.modified
        fc1 = model.graph.initializers["fc1.weight"].const_value
        assert isinstance(fc1, ir.ExternalTensor) and str(store.folder) in fc1.path
        io.save(model, tmp_path / "out.onnx")
        # spilling is an implementation detail: a model given inline is saved inline (< 2 GB)
        assert not (tmp_path / "out.onnx.data").exists()
    reloaded = io.load(tmp_path / "out.onnx")
    assert_same_outputs(expected, run(reloaded, feeds), rtol=1e-5, atol=1e-6)
    record = result.report.records[0]
    assert record.memory["peak_rss"] and record.memory["peak_anon"]


def test_verify_and_the_teacher_copy_work_with_spilled_weights(zoo_model, tmp_path):
    """--verify hands onnxruntime bytes, and the teacher is a serialized copy: both must still
    reach spilled (external) weights."""
    from onnxforge.passes import manager

    model = zoo_model("linear_affine")
    with io.spilling(tmp_path, threshold_bytes=SPILL_THRESHOLD):
        result = Pipeline("fold-affine,quantize-weights-int4(block_size=16)", verify=True).run(model)
        assert [r.verified for r in result.report.records] == [True, True]
        teacher = manager._deep_copy(model)
        for name, value in model.graph.initializers.items():
            np.testing.assert_array_equal(teacher.graph.initializers[name].const_value.numpy(),
                                          value.const_value.numpy())


# --------------------------------------------------------------------------- streaming passes


@pytest.mark.parametrize(
    "name, options",
    [
        ("quantize-weights-int4", {"block_size": 16}),
        ("quantize-dynamic", {}),
        ("convert-fp16", {}),
    ],
)
def test_weight_passes_stream_one_tensor_at_a_time(external_mlp, tmp_path, monkeypatch, name, options):
    in_memory = io.load(external_mlp, load_external_data=True)
    create_pass(name, options, PassContext())(in_memory)
    feeds = random_inputs(in_memory, seed=1)
    expected = run(in_memory, feeds)

    tracker = _MapTracker(monkeypatch)
    model = io.load(external_mlp)
    with io.spilling(tmp_path, threshold_bytes=SPILL_THRESHOLD) as store:
        result = create_pass(name, options, PassContext())(model)
        assert result.modified
        weights = [n for n in tracker.reads if n.endswith("weight")]
        assert sorted(weights) == ["0.weight", "2.weight", "4.weight"]
        assert all(tracker.reads[n] == 1 for n in weights), tracker.reads  # each read once
        assert tracker.max_weights_mapped == 1, "old weights must be unmapped before the next is read"
        new = [t for _g, _o, _a, t in iter_tensors(model) if t.nbytes >= SPILL_THRESHOLD]
        assert new and all(isinstance(t, ir.ExternalTensor) and str(store.folder) in t.path for t in new)
        got = run(model, feeds)
    # streaming changes where the bytes live, not the numbers
    assert_same_outputs(expected, got)


def test_quantize_blocks_in_column_chunks_is_exact(monkeypatch):
    from onnxforge.passes.quantize import dynamic, weight_only

    w = np.random.default_rng(2).standard_normal((40, 24)).astype(np.float32)
    whole = weight_only.quantize_blocks(w, 16, symmetric=False)
    monkeypatch.setattr(dynamic, "CHUNK_BYTES", 48 * 8 * 5)  # 5 columns per chunk
    assert len(dynamic.column_chunks(48, 24)) == 5
    chunked = weight_only.quantize_blocks(w, 16, symmetric=False)
    for a, b in zip(whole, chunked):
        np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------- dedup, digests


def test_digest_and_compare_read_in_chunks_without_mapping(external_mlp, monkeypatch):
    model = io.load(external_mlp)
    w = model.graph.initializers["2.weight"].const_value
    array = np.array(io.load(external_mlp, load_external_data=True).graph.initializers["2.weight"].const_value.numpy())
    monkeypatch.setattr(io, "READ_CHUNK_BYTES", 1000)  # uneven: chunks straddle rows
    chunks = list(bytes(c) for c in io.iter_tensor_chunks(w, chunk_bytes=1000))
    assert len(chunks) == -(-array.nbytes // 1000) and b"".join(chunks) == array.tobytes()
    assert io.tensor_digest(w) == io.tensor_digest(ir.tensor(array))
    assert io.same_bytes(w, ir.tensor(array))
    changed = array.copy()
    changed[-1, -1] += 1
    assert not io.same_bytes(w, ir.tensor(changed))
    # a transposed (non-contiguous) view hashes like its contiguous copy
    assert io.tensor_digest(ir.tensor(array.T)) == io.tensor_digest(ir.tensor(np.ascontiguousarray(array.T)))
    assert w.raw is None, "hashing must not memory-map the tensor"


def test_dedup_merges_external_duplicates_without_mapping(tmp_path):
    rng = np.random.default_rng(4)
    same = rng.standard_normal((32, 32)).astype(np.float32)
    other = same.copy()
    other[0, 0] += 1.0  # same shape and dtype, different bytes: kept
    graph = ir.Graph([], [], nodes=[], name="twins", opset_imports={"": 18})
    x = ir.Value(name="x", shape=ir.Shape([2, 32]), type=ir.TensorType(ir.DataType.FLOAT))
    graph.inputs.append(x)
    h = x
    for name, array in (("a", same), ("b", same), ("c", other)):
        v = ir.Value(name=name, shape=ir.Shape([32, 32]), type=ir.TensorType(ir.DataType.FLOAT),
                     const_value=ir.tensor(array.copy(), name=name))
        graph.register_initializer(v)
        node = ir.node("MatMul", [h, v], name=f"mm_{name}")
        graph.append(node)
        h = node.outputs[0]
        h.name, h.shape, h.type = f"h_{name}", ir.Shape([2, 32]), ir.TensorType(ir.DataType.FLOAT)
    graph.outputs.append(h)
    io.save(ir.Model(graph, ir_version=10), tmp_path / "m.onnx", external_data=True,
            tensor_threshold_bytes=0)
    feeds = {"x": rng.standard_normal((2, 32)).astype(np.float32)}
    expected = run(io.load(tmp_path / "m.onnx", load_external_data=True), feeds)
    lazy = io.load(tmp_path / "m.onnx")
    result = create_pass("dedup-initializers", {}, PassContext())(lazy)
    assert result.modified
    assert sorted(lazy.graph.initializers) == ["a", "c"]
    assert all(t.raw is None for t in _externals(lazy)), "dedup must hash from the file, not map it"
    assert_same_outputs(expected, run(lazy, feeds))


# --------------------------------------------------------------------------- save


def test_save_defaults_to_external_data_for_external_models(external_mlp, tmp_path):
    model = io.load(external_mlp)
    out = io.save(model, tmp_path / "out.onnx")  # no flag: the source had external data
    assert (tmp_path / "out.onnx.data").exists()
    proto = onnx.load(out, load_external_data=False)
    external = {t.name for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    assert external == {"0.weight", "2.weight", "4.weight"}  # biases (<= 1 KB) stay inline
    # large tensors are copied file to file (copy_file_range), never mapped; small ones are inlined
    assert all(t.raw is None for t in _externals(model) if t.nbytes > 1024), "no weight mapped"


def test_sharded_save_round_trips(external_mlp, tmp_path):
    model = io.load(external_mlp)
    io.save(model, tmp_path / "out.onnx", external_data=True, tensor_threshold_bytes=0,
            max_shard_size_bytes=40_000)
    shards = sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".data"))
    assert len(shards) == 3 and shards[0] == "out-00001-of-00003.onnx.data", shards
    # a shard holds at most 40 KB, or one tensor that is larger on its own (2.weight: 64 KB)
    assert all((tmp_path / name).stat().st_size <= 128 * 128 * 4 for name in shards)
    feeds = random_inputs(model, seed=3)
    reference = run(io.load(external_mlp, load_external_data=True), feeds)
    assert_same_outputs(reference, run(io.load(tmp_path / "out.onnx"), feeds))


def _sparse_model(tmp_path, n: int, shape=(16384, 16384)):
    """``n`` external fp32 tensors of 1 GiB each over one sparse file (no disk, no data read)."""
    data = tmp_path / "big.data"
    nbytes = shape[0] * shape[1] * 4
    with open(data, "wb") as f:
        f.truncate(n * nbytes)
    graph = ir.Graph([], [], nodes=[], name="big", opset_imports={"": 18})
    x = ir.Value(name="x", shape=ir.Shape([1, shape[0]]), type=ir.TensorType(ir.DataType.FLOAT))
    graph.inputs.append(x)
    h = x
    for i in range(n):
        t = ir.ExternalTensor("big.data", i * nbytes, nbytes, ir.DataType.FLOAT, shape=ir.Shape(shape),
                              name=f"w{i}", base_dir=str(tmp_path))
        v = ir.Value(name=f"w{i}", shape=ir.Shape(shape), type=ir.TensorType(ir.DataType.FLOAT), const_value=t)
        graph.register_initializer(v)
        node = ir.node("MatMul", [h, v], name=f"mm{i}")
        graph.append(node)
        h = node.outputs[0]
        h.name, h.shape, h.type = f"h{i}", ir.Shape([1, shape[1]]), ir.TensorType(ir.DataType.FLOAT)
    graph.outputs.append(h)
    return ir.Model(graph, ir_version=10)


def test_models_over_2gb_never_go_through_protobuf(tmp_path, monkeypatch):
    model = _sparse_model(tmp_path, 3)  # 3 GiB of tensors
    assert io.tensor_bytes(model) > io.PROTOBUF_LIMIT_BYTES
    with pytest.raises(UnsupportedModelError, match="2 GiB"):
        io.model_to_bytes(model)  # refused before reading anything
    calls = []

    def fake_external(model, folder, data_name, **kwargs):
        # the graph without its weights (writing 3 GiB is not the point of this test)
        calls.append(kwargs)
        proto = ir.serde.serialize_model(model)  # external tensors stay references: small
        assert proto.ByteSize() < 1 << 20
        return proto.SerializeToString()

    def no_inline(*args, **kwargs):
        raise AssertionError("a >2 GB model must not be serialized inline")

    monkeypatch.setattr(io, "_serialize_external", fake_external)
    import onnxforge.ir.validate as validate

    monkeypatch.setattr(validate, "check_file", lambda path: None)  # the stub wrote no data file
    monkeypatch.setattr(io, "_serialize_inline", no_inline)
    io.save(model, tmp_path / "out.onnx")
    assert len(calls) == 1
    assert all(t.raw is None for t in _externals(model))


# --------------------------------------------------------------------------- memory measurement


def test_peak_memory_sees_an_allocation_and_survives_nesting():
    if memory.read_status() is None:
        pytest.skip("needs /proc (Linux)")
    with memory.PeakMemory() as outer:
        with memory.PeakMemory() as inner:
            block = np.ones(64 << 20, np.uint8)  # 64 MiB, touched
            del block
        with memory.PeakMemory():
            pass  # a later inner reset must not hide the first inner block's peak from `outer`
    for m in (inner, outer):
        d = m.to_dict()
        assert d["peak_rss"] - d["start_rss"] >= 60 << 20, d
    assert inner.to_dict()["peak_anon"] >= 60 << 20


@pytest.mark.parametrize("text, expected", [("8G", 8 << 30), ("512M", 512 << 20), ("1.5GiB", int(1.5 * 2**30)),
                                            ("1000", 1000), ("2 gb", 2 << 30)])
def test_parse_size(text, expected):
    assert memory.parse_size(text) == expected


def test_parse_size_rejects_garbage():
    with pytest.raises(ValueError, match="memory size"):
        memory.parse_size("lots")


def test_estimate_names_the_pass_that_needs_the_model():
    gb = 2**30
    streaming = memory.estimate_peak(28 * gb, gb // 4, ["cse", "dedup-initializers", "quantize-weights-int4"])
    assert streaming.bytes < 2 * gb and streaming.culprit == "quantize-weights-int4"
    # fold-affine spills each folded weight, so it streams like the quantizers (4 x the largest tensor)
    folding = memory.estimate_peak(28 * gb, gb // 4, ["fold-affine", "quantize-weights-int4"])
    assert folding.bytes < 2 * gb
    whole = memory.estimate_peak(28 * gb, gb // 4, ["fold-affine", "prune-channels"])
    assert whole.culprit == "prune-channels" and whole.bytes > 56 * gb
    assert memory.estimate_peak(28 * gb, gb // 4, ["cse"], verify=True).culprit == "--verify"


# --------------------------------------------------------------------------- CLI


def test_cli_reports_memory_per_pass_and_leaves_no_spill_files(external_mlp, tmp_path):
    from click.testing import CliRunner

    from onnxforge.cli import main

    out = tmp_path / "out" / "m.onnx"
    out.parent.mkdir()
    report = tmp_path / "r.json"
    result = CliRunner().invoke(main, ["optimize", str(external_mlp), "-o", str(out), "--passes",
                                       "O1,quantize-weights-int4(block_size=16)", "--report", str(report), "-q"])
    assert result.exit_code == 0, result.output
    # the spill folder (made beside the output) is gone; the input's weights were external, so the
    # output's are too, although int4 replaced every original weight
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.onnx", "m.onnx.data"]
    passes = json.loads(report.read_text())["passes"]
    assert all(p["memory"]["peak_rss"] > 0 and p["memory"]["peak_anon"] > 0 for p in passes)


def test_cli_max_memory_refuses_up_front(external_mlp, tmp_path):
    from click.testing import CliRunner

    from onnxforge.cli import main

    out = tmp_path / "m.onnx"
    result = CliRunner().invoke(main, ["optimize", str(external_mlp), "-o", str(out), "--passes",
                                       "O1,prune-channels", "--max-memory", "1M"])
    assert result.exit_code == 2
    assert "--max-memory 1M" in result.output and "estimated to need" in result.output
    assert len(result.output.strip().splitlines()) == 1  # one line, no traceback
    assert not out.exists()
    bad = CliRunner().invoke(main, ["optimize", str(external_mlp), "-o", str(out), "--max-memory", "lots"])
    assert bad.exit_code == 2 and "memory size" in bad.output
    ok = CliRunner().invoke(main, ["optimize", str(external_mlp), "-o", str(out), "--max-memory", "8G", "-q"])
    assert ok.exit_code == 0, ok.output


# --------------------------------------------------------------------------- data-driven passes


@pytest.mark.parametrize(
    "pipeline",
    [
        "O2,quantize-int8(bias_correction=true,max_drop=0.02)",
        "O2,quantize-int8(weight_rounding=gptq,range_search=weighted)",
        "O1,prune-channels(ratio=0.25),reconstruct",
        "O1,prune-channels(target_latency=0.9,criterion=activation,latency_table={table}),reconstruct,quantize-int8",
        "O1,prune-channels(ratio=0.25),reconstruct,distill(epochs=1,max_samples=64)",
        # per-layer timing builds region models from the weights (layout, 800x608, takes this path)
        "O1,prune-channels(target_latency=0.9,latency_scope=layer,latency_table={table}),reconstruct",
    ],
)
def test_data_driven_passes_reach_external_and_spilled_weights(trained_digits, tmp_path, monkeypatch, pipeline):
    """Passes that copy the model or hand it to onnxruntime as bytes must carry external weights
    along: a model loaded with external data (its tensors refer to its own folder) and the spill
    store (``onnxforge optimize``: every weight a pass makes moves to a scratch file) serialize as
    references that bytes cannot resolve. The CLI's O3 failed this way on a trained YOLOX detector
    (``No such file or directory: 'spill.data'``). The result equals the in-memory run's (a latency
    table measured by the external run, with the bug's path, is read back by the in-memory one)."""
    pipeline = pipeline.format(table=tmp_path / "latency.json")
    src = tmp_path / "src" / "digits.onnx"
    src.parent.mkdir()
    io.save(io.clone(trained_digits["model"]), src, external_data=True, tensor_threshold_bytes=1024)
    calib, x = trained_digits["calib"], trained_digits["x"][:64]
    feeds = {trained_digits["name"]: x}
    context = dict(calibration_data=calib, seed=0)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # relative references must not resolve by accident
    model = io.load(src)
    with io.spilling(tmp_path / "spill", threshold_bytes=SPILL_THRESHOLD):
        Pipeline(pipeline, context=PassContext(**context)).run(model)
        got = run(model, feeds)

    in_memory = io.load(src, load_external_data=True)
    Pipeline(pipeline, context=PassContext(**context)).run(in_memory)
    assert_same_outputs(run(in_memory, feeds), got)


def test_cli_o3_with_a_report_on_external_weights(trained_digits, tmp_path, monkeypatch):
    """``onnxforge optimize --preset O3 --report r.html`` on a model stored with external data, run
    from another folder, with the spill store taking every new weight (threshold lowered): what a
    user with a real model does. It exits 0 and the int8 model is the in-memory pipeline's."""
    from click.testing import CliRunner

    from onnxforge.cli import main

    src = tmp_path / "src" / "digits.onnx"
    src.parent.mkdir()
    io.save(io.clone(trained_digits["model"]), src, external_data=True, tensor_threshold_bytes=1024)
    calib = tmp_path / "calib.npz"
    name = trained_digits["name"]
    np.savez(calib, **{name: np.concatenate([c[name] for c in trained_digits["calib"]])})
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(io.spilling.__wrapped__, "__defaults__", (None, SPILL_THRESHOLD))
    spilled = []
    monkeypatch.setattr(io.SpillStore, "close", lambda self, close=io.SpillStore.close: (spilled.append(self.tensors),
                                                                                       close(self)))
    result = CliRunner().invoke(main, ["optimize", str(src), "-o", "o3.onnx", "--preset", "O3", "--calibration-data",
                                       str(calib), "--report", "r.html", "--quiet"])
    assert result.exit_code == 0, result.output
    assert spilled and spilled[0] > 0, "the run must have moved weights to the spill file"
    page = (work / "r.html").read_text()
    assert "dB" in page  # the per-layer SQNR table ran the float reference and the int8 model
    feeds = {name: trained_digits["x"][:64]}
    reference = run(io.load(src, load_external_data=True), feeds)
    got = run(io.load(work / "o3.onnx"), feeds)
    agreement = np.mean(got[next(iter(got))].argmax(1) == reference[next(iter(reference))].argmax(1))
    assert agreement >= 0.95
