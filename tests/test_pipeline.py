"""The pass manager: registry, options, instruments, verification, fixed point, reports, plugins."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import onnx_ir as ir
import pytest

import onnxforge
from onnxforge.errors import PassFailedError, PassOptionError, UnknownPassError, VerificationError
from onnxforge.passes import Pass, PassContext, PassStats, create_pass, register_pass
from onnxforge.passes.manager import Pipeline
from onnxforge.testing import numerics


# ----------------------------------------------------------------------- test-only passes


@register_pass("test-nudge-weights", replace=True)
class NudgeWeightsPass(Pass):
    """Deliberately wrong 'lossless' pass: multiplies every float initializer by ``factor``."""

    def __init__(self, factor: float = 1.01, only_first: bool = False):
        super().__init__()
        self.factor = factor
        self.only_first = only_first

    def run(self, model, stats: PassStats) -> bool:
        for value in list(model.graph.initializers.values()):
            array = value.const_value.numpy()
            if array.dtype != np.float32:
                continue
            value.const_value = ir.tensor(array * np.float32(self.factor), name=value.name)
            stats.count("nudged")
            if self.only_first:
                break
        return stats.counts["nudged"] > 0


@register_pass("test-noop", replace=True)
class NoopPass(Pass):
    """Changes nothing."""

    def run(self, model, stats):
        return False


@register_pass("test-countdown", replace=True)
class CountdownPass(Pass):
    """Removes one Identity (not producing a graph output) per run: needs several rounds."""

    def run(self, model, stats):
        for node in list(model.graph):
            if node.op_type == "Identity" and not node.outputs[0].is_graph_output():
                ir.convenience.replace_all_uses_with(node.outputs[0], node.inputs[0])
                model.graph.remove(node, safe=True)
                stats.count("removed")
                return True
        return False


@register_pass("test-crash", replace=True)
class CrashPass(Pass):
    """Raises inside run()."""

    def run(self, model, stats):
        raise RuntimeError("boom at node /fc/Gemm")


@pytest.fixture(scope="module")
def mlp_model():
    import torch

    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = torch.nn.Linear(8, 16)
            self.fc2 = torch.nn.Linear(16, 4)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))

    torch.manual_seed(0)
    module = MLP().eval()
    return onnxforge.export(module, (torch.randn(2, 8),))


def fresh(model: ir.Model) -> ir.Model:
    return ir.serde.deserialize_model(ir.serde.serialize_model(model))


# ----------------------------------------------------------------------- registry


def test_create_pass_coerces_option_strings():
    p = create_pass("test-nudge-weights", {"factor": "2", "only_first": "true"})
    assert p.factor == 2.0 and p.only_first is True


@pytest.mark.parametrize(
    "options, fragment",
    [({"factr": 1}, "no option 'factr'"), ({"factor": "abc"}, "expected a number"), ({"only_first": "maybe"}, "true/false")],
)
def test_bad_options_are_clear(options, fragment):
    with pytest.raises(PassOptionError) as e:
        create_pass("test-nudge-weights", options)
    assert fragment in str(e.value) and "test-nudge-weights" in str(e.value)


def test_unknown_pass_suggests_close_names():
    with pytest.raises(UnknownPassError, match="did you mean test-noop"):
        create_pass("test-nop")


def test_names_must_be_kebab_case():
    with pytest.raises(ValueError, match="kebab-case"):
        register_pass("Bad_Name")


def test_foreign_onnx_ir_pass_runs_in_pipeline(mlp_model):
    """An onnx_ir pass drops into our pipeline unchanged (and ours into theirs)."""
    model = fresh(mlp_model)
    pipeline = Pipeline([ir.passes.common.TopologicalSortPass(), create_pass("test-noop")])
    result = pipeline.run(model)
    assert [r.name for r in result.report.records] == ["TopologicalSortPass", "test-noop"]
    theirs = ir.passes.PassManager([create_pass("test-noop")])
    assert theirs(model).modified is False


# ----------------------------------------------------------------------- instruments


def test_report_records_every_pass(mlp_model, tmp_path):
    model = fresh(mlp_model)
    result = Pipeline("test-noop,test-nudge-weights(factor=1.0)", verify=True).run(model)
    report = result.report
    assert [r.name for r in report.records] == ["test-noop", "test-nudge-weights"]
    noop, nudge = report.records
    assert noop.modified is False and noop.verified is None  # unchanged passes are not re-verified
    assert nudge.modified is True and nudge.verified is True
    assert nudge.stats["counts"]["nudged"] == 4
    assert nudge.before["params"] == nudge.after["params"] == 8 * 16 + 16 + 16 * 4 + 4
    assert nudge.vs_original.max_abs == 0.0
    path = tmp_path / "report.json"
    report.write_json(path)
    data = json.loads(path.read_text())
    assert data["passes"][1]["stats"]["counts"] == {"nudged": 4}
    assert data["pipeline"] == "test-noop,test-nudge-weights(factor=1.0)"


def test_verify_names_the_first_breaking_pass(mlp_model, tmp_path):
    model = fresh(mlp_model)
    pipeline = Pipeline(
        "test-noop,test-nudge-weights(factor=1.0),test-nudge-weights(factor=1.05),test-noop",
        verify=True,
        reproducer_dir=tmp_path / "repro",
    )
    with pytest.raises(VerificationError) as e:
        pipeline.run(model)
    assert "test-nudge-weights" in str(e.value) and "beyond tolerance" in str(e.value)
    # The reproducer holds the model the failing pass received, and replays it.
    repro = tmp_path / "repro"
    assert (repro / "pipeline.txt").read_text().strip() == "test-nudge-weights(factor=1.05)"
    replayed = onnxforge.load(repro / "input.onnx")
    feeds = numerics.random_inputs(replayed)
    np.testing.assert_allclose(numerics.run(replayed, feeds)[0], numerics.run(mlp_model, feeds)[0], rtol=1e-6)


def test_lossy_pass_gets_its_own_tolerance(mlp_model):
    class LossyNudge(NudgeWeightsPass):
        lossless = False
        tolerance = 0.2

    model = fresh(mlp_model)
    result = Pipeline([LossyNudge(factor=1.05)], verify=True).run(model)
    (record,) = result.report.records
    assert record.verified is True and record.tolerance == 0.2
    assert 0 < record.vs_original.max_rel < 0.2


def test_crashing_pass_is_named_with_reproducer(mlp_model, tmp_path):
    with pytest.raises(PassFailedError, match="pass 'test-crash' failed: RuntimeError: boom") as e:
        Pipeline("test-noop,test-crash", reproducer_dir=tmp_path).run(fresh(mlp_model))
    assert str(tmp_path) in str(e.value)
    assert (tmp_path / "input.onnx").is_file()


def test_fixed_point_repeats_lossless_passes_until_stable(mlp_model):
    model = fresh(mlp_model)
    # Chain three Identity nodes onto the output.
    graph = model.graph
    out = graph.outputs[0]
    last = out
    for i in range(3):
        node = ir.node("Identity", [last], name=f"extra_identity_{i}")
        graph.append(node)
        node.outputs[0].name = f"id_{i}"
        node.outputs[0].type, node.outputs[0].shape = out.type, out.shape
        last = node.outputs[0]
    graph.outputs[0] = last
    once = Pipeline("test-countdown").run(fresh(model))
    assert sum(n.op_type == "Identity" for n in once.model.graph) == 2
    fixed = Pipeline("test-countdown", fixed_point=True, max_iterations=10, verify=True).run(model)
    assert sum(n.op_type == "Identity" for n in fixed.model.graph) == 1  # the one naming the output
    rounds = [r.iteration for r in fixed.report.records]
    assert rounds == [0, 1, 2]  # two removals, then one round that changed nothing


def test_fixed_point_runs_lossy_passes_once(mlp_model):
    class Lossy(NudgeWeightsPass):
        lossless = False

    result = Pipeline([Lossy(factor=1.0)], fixed_point=True).run(fresh(mlp_model))
    assert len(result.report.records) == 1


def test_context_reaches_passes():
    ctx = PassContext(target="onnx", seed=7)
    pipeline = Pipeline("test-noop", context=ctx)
    assert pipeline.passes[0].context is ctx
    with pytest.raises(PassOptionError, match="unknown target"):
        PassContext(target="gpu")
    with pytest.raises(PassOptionError, match="unknown context option"):
        PassContext(options={"nope": 1})


def test_pipeline_is_deterministic(mlp_model):
    a = Pipeline("test-nudge-weights(factor=1.5)").run(fresh(mlp_model)).model
    b = Pipeline("test-nudge-weights(factor=1.5)").run(fresh(mlp_model)).model
    ser = lambda m: ir.serde.serialize_model(m).SerializeToString(deterministic=True)  # noqa: E731
    assert ser(a) == ser(b)


# ----------------------------------------------------------------------- plugins

PLUGIN_SOURCE = textwrap.dedent(
    '''
    from onnxforge.passes import Pass, register_pass

    class TagPass(Pass):
        """Adds a metadata tag (plugin test)."""

        def __init__(self, tag: str = "hello"):
            super().__init__()
            self.tag = tag

        def run(self, model, stats):
            model.metadata_props["plugin_tag"] = self.tag
            stats.count("tagged")
            return True
    '''
)


def _run_cli(args, env_extra=None, cwd=None):
    import os

    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "onnxforge", *args], capture_output=True, text=True,
                          env=env, cwd=cwd)


def test_plugin_via_entry_point(tmp_path, mlp_model):
    """A package that declares the 'onnxforge.passes' entry point is found without any flag."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "tag_plugin.py").write_text(PLUGIN_SOURCE)
    dist = site / "tag_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tag-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[onnxforge.passes]\ntag-model = tag_plugin:TagPass\n")
    model_path = tmp_path / "m.onnx"
    onnxforge.save(fresh(mlp_model), model_path)
    env = {"PYTHONPATH": str(site)}
    listing = _run_cli(["passes", "--json"], env)
    assert listing.returncode == 0, listing.stderr
    assert "tag-model" in json.loads(listing.stdout)["passes"]
    run = _run_cli(["optimize", str(model_path), "-o", str(tmp_path / "out.onnx"), "--passes",
                    "tag-model(tag=ci)", "-q"], env)
    assert run.returncode == 0, run.stderr
    assert onnxforge.load(tmp_path / "out.onnx").metadata_props["plugin_tag"] == "ci"


