"""``quantize-int8``: static int8 quantization in QDQ form, calibrated, target-aware.

The pass works in steps, one module each, every step reusable by the accuracy fallback and the
latency guard (which build candidate models for any node subset through :class:`QuantContext`):

1. :mod:`.analysis`: :func:`analyze` classifies every main-graph node (weighted, int8, scale-sharing,
   foldable activation, rescale, float - each float node with its reason; which op types may run in
   int8 comes from the measured table in :mod:`.kernels` for the CPU's int8 path, :mod:`.isa`);
   :func:`select` picks the nodes to quantize (weighted ops, and the others only inside an int8
   region); :func:`~.analysis.regions` groups them into connected regions.
2. :mod:`.plan`: :func:`plan_tensors` lists the tensors that get a Q/DQ pair and where each one's
   qparams come from (calibration, a constant, the input of a scale-sharing op or a rescale).
3. :mod:`.rewrite`: :func:`apply_plan` inserts the pairs (one DQ per reading node), stores weights as
   int8 and biases as int32, folds Relu/Clip into a Q range and ``x / c`` into a DQ scale, and
   expands HardSwish into integer ops.
4. Decisions: :mod:`.bias_correction`, :mod:`.range_search`, :mod:`.fallback` (``max_drop``), :mod:`.guard`
   (``latency_guard``), replayed from :mod:`.decisions` (``decisions=PATH``); :mod:`.opset` upgrades
   old models to opset 13.

The names ``_Builder``, ``_attr``, ``upgrade_opset`` are re-exported here for ``dynamic.py`` and
``weight_only.py``.

Math (see :mod:`.qmath`): ``q = saturate(round_half_even(x / s) + z)``, ``x' = (q - z) * s``;
activations asymmetric uint8 ``s = (hi - lo) / 255``, ``z = round(-lo / s)`` (cpu) or symmetric
int8 ``s = max|x| / 127``, ``z = 0`` (tensorrt); weights symmetric int8 in [-127, 127] per output
channel (Conv axis 0, ConvTranspose axis 1, Gemm axis 0 if ``transB`` else 1, MatMul last axis);
bias int32 with ``s_b = s_x * s_w``, ``z = 0``.

Lossy: each quantized tensor carries at most ``s / 2`` rounding error inside its calibrated range
and saturates outside. The stated bound (``tolerance``) is a max abs error of 10% of the output's
magnitude; the accuracy budget ``max_drop`` bounds ``1 - cosine`` (or the drop of a user metric).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import pathlib
from typing import Literal

import numpy as np
import onnx_ir as ir

from onnxforge.errors import CalibrationDataError, PassOptionError, UnsupportedModelError
from onnxforge.ir.graph import const_value, opset_version
from onnxforge.ir.io import model_to_bytes
from onnxforge.passes.base import Pass, PassStats, Skip
from onnxforge.passes.quantize import calibrate as cal
# Re-exported: dynamic.py and weight_only.py import these from here.
from onnxforge.passes.quantize.analysis import Analysis, NodeInfo, _attr, _is_float, analyze, select  # noqa: F401
from onnxforge.passes.quantize.opset import copy_model, restore_model, upgrade_opset  # noqa: F401
from onnxforge.passes.quantize.plan import Plan, plan_tensors
from onnxforge.passes.quantize.decisions import DecisionRecord
from onnxforge.passes.quantize.isa import Int8Choices, choose
from onnxforge.passes.quantize.qmath import QParams, activation_qparams
from onnxforge.passes.quantize.range_search import SCOPES, apply_factors
from onnxforge.passes.quantize.recurrent import to_dynamic_lstm
from onnxforge.passes.quantize.rewrite import _Builder, _values_by_name, apply_plan  # noqa: F401
from onnxforge.passes.cleanup import lift_constant_tensors
from onnxforge.passes.registry import register_pass
from onnxforge.runtime.cpu import detect_isa

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class QuantContext:
    """Everything one run learns before rewriting; lets fallback/guard build candidate models."""

    float_bytes: bytes
    analysis: Analysis
    ranges: dict[str, tuple[float, float]]
    act_dtype: np.dtype
    symmetric: bool
    target: str
    feeds: list[dict[str, np.ndarray]]
    reduce_range: bool = False  # 7-bit weights where u8s8 could saturate (.isa decides per CPU path)
    choices: Int8Choices | None = None
    bias_delta: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # see .bias_correction
    # weight initializer -> (float weight already on its int8 grid, per-channel scale): see .gptq
    weight_rounding: dict[str, tuple[np.ndarray, np.ndarray]] = dataclasses.field(default_factory=dict)

    def fresh(self) -> ir.Model:
        import onnx

        return ir.serde.deserialize_model(onnx.load_from_string(self.float_bytes))

    def qparams_for(self, model: ir.Model, plan: Plan) -> dict[str, QParams]:
        by_name = _values_by_name(model.graph)
        qps: dict[str, QParams] = {}
        for t in plan.calibrated:
            if t in self.ranges:
                lo, hi = self.ranges[t]
                qps[t] = activation_qparams(lo, hi, self.act_dtype, self.symmetric)
        for t in plan.constants:
            arr = const_value(by_name[t])
            qps[t] = activation_qparams(float(arr.min()), float(arr.max()), self.act_dtype, self.symmetric)
        # derived qparams, in graph order (chains resolve): a scale-sharing op's output has its input's
        # (even where that tensor was calibrated too: onnxruntime drops the Q/DQ only for equal qparams);
        # a rescale's output is its input's integers with the scale times the factor
        for out, src, f in plan.derived:
            if src in qps:
                qp = qps[src]
                qps[out] = qp if f == 1.0 else QParams((qp.scale * np.float32(f)).astype(np.float32),
                                                       qp.zero_point, qp.axis)
        return qps

    def build(self, chosen: set[int], stats: PassStats | None = None, model: ir.Model | None = None,
              bias_delta: dict[str, np.ndarray] | None = None) -> ir.Model:
        """Quantize ``chosen`` (node indices) into ``model`` (default: a fresh float copy), the biases
        shifted by ``bias_delta`` (default: this context's, from bias correction)."""
        model = model if model is not None else self.fresh()
        delta = self.bias_delta if bias_delta is None else bias_delta
        # Only the weights and biases of the quantized nodes change: a node left float (by max_drop,
        # the latency guard, or a one-node sensitivity build) keeps its exact float weight and bias
        # (shifting its bias for an int8 rounding error it does not have is an error of its own).
        own = self._weights_of(model, chosen)
        for name, d in delta.items():
            v = model.graph.initializers.get(name)
            if name in own and v is not None and v.const_value is not None:
                v.const_value = ir.tensor((v.const_value.numpy() + d).astype(np.float32), name=name)
        rounding = {k: v for k, v in self.weight_rounding.items() if k in own}
        for name, (w, _) in rounding.items():
            v = model.graph.initializers.get(name)
            if v is not None and v.const_value is not None and tuple(v.const_value.shape.numpy()) == w.shape:
                v.const_value = ir.tensor(w, name=name)
        dynamic = [i for i in sorted(chosen) if self.analysis.infos[i].role == "dynamic"]
        nodes = list(model.graph)
        recurrent = [nodes[i] for i in dynamic]  # held before the rewrite shifts indices
        plan = plan_tensors(model, self.analysis, set(chosen) - set(dynamic), target=self.target)
        plan.reduce_range = self.reduce_range
        plan.weight_scales = {name: scale for name, (_, scale) in rounding.items()}
        qps = self.qparams_for(model, plan)
        apply_plan(model, plan, qps, analysis=self.analysis, stats=stats)
        if recurrent:
            builder = _Builder(model.graph)
            for node in recurrent:
                to_dynamic_lstm(model.graph, node, builder)
            if stats:
                stats.count("LSTM_dynamic_int8", len(recurrent))
        return model

    def _weights_of(self, model: ir.Model, chosen: set[int]) -> set[str]:
        """Names of the weight and bias initializers read *only* by chosen weighted nodes."""
        nodes = list(model.graph)
        quantized = {id(nodes[i]) for i in chosen}
        names: set[str] = set()
        for i in chosen:
            info = self.analysis.infos[i]
            if info.role != "weighted":
                continue
            for j in (info.weight_input, info.bias_input):
                v = nodes[i].inputs[j] if j is not None and j < len(nodes[i].inputs) else None
                if v is not None and v.name and all(id(u.node) in quantized for u in v.uses()):
                    names.add(v.name)
        return names


@register_pass("quantize-int8")
class QuantizeInt8Pass(Pass):
    """Static int8 quantization in QDQ form (QuantizeLinear/DequantizeLinear), calibrated from data.

    Rewrites Conv, ConvTranspose, Gemm, MatMul (constant weights) to read int8 weights through
    ``DequantizeLinear`` (symmetric, per output channel by default; bias int32 with
    ``scale = x_scale * w_scale``), and puts ``QuantizeLinear -> DequantizeLinear`` on the float
    activations of every quantized op (its inputs and its output), so the runtime fuses each
    ``DQ -> op -> Q`` region into one integer kernel (QLinearConv, QLinearMatMul, QGemm,
    QLinearAdd, ...). Add/Mul/Concat/pooling are quantized inside int8 regions; Reshape/Transpose/
    Flatten/MaxPool/Resize share their input's scale; Relu and Clip(0, m) are folded into the
    preceding Q range (uint8 saturation at the zero point *is* the ReLU). Softmax, LayerNorm, Gelu,
    HardSwish and anything unknown stay float, with no Q/DQ around them. On the CPU an LSTM becomes
    onnxruntime's ``DynamicQuantizeLSTM`` (int8 weights, activations quantized by the kernel; no
    Q/DQ, its own region for the latency guard, a candidate of ``max_drop``: see :mod:`.recurrent`).

    Math: ``q = saturate(round_half_even(x / s) + z)``, ``x' = (q - z) * s``. Activations:
    ``cpu`` uint8 asymmetric ``s = (hi - lo) / 255, z = round(-lo / s)`` (U8S8 with int8 weights);
    ``tensorrt`` int8 symmetric ``s = max|x| / 127, z = 0`` with Q/DQ only on the inputs of the
    ops TensorRT runs in int8 (it fuses outputs itself; bias stays float). ``[lo, hi]`` comes from
    ``calibration``: ``minmax``, ``percentile``, ``entropy`` (TensorRT's KL method) or ``sqnr`` (per
    tensor, the one of those with the best signal-to-quantization-noise ratio on its histogram).

    Lossy: per tensor at most ``s / 2`` rounding error inside ``[lo, hi]``, saturation outside.
    ``max_drop`` (1 - cosine of the outputs, or the drop of ``context.options['metric']`` on
    ``eval_data``) keeps the most sensitive nodes float until the budget holds (with
    ``budget_confidence=c``, until an upper ``c`` confidence bound of the drop does, see
    :mod:`.fallback`); ``max_cosine_drop`` replaces ``max_drop`` where the measure is ``1 - cosine``
    (no metric given, outputs not a classifier's: its unit is not the task's, see O3); ``latency_guard``
    keeps an int8 region (a connected quantized subgraph) only where it is measured faster beyond
    the noise, and the model float if int8 is not (see :mod:`.guard`), timed by the wall clock at the
    default threads or, with ``latency_clock=cpu``, by one thread's CPU time (steady under load).
    ``budget_unit`` sets what ``max_drop`` counts for a classifier or a recognizer without a task
    metric: ``agreement`` (default), the answers expected to change; ``accuracy``, the accuracy
    expected to be lost, each change weighted by how much of the float model's probability it moves
    (a flip between two answers the float model holds equally likely costs nothing; O3 uses it).
    ``budget_measure=proxy`` measures ``max_drop`` by the proxies even when the context carries a
    task metric (``auto``: the metric when given); ``tune`` uses it to try O3's int8 as the preset
    builds it, judged by tune's metric afterwards like any candidate.
    ``score_gate=g`` measures a detector's ``1 - cosine`` only on the anchors whose score (a
    probability column of its anchor rows, near 0 on the background) is at least ``g`` in the float
    or the int8 model: the background thousands change no detection (O3 uses 0.2; see :mod:`.detection`).
    ``decisions=PATH`` writes these measured decisions (and the CPU-dependent choices) to a JSON
    record, or, when the file exists, replays it without measuring: byte-identical rebuilds (see :mod:`.decisions`).
    ``reduce_range`` (default: by the CPU's int8 path, see :mod:`.isa`) gives 7-bit weights to the
    layers behind a uint8 input that would saturate u8s8 int16 sums on x86 without VNNI.

    ``bias_correction`` shifts each quantized layer's bias by the mean output error it measures on
    the calibration data (see :mod:`.bias_correction`).

    ``weight_rounding="gptq"`` rounds each layer's int8 weights to minimise its output error
    ``||W X - W_q X||`` on the calibration inputs instead of each weight to nearest (same scales; a
    layer keeps nearest rounding where that is not better; see :mod:`.gptq`).

    ``range_search`` (``depthwise`` or ``weighted``) narrows the calibrated ranges of the activation
    inputs of the quantized depthwise convs (or of every quantized weighted node) where that lowers
    the int8 model's output error on the calibration inputs: a greedy search over range factors
    0.85-0.4, each measured in onnxruntime (see :mod:`.range_search`).

    ``fold_batchnorm`` (default on) first folds every BatchNormalization that follows a Conv/Gemm
    into it (the lossless ``fold-batchnorm`` pass): a float BatchNorm between a QLinearConv and its
    activation breaks the int8 region (Q/DQ and NHWC<->NCHW Transposes around every conv).

    Needs calibration data (``PassContext.calibration_data``) and opset >= 13 for per-channel
    weights: older models are upgraded (onnxscript's version converter) or, if that fails,
    quantized per-tensor (reported).
    """

    lossless = False
    tolerance = 0.1

    def __init__(
        self,
        calibration: Literal["minmax", "percentile", "entropy", "sqnr"] = "percentile",
        percentile: float = 99.99,
        per_channel: bool = True,
        activation_type: Literal["auto", "uint8", "int8"] = "auto",
        exclude: list[str] | None = None,
        include_ops: list[str] | None = None,
        num_samples: int | None = None,
        max_drop: float | None = None,
        latency_guard: bool = False,
        fold_batchnorm: bool = True,
        reduce_range: bool | None = None,
        decisions: str | None = None,
        bias_correction: bool = False,
        weight_rounding: Literal["nearest", "gptq"] = "nearest",
        range_search: Literal["none", "depthwise", "weighted"] = "none",
        budget_confidence: float = 0.0,
        max_cosine_drop: float | None = None,
        latency_clock: Literal["wall", "cpu"] = "wall",
        budget_measure: Literal["auto", "proxy"] = "auto",
        budget_unit: Literal["agreement", "accuracy"] = "agreement",
        score_gate: float | None = None,
    ):
        super().__init__()
        if calibration not in cal.METHODS:
            raise ValueError(f"calibration must be one of {', '.join(cal.METHODS)}, got {calibration!r}")
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {percentile}")
        if activation_type not in ("auto", "uint8", "int8"):
            raise ValueError(f"activation_type must be auto, uint8 or int8, got {activation_type!r}")
        if weight_rounding not in ("nearest", "gptq"):
            raise PassOptionError(f"quantize-int8: weight_rounding must be nearest or gptq, got {weight_rounding!r}")
        if range_search != "none" and range_search not in SCOPES:
            raise PassOptionError(f"quantize-int8: range_search must be none, depthwise or weighted, got {range_search!r}")
        if max_drop is not None and max_drop < 0:
            raise ValueError(f"max_drop must be >= 0, got {max_drop}")
        if max_cosine_drop is not None and not 0.0 <= max_cosine_drop <= 2.0:
            raise PassOptionError(f"quantize-int8: max_cosine_drop must be in [0, 2], got {max_cosine_drop!r}")
        if latency_clock not in ("wall", "cpu"):
            raise PassOptionError(f"quantize-int8: latency_clock must be wall or cpu, got {latency_clock!r}")
        if budget_measure not in ("auto", "proxy"):
            raise PassOptionError(f"quantize-int8: budget_measure must be auto or proxy, got {budget_measure!r}")
        if budget_unit not in ("agreement", "accuracy"):
            raise PassOptionError(f"quantize-int8: budget_unit must be agreement or accuracy, got {budget_unit!r}")
        if score_gate is not None and not 0.0 < score_gate < 1.0:
            raise PassOptionError(f"quantize-int8: score_gate must be in (0, 1), got {score_gate!r}")
        if not 0.0 <= budget_confidence < 1.0:
            raise PassOptionError(f"quantize-int8: budget_confidence must be in [0, 1), got {budget_confidence!r}")
        self.calibration = calibration
        self.percentile = percentile
        self.per_channel = per_channel
        self.activation_type = activation_type
        self.exclude = list(exclude or [])
        self.include_ops = list(include_ops) if include_ops else None
        self.num_samples = num_samples
        self.max_drop = max_drop
        self.latency_guard = latency_guard
        self.fold_batchnorm = fold_batchnorm
        self.reduce_range = reduce_range
        self.decisions = decisions
        self.bias_correction = bias_correction
        self.weight_rounding = weight_rounding
        self.range_search = range_search
        self.budget_confidence = float(budget_confidence)
        self.latency_clock = latency_clock
        self.max_cosine_drop = max_cosine_drop
        self.budget_measure = budget_measure
        self.budget_unit = budget_unit
        self.score_gate = None if score_gate is None else float(score_gate)

    def requires(self, model: ir.Model) -> None:
        data = self.context.calibration_data
        if data is None:
            raise CalibrationDataError(
                f"pass {self.name!r} needs calibration data: pass representative inputs with "
                "--calibration-data FILE.npz|DIR (CLI) or PassContext(calibration_data=...) (API); "
                "CalibrationData.synthetic(model, n) works but calibrates on noise"
            )
        try:
            if len(data) == 0:
                raise CalibrationDataError(f"pass {self.name!r}: the calibration data is empty")
        except TypeError:
            pass
        if getattr(data, "synthetic", False):
            logger.warning("quantize-int8 is calibrating on SYNTHETIC data: ranges will not match real inputs")

    # -------------------------------------------------------------------------------------
    def _choices(self, stats: PassStats, recorded: dict | None) -> Int8Choices:
        """Activation type and weight range for this CPU's int8 path (or as the decision record says)."""
        target = self.context.target
        if target == "tensorrt" and self.activation_type == "uint8":
            raise PassOptionError("quantize-int8: TensorRT needs int8 activations; drop activation_type=uint8")
        found = detect_isa()
        if recorded is not None:
            choices = Int8Choices(**recorded)
        else:
            choices = choose(found, target=target, activation_type=self.activation_type,
                             reduce_range=self.reduce_range)
        stats.details["isa"] = {"detected": found.to_dict(), "choices": choices.to_dict(),
                                "source": "decision record" if recorded is not None else "detected"}
        return choices

    def _fold_batchnorm(self, model: ir.Model, stats: PassStats) -> None:
        """Fold BatchNormalization into the Conv/Gemm before it (the lossless ``fold-batchnorm``).

        A BatchNorm left between a Conv and its activation keeps ``Conv -> Q | DQ -> BN -> Clip -> Q``
        apart: onnxruntime runs QLinearConv in NHWC and the float BatchNorm in NCHW, so every conv
        pays a Q/DQ pair and two Transposes (mobilenetv2_style: 74 Transposes, int8 slower than fp32).
        """
        if not any(n.op_type == "BatchNormalization" for n in model.graph):
            return
        from onnxforge.passes.registry import create_pass

        result = create_pass("fold-batchnorm", {}, self.context)(model)
        n = result.stats.counts.get("batchnorm_folded", 0)
        if n:
            stats.count("batchnorm_folded", n)
            stats.note(f"folded {n} BatchNormalization node(s) into the preceding Conv/Gemm before quantizing "
                       "(option fold_batchnorm)")

    def prepare(self, model: ir.Model, stats: PassStats, recorded_choices: dict | None = None) -> QuantContext:
        if self.fold_batchnorm:
            self._fold_batchnorm(model, stats)
        per_channel = self.per_channel
        version = opset_version(model) or 0
        if version < 13:
            if not upgrade_opset(model, 13, stats):
                if version < 10:
                    raise UnsupportedModelError(
                        f"quantize-int8: opset {version} has no QuantizeLinear and the upgrade to 13 failed"
                    )
                if per_channel:
                    per_channel = False
                    stats.note(f"opset {version} < 13: weights quantized per-tensor (per-channel needs opset 13)")
        choices = self._choices(stats, recorded_choices)
        target = self.context.target
        analysis = analyze(model, per_channel=per_channel, exclude=self.exclude, include_ops=self.include_ops,
                           target=target, path=choices.path)
        n = self.num_samples or self.context.options.get("num_samples")
        feeds = cal.iter_feeds(self.context.calibration_data, n)
        if not feeds:
            raise CalibrationDataError(f"pass {self.name!r}: the calibration data is empty")
        # calibrate every float tensor around every candidate node, so any subset can be built
        nodes = list(model.graph)
        names: dict[str, None] = {}
        for info in analysis.infos:
            if info.role == "float":
                continue
            node = nodes[info.index]
            for j, v in enumerate(node.inputs):
                if info.role == "weighted" and j in (info.weight_input, info.bias_input):
                    continue
                if v is not None and _is_float(v) and const_value(v) is None:
                    names[v.name] = None
            for o in node.outputs:
                if _is_float(o):
                    names[o.name] = None
        picked: dict[str, str] = {}
        ranges, skipped = cal.collect_ranges(
            model, feeds, list(names), method=self.calibration, percentile=self.percentile,
            providers=self.context.providers, full_range=[o.name for o in model.graph.outputs], choices=picked,
        )
        if picked:
            stats.details["calibration_choices"] = dict(sorted(collections.Counter(picked.values()).items()))
        for name, why in skipped.items():
            stats.note(f"tensor {name!r} not calibrated: {why}")
        blob = model_to_bytes(model)  # external and spilled weights inline: the candidates are built from it
        return QuantContext(blob, analysis, ranges, choices.act_dtype, choices.symmetric, target, feeds,
                            reduce_range=choices.reduce_range, choices=choices)

    def _record_options(self) -> dict:
        """The options a decision record must have been made with (those that shape the candidates)."""
        keys = ("calibration", "percentile", "per_channel", "activation_type", "exclude", "include_ops",
                "num_samples", "max_drop", "latency_guard", "fold_batchnorm", "reduce_range", "bias_correction")
        opts = {"target": self.context.target, **{k: getattr(self, k) for k in keys}}
        if self.weight_rounding != "nearest":  # absent by default: records written before the option still load
            opts["weight_rounding"] = self.weight_rounding
        if self.range_search != "none":
            opts["range_search"] = self.range_search
        if self.budget_confidence:
            opts["budget_confidence"] = self.budget_confidence
        if self.max_cosine_drop is not None:
            opts["max_cosine_drop"] = self.max_cosine_drop
        if self.latency_clock != "wall":
            opts["latency_clock"] = self.latency_clock
        if self.budget_measure != "auto":
            opts["budget_measure"] = self.budget_measure
        if self.budget_unit != "agreement":
            opts["budget_unit"] = self.budget_unit
        if self.score_gate is not None:
            opts["score_gate"] = self.score_gate
        return opts

    def run(self, model: ir.Model, stats: PassStats) -> bool:
        self.requires(model)
        if not isinstance(model.graph, ir.Graph):
            raise UnsupportedModelError("quantize-int8 needs a model with a main graph")
        lifted = lift_constant_tensors(model)
        if lifted:
            stats.count("constants_lifted", lifted)
        path = self.decisions or self.context.options.get("decisions")
        record = DecisionRecord.load(path) if path and pathlib.Path(path).exists() else None
        # prepare() upgrades an old opset to 13 (and folds BatchNorm) for the int8 model; a model left
        # float is given back as it came
        as_given = copy_model(model) if (opset_version(model) or 0) < 13 else None
        qc = self.prepare(model, stats, record.choices if record else None)
        analysis = qc.analysis
        sha = DecisionRecord.fingerprint(qc.float_bytes)
        if record is not None:
            record.check(path, sha, self._record_options())
        for name, op, reason in analysis.skipped:
            stats.skipped.append(Skip(name, op, reason))
        # nodes in subgraphs are not quantized (calibration cannot see their values reliably)
        for g in _subgraph_nodes(model):
            stats.skip(g, "inside an If/Loop/Scan subgraph: left float")
        forced: set[int] = set()
        chosen = select(model, analysis, forced, target=qc.target)
        # a node whose tensors could not be calibrated stays float
        for _ in range(3):
            plan = plan_tensors(model, analysis, chosen, target=qc.target)
            missing = [t for t in plan.calibrated if t not in qc.ranges]
            if not missing:
                break
            for t in missing:
                for idx in plan.quantized_consumers.get(t, ()):
                    forced.add(idx)
                for idx in chosen:
                    if any(o.name == t for o in list(model.graph)[idx].outputs):
                        forced.add(idx)
            chosen = select(model, analysis, forced, target=qc.target)
        not_paying = [i for i in analysis.infos if i.role in ("int8", "share") and i.index not in chosen]
        for info in not_paying:
            stats.skipped.append(Skip(info.name, info.op_type,
                                      "no quantized neighbour: an isolated int8 op costs more Q/DQ than it saves"))
        if self.weight_rounding == "gptq":
            # deterministic (seeded columns, no timing): recomputed on replay, not stored in the record
            from onnxforge.passes.quantize.gptq import gptq_rounding

            qc.weight_rounding = gptq_rounding(qc, chosen, stats)
        if record is not None:
            qc.bias_delta = {k: np.asarray(v, np.float32) for k, v in record.bias_delta.items()}
            apply_factors(qc, record.range_factors)
            chosen = record.chosen([i.name for i in analysis.infos], path)
            for name, reason in record.kept_float.items():
                op = next((i.op_type for i in analysis.infos if i.name == name), "")
                stats.skipped.append(Skip(name, op, f"{reason} [from decision record]"))
            kept_float = dict(record.kept_float)
            stats.details["decisions"] = {"path": str(path), "source": "record: nothing measured"}
        else:
            n_skips = len(stats.skipped)
            range_factors: dict[str, float] = {}
            if self.bias_correction:
                from onnxforge.passes.quantize.bias_correction import bias_correction

                qc.bias_delta = bias_correction(qc, chosen, stats)
            if self.range_search != "none":
                from onnxforge.passes.quantize.range_search import range_search

                range_factors = range_search(qc, chosen, stats, scope=self.range_search)
            if self.max_drop is not None:
                from onnxforge.passes.quantize.fallback import accuracy_fallback

                chosen = accuracy_fallback(self, qc, chosen, stats)
            if self.latency_guard:
                from onnxforge.passes.quantize.guard import latency_guard

                chosen = latency_guard(qc, chosen, stats, forced, clock=self.latency_clock)
            kept_float = {s.node: s.reason for s in stats.skipped[n_skips:]}
            if path:
                DecisionRecord(sha, self._record_options(),
                               [(i, analysis.infos[i].name) for i in sorted(chosen)], kept_float,
                               qc.choices.to_dict(),
                               {k: stats.details[k] for k in ("fallback", "latency_guard", "bias_correction",
                                                              "range_search")
                                if k in stats.details},
                               bias_delta={k: [float(x) for x in v] for k, v in sorted(qc.bias_delta.items())},
                               range_factors=dict(sorted(range_factors.items())),
                               ).save(path)
                stats.details["decisions"] = {"path": str(path), "source": "measured, record written"}
        stats.details["kept_float"] = kept_float
        if not chosen:
            stats.note("nothing quantized: the model stays float")
            if as_given is not None and stats.counts.pop("opset_upgraded", 0):
                restore_model(model, as_given)
                stats.counts.pop("batchnorm_folded", None)
                stats.notes[:] = [n for n in stats.notes if not n.startswith(("upgraded opset", "folded "))]
                stats.note(f"opset {opset_version(model)} kept: the upgrade to 13 was for the int8 model")
            return bool(lifted or stats.counts.get("opset_upgraded") or stats.counts.get("batchnorm_folded"))
        for info in analysis.infos:
            if info.index in chosen:
                stats.count(f"quantized_{info.op_type}")
        stats.details["quantized_nodes"] = sorted(analysis.infos[i].name for i in chosen)
        stats.details["activation_type"] = str(qc.act_dtype)
        stats.details["calibration"] = self.calibration
        qc.build(chosen, stats, model=model)
        return True


def _subgraph_nodes(model: ir.Model) -> list[ir.Node]:
    out = []
    for node in model.graph:
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                out.extend(ir.traversal.RecursiveGraphIterator(attr.value))
            elif attr.type == ir.AttributeType.GRAPHS:
                for g in attr.value:
                    out.extend(ir.traversal.RecursiveGraphIterator(g))
    return out
