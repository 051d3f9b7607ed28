"""bench / compare / run / profile / tune-runtime from the command line, and their user mistakes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx_ir as ir
import pytest
from click.testing import CliRunner

from onnxforge.cli import main
from onnxforge.cli.runtime_cmds import resolve_settings
from onnxforge.passes.fp16 import ConvertFloat16Pass
from onnxforge.runtime.parallel import run_parallel


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "onnxforge", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=dict(os.environ, COLUMNS="200"))


def in_process(*args):
    return CliRunner().invoke(main, [str(a) for a in args], env={"COLUMNS": "200"})


def assert_one_line_error(stderr: str, returncode: int, fragment: str) -> None:
    assert returncode != 0
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("onnxforge: error:"), lines[0]
    assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory, zoo_model):
    import torch  # noqa: F401
    folder = tmp_path_factory.mktemp("cli_runtime")
    model = zoo_model("digits_cnn")
    ir.save(model, folder / "cnn.onnx")
    half = ir.load(folder / "cnn.onnx")
    ConvertFloat16Pass()(half)
    ir.save(half, folder / "cnn_fp16.onnx")
    x = np.random.default_rng(0).standard_normal((21, 1, 8, 8)).astype(np.float32)
    np.savez(folder / "inputs.npz", input=x)
    return folder


# --------------------------------------------------------------------------- happy paths (subprocess)


def test_bench_prints_latency_throughput_and_providers(files):
    proc = cli("bench", files / "cnn.onnx", "--batch-size", 4, "--repeat", 10, "--warmup", 2,
               "--provider", "tensorrt", "--provider", "cpu", "--trt-fp16", "--json", files / "bench.json")
    assert proc.returncode == 0, proc.stderr
    for word in ("p50 ms", "p99 ms", "throughput", "ran on: cpu", "fell back from tensorrt"):
        assert word in proc.stdout, proc.stdout
    report = json.loads((files / "bench.json").read_text())
    assert report["batch_size"] == 4 and report["n"] == 10
    assert report["providers_used"] == ["CPUExecutionProvider"]
    assert report["fallbacks"][0][0] == "TensorrtExecutionProvider" and "not available" in report["fallbacks"][0][1]
    assert report["p50_ms"] <= report["p90_ms"] <= report["p99_ms"] and report["io_binding"] is False


def test_compare_fp16_against_fp32(files):
    proc = cli("compare", files / "cnn.onnx", files / "cnn_fp16.onnx", "--inputs", files / "inputs.npz",
               "--json", "-")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["n_samples"] == 21
    assert 0 < report["max_rel"] <= ConvertFloat16Pass.tolerance
    assert report["cosine"] > 0.9999 and report["top1_agreement"] >= 0.95
    assert report["providers_used"]["candidate"] == ["CPUExecutionProvider"]


def test_run_two_workers_writes_outputs_in_order(files):
    out2 = files / "two.npz"
    double = cli("run", files / "cnn.onnx", "--inputs", files / "inputs.npz", "--workers", 2,
                 "--threads-per-worker", 1, "--batch-size", 2, "-o", out2, "--json", files / "run.json")
    assert double.returncode == 0, double.stderr
    assert "2 worker(s) x 1 thread(s)" in double.stdout and "samples/s" in double.stdout
    # The single-process run of the same batches (in this process) gives identical outputs.
    single = run_parallel(files / "cnn.onnx", files / "inputs.npz", workers=1, threads_per_worker=1, batch_size=2)
    with np.load(out2) as b:
        assert b.files == list(single.outputs)
        for name in b.files:
            assert b[name].shape[0] == 21
            np.testing.assert_array_equal(b[name], single.outputs[name])
    timing = json.loads((files / "run.json").read_text())
    assert timing["workers"] == 2 and timing["shards"] == [12, 9] and timing["samples_per_s"] > 0


def test_profile_lists_op_types_and_top_nodes(files):
    proc = cli("profile", files / "cnn.onnx", "--top", 3, "--runs", 5, "--json", files / "profile.json")
    assert proc.returncode == 0, proc.stderr
    assert "Conv" in proc.stdout and "top 3 nodes" in proc.stdout
    report = json.loads((files / "profile.json").read_text())
    assert "Conv" in [row["op_type"] for row in report["op_types"]]
    assert len(report["nodes"]) == 3 and all(n["provider"] == "cpu" for n in report["nodes"])


def test_tune_runtime_recommends_a_setting(files):
    proc = cli("tune-runtime", files / "cnn.onnx", "--batch-sizes", "1,8", "--threads", "1",
               "--repeat", 10, "--max-latency-ms", 1000, "--json", files / "tune.json")
    assert proc.returncode == 0, proc.stderr
    assert "recommended: batch" in proc.stdout
    report = json.loads((files / "tune.json").read_text())
    assert [(p["batch_size"], p["threads"]) for p in report["points"]] == [(1, 1), (8, 1)]
    assert report["recommended"] is not None and report["max_latency_ms"] == 1000


# --------------------------------------------------------------------------- user mistakes


def test_subprocess_errors_are_one_line(files, tmp_path):
    missing = cli("bench", tmp_path / "nope.onnx")
    assert_one_line_error(missing.stderr, missing.returncode, "not found")
    bad = cli("tune-runtime", files / "cnn.onnx", "--bogus")
    assert_one_line_error(bad.stderr, bad.returncode, "No such option")


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["bench", "{cnn}", "--provider", "warp-drive"], "unknown execution provider 'warp-drive'"),
        (["bench", "{cnn}", "--trt-fp16"], "TensorRT option; add --provider tensorrt"),
        (["bench", "{cnn}", "--cuda-device", "1"], "add --provider cuda or tensorrt"),
        (["bench", "{cnn}", "--threads", "2", "--intra-op-threads", "1"], "conflicts with --intra-op-threads"),
        (["bench", "{cnn}", "--repeat", "many"], "Invalid value for '--repeat'"),
        (["bench", "{cnn}", "--provider", "tensorrt", "--trt-workspace", "-5"], "workspace_bytes must be a positive"),
        (["compare", "{cnn}", "{dir}/nope.onnx"], "not found"),
        (["compare", "{cnn}", "{cnn}", "--inputs", "{dir}/nope.npz"], "not found"),
        (["compare", "{cnn}", "{cnn}", "--cudnn-conv-algo", "HEURISTIC"], "CUDA option"),
        (["run", "{cnn}", "-o", "{dir}/o.npz"], "Missing option '--inputs'"),
        (["run", "{cnn}", "--inputs", "{dir}/inputs.npz", "-o", "{dir}/o.npz", "--workers", "0"], "--workers"),
        (["run", "{cnn}", "--inputs", "{dir}/inputs.npz", "-o", "{dir}/o.txt"], "must be an .npz"),
        (["run", "{cnn}", "--inputs", "{dir}/inputs.npz", "-o", "{dir}/inputs.npz"], "never overwrites its input"),
        (["profile", "{dir}/nope.onnx"], "not found"),
        (["profile", "{cnn}", "--provider", "cuda", "--trt-int8"], "TensorRT option"),
        (["tune-runtime", "{cnn}", "--batch-sizes", "1,x"], "comma-separated integers"),
        (["tune-runtime", "{cnn}", "--batch-sizes", "0,2"], "must be >= 1"),
        (["tune-runtime", "{cnn}", "--threads", "1", "--intra-op-threads", "2"], "give one"),
        (["tune-runtime", "{cnn}", "--max-latency-ms", "-1"], "must be positive"),
        (["tune-runtime", "{cnn}", "--inter-op-threads", "-2"], "must be >= 0"),
        (["tune-runtime", "{cnn}", "--dim", "seq"], "--dim expects NAME=N"),
        (["bench", "{cnn}", "--dim", "seq=long"], "is not an integer"),
    ],
)
def test_user_mistakes_are_one_line(files, args, fragment):
    args = [a.format(cnn=files / "cnn.onnx", dir=files) for a in args]
    result = in_process(*args)
    assert_one_line_error(result.stderr, result.exit_code, fragment)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert not (files / "o.npz").exists()


def test_not_an_onnx_file(files):
    text = files / "notes.onnx"
    text.write_text("not a model")
    result = in_process("bench", text)
    assert_one_line_error(result.stderr, result.exit_code, "not a valid ONNX model")


def test_provider_flags_become_the_options_onnxruntime_expects():
    settings = resolve_settings({
        "providers": ("tensorrt", "cuda"), "trt_fp16": True, "trt_int8": False, "trt_engine_cache": "/tmp/engines",
        "trt_timing_cache": "/tmp/timing", "trt_workspace": 1 << 30, "cuda_device": 1, "cudnn_conv_algo": "heuristic",
        "intra_op_threads": 2, "inter_op_threads": 2, "optimize": "basic",
    })
    assert settings.providers == ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
    assert settings.provider_options["TensorrtExecutionProvider"].to_ort() == {
        "device_id": "1", "trt_fp16_enable": "True", "trt_int8_enable": "False",
        "trt_engine_cache_enable": "True", "trt_engine_cache_path": "/tmp/engines",
        "trt_timing_cache_enable": "True", "trt_timing_cache_path": "/tmp/timing",
        "trt_max_workspace_size": str(1 << 30),
    }
    assert settings.provider_options["CUDAExecutionProvider"].to_ort() == {
        "device_id": "1", "cudnn_conv_algo_search": "HEURISTIC",
    }
    cpu = settings.provider_options["CPUExecutionProvider"].session_settings()
    assert cpu["inter_op_num_threads"] == 2 and settings.intra_op_threads == 2 and settings.optimize == "basic"
    assert resolve_settings({}).providers == ["CPUExecutionProvider"]


# --------------------------------------------------------------------------- symbolic H/W: suggest --dim


@pytest.fixture(scope="module")
def detector_path(tmp_path_factory):
    """x [N, 3, height, width] -> MaxPool(2, stride 2) -> Resize(x2) -> Concat with x: like a detector's
    neck, it runs only when height and width are even (with the default size 1 Concat fails)."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("MaxPool", ["x"], ["p"], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1),
        helper.make_node("Resize", ["p", "", "scales"], ["u"], mode="nearest"),
        helper.make_node("Concat", ["x", "u"], ["y"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "neck", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "height", "width"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6, "height", "width"])],
        [helper.make_tensor("scales", TensorProto.FLOAT, [4], [1, 1, 2, 2])])
    path = tmp_path_factory.mktemp("detector") / "neck.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