def test_plugin_via_flag(tmp_path, mlp_model):
    plugin = tmp_path / "my_passes.py"
    plugin.write_text(PLUGIN_SOURCE + "\nregister_pass('tag-model')(TagPass)\n")
    model_path = tmp_path / "m.onnx"
    onnxforge.save(fresh(mlp_model), model_path)
    run = _run_cli(["--plugin", str(plugin), "optimize", str(model_path), "-o", str(tmp_path / "o.onnx"),
                    "--passes", "tag-model", "-q"])
    assert run.returncode == 0, run.stderr
    bad = _run_cli(["--plugin", "no_such_module_xyz", "passes"])
    assert bad.returncode != 0
    assert bad.stderr.strip().startswith("onnxforge: error: plugin 'no_such_module_xyz' failed to import")
    assert "Traceback" not in bad.stderr


def test_teacher_is_the_model_just_before_the_first_lossy_pass(mlp_model):
    """reconstruct-style passes get a teacher with the student's structure (lossless passes done)."""
    seen = {}

    class LossyRecorder(Pass):
        lossless = False

        def run(self, model, stats):
            teacher = self.context.reference_model
            seen["teacher_nodes"] = [n.op_type for n in teacher.graph]
            seen["shares_tensors"] = any(
                teacher.graph.initializers[k].const_value is v.const_value
                for k, v in model.graph.initializers.items()
                if k in teacher.graph.initializers
            )
            return False

    ctx = PassContext()
    model = fresh(mlp_model)
    out = model.graph.outputs[0]
    middle = ir.node("Identity", [out], name="extra_identity")
    model.graph.append(middle)
    middle.outputs[0].name = "renamed_output"
    middle.outputs[0].type, middle.outputs[0].shape = out.type, out.shape
    model.graph.outputs[0] = middle.outputs[0]
    final = ir.node("Identity", [middle.outputs[0]], name="final_identity")
    model.graph.append(final)
    final.outputs[0].name = "final_output"
    final.outputs[0].type, final.outputs[0].shape = out.type, out.shape
    model.graph.outputs[0] = final.outputs[0]
    input_ops = [n.op_type for n in model.graph]
    Pipeline([create_pass("test-countdown"), LossyRecorder()], context=ctx).run(model)
    # The teacher is the model after the lossless pass removed an Identity, not the input model.
    assert seen["teacher_nodes"] == [n.op_type for n in model.graph]
    assert len(seen["teacher_nodes"]) == len(input_ops) - 1
    assert seen["shares_tensors"] is False  # a deep copy: the student's edits cannot reach it
    assert ctx.reference_model is None  # set for the run only


