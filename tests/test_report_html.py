"""``--report report.html``: one self-contained page, its structure, and the SQNR it shows.

The page is parsed (html.parser), not string-matched: sections by id, tables with rows, plots as
inline ``data:image/png`` images, and no external reference (no ``http(s)://``, ``//`` or file URL,
no script, no stylesheet link). SQNR is checked against its definition and against a direct
computation from the two models' activations.
"""

from __future__ import annotations

import html.parser
import json
import math
import re

import numpy as np
import pytest
from click.testing import CliRunner

from onnxforge.cli import main
from onnxforge.runtime.sqnr import layer_sqnr, sqnr_db


class _Page(html.parser.HTMLParser):
    """Collects section ids, tables (as lists of rows of cell text), images and every URL-bearing attribute."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.sections: dict[str, list[list[list[str]]]] = {}
        self.images: list[str] = []
        self.urls: list[tuple[str, str, str]] = []
        self.tags: set[str] = set()
        self._section: str | None = None
        self._table: list[list[str]] | None = None
        self._cell: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        a = dict(attrs)
        for key in ("src", "href", "action", "data", "poster"):
            if key in a:
                self.urls.append((tag, key, a[key] or ""))
        if tag == "section":
            self._section = a.get("id")
            self.sections.setdefault(self._section, [])
        elif tag == "table":
            self._table = []
        elif tag == "tr" and self._table is not None:
            self._table.append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images.append(a.get("src", ""))

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None and self._table is not None:
            self._table[-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table" and self._table is not None:
            self.sections[self._section].append(self._table)
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def assert_self_contained(text: str, page: _Page) -> None:
    assert "script" not in page.tags and "link" not in page.tags and "iframe" not in page.tags
    for tag, key, url in page.urls:
        assert url.startswith("data:image/png;base64,"), (tag, key, url[:60])
    assert not re.search(r"(https?:)?//[a-z0-9]", re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", text),
                         re.I), "external URL in the page"
    assert "@import" not in text and "url(" not in text


def png_ok(src: str) -> bool:
    import base64

    data = base64.b64decode(src.split(",", 1)[1])
    return data.startswith(b"\x89PNG") and len(data) > 2000


@pytest.fixture(scope="module")
def files(tmp_path_factory, demo_model_path, demo_data_path):
    d = tmp_path_factory.mktemp("report_html")
    data = np.load(demo_data_path)
    np.savez(d / "calib.npz", input=data["input"][:32])
    np.savez(d / "val.npz", input=data["x_test"][:120], labels=data["y_test"][:120])
    return {"dir": d, "model": demo_model_path, "calib": d / "calib.npz", "val": d / "val.npz"}


@pytest.fixture(scope="module")
def optimize_page(files):
    d = files["dir"]
    r = CliRunner().invoke(main, ["optimize", str(files["model"]), "-o", str(d / "int8.onnx"), "--passes",
                                  "O1,quantize-int8", "--calibration-data", str(files["calib"]), "--verify",
                                  "--report", str(d / "report.html"), "-q"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    text = (d / "report.html").read_text()
    return text, _Page(text)


def test_optimize_page_has_every_section(optimize_page):
    text, page = optimize_page
    for section in ("summary", "passes", "plots", "quant-error", "float-ops"):
        assert section in page.sections, (section, list(page.sections))
    passes = page.sections["passes"][0]
    assert passes[0][:3] == ["pass", "changed", "kind"]
    names = [row[0] for row in passes[1:]]
    assert "fold-batchnorm" in names and names[-1] == "quantize-int8"
    # two plots (size per pass, SQNR per layer), both real PNGs inline
    assert len(page.images) == 2 and all(png_ok(src) for src in page.images)
    # the op that stayed float, with the pass's reason
    floats = page.sections["float-ops"][0]
    assert floats[0] == ["node", "op", "reason it stayed float", "pass"]
    assert any(row[1] == "ReduceMean" and "stays float" in row[2] for row in floats[1:]), floats
    assert_self_contained(text, page)


def test_optimize_page_sqnr_rows_are_the_quantized_layers(optimize_page, files):
    _, page = optimize_page
    rows = page.sections["quant-error"][0]
    assert rows[0][:4] == ["layer", "op", "output", "SQNR (dB)"]
    by_op = {}
    for row in rows[1:]:
        by_op.setdefault(row[1], []).append(float(row[3]))
    assert len(by_op.get("Conv", [])) == 5 and "Gemm" in by_op
    # int8 with calibrated ranges: well above noise, far from identical
    assert all(15.0 < v < 80.0 for vs in by_op.values() for v in vs), by_op


def test_lossless_page_has_no_quantization_sections(files, tmp_path):
    r = CliRunner().invoke(main, ["optimize", str(files["model"]), "-o", str(tmp_path / "o.onnx"), "--verify",
                                  "--report", str(tmp_path / "r.html"), "--json"], catch_exceptions=False)
    assert r.exit_code == 0
    assert json.loads(r.stdout)["report"] == str(tmp_path / "r.html")  # stdout: still only the JSON
    text = (tmp_path / "r.html").read_text()
    page = _Page(text)
    assert {"summary", "passes", "plots"} <= set(page.sections)
    assert "quant-error" not in page.sections and "float-ops" not in page.sections
    assert len(page.images) == 1
    assert_self_contained(text, page)


def test_html_report_with_json_summary_and_plain_json_report(files, tmp_path):
    """--json keeps stdout to one JSON document even when an HTML page is written; .json stays JSON."""
    r = CliRunner().invoke(main, ["optimize", str(files["model"]), "-o", str(tmp_path / "o.onnx"),
                                  "--report", str(tmp_path / "r.json"), "--json"], catch_exceptions=False)
    assert r.exit_code == 0
    summary = json.loads(r.stdout)
    assert summary["report"] == str(tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text())["passes"]


def test_sqnr_definition():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 1000)).astype(np.float32)
    noise = rng.standard_normal((4, 1000)) * 0.01
    expected = 10 * math.log10(np.sum(x.astype(np.float64) ** 2) / np.sum(noise**2))
    assert sqnr_db(x, x + noise) == pytest.approx(expected, rel=1e-9)
    assert sqnr_db([x[:2], x[2:]], [x[:2] + noise[:2], x[2:] + noise[2:]]) == pytest.approx(expected, rel=1e-9)
    assert sqnr_db(x, x) == math.inf
    # 10x the noise amplitude = 20 dB less
    assert sqnr_db(x, x + 10 * noise) == pytest.approx(expected - 20, abs=1e-6)


def test_layer_sqnr_matches_direct_computation(files):
    """The number in the table is the SQNR of the two models' own intermediate values in onnxruntime."""
    import onnx

    from onnxforge.ir.io import load
    from onnxforge.passes.base import PassContext
    from onnxforge.passes.manager import Pipeline
    from onnxforge.report.collect import FloatSnapshot, quantized_nodes
    from onnxforge.runtime.data import CalibrationData
    from onnxforge.testing import numerics

    model = load(files["model"])
    data = CalibrationData.from_npz(files["calib"], model)
    snap = FloatSnapshot(model)
    result = Pipeline("O1,quantize-int8", context=PassContext(calibration_data=data), on_pass=snap).run(model)
    nodes = quantized_nodes(result.report)
    rows = layer_sqnr(snap.bytes, result.model, data, nodes, max_samples=4)
    conv = next(r for r in rows if r.op_type == "Conv")
    # Direct: expose the value as a graph output in both models and run them ourselves.
    feeds = list(data)[:4]

    def value(model_like, name):
        import onnx_ir as ir

        proto = onnx.load_from_string(model_like) if isinstance(model_like, bytes) else \
            ir.serde.serialize_model(model_like)
        del proto.graph.output[:]  # only the exposed value, so the one output is it
        proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
        return [numerics.run(proto, f)[0] for f in feeds]

    direct = sqnr_db(value(snap.bytes, conv.value), value(result.model, conv.value))
    assert conv.sqnr_db == pytest.approx(direct, rel=1e-9)
    assert conv.samples == 4
    # identical models: infinite SQNR; an unknown node: a note, not an exception
    same = layer_sqnr(snap.bytes, snap.bytes, data, [conv.node, "no_such_node"], max_samples=2)
    assert same[0].sqnr_db == math.inf
    assert same[1].sqnr_db is None and "not in" in same[1].note