def test_shape_failure_suggests_dim_and_dim_fixes_it(detector_path, tmp_path):
    hint = "give real sizes, e.g. --dim height=N --dim width=N"
    r = in_process("bench", detector_path, "--repeat", "2", "--warmup", "0")
    assert_one_line_error(r.stderr, r.exit_code, hint)
    assert "onnxruntime failed" in r.stderr
    r = in_process("compare", detector_path, detector_path, "--samples", "1")
    assert_one_line_error(r.stderr, r.exit_code, hint)
    # with the sizes, both run; bench reports, compare finds the model equal to itself
    r = in_process("bench", detector_path, "--repeat", "2", "--warmup", "0", "--dim", "height=32", "--dim",
                   "width=32", "--json", "-")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["n"] >= 2
    r = in_process("compare", detector_path, detector_path, "--samples", "1", "--dim", "height=16", "--dim",
                   "width=16", "--json", "-")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["max_abs"] == 0.0


def test_piped_bench_table_has_full_headers(files):
    r = in_process("bench", files / "cnn.onnx", "--repeat", "3", "--warmup", "0")
    assert r.exit_code == 0, r.stderr
    assert "…" not in r.stdout and "\x1b[" not in r.stdout
    for header in ("batch", "p50 ms", "p90 ms", "p99 ms", "throughput /s", "io binding"):
        assert header in r.stdout, r.stdout