def test_user_given_teacher_wins(mlp_model):
    seen = {}

    class LossyRecorder(Pass):
        lossless = False

        def run(self, model, stats):
            seen["teacher"] = self.context.reference_model
            return False

    teacher = fresh(mlp_model)
    ctx = PassContext(reference_model=teacher)
    Pipeline([LossyRecorder()], context=ctx).run(fresh(mlp_model))
    assert seen["teacher"] is teacher and ctx.reference_model is teacher


# ----------------------------------------------------------------------- verifier: by name (issue 13)


def two_outputs(model: ir.Model) -> ir.Model:
    """``model`` with a second graph output: the hidden activation (the Relu), named 'hidden'."""
    model = fresh(model)
    relu = next(n for n in model.graph if n.op_type == "Relu")
    relu.outputs[0].name = "hidden"
    model.graph.outputs.append(relu.outputs[0])
    return model


@register_pass("test-drop-last-output", replace=True)
class DropLastOutputPass(Pass):
    """Deliberately wrong 'lossless' pass: removes the last graph output."""

    def run(self, model, stats):
        model.graph.outputs.pop()
        return True


@register_pass("test-rename-output", replace=True)
class RenameOutputPass(Pass):
    """Deliberately wrong 'lossless' pass: renames the first graph output."""

    def run(self, model, stats):
        model.graph.outputs[0].name = "something_else"
        return True


