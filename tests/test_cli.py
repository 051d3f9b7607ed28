"""The command line as a user (or a CI job) runs it: subprocesses, exit codes, one-line errors."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import onnxforge
from onnxforge.testing import numerics


def cli(*args, cwd=None, env=None):
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "onnxforge", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=full_env)


def assert_one_line_error(proc, fragment, code=None):
    assert proc.returncode != 0, proc.stdout
    if code is not None:
        assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("onnxforge: error:")]
    # Progress lines of passes that did run may come first; the error is one line, and the last.
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr
    assert fragment in errors[0], errors[0]


@pytest.fixture(scope="module")
def convbn_path(tmp_path_factory):
    import torch

    class ConvBN(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.bn = torch.nn.BatchNorm2d(8)
            self.fc = torch.nn.Linear(8, 5)

        def forward(self, x):
            y = torch.relu(self.bn(self.conv(x)))
            return self.fc(y.mean(dim=(2, 3)))

    torch.manual_seed(0)
    m = ConvBN().eval()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-1, 1)
        m.bn.running_var.uniform_(0.5, 2)
        m.bn.weight.uniform_(0.5, 1.5)
        m.bn.bias.uniform_(-1, 1)
    path = tmp_path_factory.mktemp("cli") / "convbn.onnx"
    onnxforge.export(m, (torch.randn(1, 3, 16, 16),), path)
    return path


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_optimize_default_is_lossless_and_input_untouched(convbn_path, tmp_path):
    before = sha(convbn_path)
    out = tmp_path / "out.onnx"
    report = tmp_path / "report.json"
    proc = cli("optimize", convbn_path, "-o", out, "--verify", "--report", report)
    assert proc.returncode == 0, proc.stderr
    assert sha(convbn_path) == before
    original, optimized = onnxforge.load(convbn_path), onnxforge.load(out)
    assert numerics.op_count(optimized, "BatchNormalization") == 0
    feeds = numerics.random_inputs(original, dim_values={"batch": 3})
    numerics.assert_outputs_close(original, optimized, feeds)
    data = json.loads(report.read_text())
    assert data["after"]["nodes"] < data["before"]["nodes"]
    assert all(p["verified"] in (True, None) for p in data["passes"])
    assert "fold-batchnorm" in [p["name"] for p in data["passes"]]


def test_optimize_with_pass_list_and_config(convbn_path, tmp_path):
    proc = cli("optimize", convbn_path, "-o", tmp_path / "a.onnx", "--passes", "fold-batchnorm,remove-unused", "-q")
    assert proc.returncode == 0, proc.stderr
    assert numerics.op_count(onnxforge.load(tmp_path / "a.onnx"), "BatchNormalization") == 0
    cfg = tmp_path / "onnxforge.toml"
    cfg.write_text('preset = "O1"\nverify = true\n\n[[passes]]\nname = "topo-sort"\n')
    proc = cli("optimize", convbn_path, "-o", tmp_path / "b.onnx", "--config", cfg, "--report", tmp_path / "r.json")
    assert proc.returncode == 0, proc.stderr
    names = [p["name"] for p in json.loads((tmp_path / "r.json").read_text())["passes"]]
    assert names[-1] == "topo-sort"


def test_verify_names_breaking_pass_from_cli(convbn_path, tmp_path):
    plugin = tmp_path / "bad_pass.py"
    plugin.write_text(textwrap.dedent('''
        import numpy as np, onnx_ir as ir
        from onnxforge.passes import Pass, register_pass

        @register_pass("break-weights")
        class BreakWeights(Pass):
            """Claims to be lossless, is not."""
            def run(self, model, stats):
                for v in model.graph.initializers.values():
                    a = v.const_value.numpy()
                    if a.dtype == np.float32 and a.ndim == 4:
                        v.const_value = ir.tensor(a * np.float32(1.1), name=v.name)
                        return True
                return False
    '''))
    proc = cli("--plugin", plugin, "optimize", convbn_path, "-o", tmp_path / "x.onnx", "--verify",
               "--passes", "fold-batchnorm,break-weights,remove-unused", "--reproducer-dir", tmp_path / "repro")
    assert_one_line_error(proc, "pass 'break-weights' changed the outputs beyond tolerance", code=4)
    assert not (tmp_path / "x.onnx").exists()
    assert (tmp_path / "repro" / "input.onnx").is_file()


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--passes", "no-such-pass"], "unknown pass 'no-such-pass'"),
        (["--passes", "fold-constants(input_size_limit=lots)"], "expected an integer"),
        (["--passes", "fold-batchnorm(bogus=1)"], "has no option 'bogus'"),
        (["--passes", "fold-batchnorm("], "expected ')'"),
        (["--passes", "O1", "--preset", "O1"], "only one of"),
        (["--config", "missing.toml"], "config file not found"),
        (["--passes", "O1", "--calibration-data", "missing.npz"], "not found"),
    ],
)
def test_optimize_user_mistakes(convbn_path, tmp_path, args, fragment):
    proc = cli("optimize", convbn_path, "-o", tmp_path / "o.onnx", *args, cwd=tmp_path)
    assert_one_line_error(proc, fragment)
    assert not (tmp_path / "o.onnx").exists()


def test_bad_model_files(tmp_path, convbn_path):
    missing = cli("optimize", tmp_path / "nope.onnx", "-o", tmp_path / "o.onnx")
    assert_one_line_error(missing, "not found")
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model")
    assert_one_line_error(cli("inspect", text), "not a valid ONNX model")
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(convbn_path.read_bytes()[:200])
    assert_one_line_error(cli("optimize", truncated, "-o", tmp_path / "o.onnx"), "truncated")


def test_refuses_to_overwrite_input(convbn_path):
    before = sha(convbn_path)
    proc = cli("optimize", convbn_path, "-o", convbn_path)
    assert_one_line_error(proc, "never overwrites its input")
    assert sha(convbn_path) == before


def test_debug_shows_traceback(tmp_path):
    proc = cli("--debug", "inspect", tmp_path / "nope.onnx")
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr


def test_inspect(convbn_path):
    proc = cli("inspect", convbn_path, "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    text = json.dumps(summary)
    assert "BatchNormalization" in text and "Conv" in text
    # conv 3*8*9 + 8, bn 4*8, fc 8*5 + 5
    assert summary["params"] == 3 * 8 * 9 + 8 + 4 * 8 + 8 * 5 + 5
    human = cli("inspect", convbn_path)
    assert human.returncode == 0 and "Conv" in human.stdout


def test_passes_lists_builtins_with_options():
    proc = cli("passes", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    for name in ("fold-constants", "fold-batchnorm", "fold-affine", "remove-unused", "cse"):
        assert name in data["passes"], name
    assert data["passes"]["fold-batchnorm"]["lossless"] is True
    assert "O1" in data["presets"]
    table = cli("passes")
    assert table.returncode == 0 and "fold-batchnorm" in table.stdout


def test_custom_pass_example_runs_from_cli(convbn_path, tmp_path):
    example = os.path.join(os.path.dirname(__file__), "..", "examples", "custom_pass", "fold_scale_pass.py")
    proc = cli("--plugin", example, "optimize", convbn_path, "-o", tmp_path / "c.onnx",
               "--passes", "O1,drop-mul-by-one", "--verify", "-q")
    assert proc.returncode == 0, proc.stderr


def test_python_api_round_trip(convbn_path, tmp_path):
    result = onnxforge.optimize(convbn_path, "O1", verify=True, output=tmp_path / "api.onnx",
                                report_path=tmp_path / "api.json")
    assert result.modified
    assert result.report.records and all(r.verified in (True, None) for r in result.report.records)
    feeds = numerics.random_inputs(result.model)
    a = numerics.run(onnxforge.load(convbn_path), feeds)[0]
    b = numerics.run(onnxforge.load(tmp_path / "api.onnx"), feeds)[0]
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
