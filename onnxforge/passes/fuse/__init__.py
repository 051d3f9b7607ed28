"""The ``fuse`` pass: rewrite chains of small ops into the fused kernels a runtime implements.

Rules come in families (:mod:`.cnn`, :mod:`.transformer`), each rule a named group of onnxscript
rewrite rules (``RewriteRuleSet``); nothing here matches graphs by hand. Which rules run depends on the
target: for onnxruntime (``cpu``/``cuda``/``tensorrt``) rules may emit ``com.microsoft`` contrib ops;
for ``onnx`` only standard ops are emitted and the output is checked to contain no new domain.
"""

from __future__ import annotations

import collections
import logging
from typing import Sequence

import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript.rewriter.pattern import MatchingTracer, MatchStatus
from onnxscript.rewriter.ort_fusions import shape_optimization

from onnxforge.errors import PassFailedError, PassOptionError
from onnxforge.ir.infer import infer_shapes
from onnxforge.passes.base import Pass, PassStats
from onnxforge.ir.graph import keep_interface
from onnxforge.passes.cleanup import CsePass, apply_guarded, fold_constants, guard_rules
from onnxforge.passes.fuse import _rule, cnn, transformer
from onnxforge.passes.fuse._rule import FusionRule, Step
from onnxforge.passes.registry import register_pass

logger = logging.getLogger(__name__)

FAMILIES: dict[str, list[FusionRule]] = {"cnn": cnn.RULES, "transformer": transformer.RULES}
ALL_RULES: dict[str, FusionRule] = {r.name: r for rules in FAMILIES.values() for r in rules}

# Ops the report counts as "fused" (net change per op type goes to stats.details["fused_ops"]).
_STANDARD_DOMAINS = ("", "ai.onnx")


def default_families(target: str) -> list[str]:
    """The families run when ``families`` is not given: both, for every target.

    Which rules of a family run on a target is decided per rule (:meth:`FusionRule.is_default`,
    ``FusionRule.targets``), so the family list itself does not depend on the target."""
    if target not in (*_rule.ALL_TARGETS,):
        raise PassOptionError(f"fuse: unknown target {target!r}; choose from {', '.join(sorted(_rule.ALL_TARGETS))}")
    return list(FAMILIES)


def _opset(model: ir.Model) -> int:
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))


def _histogram(model: ir.Model) -> collections.Counter:
    return collections.Counter(
        (node.domain or "", node.op_type) for node in ir.traversal.RecursiveGraphIterator(model.graph)
    )


