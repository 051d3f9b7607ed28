"""Providers, session creation with fallback, and validated runs (CPU only; GPU paths are faked)."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxforge.errors import CalibrationDataError, ProviderError
from onnxforge.runtime.providers import (
    CPU,
    CUDA,
    TENSORRT,
    CPUOptions,
    CUDAOptions,
    TensorRTOptions,
    parse_provider_options,
    provider_name,
    select_providers,
    short_name,
)
from onnxforge.runtime.session import ProviderFallbackWarning, make_session, run

ALL = [TENSORRT, CUDA, CPU]


def tiny_model() -> onnx.ModelProto:
    """y = relu(x + b), x: float32 [batch, 3], plus an int64 'n' input passed through."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "b"], ["s"]), helper.make_node("Relu", ["s"], ["y"]),
         helper.make_node("Identity", ["n"], ["m"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3]),
         helper.make_tensor_value_info("n", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3]),
         helper.make_tensor_value_info("m", TensorProto.INT64, [2])],
        initializer=[helper.make_tensor("b", TensorProto.FLOAT, [3], [1.0, -1.0, 0.5])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


class FakeSession:
    def __init__(self, providers):
        self._providers = list(providers)

    def get_providers(self):
        return self._providers


class FakeFactory:
    """Stands in for onnxruntime.InferenceSession; records every call."""

    def __init__(self, fail=(), drop=()):
        self.fail, self.drop, self.calls = set(fail), set(drop), []

    def __call__(self, model, sess_options=None, providers=None, provider_options=None):
        self.calls.append({"model": model, "sess_options": sess_options, "providers": providers,
                           "provider_options": provider_options})
        if providers[0] in self.fail:
            raise RuntimeError(f"{providers[0]}: libnvinfer.so.10: cannot open shared object file")
        return FakeSession([p for p in providers if p not in self.drop])


# --- names and selection ------------------------------------------------------------------------

def test_provider_names_round_trip():
    assert provider_name("tensorrt") == TENSORRT
    assert provider_name("TRT") == TENSORRT
    assert provider_name("cuda") == CUDA
    assert provider_name("cpu") == CPU
    assert provider_name("DmlExecutionProvider") == "DmlExecutionProvider"
    assert provider_name("CoreML") == "CoreMLExecutionProvider"
    assert provider_name("MyPluginExecutionProvider") == "MyPluginExecutionProvider"
    assert short_name(CUDA) == "cuda" and short_name(TENSORRT) == "tensorrt"
    with pytest.raises(ProviderError, match="unknown execution provider 'gpu'"):
        provider_name("gpu")


def test_select_providers_filters_and_ends_with_cpu():
    assert select_providers(available=ALL) == ALL
    assert select_providers(available=[CUDA, CPU]) == [CUDA, CPU]
    assert select_providers(available=["AzureExecutionProvider", CPU]) == [CPU]
    # CPU is appended even when not preferred and the order of `preferred` is kept
    assert select_providers(("cuda", "tensorrt"), available=ALL) == [CUDA, TENSORRT, CPU]
    assert select_providers(("cpu", "cuda"), available=ALL) == [CUDA, CPU]
    assert select_providers() [-1] == CPU  # the real onnxruntime list


# --- typed options ------------------------------------------------------------------------------

def test_tensorrt_options_to_ort_keys():
    opts = TensorRTOptions(fp16=True, int8=True, engine_cache_dir="/tmp/eng", timing_cache_dir="/tmp/tim",
                           workspace_bytes=1 << 30, device_id=1)
    assert opts.to_ort() == {
        "device_id": "1",
        "trt_fp16_enable": "True",
        "trt_int8_enable": "True",
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": "/tmp/eng",
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": "/tmp/tim",
        "trt_max_workspace_size": str(1 << 30),
    }
    assert TensorRTOptions().to_ort() == {"device_id": "0", "trt_fp16_enable": "False", "trt_int8_enable": "False"}


def test_cuda_and_cpu_options():
    assert CUDAOptions(device_id=1, conv_algo_search="heuristic").to_ort() == {
        "device_id": "1", "cudnn_conv_algo_search": "HEURISTIC"}
    full = CUDAOptions(gpu_mem_limit_bytes=2 << 30, arena_extend_strategy="kSameAsRequested",
                       conv_use_max_workspace=True, copy_in_default_stream=False).to_ort()
    assert full["gpu_mem_limit"] == str(2 << 30) and full["arena_extend_strategy"] == "kSameAsRequested"
    assert full["cudnn_conv_use_max_workspace"] == "1" and full["do_copy_in_default_stream"] == "0"
    with pytest.raises(ProviderError, match="conv_algo_search"):
        CUDAOptions(conv_algo_search="FASTEST")
    cpu = CPUOptions(intra_op_threads=2, inter_op_threads=2, arena=False, execution_mode="parallel")
    assert cpu.to_ort() == {}
    settings = cpu.session_settings()
    assert settings["intra_op_num_threads"] == 2 and settings["inter_op_num_threads"] == 2
    assert settings["enable_cpu_mem_arena"] is False


def test_parse_provider_options_from_dicts():
    trt = parse_provider_options("tensorrt", {"fp16": "true", "engine_cache_dir": "cache", "workspace_bytes": "1024"})
    assert isinstance(trt, TensorRTOptions) and trt.fp16 and trt.workspace_bytes == 1024
    # onnxruntime's own key names are accepted too
    trt2 = parse_provider_options("TensorrtExecutionProvider", {"trt_fp16_enable": True, "trt_engine_cache_path": "c"})
    assert trt2.to_ort()["trt_engine_cache_enable"] == "True"
    cuda = parse_provider_options("cuda", {"device_id": 1, "cudnn_conv_algo_search": "DEFAULT"})
    assert cuda.to_ort() == {"device_id": "1", "cudnn_conv_algo_search": "DEFAULT"}


@pytest.mark.parametrize(
    "provider, options, message",
    [
        ("tensorrt", {"fp17": True}, "unknown option 'fp17'"),
        ("cuda", {"trt_fp16_enable": True}, "unknown option 'trt_fp16_enable'"),
        ("cpu", {"threads": 2}, "unknown option 'threads'"),
        ("tensorrt", {"fp16": "maybe"}, "expects true/false"),
        ("tensorrt", {"workspace_bytes": "lots"}, "expects an integer"),
        ("tensorrt", {"int8_calibration_table": "calib.flatbuffers", "engine_cache_dir": "c"}, "int8 is off"),
        ("tensorrt", {"trt_engine_cache_enable": True}, "needs its folder"),
        ("tensorrt", {"device_id": -1}, "device_id"),
        ("cpu", {"inter_op_threads": 4}, "execution_mode='parallel'"),
    ],
)
def test_bad_provider_options(provider, options, message):
    with pytest.raises(ProviderError, match=message):
        parse_provider_options(provider, options)


# --- fallback -------------------------------------------------------------------------------------

def test_fallback_tensorrt_fails_then_cuda():
    factory = FakeFactory(fail={TENSORRT})
    with pytest.warns(ProviderFallbackWarning, match="tensorrt not used: session creation failed"):
        info = make_session(tiny_model(), ("tensorrt", "cuda", "cpu"), session_factory=factory, available=ALL)
    assert info.providers_used == [CUDA, CPU]
    assert info.provider == CUDA
    assert [p for p, _ in info.fallbacks] == [TENSORRT]
    assert "libnvinfer" in info.fallbacks[0][1]
    assert [c["providers"] for c in factory.calls] == [[TENSORRT, CUDA, CPU], [CUDA, CPU]]


def test_fallback_all_the_way_to_cpu():
    factory = FakeFactory(fail={TENSORRT, CUDA})
    with pytest.warns(ProviderFallbackWarning):
        info = make_session(tiny_model(), ("tensorrt", "cuda"), session_factory=factory, available=ALL)
    assert info.providers_used == [CPU]
    assert [p for p, _ in info.fallbacks] == [TENSORRT, CUDA]
    assert all("session creation failed" in r for _, r in info.fallbacks)


def test_silently_dropped_provider_is_reported():
    # onnxruntime-gpu without cuDNN logs an error and runs on CPU: get_providers() tells.
    factory = FakeFactory(drop={TENSORRT, CUDA})
    with pytest.warns(ProviderFallbackWarning, match="dropped"):
        info = make_session(tiny_model(), ("tensorrt", "cuda", "cpu"), session_factory=factory, available=ALL)
    assert info.providers_used == [CPU]
    assert [p for p, _ in info.fallbacks] == [TENSORRT, CUDA]
    assert len(factory.calls) == 1


def test_unavailable_provider_is_not_tried():
    factory = FakeFactory()
    with pytest.warns(ProviderFallbackWarning, match="not available in this onnxruntime build"):
        info = make_session(tiny_model(), ("tensorrt", "cuda"), session_factory=factory, available=[CUDA, CPU])
    assert info.providers_used == [CUDA, CPU]
    assert info.fallbacks[0][0] == TENSORRT
    assert factory.calls[0]["providers"] == [CUDA, CPU]


def test_strict_raises_with_every_reason():
    factory = FakeFactory(fail={TENSORRT, CUDA})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ProviderError, match="tensorrt: .*libnvinfer.*cuda: .*libnvinfer"):
            make_session(tiny_model(), ("tensorrt", "cuda"), session_factory=factory, available=ALL, strict=True)


