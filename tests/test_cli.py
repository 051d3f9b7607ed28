"""The command line as a user (or a CI job) runs it: exit codes, one-line errors, JSON for CI.

A few tests run real subprocesses (what a shell sees: exit codes, stdout holding only JSON, the
traceback with --debug); the rest run the same command in-process with click's CliRunner (stdout is
not a terminal there either), because each subprocess pays ~3 s of imports on a loaded 2-core box.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import onnxforge
from onnxforge.testing import numerics


# A plugin pass that claims to be lossless and is not: --verify must name it.
BREAK_WEIGHTS_PLUGIN = textwrap.dedent('''
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
''')


def cli(*args, cwd=None, env=None):
    """A real ``python -m onnxforge`` subprocess."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "onnxforge", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=full_env)


def run(*args, cwd=None):
    """The same command in-process (CliRunner); returns what :func:`cli` does: returncode, stdout, stderr."""
    import types

    from click.testing import CliRunner

    from onnxforge.cli import main

    old = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        r = CliRunner().invoke(main, [str(a) for a in args])
    finally:
        os.chdir(old)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception  # a bug, not a user mistake: show it
    return types.SimpleNamespace(returncode=r.exit_code, stdout=r.stdout, stderr=r.stderr)


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
    proc = run("optimize", convbn_path, "-o", out, "--verify", "--report", report)
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
    proc = run("optimize", convbn_path, "-o", tmp_path / "a.onnx", "--passes", "fold-batchnorm,remove-unused", "-q")
    assert proc.returncode == 0, proc.stderr
    assert numerics.op_count(onnxforge.load(tmp_path / "a.onnx"), "BatchNormalization") == 0
    cfg = tmp_path / "onnxforge.toml"
    cfg.write_text('preset = "O1"\nverify = true\n\n[[passes]]\nname = "topo-sort"\n')
    proc = run("optimize", convbn_path, "-o", tmp_path / "b.onnx", "--config", cfg, "--report", tmp_path / "r.json")
    assert proc.returncode == 0, proc.stderr
    names = [p["name"] for p in json.loads((tmp_path / "r.json").read_text())["passes"]]
    assert names[-1] == "topo-sort"


def test_verify_names_breaking_pass_from_cli(convbn_path, tmp_path):
    plugin = tmp_path / "bad_pass.py"
    plugin.write_text(BREAK_WEIGHTS_PLUGIN)
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
    proc = run("optimize", convbn_path, "-o", tmp_path / "o.onnx", *args, cwd=tmp_path)
    assert_one_line_error(proc, fragment)
    assert not (tmp_path / "o.onnx").exists()


def test_bad_model_files(tmp_path, convbn_path):
    missing = cli("optimize", tmp_path / "nope.onnx", "-o", tmp_path / "o.onnx")
    assert_one_line_error(missing, "not found")
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model")
    assert_one_line_error(run("inspect", text), "not a valid ONNX model")
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(convbn_path.read_bytes()[:200])
    assert_one_line_error(run("optimize", truncated, "-o", tmp_path / "o.onnx"), "truncated")


def test_refuses_to_overwrite_input(convbn_path):
    before = sha(convbn_path)
    proc = run("optimize", convbn_path, "-o", convbn_path)
    assert_one_line_error(proc, "never overwrites its input")
    assert sha(convbn_path) == before


def test_debug_shows_traceback(tmp_path):
    proc = cli("--debug", "inspect", tmp_path / "nope.onnx")
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr


def test_inspect(convbn_path):
    proc = run("inspect", convbn_path, "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    text = json.dumps(summary)
    assert "BatchNormalization" in text and "Conv" in text
    # conv 3*8*9 + 8, bn 4*8, fc 8*5 + 5
    assert summary["params"] == 3 * 8 * 9 + 8 + 4 * 8 + 8 * 5 + 5
    human = run("inspect", convbn_path)
    assert human.returncode == 0 and "Conv" in human.stdout


def test_passes_lists_builtins_with_options():
    proc = run("passes", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    for name in ("fold-constants", "fold-batchnorm", "fold-affine", "remove-unused", "cse"):
        assert name in data["passes"], name
    assert data["passes"]["fold-batchnorm"]["lossless"] is True
    assert "O1" in data["presets"]
    table = run("passes")
    assert table.returncode == 0 and "fold-batchnorm" in table.stdout


def test_custom_pass_example_runs_from_cli(convbn_path, tmp_path):
    example = os.path.join(os.path.dirname(__file__), "..", "examples", "custom_pass", "fold_scale_pass.py")
    proc = run("--plugin", example, "optimize", convbn_path, "-o", tmp_path / "c.onnx",
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


# ------------------------------------------------------------------ CI use: --json, exit codes, piped tables


def test_optimize_json_is_the_only_stdout(convbn_path, tmp_path):
    out = tmp_path / "o.onnx"
    proc = cli("optimize", convbn_path, "-o", out, "--verify", "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)  # the whole of stdout is one JSON document
    assert summary["ok"] is True and summary["exit_code"] == 0 and summary["error"] is None
    assert summary["output"] == str(out) and out.is_file()
    names = [p["name"] for p in summary["passes"]]
    assert "fold-batchnorm" in names
    fold = summary["passes"][names.index("fold-batchnorm")]
    assert fold["modified"] is True and fold["nodes"][1] < fold["nodes"][0]
    assert fold["max_abs_vs_original"] is not None and fold["max_abs_vs_original"] < 1e-4
    assert summary["after"]["nodes"] < summary["before"]["nodes"]
    # progress lines still go to stderr
    assert "fold-batchnorm" in proc.stderr


def test_optimize_json_on_failure_carries_the_exit_code(convbn_path, tmp_path):
    r = run("optimize", convbn_path, "-o", tmp_path / "o.onnx", "--passes", "no-such-pass", "--json")
    assert r.returncode == 2
    summary = json.loads(r.stdout)
    assert summary["ok"] is False and summary["exit_code"] == 2 and summary["output"] is None
    assert "no-such-pass" in summary["error"] and summary["error_type"] == "UnknownPassError"
    assert r.stderr.strip().startswith("onnxforge: error: unknown pass")

    plugin = tmp_path / "bad_pass.py"
    plugin.write_text(BREAK_WEIGHTS_PLUGIN)
    r = run("--plugin", plugin, "optimize", convbn_path, "-o", tmp_path / "x.onnx", "--verify", "--json",
               "--passes", "fold-batchnorm,break-weights")
    assert r.returncode == 4, r.stderr
    summary = json.loads(r.stdout)
    assert summary["exit_code"] == 4 and summary["error_type"] == "VerificationError"
    assert [p["name"] for p in summary["passes"]] == ["fold-batchnorm"]  # what ran before the failure


_ELLIPSIS = "…"


def _assert_plain_full_width(text: str, headers: list[str]) -> None:
    assert _ELLIPSIS not in text, text
    assert "\x1b[" not in text, "colour codes in a piped log"
    for h in headers:
        assert h in text, (h, text)


def test_piped_tables_are_not_truncated(convbn_path, tmp_path):
    proc = run("optimize", convbn_path, "-o", tmp_path / "o.onnx", "--verify")
    assert proc.returncode == 0, proc.stderr
    _assert_plain_full_width(proc.stdout, ["pass", "changed", "nodes", "params", "bytes", "max abs diff",
                                           "what it did", "fold-batchnorm"])
    header = next(line for line in proc.stdout.splitlines() if "max abs diff" in line)
    assert header.split("┃")[1].strip() == "pass", header  # the first column is the pass, not empty
    proc = run("passes")
    _assert_plain_full_width(proc.stdout, ["pass", "lossless", "options", "what it does", "quantize-int8"])
    proc = run("inspect", convbn_path)
    _assert_plain_full_width(proc.stdout, ["FLOPs (est.)", "Inputs and outputs", "Operators"])


def test_console_helper_is_wide_and_folds_when_not_a_terminal():
    import io

    from onnxforge.cli import _console

    c = _console.console()  # pytest captures stdout: not a terminal
    assert c.width == _console.PIPE_WIDTH and c.no_color
    t = _console.table(title="t")
    for name in ("latency ratio", "size ratio", "a very long header that would be cut at eighty columns"):
        t.add_column(name, no_wrap=True)
    t.add_row("1.000", "0.250", "x" * 300)
    buf = io.StringIO()
    c.file = buf
    c.print(t)
    text = buf.getvalue()
    assert _ELLIPSIS not in text and "latency ratio" in text and "x" * 100 in text.replace("\n", "").replace("│", "").replace(" ", "")


def test_piped_pareto_table_names_every_column():
    """The issue's CI log read "latency rat…", "size rat…" under an empty first column."""
    import io

    from onnxforge.cli import _console
    from onnxforge.tune.evaluate import Candidate
    from onnxforge.tune.report import render
    from onnxforge.tune.search import TuneResult

    base = "lift-constants,fold-batchnorm"
    long = base + ",prune-channels(ratio=0.25,criterion=activation,round_to=8),reconstruct,quantize-int8(calibration=percentile)"
    cands = [Candidate(long, latency_ratio=0.41, drop=0.8, latency_ms=1.2, metric=98.9, size_ratio=0.2),
             Candidate(base + ",quantize-int8", latency_ratio=0.55, drop=0.0, latency_ms=1.6, metric=99.4,
                       size_ratio=0.27)]
    result = TuneResult(candidates=cands, front=cands, chosen=cands[0], evaluations=2, cache_hits=0)
    console = _console.console()
    console.file = buf = io.StringIO()
    render(result, base, "top1", console)
    text = buf.getvalue()
    header = next(line for line in text.splitlines() if "latency ratio" in line)
    assert [c.strip() for c in header.strip("┃ ").split("┃")][:6] == [
        "chosen", "latency ratio", "latency ms", "size ratio", "top1", "drop"]
    assert "…" not in text and "quantize-int8(calibration=percentile)" in text.replace("\n", "").replace(" ", "").replace("│", "")


def test_a_pass_that_raises_exits_3_with_json(convbn_path, tmp_path):
    """The "Use in CI" table: a pass that raises is exit code 3, and --json says so on stdout."""
    plugin = tmp_path / "raising_pass.py"
    plugin.write_text(textwrap.dedent('''
        from onnxforge.passes import Pass, register_pass

        @register_pass("h6-raises")
        class Raises(Pass):
            """Always fails."""
            def run(self, model, stats):
                raise RuntimeError("boom")
    '''))
    r = run("--plugin", plugin, "optimize", convbn_path, "-o", tmp_path / "x.onnx", "--json",
            "--passes", "fold-batchnorm,h6-raises")
    assert r.returncode == 3, r.stderr
    summary = json.loads(r.stdout)
    assert summary["exit_code"] == 3 and summary["error_type"] == "PassFailedError" and "boom" in summary["error"]
    assert_one_line_error(r, "pass 'h6-raises' failed", code=3)


def test_o3_with_a_decision_record_rebuilds_byte_identical(tmp_path):
    """The same ``--preset O3`` command twice writes the same bytes: the first run measures and
    writes the decision record, the second replays it without measuring (issue 11)."""
    import numpy as np
    from click.testing import CliRunner

    from onnxforge.cli import main

    repo = pathlib.Path(__file__).resolve().parents[1]
    data = np.load(repo / "examples" / "digits_data.npz")
    calib = tmp_path / "calib.npz"
    np.savez(calib, input=data["input"][:64])
    record = tmp_path / "decisions.json"
    outputs = []
    for name in ("a.onnx", "b.onnx"):
        out = tmp_path / name
        result = CliRunner().invoke(main, [
            "optimize", str(repo / "examples" / "digits_cnn.onnx"), "-o", str(out), "--preset", "O3",
            "--calibration-data", str(calib), "--decisions", str(record), "--quiet",
        ])
        assert result.exit_code == 0, result.output
        assert record.exists()
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]


def test_optimize_metric_sets_the_int8_budget_in_task_units(tmp_path, monkeypatch):
    """``--metric module:function`` (three parameters: scored against the float model) replaces
    max_drop's proxy; a wrong spec is one clear line and exit 2."""
    import numpy as np
    from click.testing import CliRunner

    from onnxforge.cli import main

    repo = pathlib.Path(__file__).resolve().parents[1]
    data = np.load(repo / "examples" / "digits_data.npz")
    calib = tmp_path / "calib.npz"
    np.savez(calib, input=data["input"][:64])
    (tmp_path / "h6_task_metric.py").write_text(
        "import numpy as np\n"
        "calls = []\n"
        "def agreement(outputs, data, float_outputs):\n"
        "    calls.append(sorted(outputs))\n"
        "    (a,), (b,) = outputs.values(), float_outputs.values()\n"
        "    return float(np.mean(a.argmax(1) == b.argmax(1)))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out, report = tmp_path / "q.onnx", tmp_path / "r.json"
    args = ["optimize", str(repo / "examples" / "digits_cnn.onnx"), "-o", str(out), "--passes",
            "O1,quantize-int8(max_drop=0.0)", "--calibration-data", str(calib), "--report", str(report), "--quiet"]
    result = CliRunner().invoke(main, [*args, "--metric", "h6_task_metric:agreement"])
    assert result.exit_code == 0, result.output
    rec = next(r for r in json.loads(report.read_text())["passes"] if r["name"] == "quantize-int8")
    fb = rec["stats"]["details"]["fallback"]
    assert fb["measure"] == "metric" and fb["drop_final"] <= 0.0, fb
    import h6_task_metric

    assert h6_task_metric.calls  # the user's function ran, with the outputs by name
    bad = CliRunner().invoke(main, [*args, "--metric", "no_such_module_h6:f"])
    assert bad.exit_code == 2 and "cannot import" in bad.output


def test_optimize_metric_reads_the_calibration_labels(tmp_path, monkeypatch):
    """A 'labels' array in the calibration .npz reaches ``--metric`` as ``data['labels']``, paired with
    the samples the pass scores (all of them, and each feed alone for budget_confidence), so O3's
    budget can be accuracy against the truth. It is never fed to the model."""
    import numpy as np
    from click.testing import CliRunner

    from onnxforge.cli import main

    repo = pathlib.Path(__file__).resolve().parents[1]
    data = np.load(repo / "examples" / "digits_data.npz")
    x, y = data["x_test"][:48], data["y_test"][:48]
    calib = tmp_path / "calib.npz"
    np.savez(calib, input=x, labels=y)
    (tmp_path / "h6_truth_metric.py").write_text(
        "import numpy as np\n"
        "seen = []\n"
        "def accuracy(outputs, data):\n"
        "    seen.append(([r.tobytes() for r in data['input']], data['labels'].tolist()))\n"
        "    (a,) = outputs.values()\n"
        "    return float(np.mean(a.argmax(1) == data['labels']))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out, report = tmp_path / "q.onnx", tmp_path / "r.json"
    result = CliRunner().invoke(main, [
        "optimize", str(repo / "examples" / "digits_cnn.onnx"), "-o", str(out), "--passes",
        "O1,quantize-int8(max_drop=0.01,budget_confidence=0.9)", "--calibration-data", str(calib),
        "--metric", "h6_truth_metric:accuracy", "--report", str(report), "--quiet"])
    assert result.exit_code == 0, result.output
    rec = next(r for r in json.loads(report.read_text())["passes"] if r["name"] == "quantize-int8")
    assert rec["stats"]["details"]["fallback"]["measure"] == "metric"
    import h6_truth_metric

    label_of = {r.astype(np.float32).tobytes(): int(k) for r, k in zip(x, y)}
    sizes = {len(labels) for _, labels in h6_truth_metric.seen}
    assert {1, 48} <= sizes  # all the samples, and one feed alone
    for rows, labels in h6_truth_metric.seen:  # every call got its own samples' labels
        assert [label_of[r] for r in rows] == labels
    # the built-in top1 for a classifier: accuracy against the labels, max_drop in fractions (0.01 = 1 point)
    top1 = CliRunner().invoke(main, [
        "optimize", str(repo / "examples" / "digits_cnn.onnx"), "-o", str(tmp_path / "t.onnx"), "--preset", "O3",
        "--calibration-data", str(calib), "--metric", "top1", "--report", str(report), "--quiet"])
    assert top1.exit_code == 0, top1.output
    fb = next(r for r in json.loads(report.read_text())["passes"] if r["name"] == "quantize-int8")["stats"]["details"]["fallback"]
    assert fb["measure"] == "metric" and fb["budget"] == 0.01 and -0.05 < fb["drop_all_int8"] < 0.1, fb
    np.savez(tmp_path / "unlabelled.npz", input=x)
    bad = CliRunner().invoke(main, [
        "optimize", str(repo / "examples" / "digits_cnn.onnx"), "-o", str(tmp_path / "u.onnx"), "--preset", "O3",
        "--calibration-data", str(tmp_path / "unlabelled.npz"), "--metric", "top1", "--quiet"])
    assert bad.exit_code == 2 and "needs the true classes" in bad.output and not (tmp_path / "u.onnx").exists()


def test_optimize_shows_what_the_lossy_passes_noted(tmp_path):
    """O3's budget, its measure and what it kept float are notes of quantize-int8: the table alone
    hid them (only --report json had them). They follow the table on stdout and sit in the HTML
    page's notes; lossless passes' notes (fusion rules not applied) stay in the JSON."""
    import numpy as np

    repo = pathlib.Path(__file__).resolve().parents[1]
    data = np.load(repo / "examples" / "digits_data.npz")
    calib = tmp_path / "calib.npz"
    np.savez(calib, input=data["input"][:64])
    page, js = tmp_path / "r.html", tmp_path / "r.json"
    args = ["optimize", repo / "examples" / "digits_cnn.onnx", "-o", tmp_path / "o3.onnx", "--preset", "O3",
            "--calibration-data", calib]
    proc = run(*args, "--report", page)
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("quantize-int8: ")]
    assert any("max_drop" in ln for ln in lines), proc.stdout
    assert not [ln for ln in proc.stdout.splitlines() if ln.startswith("fuse: ")]
    html_text = page.read_text()
    assert all(html.escape(ln.split(": ", 1)[1])[:60] in html_text for ln in lines)
    run(*args, "--report", js, "--quiet")
    fuse = next(r for r in json.loads(js.read_text())["passes"] if r["name"] == "fuse")
    assert fuse["stats"]["notes"], "the lossless pass's notes are still in the JSON"
