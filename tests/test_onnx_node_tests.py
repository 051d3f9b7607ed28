"""ONNX's backend node tests through O1/O2 (issue 13): preserved or refused cleanly, never broken.

A deterministic sample of ONNX's node-test cases (plus the cases that found bugs) runs through O1 and
O2, with the inputs fed and with the inputs frozen into initializers (so that fold-constants and
simplify evaluate every op), compared with the original by output name
(``onnxforge.testing.node_tests``). ``bench/onnx_node_tests.py`` is the full run (1,884 cases).
The classifier itself is tested on cases broken on purpose.
"""

from __future__ import annotations

import types

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxforge.errors import PassFailedError, UnsupportedModelError
from onnxforge.testing import fuzz, node_tests

# Cases that were broken before their fix (each names the bug), always in the slice.
REGRESSIONS = [
    "test_castlike_no_saturate_FLOAT_to_FLOAT8E5M2",  # fold-constants: CastLike -> Cast lost saturate=0
    "test_castlike_no_saturate_FLOAT16_to_FLOAT8E4M3FN",
    "test_ai_onnx_ml_label_encoder_string_int",  # dedup-initializers: string tensors (frozen)
    "test_attention_3d_causal_bf16_expanded",  # dedup-initializers: bfloat16 tensors
    "test_loop16_seq_none",  # fuse: an If's sequence output typed as a tensor by shape inference
    "test_bernoulli_expanded",  # random ops: "upstream" (the original differs from itself), not broken
    "test_bernoulli",  # fold-constants froze one Bernoulli draw into a constant (frozen)
    "test_training_dropout",  # fold-constants froze a training-mode Dropout's mask (frozen)
    "test_resize_downsample_scales_linear_align_corners",  # onnxruntime differs from ONNX (frozen)
]
SAMPLE = 80


@pytest.fixture(scope="module")
def slice_cases():
    cases = node_tests.sample(SAMPLE, seed=13)
    named = {c.name for c in cases}
    return cases + [c for c in node_tests.collect(REGRESSIONS) if c.name not in named]


@pytest.mark.parametrize("spec", ["O1", "O2"])
def test_node_tests_slice_not_broken(slice_cases, spec):
    outcomes = node_tests.run_all(slice_cases, [spec])
    broken = [f"{o.case} [{o.variant}] {o.cause}: {o.detail.splitlines()[0][:200]}" for o in outcomes if o.broken]
    assert not broken, "\n".join(broken)
    statuses = {o.status for o in outcomes}
    assert "preserved" in statuses
    # the regressions are really exercised: every one preserved or (random ops, runtime bugs) upstream
    regress = {(o.case, o.variant): o.status for o in outcomes if o.case in REGRESSIONS}
    assert len(regress) == 2 * len(REGRESSIONS)
    assert regress[("test_bernoulli_expanded", "inputs")] == "upstream"
    assert regress[("test_castlike_no_saturate_FLOAT_to_FLOAT8E5M2", "frozen")] == "preserved"
    assert regress[("test_training_dropout", "frozen")] == "preserved"  # ORT's own seeded mask, kept
    assert regress[("test_bernoulli", "frozen")] == "upstream"  # still random, not a constant


def test_classifier_random_op_folded_is_broken(monkeypatch):
    # What fold-constants did before: the Bernoulli replaced by one draw of it.
    case = node_tests.collect(["test_bernoulli"])[0]

    def freeze_draw(model):
        draw = node_tests._ref_outputs(model, {})[0][1]
        del model.graph.node[:]
        model.graph.initializer.append(onnx.numpy_helper.from_array(draw, model.graph.output[0].name))
        return model

    monkeypatch.setattr(fuzz, "optimize", _returning(freeze_draw))
    o = node_tests.check(case, "O1", "frozen")
    assert (o.status, o.cause) == ("broken", "randomness-lost"), o


def test_every_case_has_matching_inputs():
    # ONNX pairs a case's input values with the graph inputs by position: the harness must too.
    for case in node_tests.collect(REGRESSIONS):
        feeds = node_tests.feeds_of(case)
        assert list(feeds) == [i.name for i in case.model.graph.input]


# --------------------------------------------------------------------------- the classifier