@register_pass("fuse")
class FusePass(Pass):
    """Fuse op chains into single kernels, chosen by target (lossless).

    Rewrites, per rule (``onnxforge passes`` lists them; see :data:`ALL_RULES`):
    CNN — Pad into Conv, Min/Max → Clip, successive Relu/Clip, HardSwish, Transpose/Reshape chains,
    MatMul+Add → Gemm, Conv+activation → FusedConv (onnxruntime CPU/CUDA), Conv+Add(+activation) →
    FusedConv with the residual input Z (onnxruntime CPU; opt-in like FusedConv);
    transformer — LayerNormalization, Gelu (erf), FastGelu (tanh), RMSNorm, SkipLayerNormalization,
    RotaryEmbedding, MultiHeadAttention, packed-QKV Attention, BiasGelu, EmbedLayerNormalization
    (token + position [+ segment] embeddings and their LayerNorm), ResidualSum (cpu: the residual Add
    before a LayerNorm written as Sum so onnxruntime keeps Add + LayerNormalization, whose CPU kernels
    beat its SkipLayerNormalization; SkipLayerNormalization is therefore not a default on cpu).

    Math: every rule replaces a subgraph by an op that computes the same function, e.g.
    ``LayerNorm(x) = (x-μ)/√(σ²+ε)·γ+β``, ``Gelu(x) = x·½(1+erf(x/√2))``,
    ``Attention(x) = softmax((xW_q)(xW_k)ᵀ·s + mask)(xW_v)`` per head. Lossless up to fp32 rounding
    (kernels sum in a different order).

    Never matched (reported with ``--explain``): a pattern whose nodes read an initializer that is also
    a graph input (the caller may override it; see ``freeze-inputs``). Graph input and output names
    never change.

    Before matching, the model is canonicalized with onnxscript's optimizer (shape inference,
    constant folding, Shape-subgraph simplification): the attention rules check static shapes and
    constant scale/reshape arguments. Set ``prepare=false`` to skip that when the model is already
    folded and shape-inferred.

    Options:
        families: rule families to run (``cnn``, ``transformer``); default: both.
        rules: run only these rules (names as in the report); overrides ``families``.
        exclude_rules: rules not to run.
        prepare: canonicalize with onnxscript's optimizer first (see above).

    Counts (``stats.counts``) are matches per rule; ``stats.details["fused_ops"]`` is the net change
    of each fused op type; with ``context.explain``, ``stats.details["near_misses"]`` lists patterns
    that matched partly or failed a check, with onnxscript's reason (also in ``stats.skipped``).
    """

    def __init__(
        self,
        families: list[str] | None = None,
        rules: list[str] | None = None,
        exclude_rules: list[str] | None = None,
        prepare: bool = True,
    ):
        super().__init__()
        for fam in families or []:
            if fam not in FAMILIES:
                raise PassOptionError(
                    f"fuse: unknown family {fam!r}; choose from {', '.join(FAMILIES)}"
                )
        for name in [*(rules or []), *(exclude_rules or [])]:
            if name not in ALL_RULES:
                import difflib

                close = difflib.get_close_matches(name, ALL_RULES, n=3)
                hint = f" (did you mean {', '.join(close)}?)" if close else ""
                raise PassOptionError(
                    f"fuse: unknown rule {name!r}{hint}; rules: {', '.join(ALL_RULES)}"
                )
        self.families = families
        self.rules = rules
        self.exclude_rules = exclude_rules
        self.prepare = prepare

    def selected_rules(self) -> list[FusionRule]:
        """The rules this pass will try, in application order, before target filtering."""
        target = self.context.target
        if self.rules:
            chosen = [ALL_RULES[n] for n in self.rules]
            # keep the canonical order: later rules consume earlier rules' output
            order = list(ALL_RULES)
            chosen.sort(key=lambda r: order.index(r.name))
        else:
            fams = self.families or default_families(target)
            chosen = [r for fam in FAMILIES if fam in fams for r in FAMILIES[fam] if r.is_default(target)]
        excluded = set(self.exclude_rules or ())
        return [r for r in chosen if r.name not in excluded]

    def run(self, model: ir.Model, stats: PassStats) -> bool:
        with keep_interface(model.graph) as interface:
            modified = self._run(model, stats)
        if interface.fixes:
            stats.count("interface_names_restored", interface.fixes)
        return modified or interface.fixes > 0

    def _run(self, model: ir.Model, stats: PassStats) -> bool:
        from onnxforge.ir.shapes import reconcile_declared_shapes

        # Rules check ranks and dims from Value.shape: correct stale declared shapes first.
        stale = reconcile_declared_shapes(model)
        if stale:
            stats.count("stale_shapes_corrected", stale)
        target = self.context.target
        before = _histogram(model)
        prepared = _prepare(model, stats) if self.prepare else False
        opset = _opset(model)
        stats.details["target"] = target
        near_misses: list[dict] = []
        matches: dict[str, int] = {}
        if not self.rules:
            for rule in ALL_RULES.values():
                if rule.default and not rule.is_default(target):
                    stats.note(f"{rule.name}: off by default for target {target!r}: {rule.not_default_why}")
        for rule in self.selected_rules():
            if target not in rule.targets:
                stats.note(f"{rule.name}: not applied for target {target!r} (emits contrib ops)")
                continue
            steps = rule.build(target, opset)
            if isinstance(steps, str):
                stats.note(f"{rule.name}: not applied: {steps}")
                continue
            n = _apply_steps(model, rule.name, steps, near_misses if self.context.explain else None)
            matches[rule.name] = n
            if n:
                stats.count(rule.name, n)
        prepared |= stale > 0
        if any(matches.values()):
            _fold_fused_weights(model)
            # Intermediate nodes left by rules with remove_nodes=False, then unused opsets.
            common_passes.RemoveUnusedNodesPass()(model)
            common_passes.RemoveUnusedOpsetsPass()(model)
        after = _histogram(model)
        stats.details["rule_matches"] = matches
        stats.details["fused_ops"] = _fused_delta(before, after)
        if self.context.explain:
            stats.details["near_misses"] = near_misses
            for miss in near_misses:
                for node in miss["nodes"]:
                    stats.skip(node, f"{miss['rule']} ({miss['pattern']}): {miss['reason']}")
        _check_domains(model, before, after, target)
        logger.info("fuse: %s", ", ".join(f"{k} ×{v}" for k, v in stats.counts.items()) or "nothing")
        # The preparation's rewrites (folding, CSE, dedup) change the graph even when no rule matches;
        # shape annotations alone do not count (metadata).
        return bool(any(matches.values())) or prepared or after != before


