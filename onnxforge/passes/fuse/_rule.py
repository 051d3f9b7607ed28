"""What a fusion rule is to the ``fuse`` pass: a named group of onnxscript rewrite steps.

One :class:`FusionRule` is what a user names in ``fuse(rules=[...])`` and what the report counts
(``LayerNormalization ×12``). It is made of ordered :class:`Step`\\ s, each an onnxscript
``RewriteRuleSet``; helper steps (e.g. onnxscript's intermediate ``SDPA`` op that the attention
fusions consume) run but are not counted.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import onnx_ir as ir
from onnxscript.rewriter import pattern

ORT_TARGETS = frozenset({"cpu", "cuda", "tensorrt"})
ALL_TARGETS = frozenset({"cpu", "cuda", "tensorrt", "onnx"})


@dataclasses.dataclass(frozen=True)
class Step:
    """One onnxscript rule set applied to the whole model — or an onnx_ir pass run between rule
    sets (an analysis such as symbolic shape inference, or a cleanup), which matches nothing.

    ``counted``: whether its matches count towards the rule's total (helper steps do not).
    ``shape_inference``: run shape inference after it (rules that add nodes whose shapes later rules
    check, as onnxscript's ``fuse_sdpa`` does).
    """

    rules: pattern.RewriteRuleSet | ir.passes.PassBase
    counted: bool = True
    shape_inference: bool = False


@dataclasses.dataclass(frozen=True)
class FusionRule:
    """A user-selectable fusion.

    ``build(target, opset)`` returns the steps for that target and default-domain opset, or a string
    saying why the rule does not apply there (recorded as a note, never silently dropped).
    ``contrib``: the rule emits ``com.microsoft`` ops for this target (never for target ``onnx``).
    """

    name: str
    family: str
    summary: str
    build: Callable[[str, int], Sequence[Step] | str]
    targets: frozenset[str] = ALL_TARGETS
    default: bool = True
    # targets where the rule is *not* in the default set (still applied when named in ``rules``),
    # and why — e.g. a contrib kernel measured slower than the ops it replaces on that target
    not_default_on: frozenset[str] = frozenset()
    not_default_why: str = ""

    def is_default(self, target: str) -> bool:
        return self.default and target not in self.not_default_on


def ruleset(*rules: pattern.RewriteRule, commute: bool = False) -> pattern.RewriteRuleSet:
    return pattern.RewriteRuleSet(list(rules), commute=commute)
