"""Lossless graph cleanup: lift constants, remove dead code, drop identities, CSE, dedup, sort, infer shapes,
fold constants.

Every pass here wraps a pass of ``onnx_ir.passes.common`` or onnxscript's optimizer rather than
re-implementing it, and adds what those lack: counts for the report (nodes before/after), a reason for
every node left alone, and guards around the few cases where the wrapped pass is wrong or silent
(a ``sparse_value`` Constant crashes the lifter; identity elimination renames values that other graph
outputs or outer scopes own; shape inference swallows its failures).

None of these passes changes what the model computes: they are all lossless.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import re
from collections.abc import Iterable, Iterator

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common
from onnx_ir.passes.common import shape_inference as _shape_inference
import onnxscript.optimizer
from onnxscript.rewriter.pattern import MatchResult, MatchStatus, RewriteRuleClassBase, RewriteRuleSet

from onnxforge.errors import UnsupportedModelError
from onnxforge.ir.infer import infer_shapes
from onnxforge.ir.graph import (
    adopt_orphan_constants,
    all_graphs,
    all_nodes,
    const_value,
    is_overridable,
    keep_interface,
    opset_version,
    unique_name,
)
from onnxforge.passes.base import Pass, PassStats
from onnxforge.passes.registry import register_pass

__all__ = [
    "CsePass",
    "DedupInitializersPass",
    "EliminateIdentityPass",
    "FoldConstantsPass",
    "FreezeInputsPass",
    "LiftConstantsPass",
    "RemoveUnusedPass",
    "ShapeInferencePass",
    "TopoSortPass",
    "fold_constants",
    "node_count",
]

logger = logging.getLogger(__name__)

# A domain no ONNX pass acts on: nodes moved here for the duration of a wrapped pass are invisible to it.
_HIDDEN_DOMAIN = "onnxforge.hidden"

# Ops whose constant-folding would erase quantization: always left for the runtime.
_NEVER_FOLD = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})


def node_count(model: ir.Model, op_type: str | None = None) -> int:
    """Nodes in the main graph, its subgraphs and function bodies (of ``op_type`` if given)."""
    return sum(1 for n in all_nodes(model) if op_type is None or n.op_type == op_type)


def _initializer_count(model: ir.Model) -> int:
    return sum(len(g.initializers) for g in all_graphs(model))


@contextlib.contextmanager
def _hidden(nodes: Iterable[ir.Node], distinct: bool = False) -> Iterator[None]:
    """Move ``nodes`` to a private domain while a wrapped pass runs, so that it leaves them alone
    (``distinct``: one domain per node, so that CSE does not merge the hidden nodes among themselves)."""
    saved = [(node, node.domain) for node in nodes]
    for i, (node, _) in enumerate(saved):
        node.domain = f"{_HIDDEN_DOMAIN}.{i}" if distinct else _HIDDEN_DOMAIN
    try:
        yield
    finally:
        for node, domain in saved:
            node.domain = domain


def _is_onnx(node: ir.Node) -> bool:
    return node.domain in ("", "ai.onnx", "onnx.ai")


# --------------------------------------------------------------------------- lift-constants


@register_pass("lift-constants")
class LiftConstantsPass(Pass):
    """Turn ``Constant`` nodes into initializers (``value`` and ``value_float(s)/int(s)/string(s)``).

    Exporters such as PaddlePaddle's (and some torch paths) store weights as Constant nodes; the
    folding passes look for initializers, so this runs first. Main graph and If/Loop subgraphs (a
    subgraph's constant becomes an initializer of that subgraph). Wraps
    ``onnx_ir.passes.common.LiftConstantsToInitializersPass``.

    Left alone (and reported): a Constant whose output is a graph output (an initializer cannot be
    one without changing the signature), a ``sparse_value`` Constant, and tensors with fewer than
    ``size_limit`` elements. Lossless: the same tensor is read from another place.
    """

    def __init__(self, size_limit: int = 0, lift_all_constants: bool = True):
        super().__init__()
        self.size_limit = size_limit
        self.lift_all_constants = lift_all_constants

    def run(self, model: ir.Model, stats: PassStats) -> bool:
        hide, reported = [], set()
        # Function bodies cannot hold initializers; the lifter (like this loop) leaves them alone.
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            if node.op_type != "Constant" or not _is_onnx(node):
                continue
            attrs = set(node.attributes)
            if "sparse_value" in attrs or len(attrs) != 1:
                hide.append(node)
                reported.add(node)
                stats.skip(node, f"Constant with attribute(s) {sorted(attrs)} is not lifted")
            elif node.outputs[0].is_graph_output():
                reported.add(node)
                stats.skip(node, "output is a graph output; lifting would change the signature")
        before = node_count(model, "Constant")
        lifter = common.LiftConstantsToInitializersPass(
            lift_all_constants=self.lift_all_constants, size_limit=self.size_limit
        )
        with _hidden(hide):
            result = lifter(model)
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            if node.op_type == "Constant" and _is_onnx(node) and node not in reported:
                stats.skip(node, f"fewer than size_limit={self.size_limit} elements, or not a tensor "
                           f"attribute (lift_all_constants={self.lift_all_constants})")
        lifted = before - node_count(model, "Constant")
        stats.count("lifted", lifted)
        if lifted and model.ir_version is not None and model.ir_version < 4:
            # Before IR 4 every initializer must also be a graph input; newer readers accept either.
            model.ir_version = 4
            stats.note("ir_version raised to 4 so that initializers need not be graph inputs")
        return bool(result.modified)


def lift_constant_tensors(model: ir.Model) -> int:
    """Lift every ``Constant(value=tensor)`` to an initializer, as ``lift-constants`` does (without its
    report); returns how many. Passes that replace weights call it first: a weight read from a
    Constant node would otherwise stay behind as a dead float Constant (a PaddlePaddle export
    quantized this way came out 1.25x *larger* than its float file) and edits made on initializers
    (bias correction, GPTQ rounding) would miss it."""
    stats = PassStats()
    LiftConstantsPass(size_limit=0, lift_all_constants=False).run(model, stats)
    return stats.counts["lifted"]


# --------------------------------------------------------------------------- freeze-inputs


@register_pass("freeze-inputs")
class FreezeInputsPass(Pass):
    """Make initializers that are also graph inputs plain initializers (constants), so folds apply.

    Older exporters list every weight as a graph input with a default (an initializer of the same
    name): the caller may feed another value at run time, so every folding and fusion pass treats
    such a value as *not* constant (``onnxforge.ir.graph.const_value``) and leaves it alone. This pass
    removes those inputs from the signature (all of them, or those in ``names``), after which they are
    ordinary constants. Not in any preset: it changes the model's interface. Outputs on the default
    values are unchanged; a caller that fed other values can no longer do so.
    """

    def __init__(self, names: list[str] | None = None):
        super().__init__()
        self.names = names

    def run(self, model: ir.Model, stats: PassStats) -> bool:
        from onnxforge.errors import PassOptionError

        graph = model.graph
        overridable = [v for v in graph.inputs if is_overridable(v)]
        if self.names is not None:
            known = {v.name for v in overridable}
            unknown = sorted(set(self.names) - known)
            if unknown:
                raise PassOptionError(
                    f"freeze-inputs: {unknown} are not graph inputs with an initializer; "
                    f"those are: {sorted(known) or 'none'}"
                )
            overridable = [v for v in overridable if v.name in set(self.names)]
        for value in overridable:
            graph.inputs.remove(value)
        stats.count("inputs_frozen", len(overridable))
        stats.details["frozen"] = [v.name for v in overridable]
        if overridable and model.ir_version is not None and model.ir_version < 4:
            model.ir_version = 4  # before IR 4 every initializer must be a graph input
            stats.note("ir_version raised to 4 so that initializers need not be graph inputs")
        return bool(overridable)


# --------------------------------------------------------------------------- remove-unused


def _remove_unused_subgraph_initializers(model: ir.Model) -> int:
    # onnx_ir removes unused initializers of the main graph only.
    removed = 0
    for graph in all_graphs(model):
        if graph is model.graph:
            continue
        outputs, inputs = set(graph.outputs), set(graph.inputs)
        for init in list(graph.initializers.values()):
            if not init.uses() and init not in outputs and init not in inputs:
                del graph.initializers[init.name]
                removed += 1
    return removed


@register_pass("remove-unused")
class RemoveUnusedPass(Pass):
    """Dead-code elimination: nodes whose outputs nobody reads, unused initializers, functions, opsets.

    Wraps ``RemoveUnusedNodesPass``, ``RemoveUnusedFunctionsPass`` and ``RemoveUnusedOpsetsPass`` of
    ``onnx_ir.passes.common`` and also drops unused initializers of subgraphs. Graph inputs and outputs
    are kept (the signature does not change). Lossless.
    """

    def __init__(self, functions: bool = True, opsets: bool = True):
        super().__init__()
        self.functions = functions
        self.opsets = opsets

    def run(self, model: ir.Model, stats: PassStats) -> bool:
        nodes, inits = node_count(model), _initializer_count(model)
        n_functions, n_opsets = len(model.functions), len(model.opset_imports)
        modified = common.RemoveUnusedNodesPass()(model).modified
        modified |= bool(_remove_unused_subgraph_initializers(model))
        if self.functions:
            modified |= common.RemoveUnusedFunctionsPass()(model).modified
        if self.opsets:
            modified |= common.RemoveUnusedOpsetsPass()(model).modified
        stats.count("nodes_removed", nodes - node_count(model))
        stats.count("initializers_removed", inits - _initializer_count(model))
        stats.count("functions_removed", n_functions - len(model.functions))
        stats.count("opsets_removed", n_opsets - len(model.opset_imports))
        return modified


# --------------------------------------------------------------------------- eliminate-identity


class DropoutInference(RewriteRuleClassBase):
    """``Dropout(x)`` at inference is ``x``: replace it by ``Identity(x)``.

    Opset < 12: Dropout has no training mode in ONNX inference, it is always the identity.
    Opset >= 12: when ``training_mode`` is absent or the constant False, or ``ratio`` is the constant 0.
    Refused when the ``mask`` output is read (it would have to become a tensor of ones).
    """

    def pattern(self, op, x):
        return op.Dropout(x, _allow_other_inputs=True, _allow_other_attributes=True, _outputs=["out"])

    def check(self, context, x, out) -> MatchResult:
        result = MatchResult()
        node = out.producer()
        if len(node.outputs) > 1 and (node.outputs[1].uses() or node.outputs[1].is_graph_output()):
            return result.fail("the mask output is used")
        version = opset_version(context.model) or 0
        if version < 12:
            return result
        inputs = list(node.inputs) + [None, None]
        ratio, training = inputs[1], inputs[2]
        if training is None:
            return result
        t = training.const_value
        if t is not None and t.size == 1 and not bool(t.numpy().reshape(-1)[0]):
            return result
        r = ratio.const_value if ratio is not None else None
        if r is not None and r.size == 1 and float(r.numpy().reshape(-1)[0]) == 0.0:
            return result
        return result.fail("training_mode is not the constant False and ratio is not the constant 0")

    def rewrite(self, op, x, out):
        return op.Identity(x)


dropout_inference_rule = DropoutInference().rule()


def _eliminate_identities(graph: ir.Graph, stats: PassStats) -> int:
    """Remove ``y = Identity(x)`` from ``graph``: readers of ``y`` read ``x``. Returns how many.

    When ``y`` is an output of ``graph``, ``x`` takes its place *and its name*; that is done only when
    ``x`` is computed by a node of this graph and is not itself an output (it would lose its name, or
    one value would be listed under two names). Otherwise the Identity stays (reported).
    Conditions are checked as each node is reached, after the removals before it: onnx_ir's
    ``IdentityEliminationPass`` renames outputs and outer-scope values that are not the node's to
    rename, and a list of nodes to hide from it, made beforehand, goes stale along Identity chains.
    """
    removed = 0
    for node in list(graph):
        if node.op_type != "Identity" or not _is_onnx(node) or len(node.inputs) != 1 or node.inputs[0] is None:
            continue
        x, y = node.inputs[0], node.outputs[0]
        if y.is_graph_output():
            producer = x.producer()
            if producer is None or producer.graph is not graph:
                stats.skip(node, "connects a graph input, initializer or outer-scope value to a graph output")
                continue
            if x.is_graph_output():
                stats.skip(node, "input and output are both graph outputs; removing it would merge two output names")
                continue
            name = y.name
            y.replace_all_uses_with(x, replace_graph_outputs=True)
            graph.remove(node, safe=True)
            y.name = None
            x.name = name
            # a graph output needs a type: the output's, where the intermediate value had none
            x.type = x.type or y.type
            x.shape = x.shape or y.shape
        else:
            y.replace_all_uses_with(x)
            graph.remove(node, safe=True)
        removed += 1
    return removed


@register_pass("eliminate-identity")
class EliminateIdentityPass(Pass):
    """Remove ``Identity`` nodes, and ``Dropout`` nodes that are identities at inference.

    ``Dropout`` becomes ``Identity`` by :data:`dropout_inference_rule` (opset < 12 always; opset >= 12
    when ``training_mode`` is absent/False or ``ratio`` is 0); then
    readers of ``y = Identity(x)`` read ``x`` (main graph, subgraphs, functions; see
    :func:`_eliminate_identities`). Kept (reported): an Identity from a graph input, initializer or
    outer-scope value to a graph output, and one whose input is itself a graph output: graph output
    names never change. Lossless.
    """

    def run(self, model: ir.Model, stats: PassStats) -> bool:
        dropouts = node_count(model, "Dropout")
        modified = False
        if dropouts:
            modified |= bool(apply_guarded(RewriteRuleSet([dropout_inference_rule]), model))
            for node in all_nodes(model):
                if node.op_type == "Dropout":
                    stats.skip(node, _dropout_reason(model, node))
        stats.count("dropout_removed", dropouts - node_count(model, "Dropout"))

        removed = 0
        with keep_interface(model.graph):
            for graph in list(all_graphs(model)):
                removed += _eliminate_identities(graph, stats)
        stats.count("identity_removed", removed)
        return modified or removed > 0


def _dropout_reason(model: ir.Model, node: ir.Node) -> str:
    return why_not_matched([dropout_inference_rule], model, node) or "not an inference-mode Dropout"


# --------------------------------------------------------------------------- rule helpers


def why_not_matched(rules: Iterable, model: ir.Model, node: ir.Node) -> str:
    """The reason the best-matching of ``rules`` gives for not rewriting at ``node`` ("" if one matches).

    Uses onnxscript's ``MatchingTracer`` (which only observes): a failed ``check`` gives its
    ``MatchResult.fail`` reason, a structural mismatch the matcher's.
    """
    from onnxscript.rewriter import MatchingTracer, MatchStatus

    tracer = MatchingTracer()
    graph = node.graph
    for rule in rules:
        rule.match(model, graph, node, tracer=tracer)
    best, best_score = None, -1
    for matches in tracer.best_matches_map.values():
        for info in matches:
            if info.root_node is node and info.score() > best_score:
                best, best_score = info, info.score()
    if best is None:
        return "does not match the pattern"
    if best.status == MatchStatus.SUCCESS:
        return ""
    return best.match_result.reason or "does not match the pattern"


def guard_rules(rules: RewriteRuleSet) -> RewriteRuleSet:
    """``rules`` refusing any match whose nodes read an overridable initializer (see below).

    An initializer that is also a graph input is a default the caller may override at run time
    (:func:`onnxforge.ir.graph.is_overridable`); onnxscript's rules read ``const_value`` and would
    bake the default in, or replace the initializer and leave the input without its default. A rule
    that only passes such a value through is refused too: rare in practice, and always safe. The
    ``freeze-inputs`` pass turns those inputs into constants for users who want the rewrites.
    Returns a copy; onnxscript's rule objects (module-level singletons) are left untouched.
    """
    guarded = copy.copy(rules)
    guarded.rules = [guard_rule(rule) for rule in rules.rules]
    return guarded


def guard_rule(rule):
    if getattr(rule, "_onnxforge_guarded", False):
        return rule
    guarded = copy.copy(rule)
    original = rule.match

    def match(model, graph_or_function, node, *, verbose=None, check_nodes_are_removable=True, tracer=None):
        result = original(model, graph_or_function, node, verbose=verbose,
                          check_nodes_are_removable=check_nodes_are_removable, tracer=tracer)
        if not result:
            return result
        for matched in result.nodes:
            for value in matched.inputs:
                if is_overridable(value):
                    failed = MatchResult().fail(
                        f"{value.name!r} is an initializer that is also a graph input (overridable at run "
                        "time); run freeze-inputs first to treat it as a constant",
                        matched,
                    )
                    if tracer is not None:
                        tracer.log(guarded, graph_or_function, node, failed, MatchStatus.CONDITION_FAILED)
                    return None
        return result

    guarded.match = match
    guarded._onnxforge_guarded = True
    return guarded


def apply_guarded(rules: RewriteRuleSet, model: ir.Model, **kwargs) -> int:
    """``rules.apply_to_model`` with :func:`guard_rules`, then :func:`adopt_orphan_constants`."""
    n = guard_rules(rules).apply_to_model(model, **kwargs)
    if n:
        adopt_orphan_constants(model)
    return n


# --------------------------------------------------------------------------- cse, dedup, topo-sort


@register_pass("cse")
class CsePass(Pass):
    """Common-subexpression elimination: nodes with the same op, attributes and inputs are merged.

    Wraps ``onnx_ir.passes.common.CommonSubexpressionEliminationPass`` (main graph; control-flow nodes
    and random ops are never merged; Constant nodes only up to ``size_limit`` elements). Nodes that
    produce a graph output are left alone (reported), so output names stay distinct. Lossless:
    a deterministic op applied twice to the same inputs gives the same result.
    """

    def __init__(self, size_limit: int = 10):
        super().__init__()
        self.size_limit = size_limit

    def run(self, model: ir.Model, stats: PassStats) -> bool:
        before = node_count(model)
        # A node whose output is a graph output keeps it: merging two such nodes would give one value
        # two output names (onnx_ir's CSE then defines a name twice).
        hide = [n for n in model.graph if any(o.is_graph_output() for o in n.outputs)]
        for node in hide:
            stats.skip(node, "output is a graph output; merging would merge two output names")
        with _hidden(hide, distinct=True), keep_interface(model.graph):
            modified = common.CommonSubexpressionEliminationPass(size_limit=self.size_limit)(model).modified
        stats.count("nodes_merged", before - node_count(model))
        return modified


@register_pass("dedup-initializers")
class DedupInitializersPass(Pass):
    """Merge initializers with the same dtype, shape and bytes into one (per graph).

    Wraps ``DeduplicateHashedInitializersPass`` (SHA-512 of the bytes, then a byte comparison; low
    memory) or, with ``hashed=false``, ``DeduplicateInitializersPass``. Initializers that are graph
    inputs or outputs are left alone (reported). Lossless: readers see the same values.
    """

    def __init__(self, size_limit: int = 1 << 32, hashed: bool = True):
        super().__init__()
        self.size_limit = size_limit
        self.hashed = hashed

    def run(self, model: ir.Model, stats: PassStats) -> bool:
        for graph in all_graphs(model):
            for init in graph.initializers.values():
                if init.is_graph_input() or init.is_graph_output():
                    stats.skip(init.name or "<unnamed>", "initializer is a graph input or output")
        before = _initializer_count(model)
        if self.hashed:
            modified = _dedup_hashed(model, self.size_limit)
        else:
            with _quiet("onnx_ir.passes.common.initializer_deduplication"):
                modified = common.DeduplicateInitializersPass(size_limit=self.size_limit)(model).modified
        stats.count("initializers_merged", before - _initializer_count(model))
        return modified


def _dedup_hashed(model: ir.Model, size_limit: int) -> bool:
    # onnx_ir's DeduplicateHashedInitializersPass (same keys and graphs), streaming (issue 14): the
    # SHA-512 and the byte comparison read a tensor in chunks (an external one from its file, never
    # mapped), so the model's pages do not pile up in RSS; non-contiguous arrays need no copy.
    from onnxforge.ir.io import same_bytes, tensor_digest

    modified = False
    for graph in model.graphs():
        seen: dict[tuple, ir.Value] = {}
        for init in tuple(graph.initializers.values()):
            tensor = init.const_value
            if tensor is None or init.is_graph_input() or init.is_graph_output() or tensor.size > size_limit:
                continue
            key = (tensor.dtype, tuple(tensor.shape), tensor_digest(tensor))
            kept = seen.setdefault(key, init)
            if kept is not init and same_bytes(kept.const_value, tensor):
                init.replace_all_uses_with(kept)
                graph.initializers.pop(init.name)
                modified = True
    return modified


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    # The wrapped pass logs a WARNING per skipped initializer; we report those as skips instead.
    log = logging.getLogger(logger_name)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


@register_pass("topo-sort")
class TopoSortPass(Pass):
    """Topologically sort the main graph, its subgraphs and function bodies (stable).

    Wraps ``onnx_ir.passes.common.TopologicalSortPass``. A graph with a cycle is an error. Lossless.
    """

    def run(self, model: ir.Model, stats: PassStats) -> bool:
        before = [list(g) for g in all_graphs(model)]
        try:
            common.TopologicalSortPass()(model)
        except ValueError as e:
            raise UnsupportedModelError(f"topo-sort: the graph has a cycle ({e})") from e
        after = [list(g) for g in all_graphs(model)]
        moved = sum(
            sum(1 for a, b in zip(old, new) if a is not b) for old, new in zip(before, after)
        )
        stats.count("nodes_moved", moved)
        return moved > 0


# --------------------------------------------------------------------------- shape-inference


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@register_pass("shape-inference")
class ShapeInferencePass(Pass):
    """Annotate values with the types and shapes ONNX shape inference derives.

    Wraps ``onnx_ir.passes.common.ShapeInferencePass`` (which handles >2 GB models). That pass logs and
    swallows a failure; here a failure is counted (``failed``), its message goes to the report, and
    with ``raise_on_failure=true`` it is an error. Lossless: only metadata changes.
    """

    def __init__(
        self, strict_mode: bool = True, data_prop: bool = True, raise_on_failure: bool = False
    ):
        super().__init__()
        self.strict_mode = strict_mode
        self.data_prop = data_prop
        self.raise_on_failure = raise_on_failure

    def run(self, model: ir.Model, stats: PassStats) -> bool:
        shaped_before = _shaped_values(model)
        capture = _Capture()
        log = logging.getLogger(_shape_inference.__name__)
        log.addHandler(capture)
        propagate = log.propagate
        log.propagate = False
        try:
            result = infer_shapes(model, strict_mode=self.strict_mode, data_prop=self.data_prop)
        finally:
            log.removeHandler(capture)
            log.propagate = propagate
        failures = [r for r in capture.records if r.exc_info or "failed" in r.getMessage().lower()]
        if failures:
            record = failures[0]
            error = record.exc_info[1] if record.exc_info else None
            message = f"{type(error).__name__}: {error}" if error else record.getMessage()
            stats.count("failed")
            stats.note(f"shape inference failed, model left unchanged: {message}")
            stats.details["shape_inference_error"] = message
            if self.raise_on_failure:
                raise UnsupportedModelError(f"shape-inference failed: {message}")
        stats.count("values_shaped", max(0, _shaped_values(model) - shaped_before))
        return bool(result.modified)


def _shaped_values(model: ir.Model) -> int:
    count = 0
    for graph in all_graphs(model):
        for node in graph:
            count += sum(1 for v in node.outputs if v.shape is not None and v.type is not None)
    return count


# --------------------------------------------------------------------------- fold-constants


# Random ops onnxscript's folder does not know as such (its list has RandomUniform/Normal(Like) and
# Multinomial): folding would bake one draw into the model.
_RANDOM = frozenset({"Bernoulli"})


def _random(node: ir.Node) -> bool:
    """Whether ``node`` draws random numbers: Bernoulli, or a Dropout whose ``training_mode`` is not
    a constant false (a training-mode Dropout draws a mask on every run, even with a ``seed``: the
    generator is the runtime's own)."""
    if not _is_onnx(node):
        return False
    if node.op_type in _RANDOM:
        return True
    if node.op_type == "Dropout" and len(node.inputs) > 2 and node.inputs[2] is not None:
        mode = const_value(node.inputs[2])
        return mode is None or bool(np.any(mode))
    return False


def _never_fold_quantization(node: ir.Node) -> bool | None:
    if node.op_type in _NEVER_FOLD and _is_onnx(node):
        return False
    return None  # onnxscript's default rules (size limits, its own blacklist)


@register_pass("fold-constants")
class FoldConstantsPass(Pass):
    """Evaluate nodes whose inputs are all constants and store the result as an initializer.

    Wraps onnxscript's ``FoldConstantsPass`` (reference evaluator, plus its partial evaluators: Shape
    of a static shape, Dropout at inference, Identity, ...). Size limits: a node with an input of more
    than ``input_size_limit`` elements is not folded (except Transpose of a weight read only there), a
    result of more than ``output_size_limit`` elements is not stored. Quantize/DequantizeLinear are never
    folded, so that a quantized model survives later cleanup; ConstantOfShape is kept (it is smaller
    than its result); control flow and random ops are not folded. Nodes left unread by the folding are
removed. Declared shapes that ONNX shape inference contradicts (stale exporter annotations) are
    corrected first (``onnxforge.ir.shapes``), so that no stale shape is folded into a constant.
    Lossless: the same ops are evaluated ahead of time in float32 by ONNX's reference implementation.
    """

    def __init__(
        self,
        input_size_limit: int = 8192,  # onnxscript's DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT
        output_size_limit: int = 512 * 512,  # onnxscript's DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT
        shape_inference: bool = True,
    ):
        super().__init__()
        if input_size_limit < 0 or output_size_limit < 0:
            raise ValueError("size limits must be >= 0")
        self.input_size_limit = input_size_limit
        self.output_size_limit = output_size_limit
        self.shape_inference = shape_inference

    def run(self, model: ir.Model, stats: PassStats) -> bool:
        from onnxforge.ir.shapes import reconcile_declared_shapes

        before = node_count(model)
        kept_q = sum(1 for n in all_nodes(model) if n.op_type in _NEVER_FOLD)
        # The folder evaluates Shape/Size from declared shapes and merges inferred shapes *under*
        # them: a stale annotation would become a wrong constant. (shape_inference=false skips this.)
        stale = reconcile_declared_shapes(model) if self.shape_inference else 0
        if stale:
            stats.count("stale_shapes_corrected", stale)
        with keep_interface(model.graph) as interface:
            modified = fold_constants(
                model,
                stats,
                shape_inference=self.shape_inference,
                input_size_limit=self.input_size_limit,
                output_size_limit=self.output_size_limit,
            )
        if interface.fixes:
            stats.count("interface_names_restored", interface.fixes)
        if modified:
            # The folder leaves the Constant nodes it read from behind, unread.
            common.RemoveUnusedNodesPass()(model)
        stats.count("nodes_folded", max(0, before - node_count(model)))
        if kept_q:
            stats.count("quantization_nodes_kept", kept_q)
        return modified or stale > 0


_MAX_FOLD_RETRIES = 16


def fold_constants(model: ir.Model, stats: PassStats, should_fold=_never_fold_quantization, **options) -> bool:
    """onnxscript's ``fold_constants`` (public API) made safe for a whole model; returns ``modified``.

    ``options``: ``shape_inference``, ``input_size_limit``, ``output_size_limit``. Nodes the folder
    cannot handle are left alone and reported instead of failing the model: SplitToSequence below
    opset 18 (onnxscript folds it into Split with ``num_outputs``, an opset-18 attribute),
    ``CastLike(saturate=0)`` (rewritten to a Cast that drops ``saturate``), random ops the folder does
    not know as random (Bernoulli, training-mode Dropout: never folded), and any
    node an evaluator raises on (the folder stops at the first such node; its replacements so far
    are complete, so the node is hidden and folding resumes).
    """
    if "shape_inference" in options:
        options["onnx_shape_inference"] = options.pop("shape_inference")
    hide = []
    if (opset_version(model) or 0) < 18:
        for node in all_nodes(model):
            if node.op_type == "SplitToSequence" and _is_onnx(node):
                hide.append(node)
                stats.skip(node, "SplitToSequence is not folded below opset 18 (the fold emits Split-18)")
    for node in all_nodes(model):
        saturate = node.attributes.get("saturate")
        if node.op_type == "CastLike" and _is_onnx(node) and saturate is not None and saturate.as_int() == 0:
            hide.append(node)
            stats.skip(node, "CastLike(saturate=0) is not folded (onnxscript's folder rewrites it to a Cast "
                             "without saturate, which saturates float8 overflow instead of giving inf/NaN)")
    # The folder's Identity evaluator merges the output's shape into the input's ("backward
    # inference"): a graph input would take a stale output annotation, and refuse its feeds.
    inputs = [(v, v.shape) for g in all_graphs(model) for v in g.inputs]
    try:
        return _fold_constants(model, stats, _not_random(should_fold, stats), hide, options)
    finally:
        for value, shape in inputs:
            if value.shape != shape:
                value.shape = shape
                stats.count("input_shapes_restored")


def _not_random(should_fold, stats: PassStats):
    def guarded(node: ir.Node) -> bool | None:
        if _random(node):
            stats.skip(node, f"{node.op_type} draws random numbers: folding would freeze one draw")
            return False
        return should_fold(node)

    return guarded


def _fold_constants(model: ir.Model, stats: PassStats, should_fold, hide: list, options: dict) -> bool:
    modified = False
    for _ in range(_MAX_FOLD_RETRIES):
        try:
            # The folder's type propagation mis-types a hidden node's outputs (e.g. a sequence as a
            # tensor): keep the types they had.
            types = [(v, v.type, v.shape) for node in hide for v in node.outputs]
            try:
                with _hidden(hide):
                    modified |= bool(
                        onnxscript.optimizer.fold_constants(model, should_fold=should_fold, **options).modified
                    )
            finally:
                for value, type_, shape in types:
                    value.type, value.shape = type_, shape
            break
        except RuntimeError as e:
            node = _failed_node(model, e)
            if node is None and _name_unnamed_nodes(model):
                continue  # the next error names its node
            if node is None or node in hide:
                raise
            hide.append(node)
            modified = True  # replacements before the failure stay
            stats.skip(node, f"constant folding failed: {e.__cause__ or e}")
    return modified




def _name_unnamed_nodes(model: ir.Model) -> int:
    named = 0
    for graph in all_graphs(model):
        taken = {n.name for n in graph if n.name}
        for node in graph:
            if not node.name:
                node.name = unique_name(graph, f"node_{node.op_type}", taken=taken)
                named += 1
    return named


def _failed_node(model: ir.Model, error: RuntimeError) -> ir.Node | None:
    """The node named in onnxscript's "Error during constant folding for node 'name' (...)"."""
    match = re.search(r"for node '([^']*)'", str(error))
    if match is None:
        return None
    return next((n for n in all_nodes(model) if n.name == match.group(1)), None)


# --------------------------------------------------------------------------- metadata


@register_pass("strip-metadata")
class StripMetadataPass(Pass):
    """Drop per-node and per-graph metadata and doc strings (exporter stack traces, scopes).

    torch's dynamo exporter records a stack trace and module scope on every node; they help debugging
    but are a tenth of a small model's file. Model-level ``metadata_props`` (licence, provenance) are
    kept. Wraps ``onnx_ir.passes.common.ClearMetadataAndDocStringPass``. Lossless: outputs cannot change.
    """

    def run(self, model: ir.Model, stats: PassStats) -> bool:
        nodes_with_metadata = sum(
            1
            for graph in all_graphs(model)
            for node in graph
            if node.metadata_props or node.doc_string
        )
        modified = common.ClearMetadataAndDocStringPass()(model).modified
        stats.count("nodes_cleared", nodes_with_metadata)
        return modified or nodes_with_metadata > 0
