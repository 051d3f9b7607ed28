"""ONNX's backend node tests through the lossless presets: every case preserved, refused, or a bug.

``onnx.backend.test.case.node.collect_testcases()`` builds, in memory, every single-op model (and the
function-expanded ``*_expanded`` multi-node ones) of ONNX's node tests, with their inputs and the
outputs ONNX expects. For each case and pipeline, :func:`check` runs the pipeline (the Python API, as
the fuzzer does: :func:`onnxforge.testing.fuzz.optimize`) on a copy of the model, in one of two
variants:

- ``inputs``: the model as it is, inputs fed at run time (folding has little to evaluate);
- ``frozen``: every tensor input becomes an initializer holding the case's input value (sequences
  and optionals stay inputs), so ``fold-constants`` and ``simplify`` evaluate every op themselves.

The original model (always the ``inputs`` form) and the optimized one run on the case's inputs in
onnxruntime with ``ORT_DISABLE_ALL``; when onnxruntime cannot load or run the *original*, both run in
``onnx.reference.ReferenceEvaluator``. Outputs are compared **by name** (same names in order, shapes,
dtypes; values within fp32 tolerance ``|a - e| <= 1e-5 + 1e-4 max|e|`` or the case's own
``rtol``/``atol`` elementwise). Statuses:

- ``preserved``: equal outputs;
- ``refused``: a typed ``OnnxforgeError`` raised on purpose (listed with its message);
- ``not-runnable``: neither runtime runs the original; the optimized model passes
  ``onnx.checker.check_model(full_check=True)`` and keeps the output names and types;
- ``upstream``: the outputs differ (or match by chance: a model with a random op is checked for
  randomness either way), but the unoptimized model differs from run to run (random ops, still random
  after the pipeline), or the runtime already gives the optimized outputs for the
  unoptimized frozen model, or the *original* run disagrees with ONNX's expected outputs while the
  optimized one agrees (a runtime bug, not ours), or the frozen model already fails to run;
- ``broken``: anything else — different values/shapes/dtypes, a lost or renamed output, an invalid
  model, a model onnxruntime no longer loads although the original loaded, a raw exception, a
  random op folded into a constant (the original differs from run to run, the optimized does not).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import warnings
from collections.abc import Iterable, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from onnxforge.testing import fuzz

__all__ = ["NodeOutcome", "STATUSES", "check", "collect", "feeds_of", "freeze", "sample"]

STATUSES = ("preserved", "refused", "not-runnable", "upstream", "broken")
VARIANTS = ("inputs", "frozen")


@dataclasses.dataclass
class NodeOutcome:
    """What one pipeline did to one node-test case in one variant."""

    case: str
    spec: str
    variant: str
    status: str  # one of STATUSES
    cause: str = ""  # the finer reason: "crash", "value", "load", "invalid", "outputs", ...
    runner: str = ""  # "onnxruntime", "reference" or "" (neither runs the original)
    detail: str = ""

    @property
    def broken(self) -> bool:
        return self.status == "broken"


@functools.lru_cache(maxsize=1)
def _all_cases() -> tuple:
    from onnx.backend.test.case import node

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")  # the generators cast out-of-range values on purpose
        return tuple(node.collect_testcases(None))


def collect(names: Iterable[str] | None = None) -> list:
    """ONNX's node-test cases (``TestCase`` with ``name``, ``model``, ``data_sets``, ``rtol``, ``atol``),
    all of them or those named."""
    cases = _all_cases()
    if names is None:
        return list(cases)
    wanted = set(names)
    return [c for c in cases if c.name in wanted]


def sample(n: int, seed: int = 0) -> list:
    """A deterministic sample of ``n`` cases (sorted by name, then drawn with ``seed``)."""
    cases = sorted(_all_cases(), key=lambda c: c.name)
    idx = np.random.default_rng(seed).choice(len(cases), size=min(n, len(cases)), replace=False)
    return [cases[i] for i in sorted(idx)]


def _value(v: object) -> object:
    """A case's input/output value as onnxruntime and the reference evaluator take it."""
    if isinstance(v, onnx.TensorProto):
        return numpy_helper.to_array(v)
    if isinstance(v, list):
        return [_value(x) for x in v]
    if v is None:
        return None
    return np.asarray(v)


def feeds_of(case) -> dict[str, object]:
    """The case's input values keyed by graph-input name (ONNX pairs them by position)."""
    inputs, _ = case.data_sets[0]
    return {vi.name: _value(v) for vi, v in zip(case.model.graph.input, inputs)}