def test_provider_options_reach_the_session_as_onnxruntime_expects():
    factory = FakeFactory()
    make_session(
        tiny_model(),
        ("tensorrt", "cuda", "cpu"),
        provider_options={
            "tensorrt": {"fp16": True, "engine_cache_dir": "/cache/trt", "timing_cache_dir": "/cache/timing",
                         "workspace_bytes": 2 << 30},
            "cuda": CUDAOptions(device_id=1, conv_algo_search="HEURISTIC"),
        },
        threads=2,
        optimize="all",
        session_factory=factory,
        available=ALL,
    )
    (call,) = factory.calls
    assert call["providers"] == [TENSORRT, CUDA, CPU]
    assert call["provider_options"] == [
        {
            "device_id": "0",
            "trt_fp16_enable": "True",
            "trt_int8_enable": "False",
            "trt_engine_cache_enable": "True",
            "trt_engine_cache_path": "/cache/trt",
            "trt_timing_cache_enable": "True",
            "trt_timing_cache_path": "/cache/timing",
            "trt_max_workspace_size": str(2 << 30),
        },
        {"device_id": "1", "cudnn_conv_algo_search": "HEURISTIC"},
        {},
    ]
    import onnxruntime as ort

    assert call["sess_options"].intra_op_num_threads == 2
    assert call["sess_options"].graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert isinstance(call["model"], bytes)