def test_page_escapes_model_strings():
    from onnxforge.passes.manager import PassRecord, Report
    from onnxforge.report.html import optimize_page as build

    rec = PassRecord(name="quantize-int8", spec="quantize-int8", iteration=0, lossless=False, modified=True,
                     seconds=0.1, before={"nodes": 1}, after={"nodes": 2}, stats={"counts": {}, "skipped": []})
    report = Report(pipeline="quantize-int8", target="cpu", records=[rec], before={"nodes": 1}, after={"nodes": 2})
    floats = [{"pass": "quantize-int8", "node": "<script>alert(1)</script>", "op_type": "Softmax",
               "reason": "a <b> reason & more"}]
    text = build(report, model="m.onnx", sqnr=[], floats=floats).to_html()
    page = _Page(text)
    assert "script" not in page.tags and "<b>" not in text
    assert page.sections["float-ops"][0][1][0] == "<script>alert(1)</script>"


def test_sensitivity_page(files, tmp_path):
    r = CliRunner().invoke(main, ["sensitivity", str(files["model"]), "--calibration-data", str(files["calib"]),
                                  "--eval-data", str(files["val"]), "--what", "quantize", "--out-dir", str(tmp_path),
                                  "--report", str(tmp_path / "s.html"), "-q"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    text = (tmp_path / "s.html").read_text()
    page = _Page(text)
    for section in ("summary", "sensitivity-plot", "sensitivity", "quant-error", "float-ops"):
        assert section in page.sections, (section, list(page.sections))
    rows = page.sections["sensitivity"][0]
    assert rows[0][:3] == ["what", "layer", "drop"] and len(rows) >= 6
    assert all(png_ok(src) for src in page.images) and len(page.images) == 2
    assert_self_contained(text, page)


def test_tune_page(files, tmp_path):
    space = tmp_path / "space.toml"
    space.write_text('base = "O1"\n\n[[space]]\npass = "quantize-int8"\noptional = true\n')
    r = CliRunner().invoke(main, ["tune", str(files["model"]), "--calibration-data", str(files["calib"]),
                                  "--eval-data", str(files["val"]), "--space", str(space), "--strategy", "grid",
                                  "--latency", "size", "--budget", "2", "--max-drop", "5", "--no-cache",
                                  "-o", str(tmp_path / "best.onnx"), "--report", str(tmp_path / "t.html"), "-q"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    text = (tmp_path / "t.html").read_text()
    page = _Page(text)
    for section in ("summary", "pareto", "front", "passes", "quant-error", "float-ops"):
        assert section in page.sections, (section, list(page.sections))
    front = page.sections["front"][0]
    assert front[0][0] == "chosen" and any(row[0] == "★" for row in front[1:])
    assert all(png_ok(src) for src in page.images)
    assert_self_contained(text, page)


@pytest.mark.skipif(__import__("shutil").which("chromium") is None, reason="needs Debian's chromium package")
def test_page_renders_in_headless_chromium(optimize_page, files, tmp_path):
    """docs/render_report.py's screenshot of the page: a real, non-blank image with networking pointed nowhere."""
    import importlib.util

    import numpy as np
    from PIL import Image

    spec = importlib.util.spec_from_file_location("render_report", files["model"].parent.parent / "docs" / "render_report.py")
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    png = tmp_path / "shot.png"
    render.screenshot(files["dir"] / "report.html", png, width=1000, height=900)
    pixels = np.asarray(Image.open(png).convert("L"))
    assert pixels.shape == (900, 1000)
    assert pixels.std() > 10 and (pixels < 128).mean() > 0.01  # text and plots, not a blank page


def test_failed_run_still_writes_a_page_naming_the_pass(files, tmp_path):
    """--verify stops at a pass that breaks its tolerance (exit 4): the page shows what ran and why it stopped."""
    plugin = tmp_path / "bad_pass.py"
    plugin.write_text(
        "import numpy as np, onnx_ir as ir\n"
        "from onnxforge.passes import Pass, register_pass\n\n"
        "@register_pass('h6-break-weights')\n"
        "class BreakWeights(Pass):\n"
        "    '''Claims to be lossless, is not.'''\n"
        "    def run(self, model, stats):\n"
        "        for v in model.graph.initializers.values():\n"
        "            a = v.const_value.numpy()\n"
        "            if a.dtype == np.float32 and a.ndim == 4:\n"
        "                v.const_value = ir.tensor(a * np.float32(1.5), name=v.name)\n"
        "                return True\n"
        "        return False\n")
    r = CliRunner().invoke(main, ["--plugin", str(plugin), "optimize", str(files["model"]), "-o",
                                  str(tmp_path / "o.onnx"), "--verify", "--passes", "fold-batchnorm,h6-break-weights",
                                  "--report", str(tmp_path / "fail.html"), "--json"])
    assert r.exit_code == 4, r.output
    assert json.loads(r.stdout)["report"] == str(tmp_path / "fail.html")
    text = (tmp_path / "fail.html").read_text()
    page = _Page(text)
    assert "FAILED" in text and "first failing pass: h6-break-weights" in text
    assert [row[0] for row in page.sections["passes"][0][1:]] == ["fold-batchnorm"]
    assert not (tmp_path / "o.onnx").exists()
    assert_self_contained(text, page)