@register_pass("test-swap-outputs", replace=True)
class SwapOutputsPass(Pass):
    """Correct pass: reorders the graph outputs (same names, same values)."""

    def run(self, model, stats):
        outs = list(model.graph.outputs)
        model.graph.outputs.clear()
        model.graph.outputs.extend(reversed(outs))
        return True


@register_pass("test-unsqueeze-output", replace=True)
class UnsqueezeOutputPass(Pass):
    """Deliberately wrong 'lossless' pass: same values and name, one more axis."""

    def run(self, model, stats):
        out = model.graph.outputs[0]
        axes = ir.Value(name="test_axes", const_value=ir.tensor(np.array([0], np.int64), name="test_axes"))
        model.graph.register_initializer(axes)
        node = ir.node("Unsqueeze", [out, axes])
        model.graph.append(node)
        name = out.name
        out.name = name + "_before"
        node.outputs[0].name = name
        node.outputs[0].dtype = out.dtype
        model.graph.outputs[0] = node.outputs[0]
        return True


@register_pass("test-require-input", replace=True)
class RequireInputPass(Pass):
    """Deliberately wrong 'lossless' pass: adds a required graph input (added to the first output)."""

    def run(self, model, stats):
        out = model.graph.outputs[0]
        extra = ir.Value(name="new_input", type=out.type, shape=ir.Shape([1]))
        model.graph.inputs.append(extra)
        node = ir.node("Add", [out, extra])
        model.graph.append(node)
        name = out.name
        out.name = name + "_before"
        node.outputs[0].name = name
        node.outputs[0].type = out.type
        model.graph.outputs[0] = node.outputs[0]
        return True