def test_real_onnxruntime_accepts_our_cpu_settings(tmp_path):
    path = tmp_path / "tiny.onnx"
    onnx.save(tiny_model(), path)
    info = make_session(str(path), ("cpu",), provider_options={"cpu": {"intra_op_threads": 1, "arena": False}})
    assert info.providers_used == [CPU] and info.fallbacks == []
    out = info.run({"x": np.array([[1.0, 1.0, -1.0]], np.float32), "n": np.array([3, 4])})
    np.testing.assert_allclose(out["y"], [[2.0, 0.0, 0.0]])
    np.testing.assert_array_equal(out["m"], [3, 4])


def test_options_for_an_unrequested_provider_are_an_error():
    with pytest.raises(ProviderError, match="not among the providers"):
        make_session(tiny_model(), ("cpu",), provider_options={"cuda": {"device_id": 0}})


def test_threads_conflicting_with_cpu_options():
    with pytest.raises(ProviderError, match="conflicts"):
        make_session(tiny_model(), ("cpu",), threads=2, provider_options={"cpu": {"intra_op_threads": 1}})


def test_bad_optimize_level():
    with pytest.raises(ProviderError, match="optimize"):
        make_session(tiny_model(), optimize="max")


# --- run ------------------------------------------------------------------------------------------

def test_run_validates_feeds():
    info = make_session(tiny_model())
    x = np.ones((4, 3), np.float32)
    n = np.array([1, 2], np.int64)
    assert run(info, {"x": x, "n": n})["y"].shape == (4, 3)  # symbolic batch: any size
    # float64 data for a float32 input is cast (numpy's default dtype), int32 to int64 likewise
    assert run(info.session, {"x": x.astype(np.float64), "n": n.astype(np.int32)})["y"].dtype == np.float32
    with pytest.raises(CalibrationDataError, match=r"missing input\(s\) \['n'\]"):
        run(info, {"x": x})
    with pytest.raises(CalibrationDataError, match=r"unknown input\(s\) \['z'\]"):
        run(info, {"x": x, "n": n, "z": n})
    with pytest.raises(CalibrationDataError, match="'x' expects float32, got int64"):
        run(info, {"x": x.astype(np.int64), "n": n})
    with pytest.raises(CalibrationDataError, match="'x' axis 1 must be 3"):
        run(info, {"x": np.ones((4, 5), np.float32), "n": n})
    with pytest.raises(CalibrationDataError, match="'x' expects rank 2"):
        run(info, {"x": np.ones(3, np.float32), "n": n})


def test_run_on_a_model_directly():
    out = run(tiny_model(), {"x": np.zeros((1, 3), np.float32), "n": np.zeros(2, np.int64)}, ["y"])
    assert list(out) == ["y"]
    np.testing.assert_allclose(out["y"], [[1.0, 0.0, 0.5]])


def test_broken_model_is_a_load_error_not_a_fallback(tmp_path):
    from onnxforge.errors import ModelLoadError

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warnings for a model that no provider can load
        with pytest.raises(ModelLoadError):
            make_session(b"definitely not onnx", ("cpu",))
