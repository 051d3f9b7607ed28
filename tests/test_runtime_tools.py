"""Runtime tools: tune-runtime sweep, data-parallel runs, the profiler table, IO binding for GPUs."""

from __future__ import annotations

import types

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxforge.errors import CalibrationDataError, ProviderError
from onnxforge.runtime.parallel import run_parallel, split_shards
from onnxforge.runtime.profile import parse_trace, profile
from onnxforge.runtime.session import SessionInfo
from onnxforge.runtime.tune import TunePoint, batch_axis, make_runner, measure, recommend, tune
from onnxforge.testing import numerics

N_SAMPLES = 37  # not a multiple of the batch size nor of the worker count


@pytest.fixture(scope="module")
def cnn_path(tmp_path_factory, zoo_model):
    """digits_cnn (Conv+BN+ReLU blocks, residual, GAP, Linear) with a dynamic batch axis, on disk."""
    import torch  # noqa: F401
    model = zoo_model("digits_cnn")
    assert batch_axis(model).dynamic
    path = tmp_path_factory.mktemp("rt") / "digits_cnn.onnx"
    ir.save(model, path)
    return path


@pytest.fixture(scope="module")
def dataset(cnn_path, tmp_path_factory):
    x = np.random.default_rng(0).standard_normal((N_SAMPLES, 1, 8, 8)).astype(np.float32)
    path = tmp_path_factory.mktemp("data") / "inputs.npz"
    np.savez(path, input=x)
    return path, x


# --------------------------------------------------------------------------- tune-runtime


def test_tune_finds_a_batch_above_one_with_higher_throughput(cnn_path):
    seen = []
    result = tune(cnn_path, batch_sizes=[1, 4, 16], threads=[1], rounds=4, per_round=5,
                  progress=lambda done, total, label: seen.append((done, total, label)))
    assert result.dynamic_batch and result.batch_sizes == [1, 4, 16]
    assert [(p.batch_size, p.threads) for p in result.points] == [(1, 1), (4, 1), (16, 1)]
    best = result.recommended
    assert best is not None and best.batch_size > 1
    at_one = next(p for p in result.points if p.batch_size == 1)
    assert best.throughput_per_s > at_one.throughput_per_s
    assert seen[-1][0] == seen[-1][1] == 3 * 4  # one progress tick per setting per round
    assert result.providers_used[0] == "CPUExecutionProvider" and not result.io_binding
    assert result.to_dict()["recommended"]["batch_size"] == best.batch_size


def test_tune_with_a_latency_bound_nobody_meets_says_so(cnn_path):
    result = tune(cnn_path, batch_sizes=[1, 2], threads=[1], max_latency_ms=1e-6, rounds=1, per_round=2)
    assert result.recommended is None
    assert not any(p.meets_bound for p in result.points)
    assert any("no setting meets" in note for note in result.notes)


def test_tune_fixed_batch_sweeps_threads_only(cnn_path):
    model = ir.load(cnn_path)
    model.graph.inputs[0].shape = ir.Shape([1, 1, 8, 8])
    axis = batch_axis(model)
    assert not axis.dynamic and axis.size == 1
    result = tune(model, batch_sizes=[1, 8], threads=[1, 2], rounds=1, per_round=2)
    assert not result.dynamic_batch and result.batch_sizes == [1]
    assert sorted(p.threads for p in result.points) == [1, 2]
    assert any("fixed batch axis of 1" in note and "only threads" in note for note in result.notes)


def test_tune_rejects_bad_settings(cnn_path):
    with pytest.raises(ProviderError, match="batch sizes"):
        tune(cnn_path, batch_sizes=[0])
    with pytest.raises(ProviderError, match="latency_stat"):
        tune(cnn_path, latency_stat="p42")


def _point(batch, threads, p90, throughput):
    return TunePoint(batch, threads, p90 / 2, p90, p90 * 2, throughput, 10)


def test_recommend_maximizes_throughput_under_the_bound():
    points = [_point(1, 1, 1.0, 1000), _point(8, 1, 5.0, 1600), _point(32, 1, 20.0, 1800), _point(8, 2, 4.0, 1600)]
    assert recommend(points).batch_size == 32
    best = recommend(points, max_latency_ms=6.0)
    assert (best.batch_size, best.threads) == (8, 2)  # tie on throughput: lower latency wins
    assert recommend(points, max_latency_ms=0.5) is None
    assert recommend(points, max_latency_ms=2.5, latency_stat="p99").batch_size == 1


# --------------------------------------------------------------------------- data-parallel run