def test_verify_fails_a_dropped_output_and_names_the_pass(mlp_model, tmp_path):
    """Regression: outputs paired by position let a dropped last output pass (zip stops early)."""
    model = two_outputs(mlp_model)
    with pytest.raises(VerificationError) as e:
        Pipeline("test-noop,test-drop-last-output", verify=True, reproducer_dir=tmp_path / "r").run(model)
    message = str(e.value)
    assert "'test-drop-last-output'" in message and "'hidden' missing" in message
    assert (tmp_path / "r" / "pipeline.txt").read_text().strip() == "test-drop-last-output"
    # the reproducer is the model the pass received: it still has both outputs
    assert [o.name for o in onnxforge.load(tmp_path / "r" / "input.onnx").graph.outputs][1] == "hidden"


def test_verify_fails_a_renamed_output(mlp_model):
    with pytest.raises(VerificationError, match="test-rename-output.*'something_else'"):
        Pipeline("test-rename-output", verify=True).run(fresh(mlp_model))


def test_verify_pairs_reordered_outputs_by_name(mlp_model):
    """Regression: by position, two reordered outputs of different shapes were a false failure."""
    result = Pipeline("test-swap-outputs", verify=True).run(two_outputs(mlp_model))
    (record,) = result.report.records
    assert record.verified is True and record.vs_previous.max_abs == 0.0


def test_verify_fails_a_shape_change(mlp_model):
    with pytest.raises(VerificationError, match="test-unsqueeze-output.*shape changed"):
        Pipeline("test-unsqueeze-output", verify=True).run(fresh(mlp_model))


def test_verify_fails_a_new_required_input(mlp_model):
    with pytest.raises(VerificationError, match="test-require-input.*changed the model's inputs.*'new_input'"):
        Pipeline("test-require-input", verify=True).run(fresh(mlp_model))


def zero_output(model: ir.Model) -> ir.Model:
    """``model`` whose last layer is all zeros: the output is exactly 0 on every input."""
    model = fresh(model)
    for value in model.graph.initializers.values():
        if "fc2" in value.name:
            value.const_value = ir.tensor(np.zeros_like(value.const_value.numpy()), name=value.name)
    return model


def test_infinite_tolerance_on_an_all_zero_output_passes(mlp_model):
    """Regression: ``diff <= atol + inf * 0`` is NaN, so a correct pass with tolerance inf failed."""

    class AnythingGoes(NudgeWeightsPass):
        lossless = False
        tolerance = float("inf")

    model = zero_output(mlp_model)
    feeds = numerics.random_inputs(model)
    assert not numerics.run(model, feeds)[0].any()
    result = Pipeline([AnythingGoes(factor=2.0)], verify=True).run(model)
    (record,) = result.report.records
    assert record.modified and record.verified is True and record.vs_previous.max_abs == 0.0


def test_verify_all_zero_output_still_uses_atol(mlp_model):
    """On an all-zero output a finite rtol scales nothing: any diff above atol fails."""

    class MakeNonZero(Pass):
        lossless = False
        tolerance = 10.0

        def run(self, model, stats):
            for value in model.graph.initializers.values():
                if value.name.endswith("fc2.bias"):
                    value.const_value = ir.tensor(np.full(value.const_value.shape.numpy(), 1e-3, np.float32))
                    return True
            raise AssertionError("no fc2 bias")

    with pytest.raises(VerificationError, match="beyond tolerance.*max abs diff 0.001"):
        Pipeline([MakeNonZero()], verify=True).run(zero_output(mlp_model))