def _prepare(model: ir.Model, stats: PassStats) -> bool:
    """Pre-fusion canonicalization, as onnxscript's ``ort_fusions._core._pre_optimize`` but without
    the optimizer's default rewrite rules (those are ours to apply and count): inline functions,
    shape inference, constant folding (with shape propagation), Shape-subgraph simplification.
    Returns whether anything but shape annotations changed; nodes the folder leaves alone are
    reported in ``stats``."""
    modified = common_passes.InlinePass()(model).modified
    _infer_shapes(model)
    for _ in range(2):
        modified |= fold_constants(model, stats, should_fold=lambda node: None)
        modified |= common_passes.RemoveUnusedNodesPass()(model).modified
        modified |= bool(apply_guarded(shape_optimization.rules, model))
    modified |= common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model).modified
    modified |= common_passes.DeduplicateInitializersPass()(model).modified
    # onnxforge's CSE: it leaves nodes that produce graph outputs alone (output names stay distinct).
    modified |= CsePass().run(model, PassStats())
    return bool(modified)


# Ops whose outputs are sequences: onnx_ir's ShapeInferencePass (onnx-ir 1.1) records them as tensors.
_SEQUENCE_OPS = frozenset({"SplitToSequence", "SequenceConstruct", "SequenceEmpty", "SequenceInsert",
                           "SequenceErase", "SequenceMap"})


def _infer_shapes(model: ir.Model) -> None:
    """onnx_ir's shape inference, without the tensor types it gives sequence values (its merge sets
    ``dtype``, which makes a tensor type of an untyped sequence or optional value)."""
    infer_shapes(model)  # onnx_ir's pass, without keeping replaced weights referenced
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.domain not in _STANDARD_DOMAINS:
            continue
        if node.op_type in _SEQUENCE_OPS:
            for value in node.outputs:
                if isinstance(value.type, ir.TensorType):
                    value.type, value.shape = None, None
        elif node.op_type in ("If", "Loop", "Scan"):
            # The body's declared output type is the truth: If's outputs are the branches' outputs,
            # Loop's and Scan's follow the body's outputs (after Loop's condition).
            body = node.attributes.get("then_branch") or node.attributes.get("body")
            if body is None:
                continue
            outs = list(body.as_graph().outputs)[1 if node.op_type == "Loop" else 0:]
            for value, inner in zip(node.outputs, outs):
                if isinstance(value.type, ir.TensorType) and inner.type is not None \
                        and not isinstance(inner.type, ir.TensorType):
                    value.type, value.shape = inner.type, None