def test_run_with_two_workers_matches_one_process_in_order(cnn_path, dataset):
    path, x = dataset
    single = run_parallel(cnn_path, path, workers=1, threads_per_worker=1, batch_size=4)
    double = run_parallel(cnn_path, path, workers=2, threads_per_worker=1, batch_size=4)
    assert double.workers == 2 and double.shards == [20, 17]  # cut on batch boundaries
    assert single.outputs.keys() == double.outputs.keys()
    for name in single.outputs:
        assert single.outputs[name].shape[0] == N_SAMPLES
        np.testing.assert_array_equal(double.outputs[name], single.outputs[name])
    # ... and in input order: sample i's output is the model's output for sample i.
    reference = numerics.ort_session(cnn_path.read_bytes(), optimize=True)
    name = reference.get_outputs()[0].name
    for i in (0, 17, 19, 20, 36):
        expected = reference.run([name], {"input": x[i : i + 1]})[0][0]
        np.testing.assert_allclose(double.outputs[name][i], expected, rtol=1e-5, atol=1e-6)
    assert double.compute_s > 0 and double.wall_s >= double.compute_s
    assert double.providers_used == [["CPUExecutionProvider"]] * 2


def test_split_shards_cover_everything_on_batch_boundaries():
    assert split_shards(37, 2, 4) == [(0, 20), (20, 37)]
    assert split_shards(10, 3, 1) == [(0, 4), (4, 7), (7, 10)]
    assert split_shards(3, 4, 1) == [(0, 1), (1, 2), (2, 3), (3, 3)]
    for n, w, b in [(100, 3, 8), (7, 2, 3), (1, 1, 1)]:
        shards = split_shards(n, w, b)
        assert shards[0][0] == 0 and shards[-1][1] == n
        assert all(a[1] == c[0] for a, c in zip(shards, shards[1:]))
        assert all(lo % b == 0 for lo, _ in shards)


def _fixed_model() -> ir.Model:
    F = onnx.TensorProto.FLOAT
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Mul", ["x", "w"], ["y"])], "fixed",
        [onnx.helper.make_tensor_value_info("x", F, [2, 3])], [onnx.helper.make_tensor_value_info("y", F, [2, 3])],
        initializer=[onnx.numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), "w")],
    )
    return ir.serde.deserialize_model(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)]))


def test_run_model_without_batch_axis_feeds_samples_one_by_one():
    x = np.random.default_rng(1).standard_normal((5, 2, 3)).astype(np.float32)
    result = run_parallel(_fixed_model(), {"x": x}, workers=1, threads_per_worker=1)
    np.testing.assert_allclose(result.outputs["y"], x * np.arange(6, dtype=np.float32).reshape(2, 3))
    with pytest.raises(CalibrationDataError, match="batch_size must be 1"):
        run_parallel(_fixed_model(), {"x": x}, workers=1, batch_size=2)


def test_run_rejects_data_that_does_not_fit(cnn_path, dataset):
    with pytest.raises(CalibrationDataError, match="missing input"):
        run_parallel(cnn_path, {"other": np.zeros((2, 1, 8, 8), np.float32)}, workers=1)
    with pytest.raises(CalibrationDataError, match="not found"):
        run_parallel(cnn_path, dataset[0].with_name("missing.npz"), workers=1)
    with pytest.raises(ProviderError, match="workers"):
        run_parallel(cnn_path, dataset[0], workers=0)


# --------------------------------------------------------------------------- profiling


def test_profile_table_has_conv_with_provider(cnn_path):
    result = profile(cnn_path, runs=5, warmup=2, top=3, batch_size=2)
    op_types = {row.op_type: row for row in result.op_types}
    assert "Conv" in op_types
    assert op_types["Conv"].providers == ["cpu"] and op_types["Conv"].calls == 5 * op_types["Conv"].nodes
    assert sum(row.percent for row in result.op_types) == pytest.approx(100.0)
    assert len(result.nodes) == 3 and all(n.provider == "cpu" for n in result.nodes)
    assert result.nodes[0].total_ms >= result.nodes[-1].total_ms
    assert result.runs == 5 and result.kernel_ms_per_run <= result.run_ms_per_run * 1.05


def test_profile_without_optimizations_shows_the_models_own_nodes(cnn_path):
    result = profile(cnn_path, runs=2, warmup=0, top=100, optimize="disable")
    names = {n.name for n in ir.load(cnn_path).graph}
    assert {n.name for n in result.nodes} <= names
    assert "Conv" in {row.op_type for row in result.op_types}


def _event(cat, name, ts, dur, **args):
    return {"cat": cat, "name": name, "ts": ts, "dur": dur, "ph": "X", "args": args}