def _expected(case) -> list[tuple[str, object]]:
    _, outputs = case.data_sets[0]
    return [(vi.name, _value(v)) for vi, v in zip(case.model.graph.output, outputs)]


def freeze(model: onnx.ModelProto, feeds: dict[str, object]) -> tuple[onnx.ModelProto, dict[str, object]]:
    """``model`` with every tensor input replaced by an initializer holding its feed, and the feeds
    left (sequences and optionals, which an initializer cannot hold)."""
    frozen = onnx.ModelProto()
    frozen.CopyFrom(model)
    graph = frozen.graph
    rest, keep = {}, []
    for vi in graph.input:
        value = feeds.get(vi.name)
        if vi.type.HasField("tensor_type") and isinstance(value, np.ndarray):
            tensor = numpy_helper.from_array(value, vi.name)
            if tensor.data_type != vi.type.tensor_type.elem_type:  # e.g. float8 fed as float32 arrays
                rest[vi.name] = value
                keep.append(vi)
                continue
            graph.initializer.append(tensor)
        else:
            keep.append(vi)
            if vi.name in feeds:
                rest[vi.name] = value
    del graph.input[:]
    graph.input.extend(keep)
    if frozen.ir_version < 4:  # an initializer that is not a graph input needs IR >= 4
        frozen.ir_version = 4
    return frozen, rest


def _ort_outputs(data: bytes, feeds: dict[str, object]) -> list[tuple[str, object]]:
    session = fuzz._session(data)
    known = fuzz._feedable(session)
    names = [o.name for o in session.get_outputs()]
    return list(zip(names, session.run(None, {k: v for k, v in feeds.items() if k in known})))


def _ref_outputs(proto: onnx.ModelProto, feeds: dict[str, object]) -> list[tuple[str, object]]:
    from onnx.reference import ReferenceEvaluator

    ref = ReferenceEvaluator(proto)
    known = set(ref.input_names)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        values = ref.run(None, {k: v for k, v in feeds.items() if k in known})
    return list(zip(ref.output_names, values))


def _close(expected, actual, rtol: float, atol: float) -> tuple[str, str]:
    """fp32 tolerance per output, or the case's ``rtol``/``atol`` elementwise (as ONNX's runner)."""
    cause, detail = fuzz.compare_by_name(expected, actual)
    if cause != "value":
        return cause, detail
    try:
        for (_, e), (_, a) in zip(expected, actual):
            _assert_allclose(e, a, rtol, atol)
        return "ok", ""
    except AssertionError:
        return cause, detail


def _assert_allclose(e, a, rtol, atol) -> None:
    if isinstance(e, (list, tuple)):
        for x, y in zip(e, a):
            _assert_allclose(x, y, rtol, atol)
    elif e is not None:
        e, a = np.asarray(e), np.asarray(a)
        if e.dtype.kind in "OSU":
            np.testing.assert_array_equal(a, e)
        else:
            np.testing.assert_allclose(a.astype(np.float64), e.astype(np.float64), rtol=rtol, atol=atol)


def _signature(proto: onnx.ModelProto) -> list[tuple[str, str]]:
    return [(o.name, str(o.type.WhichOneof("value")) + ":" + _elem(o.type)) for o in proto.graph.output]


def _elem(t: onnx.TypeProto) -> str:
    kind = t.WhichOneof("value")
    if kind in ("tensor_type", "sparse_tensor_type"):
        return str(getattr(t, kind).elem_type)
    if kind in ("sequence_type", "optional_type"):
        return _elem(getattr(t, kind).elem_type)
    return ""