def _fold_fused_weights(model: ir.Model) -> None:
    """Fold the weight arithmetic fusions leave behind — packed-QKV ``Concat(W_q, W_k, W_v)`` and
    its bias — into single initializers, so that no run (and no session with the optimizer off)
    recomputes them. Forced for Concat regardless of size: when its inputs are read only there the
    model does not grow (onnxscript's folder checks that)."""

    def force_concat(node: ir.Node) -> bool | None:
        return True if node.op_type == "Concat" and node.domain in _STANDARD_DOMAINS else None

    fold_constants(model, PassStats(), should_fold=force_concat)
    common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)


def _apply_steps(
    model: ir.Model, name: str, steps: Sequence[Step], near_misses: list[dict] | None
) -> int:
    count = 0
    for step in steps:
        if isinstance(step.rules, ir.passes.PassBase):  # an analysis or cleanup between rule sets
            step.rules(model)
            continue
        n = apply_guarded(step.rules, model)
        if step.shape_inference and n:
            _infer_shapes(model)
        if step.counted:
            count += n
        if near_misses is not None:
            near_misses.extend(_trace(model, name, step))
    return count


def _trace(model: ir.Model, name: str, step: Step) -> list[dict]:
    """Near-misses of one step: onnxscript's MatchingTracer keeps each pattern's best partial
    matches; we report those that failed a check or a replacement, or matched at least three ops of
    the pattern before failing. Grouped by (pattern, reason) with the root nodes listed."""
    if isinstance(step.rules, ir.passes.PassBase):
        return []
    tracer = MatchingTracer()
    guard_rules(step.rules).apply_to_model(model, tracer=tracer)  # with a tracer, nothing is rewritten
    groups: dict[tuple[str, str, str], dict] = {}
    for rule, infos in tracer.best_matches_map.items():
        for info in infos:
            status = info.status
            if status == MatchStatus.SUCCESS:
                continue
            matched = len(info.match_result.nodes)
            if matched < 2 or (status == MatchStatus.NO_MATCH and matched < 3):
                continue  # one or two ops in common is not a near-miss
            reason = info.match_result.reason or "pattern did not match"
            key = (str(rule), status.name, reason)
            entry = groups.setdefault(
                key,
                {"rule": name, "pattern": str(rule), "status": status.name, "reason": reason, "nodes": []},
            )
            node_name = info.root_node.name or info.root_node.op_type
            if node_name not in entry["nodes"]:
                entry["nodes"].append(node_name)
    return list(groups.values())


def _fused_delta(before: collections.Counter, after: collections.Counter) -> dict[str, int]:
    """Net change of non-standard-domain ops and the standard ops fusions create."""
    created = {"LayerNormalization", "Gelu", "HardSwish", "Gemm", "Clip", "RMSNormalization",
               "RotaryEmbedding", "HardSigmoid"}
    delta = {}
    for key in set(before) | set(after):
        domain, op_type = key
        if domain not in _STANDARD_DOMAINS or op_type in created:
            d = after[key] - before[key]
            if d:
                label = op_type if domain in _STANDARD_DOMAINS else f"{domain}.{op_type}"
                delta[label] = d
    return dict(sorted(delta.items()))


def _check_domains(model, before, after, target: str) -> None:
    new_domains = {d for (d, _), n in after.items() if n > before.get((d, _), 0)} - set(_STANDARD_DOMAINS)
    if target == "onnx" and new_domains:
        raise PassFailedError(
            f"fuse: target 'onnx' but the fused model has ops in {sorted(new_domains)}; "
            "this is a bug in a fusion rule's target filter"
        )
    leftovers = [d for (d, _) in after if d.startswith("ai.onnxruntime._fusion")]
    if leftovers:
        raise PassFailedError(
            "fuse: onnxscript intermediate ops (ai.onnxruntime._fusion) survived; "
            "run the MultiHeadAttention rule or exclude the rules that create them"
        )


__all__ = ["ALL_RULES", "FAMILIES", "FusePass", "FusionRule", "Step"]