def test_parse_trace_skips_warmup_runs_and_aggregates():
    events = [
        _event("Node", "conv_kernel_time", 1, 100, op_name="Conv", provider="CUDAExecutionProvider"),
        _event("Session", "model_run", 0, 150),  # warm-up, left out
        _event("Node", "conv_kernel_time", 201, 10, op_name="Conv", provider="CUDAExecutionProvider"),
        _event("Node", "relu_kernel_time", 212, 30, op_name="Relu", provider="CPUExecutionProvider"),
        _event("Node", "conv2_kernel_time", 243, 20, op_name="Conv", provider="CUDAExecutionProvider"),
        _event("Session", "model_run", 200, 70),
    ]
    result = parse_trace(events, warmup=1, top=2)
    assert result.runs == 1 and result.kernel_ms_per_run == pytest.approx(0.06)
    assert [(r.op_type, r.providers, r.nodes) for r in result.op_types] == [("Conv", ["cuda"], 2), ("Relu", ["cpu"], 1)]
    assert result.op_types[0].percent == pytest.approx(50.0)
    assert [(n.name, n.provider) for n in result.nodes] == [("relu", "cpu"), ("conv2", "cuda")]
    with pytest.raises(ProviderError, match="warm-up"):
        parse_trace(events, warmup=2)


# --------------------------------------------------------------------------- IO binding


class _FakeBinding:
    def __init__(self):
        self.inputs, self.outputs = [], []

    def bind_ortvalue_input(self, name, value):
        self.inputs.append((name, value))

    def bind_output(self, name, device_type, device_id):
        self.outputs.append((name, device_type, device_id))


class _FakeSession:
    """Records what a runner does; looks like an onnxruntime.InferenceSession to bench_feeds."""

    def __init__(self):
        self.binding = _FakeBinding()
        self.bound_runs = 0
        self.plain_runs = 0

    def get_inputs(self):
        return [types.SimpleNamespace(name="x", type="tensor(float)", shape=["batch", 3])]

    def get_outputs(self):
        return [types.SimpleNamespace(name="y"), types.SimpleNamespace(name="z")]

    def io_binding(self):
        return self.binding

    def run_with_iobinding(self, binding):
        assert binding is self.binding
        self.bound_runs += 1

    def run(self, names, feeds):
        self.plain_runs += 1
        return [feeds["x"], feeds["x"]]


def test_io_binding_copies_inputs_once_and_binds_outputs_on_the_gpu():
    session = _FakeSession()
    info = SessionInfo(session, ["CUDAExecutionProvider", "CPUExecutionProvider"])
    copies = []

    def to_device(array, device, device_id):
        copies.append((array.shape, device, device_id))
        return ("on-device", device, device_id)

    feeds = {"x": np.ones((4, 3), np.float32)}
    runner = make_runner(info, feeds, provider_options={"cuda": {"device_id": 1}}, ortvalue_factory=to_device)
    for _ in range(3):
        runner()
    assert runner.io_binding and runner.device == "cuda" and runner.device_id == 1
    assert copies == [((4, 3), "cuda", 1)]  # one host->device copy, not one per run
    assert session.binding.inputs == [("x", ("on-device", "cuda", 1))]
    assert session.binding.outputs == [("y", "cuda", 1), ("z", "cuda", 1)]
    assert session.bound_runs == 3 and session.plain_runs == 0


def test_io_binding_defaults_off_on_cpu_and_can_be_forced():
    session = _FakeSession()
    cpu = SessionInfo(session, ["CPUExecutionProvider"])
    result, runner = measure(cpu, batch_size=2, warmup=1, repeat=4)
    assert not runner.io_binding and session.plain_runs == 5 and session.bound_runs == 0
    assert result.batch_size == 2 and result.n == 4

    gpu = SessionInfo(_FakeSession(), ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    result, runner = measure(gpu, batch_size=2, warmup=1, repeat=4, ortvalue_factory=lambda a, d, i: a)
    assert runner.io_binding and runner.device == "cuda" and runner.device_id == 0
    assert gpu.session.bound_runs == 5 and gpu.session.plain_runs == 0
    assert result.providers_used[0] == "TensorrtExecutionProvider"

    forced = make_runner(cpu, {"x": np.ones((2, 3), np.float32)}, io_binding=True, ortvalue_factory=lambda a, d, i: a)
    forced()
    assert forced.io_binding and forced.device == "cpu" and session.bound_runs == 1

    off = make_runner(gpu, {"x": np.ones((2, 3), np.float32)}, io_binding=False)
    off()
    assert not off.io_binding and gpu.session.plain_runs == 1


def test_io_binding_path_runs_on_a_real_onnxruntime_session(cnn_path):
    from onnxforge.runtime.session import make_session

    info = make_session(cnn_path, ["cpu"])
    x = np.random.default_rng(2).standard_normal((4, 1, 8, 8)).astype(np.float32)
    runner = make_runner(info, {"input": x}, io_binding=True)  # forced: CPU "device" memory
    bound = runner().copy_outputs_to_cpu()[0]
    np.testing.assert_array_equal(bound, info.session.run(None, {"input": x})[0])
    result, runner = measure(info, {"input": x}, io_binding=True, warmup=1, repeat=3)
    assert runner.io_binding and result.n == 3 and result.batch_size == 4