def test_verification_is_skipped_for_an_unmodified_pass(mlp_model):
    class LiesUnmodified(NudgeWeightsPass):
        """Changes weights but reports no change: verification cannot see it (passes must be honest)."""

        def run(self, model, stats):
            super().run(model, stats)
            return False

    result = Pipeline([create_pass("test-noop"), LiesUnmodified(factor=1.5)], verify=True).run(fresh(mlp_model))
    assert [r.verified for r in result.report.records] == [None, None]
    assert all(r.vs_previous is None for r in result.report.records)


@register_pass("test-dangling", replace=True)
class DanglingPass(Pass):
    """Deliberately wrong pass: drops an initializer a node still reads (like a bias-name collision)."""

    def run(self, model, stats):
        name = next(iter(model.graph.initializers))
        model.graph.initializers.pop(name)
        return True


def test_a_pass_leaving_a_dangling_input_is_named_even_without_verify(mlp_model, tmp_path):
    with pytest.raises(PassFailedError, match=r"pass 'test-dangling' left an invalid model: .*reads .*dangling") as e:
        Pipeline("test-noop,test-dangling", reproducer_dir=tmp_path).run(fresh(mlp_model))
    assert str(tmp_path) in str(e.value) and (tmp_path / "input.onnx").is_file()


# ----------------------------------------------------------------------- optimize(context=...) (issue 13)


@register_pass("test-record-context", replace=True)
class RecordContextPass(Pass):
    """Changes nothing; remembers the context it ran with."""

    seen: list = []

    def run(self, model, stats):
        RecordContextPass.seen.append(self.context)
        return False


def test_optimize_with_context_honours_target_calibration_and_providers(mlp_model):
    """Regression: with ``context=``, ``target`` and ``calibration_data`` were silently ignored."""
    from onnxforge.runtime.data import CalibrationData

    mine = PassContext(seed=7, options={"num_samples": 4})
    feeds = [{mlp_model.graph.inputs[0].name: np.ones((2, 8), np.float32)}] * 3
    RecordContextPass.seen.clear()
    onnxforge.optimize(fresh(mlp_model), "test-record-context", context=mine, target="onnx",
                       calibration_data=feeds, providers=["cpu"])
    (ctx,) = RecordContextPass.seen
    assert ctx.target == "onnx" and ctx.seed == 7 and ctx.options == {"num_samples": 4}
    assert isinstance(ctx.calibration_data, CalibrationData) and len(ctx.calibration_data) == 3
    assert mine.target == "cpu" and mine.calibration_data is None  # the caller's context is not changed
    # left out, the context's own values stand (and its raw calibration data is loaded)
    RecordContextPass.seen.clear()
    onnxforge.optimize(fresh(mlp_model), "test-record-context",
                       context=PassContext(target="onnx", calibration_data=feeds, providers=("cuda", "cpu")))
    (ctx,) = RecordContextPass.seen
    assert ctx.target == "onnx" and ctx.providers == ("cuda", "cpu")
    assert isinstance(ctx.calibration_data, CalibrationData)
    with pytest.raises(PassOptionError, match="unknown target"):
        onnxforge.optimize(fresh(mlp_model), "test-record-context", context=mine, target="gpu")
    with pytest.raises(PassOptionError, match="unknown execution provider 'gpu'"):
        onnxforge.optimize(fresh(mlp_model), "test-record-context", providers=["gpu"])


def test_atomic_write_leaves_no_temporary_file_on_any_failure(tmp_path, monkeypatch):
    import os

    from onnxforge.atomic import atomic_write_bytes

    target = tmp_path / "report.json"
    target.write_bytes(b"old")

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(target, b"new")
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"] and target.read_bytes() == b"old"
