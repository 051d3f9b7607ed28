"""Pipeline stages: split equality on the detector-style zoo model, frontier choice, balancing, the CLI.

Stage models are valid ONNX; chained (in one process, or as a pipeline of processes) they give the
whole model's outputs exactly (onnxruntime with optimizations off: the same nodes do the same math).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from onnxforge.ir.io import model_to_bytes
from onnxforge.runtime.stages import _frontiers, plan_stages
from onnxforge.testing.numerics import run


@pytest.fixture(scope="module")
def yolo(zoo_model):
    return zoo_model("yolo_style")


def _whole(model, feeds):
    return dict(zip((v.name for v in model.graph.outputs), run(model, feeds)))


def _chain(plan, feeds):
    carried = dict(feeds)
    for m in plan.models:
        names = [i.name for i in m.graph.input]
        outs = run(m, {n: carried[n] for n in names})
        carried.update(zip((o.name for o in m.graph.output), outs))
    return {n: carried[n] for n in plan.outputs}


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_split_yolo_equals_whole_model(yolo, n):
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    plan = plan_stages(model_to_bytes(yolo), n)
    assert len(plan.models) == n
    for m in plan.models:
        onnx.checker.check_model(m)
    # every node of the whole model is in exactly one stage (Constant nodes may be copied)
    assert sum(s.nodes for s in plan.stages) == sum(1 for node in yolo.graph if node.op_type != "Constant")
    got, want = _chain(plan, {"input": x}), _whole(yolo, {"input": x})
    assert got.keys() == want.keys() == {"output_0", "output_1", "output_2"}
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_single_tensor_frontier_on_a_chain(zoo_model):
    mlp = zoo_model("mlp")
    plan = plan_stages(model_to_bytes(mlp), 2)
    assert plan.frontier_widths == [1]
    assert len(plan.stages[1].inputs) == 1 and plan.stages[0].outputs == plan.stages[1].inputs


def test_frontier_counts_live_tensors(yolo):
    proto = onnx.load_from_string(model_to_bytes(yolo))
    positions = [i for i, n in enumerate(proto.graph.node) if n.op_type != "Constant"]
    fronts = _frontiers(proto, positions[:-1])
    # right after the first node only its output is live; the multi-scale neck keeps several alive
    assert len(fronts[0]) == 1 and max(len(f) for f in fronts) >= 3


def test_costs_move_the_cut(zoo_model):
    mlp = zoo_model("mlp")
    proto = onnx.load_from_string(model_to_bytes(mlp))
    names = [n.name for n in proto.graph.node if n.op_type != "Constant"]
    uniform = plan_stages(proto, 2)
    heavy_first = plan_stages(proto, 2, costs={n: (100.0 if i == 0 else 1.0) for i, n in enumerate(names)})
    assert heavy_first.stages[0].nodes == 1 < uniform.stages[0].nodes
    assert heavy_first.costs == "profile" and uniform.costs == "uniform"


def test_cli_split_and_run_stages(tmp_path, yolo):
    from click.testing import CliRunner

    from onnxforge.cli import main
    from onnxforge.ir.io import save

    save(yolo, tmp_path / "yolo.onnx")
    x = np.random.default_rng(1).standard_normal((6, 3, 64, 64)).astype(np.float32)
    np.savez(tmp_path / "in.npz", input=x)
    r = CliRunner().invoke(main, ["split", str(tmp_path / "yolo.onnx"), "--stages", "2", "-o", str(tmp_path / "st")])
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "st" / "manifest.json").read_text())
    assert manifest["costs"] == "profile" and [s["file"] for s in manifest["stages"]] == ["stage0.onnx", "stage1.onnx"]
    for s in manifest["stages"]:
        onnx.checker.check_model(str(tmp_path / "st" / s["file"]))

    r = CliRunner().invoke(main, ["run", str(tmp_path / "yolo.onnx"), "--inputs", str(tmp_path / "in.npz"),
                                  "-o", str(tmp_path / "out.npz"), "--stages", "2", "--batch-size", "2",
                                  "--json", str(tmp_path / "run.json")])
    assert r.exit_code == 0, r.output
    assert "one process" in r.output
    report = json.loads((tmp_path / "run.json").read_text())
    assert report["stages"] == 2 and report["one_process_samples_per_s"] > 0
    with np.load(tmp_path / "out.npz") as got:
        want = _whole(yolo, {"input": x})
        assert set(got.files) == set(want)
        for name in want:  # in input order, bit for bit
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_cli_stages_refuses_workers(tmp_path, yolo):
    from click.testing import CliRunner

    from onnxforge.cli import main
    from onnxforge.ir.io import save

    save(yolo, tmp_path / "yolo.onnx")
    np.savez(tmp_path / "in.npz", input=np.zeros((2, 3, 64, 64), np.float32))
    r = CliRunner().invoke(main, ["run", str(tmp_path / "yolo.onnx"), "--inputs", str(tmp_path / "in.npz"),
                                  "-o", str(tmp_path / "o.npz"), "--stages", "2", "--workers", "2"])
    assert r.exit_code == 2 and "--stages" in r.output