def check(case, spec: str, variant: str = "inputs", target: str = "cpu") -> NodeOutcome:
    """Run ``spec`` on ``case`` (``variant`` ``inputs`` or ``frozen``) and classify it (module docstring)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    out = functools.partial(NodeOutcome, case.name, spec, variant)
    original = case.model
    feeds = feeds_of(case)
    candidate, cand_feeds = freeze(original, feeds) if variant == "frozen" else (original, feeds)
    cand_data = candidate.SerializeToString()

    # The original's behaviour decides the runner: onnxruntime, else the reference evaluator, else none.
    runner, expected = "", None
    try:
        expected = _ort_outputs(original.SerializeToString(), feeds)
        runner = "onnxruntime"
    except Exception:
        try:
            expected = _ref_outputs(original, feeds)
            runner = "reference"
        except Exception:
            pass

    logging.disable(logging.WARNING)  # the wrapped passes log each node they leave alone
    try:
        # (the folder's reference evaluator warns on the cases' deliberate log(0), NaN casts)
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)
            result = fuzz.optimize(cand_data, spec, target)
    finally:
        logging.disable(logging.NOTSET)
    if isinstance(result, fuzz.Outcome):
        status = "refused" if result.cause == "refused" else "broken"
        return out(status, result.cause, runner, result.detail)
    if _signature(result) != _signature(original):
        return out("broken", "outputs", runner, f"{_signature(original)} -> {_signature(result)}")
    try:
        onnx.checker.check_model(result, full_check=True)
    except Exception as e:
        if fuzz.full_check_passes(candidate):  # the candidate passed the checker: we made it invalid
            return out("broken", "invalid", runner, f"{type(e).__name__}: {str(e)[:300]}")
    if not runner:
        return out("not-runnable", "", runner, "neither onnxruntime nor the reference evaluator runs the original")

    try:
        actual = (_ort_outputs(result.SerializeToString(), cand_feeds) if runner == "onnxruntime"
                  else _ref_outputs(result, cand_feeds))
    except Exception as e:
        if variant == "frozen" and not _runs(candidate, cand_feeds, runner):
            return out("upstream", "frozen-not-runnable", runner,
                       f"the frozen model fails in {runner} before any pass: {type(e).__name__}")
        cause = "load" if runner == "onnxruntime" else "run"
        return out("broken", cause, runner, f"{type(e).__name__}: {str(e)[:300]}")
    cause, detail = _close(expected, actual, case.rtol, case.atol)
    random_op = _has_random_op(candidate.graph)
    if cause == "ok" and not random_op:
        return out("preserved", "", runner)
    close = functools.partial(_close, rtol=case.rtol, atol=case.atol)
    # a random op's outputs can match by chance (a Bernoulli of 10 elements: about 1 run in 200), so
    # whether its randomness survived is checked whatever this one draw gave
    if _runs(candidate, cand_feeds, runner):
        # up to 8 draws: a small random output (Bernoulli of a few elements) can repeat by chance
        first = _run_with(candidate, cand_feeds, runner)
        draws = [_run_with(candidate, cand_feeds, runner) for _ in range(7)]
        if any(close(first, d)[0] != "ok" for d in draws):
            # A random op (Bernoulli, RandomUniformLike): the unoptimized model differs from itself.
            # Not ours, unless the optimized model no longer does (a draw folded into a constant).
            if all(close(actual, _run_with(result, cand_feeds, runner))[0] == "ok" for _ in range(7)):
                return out("broken", "randomness-lost", runner, f"a random op was folded into a constant: {detail}")
            return out("upstream", "nondeterministic", runner, f"the unoptimized model differs from run to run: {detail}")
        if cause == "ok":  # a random op that draws the same every time (probabilities 0 or 1, a seed)
            return out("preserved", "", runner)
        if variant == "frozen" and close(first, actual)[0] == "ok":
            # the runtime gives other numbers for the same op on constants than on inputs
            return out("upstream", "frozen-differs", runner, f"the unoptimized frozen model already differs: {detail}")
    if cause == "ok":
        return out("preserved", "", runner)
    # Is the original's runtime the one that is wrong (the optimized model matches ONNX's outputs)?
    onnx_expected = _expected(case)
    if close(onnx_expected, actual)[0] == "ok" and close(onnx_expected, expected)[0] != "ok":
        return out("upstream", "runtime-differs-from-onnx", runner,
                   f"{runner} gives {detail} for the original; the optimized model matches ONNX's expected outputs")
    return out("broken", cause, runner, detail)


_RANDOM_OPS = {"Bernoulli", "RandomUniform", "RandomUniformLike", "RandomNormal", "RandomNormalLike",
               "Multinomial", "Dropout"}


def _has_random_op(graph: onnx.GraphProto) -> bool:
    """A node (in the graph or a subgraph) whose outputs may differ from run to run."""
    for node in graph.node:
        if node.op_type in _RANDOM_OPS:
            return True
        for attr in node.attribute:
            subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            if any(_has_random_op(g) for g in subs):
                return True
    return False


def _run_with(proto: onnx.ModelProto, feeds: dict[str, object], runner: str):
    if runner == "onnxruntime":
        return _ort_outputs(proto.SerializeToString(), feeds)
    return _ref_outputs(proto, feeds)


def _runs(proto: onnx.ModelProto, feeds: dict[str, object], runner: str) -> bool:
    try:
        _run_with(proto, feeds, runner)
        return True
    except Exception:
        return False


def run_all(cases: Sequence, specs: Sequence[str], variants: Sequence[str] = VARIANTS,
            target: str = "cpu") -> list[NodeOutcome]:
    """:func:`check` for every case × spec × variant."""
    return [check(c, s, v, target) for c in cases for s in specs for v in variants]
