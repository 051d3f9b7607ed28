"""Render an onnxforge HTML report in headless Chromium and save a screenshot (docs/report.png).

    python docs/render_report.py                      # build the demo report, then screenshot it
    python docs/render_report.py --html report.html   # screenshot an existing report

The demo: the bundled digits CNN (examples/digits_cnn.onnx), ``O1,quantize-int8`` calibrated on 64
digits images, ``--verify --bench --report``. Chromium is Debian's ``chromium`` package
(``apt-get install -y chromium``); the page needs no network, and Chromium is started with networking
pointed nowhere to prove it.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import subprocess
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent


def build_demo(folder: pathlib.Path) -> pathlib.Path:
    """``onnxforge optimize`` on the bundled digits CNN with an HTML report; return the report's path."""
    import numpy as np

    examples = HERE.parent / "examples"
    calib = folder / "calib.npz"
    np.savez(calib, input=np.load(examples / "digits_data.npz")["input"][:64])
    report = folder / "report.html"
    cmd = [sys.executable, "-m", "onnxforge", "optimize", str(examples / "digits_cnn.onnx"),
           "-o", str(folder / "digits_cnn.int8.onnx"), "--passes", "O1,quantize-int8", "--calibration-data",
           str(calib), "--verify", "--bench", "--report", str(report), "-q"]
    subprocess.run(cmd, check=True)
    return report


def screenshot(html: pathlib.Path, png: pathlib.Path, *, width: int = 1240, height: int = 1900) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        raise SystemExit("no chromium found: apt-get install -y chromium")
    with tempfile.TemporaryDirectory() as profile:
        cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               f"--user-data-dir={profile}", "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>",
               f"--window-size={width},{height}", f"--screenshot={png.resolve()}", html.resolve().as_uri()]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    print(f"wrote {png}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--html", type=pathlib.Path, help="An existing report (default: build the demo one).")
    parser.add_argument("-o", "--output", type=pathlib.Path, default=HERE / "report.png")
    parser.add_argument("--height", type=int, default=1900)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        html = args.html or build_demo(pathlib.Path(tmp))
        screenshot(html, args.output, height=args.height)


if __name__ == "__main__":
    main()
