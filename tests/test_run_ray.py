"""``onnxforge run --executor ray``: same outputs, same order as a local run.

The module starts one local Ray instance (``ray.init(num_cpus=2, include_dashboard=False)``) and stops
it at the end; the executor uses an instance that is already running (and leaves it running), or
starts its own for the call, or connects to ``RAY_ADDRESS``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import ray  # a dev dependency: these tests run in CI

from onnxforge.runtime.parallel import run_parallel, run_ray

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def cnn(zoo_model):
    return zoo_model("digits_cnn")


def test_cli_ray_matches_local_in_order(local_ray, cnn, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from onnxforge.cli import main
    from onnxforge.ir.io import save

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    save(cnn, tmp_path / "m.onnx")
    # distinct samples: a shard swap or a reordering would show
    x = np.random.default_rng(0).standard_normal((37, 1, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "in.npz", input=x)
    common = ["run", str(tmp_path / "m.onnx"), "--inputs", str(tmp_path / "in.npz"), "--batch-size", "4",
              "--threads-per-worker", "1"]
    r = CliRunner().invoke(main, [*common, "-o", str(tmp_path / "local.npz")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, [*common, "-o", str(tmp_path / "ray.npz"), "--executor", "ray", "--workers", "3",
                                  "--json", str(tmp_path / "ray.json")])
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "ray.json").read_text())
    assert report["workers"] == 3 and report["shards"] == [16, 12, 9]  # 10 batches of 4: 4 + 3 + 3
    with np.load(tmp_path / "local.npz") as a, np.load(tmp_path / "ray.npz") as b:
        assert a.files == b.files
        for name in a.files:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert ray.is_initialized()  # an instance the executor did not start is left running


def test_ray_api_and_user_errors(local_ray, cnn):
    from onnxforge.errors import CalibrationDataError, OnnxforgeError

    x = np.random.default_rng(1).standard_normal((10, 1, 8, 8)).astype(np.float32)
    local = run_parallel(cnn, {"input": x}, workers=1, threads_per_worker=1, batch_size=3, optimize="disable")
    remote = run_ray(cnn, {"input": x}, workers=2, batch_size=3, threads_per_worker=1, optimize="disable")
    assert remote.shards == [6, 4]  # cut on batch boundaries, like the local executor
    np.testing.assert_array_equal(local.outputs["output"], remote.outputs["output"])
    with pytest.raises(CalibrationDataError):
        run_ray(cnn, {"wrong": x}, workers=2)
    with pytest.raises(OnnxforgeError):
        run_ray(cnn, {"input": x}, workers=2, devices=[0])