def _case(op="Add", out_name="z", expected=None, domain=""):
    x, y = np.arange(6, dtype=np.float32).reshape(2, 3), np.full((2, 3), 0.5, np.float32)
    node = helper.make_node(op, ["x", "y"], [out_name], domain=domain)
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3]) for n in ("x", "y")],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, [2, 3])],
    )
    opsets = [helper.make_opsetid("", 18)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    model = helper.make_model(graph, opset_imports=opsets)
    out = x + y if expected is None else expected
    return types.SimpleNamespace(name=f"fake_{op}", model=model, data_sets=[([x, y], [out])], rtol=1e-3, atol=1e-7)


def _returning(make):
    """A stand-in for ``fuzz.optimize`` that returns ``make(model)`` (or raises what it raises)."""

    def fake(data, spec, target="cpu"):
        model = onnx.ModelProto.FromString(data)
        return make(model)

    return fake


def _op_to(op):
    def make(model):
        model.graph.node[0].op_type = op
        return model

    return make


def test_classifier_preserved():
    o = node_tests.check(_case(), "O1")
    assert (o.status, o.runner) == ("preserved", "onnxruntime")
    o = node_tests.check(_case(), "O1", "frozen")
    assert o.status == "preserved"


@pytest.mark.parametrize("variant", node_tests.VARIANTS)
def test_classifier_wrong_values_are_broken(monkeypatch, variant):
    monkeypatch.setattr(fuzz, "optimize", _returning(_op_to("Sub")))
    o = node_tests.check(_case(), "O1", variant)
    assert (o.status, o.cause) == ("broken", "value"), o


def test_classifier_renamed_output_is_broken(monkeypatch):
    def rename(model):
        model.graph.node[0].output[0] = "z_1"
        model.graph.output[0].name = "z_1"
        return model

    monkeypatch.setattr(fuzz, "optimize", _returning(rename))
    o = node_tests.check(_case(), "O2")
    assert (o.status, o.cause) == ("broken", "outputs"), o


def test_classifier_invalid_model_is_broken(monkeypatch):
    def dangle(model):
        model.graph.node[0].input[1] = "nowhere"
        return model

    monkeypatch.setattr(fuzz, "optimize", _returning(dangle))
    o = node_tests.check(_case(), "O1")
    assert (o.status, o.cause) == ("broken", "invalid"), o


@pytest.mark.parametrize("error, status", [(UnsupportedModelError("op Foo is not supported"), "refused"),
                                           (PassFailedError("pass 'x' failed: KeyError"), "broken"),
                                           (KeyError("raw"), "broken")])
def test_classifier_refusal_vs_crash(monkeypatch, error, status):
    def raising(model, spec, target="cpu"):
        raise error

    monkeypatch.setattr(fuzz, "run_pipeline", raising)
    o = node_tests.check(_case(), "O1")
    assert o.status == status, o
    assert o.cause == ("refused" if status == "refused" else "crash")


def test_classifier_runtime_bug_is_upstream(monkeypatch):
    # ONNX "expects" x - y: onnxruntime's Add (the original) disagrees, the optimized Sub agrees.
    x, y = np.arange(6, dtype=np.float32).reshape(2, 3), np.full((2, 3), 0.5, np.float32)
    monkeypatch.setattr(fuzz, "optimize", _returning(_op_to("Sub")))
    o = node_tests.check(_case(expected=x - y), "O1")
    assert (o.status, o.cause) == ("upstream", "runtime-differs-from-onnx"), o


def test_classifier_not_runnable_then_checked(monkeypatch):
    # An op no runtime knows: not runnable; the optimized model must still be valid and keep its outputs.
    case = _case(op="Foo", domain="com.example")
    o = node_tests.check(case, "O1")
    assert (o.status, o.runner) == ("not-runnable", "")

    def drop_output(model):
        model.graph.output[0].name = "other"
        return model

    monkeypatch.setattr(fuzz, "optimize", _returning(drop_output))
    assert node_tests.check(case, "O1").status == "broken"


def test_freeze_keeps_what_an_initializer_cannot_hold():
    case = node_tests.collect(["test_loop16_seq_none"])[0]
    frozen, rest = node_tests.freeze(case.model, node_tests.feeds_of(case))
    assert [i.name for i in frozen.graph.input] == ["opt_seq"]  # the optional sequence stays an input
    assert {i.name for i in frozen.graph.initializer} == {"trip_count", "cond"}
    assert list(rest) == ["opt_seq"]
