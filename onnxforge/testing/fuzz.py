"""Differential fuzzing of the lossless passes: random valid graphs, run before and after, compared by name.

A :class:`Case` is a seed, an opset (11–18) and a list of *blocks* — the op patterns that O1/O2 rewrite
(Conv/ConvTranspose with random group, dilations, pads and auto_pad; BatchNormalization with random
epsilon and near-zero variance; Gemm with random alpha/beta/transA/transB and C absent, empty or of any
broadcast shape; MatMul with 1-D/2-D/3-D operands; Mul/Add/Sub/Div/Min/Max by constants on either side
and of every rank; Clip/Relu chains; Min∘Max and HardSwish idioms; Pad→Conv; Reshape∘Reshape,
Flatten→Reshape; Identity/Dropout chains; If branches). Each block draws its parameters from its own
seed, so a case can be *minimized* by dropping blocks (:func:`minimize`) and stays reproducible.

Constants are stored as plain initializers, ``Constant`` nodes, or **overridable** initializers (also
graph inputs, as older exporters write them); weights are sometimes shared between nodes; graph
outputs are sometimes read by later nodes, listed twice, or copied through Identity; names are chosen
to collide with the names passes invent (``<W>_bias``, ``<value>/shape``, ``<x>_min``). About 30 % of
the cases also carry *stale declared shapes* (:func:`stale_annotations`: wrong ``value_info`` and
graph-output shapes, as exporters leave them), which a pass may correct but never trust.

:func:`check_case` runs the original and the transformed model in onnxruntime (``ORT_DISABLE_ALL``)
on the same feeds — once with the initializers' defaults and once with other values fed for the
overridable ones — and compares the outputs **by name**: the same names in the same order, the same
shapes, values within fp32 tolerance; and ``onnx.checker`` must accept the result (with stale
annotations ignored, for a case that has them). The pipeline runs as users run it:
``onnxforge.ir.io.load`` (with its input check) and ``onnxforge.api.optimize``. A pass that leaves
a node alone (and says why) is fine; a wrong value, a dropped or renamed output, or an invalid model
is a failure, reported with a short ``cause``.
"""

from __future__ import annotations

import dataclasses
import math
import traceback
from collections.abc import Callable

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

__all__ = [
    "BLOCKS",
    "Case",
    "Outcome",
    "build",
    "check_case",
    "check_model",
    "compare_by_name",
    "compare_values",
    "annotations_ignored",
    "stale_annotations",
    "make_model",
    "minimize",
    "optimize",
    "random_case",
    "run_pipeline",
]

OPSETS = tuple(range(11, 19))
# The lowest IR version each opset needs (older files are what carry overridable initializers).
_IR_FOR_OPSET = {11: 6, 12: 7, 13: 7, 14: 7, 15: 8, 16: 8, 17: 8, 18: 8}
RTOL, ATOL = 1e-4, 1e-5
STALE_PROBABILITY = 0.3  # share of random cases with wrong declared shapes


@dataclasses.dataclass
class Case:
    """A reproducible random model: ``build(case)`` always gives the same graph."""

    seed: int
    opset: int
    rank: int  # rank of the main input: 2, 3 or 4
    blocks: list[tuple[str, int]]  # (block kind, block seed)
    stale: int = 0  # seed of wrong declared shapes (value_info, graph outputs); 0: none

    def __str__(self) -> str:
        blocks = ",".join(f"{k}:{s}" for k, s in self.blocks)
        stale = f", stale={self.stale}" if self.stale else ""
        return f"Case(seed={self.seed}, opset={self.opset}, rank={self.rank}, blocks=[{blocks}]{stale})"


@dataclasses.dataclass
class Outcome:
    """What happened to one case under one pipeline: ``cause`` is ``"ok"``, ``"refused"`` or a failure."""

    cause: str
    detail: str = ""

    @property
    def broken(self) -> bool:
        return self.cause not in ("ok", "refused", "skipped")


# --------------------------------------------------------------------------- graph building


class _Builder:
    """Accumulates nodes, initializers and inputs; tracks the current value and its (static) shape."""

    def __init__(self, opset: int, rng: np.random.Generator, prefix: str = ""):
        self.opset = opset
        self.rng = rng
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.overridable: dict[str, np.ndarray] = {}  # initializer name -> an alternative value
        self.inputs: list[onnx.ValueInfoProto] = []
        self.feeds: dict[str, np.ndarray] = {}
        self.outputs: list[str] = []
        self.names: set[str] = set()
        self.consts: dict[tuple, str] = {}  # (shape, role) -> name, for shared constants
        self.counter = 0
        self.allow_overridable = True  # a subgraph's initializers cannot be fed

    def fresh(self, base: str) -> str:
        name = f"{self.prefix}{base}"
        while name in self.names:
            self.counter += 1
            name = f"{self.prefix}{base}{self.counter}"
        self.names.add(name)
        return name

    def node(self, op: str, inputs: list[str], n_out: int = 1, out_names=None, **attrs) -> list[str]:
        outs = out_names or [self.fresh(op.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=self.fresh(f"n_{op}"), **attrs))
        return outs

    def const(self, array: np.ndarray, base: str = "c", *, storage: str | None = None, share: str = "",
              name: str | None = None) -> str:
        """Store ``array`` as an initializer, a Constant node or an overridable initializer."""
        key = (array.shape, str(array.dtype), share)
        if share and key in self.consts and self.rng.random() < 0.5:
            return self.consts[key]
        storage = storage or self.rng.choice(["init", "init", "init", "constant", "overridable"])
        if storage == "overridable" and not self.allow_overridable:
            storage = "init"
        out = name if name is not None else self.fresh(base)
        self.names.add(out)
        if storage == "constant":
            self.nodes.append(
                helper.make_node("Constant", [], [out], name=self.fresh("n_Constant"),
                                 value=numpy_helper.from_array(array, out))
            )
        else:
            self.initializers.append(numpy_helper.from_array(array, out))
            if storage == "overridable":
                other = array + self.rng.uniform(0.5, 1.5, size=array.shape).astype(array.dtype)
                self.overridable[out] = np.asarray(other).astype(array.dtype)
        if share:
            self.consts[key] = out
        return out

    def randn(self, *shape: int, scale: float = 1.0) -> np.ndarray:
        return (self.rng.standard_normal(shape) * scale).astype(np.float32)


def _conv_out(n: int, k: int, s: int, d: int, pads: tuple[int, int], auto_pad: str) -> int:
    ek = d * (k - 1) + 1
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return math.ceil(n / s)
    if auto_pad == "VALID":
        return (n - ek) // s + 1
    return (n + pads[0] + pads[1] - ek) // s + 1


# Each block takes (builder, x, shape) and returns (y, shape) or None when it does not apply.
Block = Callable[[_Builder, str, tuple[int, ...]], "tuple[str, tuple[int, ...]] | None"]


def _block_conv(b: _Builder, x: str, shape, *, transpose: bool = False, bias=None):
    if len(shape) != 4:
        return None
    r = b.rng
    cin = shape[1]
    group = int(r.choice([g for g in (1, 2, 3) if cin % g == 0]))
    cout = group * int(r.integers(1, 4))
    k = int(r.integers(1, 4))
    s = int(r.choice([1, 1, 2]))
    d = int(r.choice([1, 1, 2]))
    auto_pad = str(r.choice(["NOTSET", "NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"]))
    if auto_pad.startswith("SAME"):
        d = 1  # onnxruntime refuses dilations with SAME padding
    attrs = {"kernel_shape": [k, k], "group": group}
    if s != 1 or r.random() < 0.3:
        attrs["strides"] = [s, s]
    if d != 1 or r.random() < 0.3:
        attrs["dilations"] = [d, d]
    pads = [int(p) for p in r.integers(0, k, size=4)]
    if auto_pad == "NOTSET":
        if any(pads) or r.random() < 0.3:
            attrs["pads"] = pads
    else:
        attrs["auto_pad"] = auto_pad
        pads = [0, 0, 0, 0]
    if transpose:
        if auto_pad in ("SAME_UPPER", "SAME_LOWER") and r.random() < 0.7:
            return None
        w_shape = (cin, cout // group, k, k)
        ek = d * (k - 1) + 1
        op_pad = int(r.integers(0, s)) if s > 1 and d == 1 else 0
        if op_pad:
            attrs["output_padding"] = [op_pad, op_pad]
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            out = tuple(n * s for n in shape[2:])
        else:
            out = tuple(s * (n - 1) + op_pad + ek - pads[i] - pads[i + 2] for i, n in enumerate(shape[2:]))
        op = "ConvTranspose"
    else:
        w_shape = (cout, cin // group, k, k)
        out = tuple(_conv_out(n, k, s, d, (pads[i], pads[i + 2]), auto_pad) for i, n in enumerate(shape[2:]))
        op = "Conv"
    if min(out) < 1:
        return None
    w = b.const(b.randn(*w_shape, scale=0.5), "w", share="w")
    inputs = [x, w]
    bias = bias if bias is not None else r.choice(["none", "none", "init", "empty"])
    if bias == "init":
        inputs.append(b.const(b.randn(cout), "b", share="b"))
    elif bias == "empty":
        inputs.append("")
    (y,) = b.node(op, inputs, **attrs)
    if r.random() < 0.25:
        # name trap: a value (read by a later op) named as the fold passes name a new bias
        trap = b.const(b.randn(1), name=f"{w}_bias", storage="init")
        (y,) = b.node("Add", [y, trap])
    return y, (shape[0], cout, *out)


def _block_convtranspose(b, x, shape):
    return _block_conv(b, x, shape, transpose=True)


def _block_batchnorm(b: _Builder, x: str, shape):
    if len(shape) < 2:
        return None
    r = b.rng
    c = shape[1]
    eps = float(r.choice([1e-5, 1e-3, 0.1, 1e-9]))
    var = np.abs(b.randn(c)) + 0.1
    if r.random() < 0.4:
        var[r.integers(0, c)] = float(r.choice([0.0, 1e-8, 1e-6]))  # near-zero variance
    params = [b.const(b.randn(c), "gamma"), b.const(b.randn(c), "beta"), b.const(b.randn(c), "mean"),
              b.const(var.astype(np.float32), "var", storage=r.choice(["init", "init", "overridable"]))]
    attrs = {"epsilon": eps}
    if b.opset >= 14 and r.random() < 0.3:
        attrs["training_mode"] = 0
    (y,) = b.node("BatchNormalization", [x, *params], **attrs)
    return y, shape


def _block_conv_bn(b, x, shape):
    r = b.rng
    first = (_block_conv if r.random() < 0.7 else _block_convtranspose)(b, x, shape)
    if first is None:
        return None
    return _block_batchnorm(b, *first)


def _block_gemm(b: _Builder, x: str, shape):
    if len(shape) != 2:
        return None
    r = b.rng
    trans_a, trans_b = int(r.integers(0, 2)), int(r.integers(0, 2))
    m, k = (shape[1], shape[0]) if trans_a else shape
    n = int(r.integers(1, 6))
    attrs = {}
    if trans_a:
        attrs["transA"] = 1
    if trans_b or r.random() < 0.2:
        attrs["transB"] = trans_b
    alpha, beta = (float(r.choice([1.0, 1.0, 0.5, 2.0, -1.0])) for _ in range(2))
    if alpha != 1.0:
        attrs["alpha"] = alpha
    if beta != 1.0 or r.random() < 0.2:
        attrs["beta"] = float(r.choice([beta, 0.0])) if r.random() < 0.2 else beta
    w = b.const(b.randn(*((n, k) if trans_b else (k, n))), "w", share="w")
    inputs = [x, w]
    c_kind = r.choice(["none", "empty", "()", "(1,)", "(n,)", "(1,n)", "(m,1)", "(m,n)"])
    if c_kind == "empty":
        inputs.append("")
    elif c_kind != "none":
        c_shape = eval(c_kind, {"n": n, "m": m})  # noqa: S307 - a fixed table above
        inputs.append(b.const(b.randn(*c_shape), "c", share="c"))
    (y,) = b.node("Gemm", inputs, **attrs)
    return y, (m, n)


def _block_matmul(b: _Builder, x: str, shape):
    r = b.rng
    k = shape[-1]
    if len(shape) > 3:
        return None
    if r.random() < 0.15 and len(shape) >= 2:
        w = b.const(b.randn(k), "w", share="w")  # 1-D: drops the last axis
        (y,) = b.node("MatMul", [x, w])
        return y, tuple(shape[:-1])
    n = int(r.integers(1, 6))
    w = b.const(b.randn(k, n), "w", share="w")
    (y,) = b.node("MatMul", [x, w])
    return y, (*shape[:-1], n)


def _const_shape(r: np.random.Generator, shape: tuple[int, ...]) -> tuple[int, ...]:
    """A shape that broadcasts against ``shape``: rank 0..rank(+1, rarely), each axis 1 or the size."""
    rank = len(shape)
    cr = int(r.integers(0, rank + 1))
    if r.random() < 0.1:
        cr = rank + 1
    dims = []
    for i in range(cr):
        axis = rank - cr + i
        if axis < 0:
            dims.append(1)
        else:
            dims.append(shape[axis] if r.random() < 0.5 else 1)
    return tuple(dims)


def _out_shape(shape, cshape):
    return tuple(np.broadcast_shapes(tuple(shape), tuple(cshape)))


def _block_binary(b: _Builder, x: str, shape):
    r = b.rng
    op = str(r.choice(["Mul", "Add", "Sub", "Div", "Min", "Max"]))
    cshape = _const_shape(r, shape)
    kind = r.random()
    if kind < 0.15 and op in ("Mul", "Div", "Add", "Sub"):
        value = np.full(cshape, 1.0 if op in ("Mul", "Div") else 0.0, np.float32)  # a no-op constant
    else:
        value = b.randn(*cshape)
        if op == "Div":
            value = (np.sign(value) + (value == 0)) * (np.abs(value) + 0.5)
    c = b.const(value.astype(np.float32), "k", share="k")
    inputs = [c, x] if r.random() < 0.4 else [x, c]
    (y,) = b.node(op, inputs)
    return y, _out_shape(shape, cshape)


def _scalar(b: _Builder, value: float, rank: int = 0) -> str:
    return b.const(np.full((1,) * rank, value, np.float32), "s", share="s" if rank == 0 else "")


def _block_clip(b: _Builder, x: str, shape):
    r = b.rng
    y = x
    for _ in range(int(r.integers(1, 3))):
        kind = r.choice(["clip", "clip", "relu"])
        if kind == "relu":
            (y,) = b.node("Relu", [y])
            continue
        lo, hi = sorted(float(v) for v in r.uniform(-2, 2, size=2))
        if r.random() < 0.2:
            lo, hi = hi, lo  # min > max: onnxruntime gives max everywhere
        inputs = [y]
        form = r.choice(["both", "min", "max", "empty_min", "none"])
        if form in ("both", "min"):
            inputs.append(_scalar(b, lo))
        elif form in ("empty_min", "max"):
            inputs.append("")
        if form in ("both", "max", "empty_min"):
            inputs.append(_scalar(b, hi))
        (y,) = b.node("Clip", inputs)
    return y, shape


def _block_minmax(b: _Builder, x: str, shape):
    r = b.rng
    lo, hi = sorted(float(v) for v in r.uniform(-2, 2, size=2))
    if r.random() < 0.2:
        lo, hi = hi, lo
    rank = int(r.choice([0, 0, 1, len(shape), len(shape) + 1]))
    c_lo, c_hi = _scalar(b, lo, rank), _scalar(b, hi, rank)
    first, second = ("Max", "Min") if r.random() < 0.5 else ("Min", "Max")
    a, bnd = (c_lo, c_hi) if first == "Max" else (c_hi, c_lo)
    (y,) = b.node(first, [x, a] if r.random() < 0.5 else [a, x])
    if r.random() < 0.3:
        (y2,) = b.node(first, [x, a])  # a second fusion on the same input
        b.outputs.append(y2)
    (y,) = b.node(second, [y, bnd])
    out = _out_shape(shape, (1,) * rank)
    return y, out


def _block_hardswish(b: _Builder, x: str, shape):
    r = b.rng
    rank = int(r.choice([0, 0, 1, len(shape) + 1]))
    if r.random() < 0.5:
        (h,) = b.node("HardSigmoid", [x], alpha=1.0 / 6, beta=0.5)
        (y,) = b.node("Mul", [x, h])
        return y, shape
    (t,) = b.node("Add", [x, _scalar(b, 3.0, rank)])
    (c,) = b.node("Clip", [t, _scalar(b, 0.0), _scalar(b, 6.0)])
    (m,) = b.node("Mul", [x, c])
    (y,) = b.node("Div", [m, _scalar(b, 6.0, rank)])
    return y, _out_shape(shape, (1,) * rank)


def _block_gelu(b: _Builder, x: str, shape):
    (d,) = b.node("Div", [x, _scalar(b, math.sqrt(2.0))])
    (e,) = b.node("Erf", [d])
    (a,) = b.node("Add", [e, _scalar(b, 1.0)])
    (m,) = b.node("Mul", [x, a])
    (y,) = b.node("Mul", [m, _scalar(b, 0.5)])
    return y, shape


def _block_linear_bn(b: _Builder, x: str, shape):
    first = (_block_gemm if b.rng.random() < 0.5 else _block_matmul)(b, x, shape)
    if first is None or len(first[1]) < 2:
        return None
    return _block_batchnorm(b, *first)


def _channel_const(b: _Builder, shape: tuple[int, ...], axis: int) -> np.ndarray:
    """A constant that varies along ``axis`` only (what fold-affine folds), sometimes scalar or 1-D."""
    r = b.rng
    kind = r.random()
    if kind < 0.2:
        return b.randn()
    dims = [1] * len(shape)
    dims[axis] = shape[axis]
    if kind < 0.35 and axis == len(shape) - 1:
        dims = [shape[axis]]
    elif kind < 0.45:
        dims = dims[1:] if len(dims) > 1 else dims  # without the batch axis
    return b.randn(*dims)


def _block_affine(b: _Builder, x: str, shape):
    """A Conv/ConvTranspose/Gemm/MatMul, then a chain of per-channel Mul/Add/Sub/Div by constants."""
    r = b.rng
    producer = str(r.choice(["conv", "convtranspose", "gemm", "matmul"]))
    res = BLOCKS[producer](b, x, shape)
    if res is None:
        return None
    y, shape = res
    axis = 1 if producer in ("conv", "convtranspose") else len(shape) - 1
    for _ in range(int(r.integers(1, 4))):
        op = str(r.choice(["Mul", "Add", "Sub", "Div"]))
        value = _channel_const(b, shape, axis)
        if op == "Div":
            value = ((np.sign(value) + (value == 0)) * (np.abs(value) + 0.5)).astype(np.float32)
        c = b.const(np.asarray(value, np.float32), "a")
        (y,) = b.node(op, [c, y] if r.random() < 0.3 else [y, c])
        shape = _out_shape(shape, np.shape(value))
    return y, shape


def _block_affine_conv(b: _Builder, x: str, shape):
    """``Conv(x * s + o)`` with scalar s, o (onnxscript's affine-conv fusion)."""
    if len(shape) != 4:
        return None
    (m,) = b.node("Mul", [x, b.const(np.asarray(b.rng.uniform(0.5, 2), np.float32), "s")])
    (a,) = b.node("Add", [m, b.const(np.asarray(b.rng.uniform(-1, 1), np.float32), "o")])
    return _block_conv(b, a, shape)


def _block_rmsnorm(b: _Builder, x: str, shape):
    (sq,) = b.node("Mul", [x, x])
    if b.opset >= 18:
        axes = b.const(np.asarray([-1], np.int64), "axes", storage="init")
        (mean,) = b.node("ReduceMean", [sq, axes], keepdims=1)
    else:
        (mean,) = b.node("ReduceMean", [sq], axes=[-1], keepdims=1)
    (e,) = b.node("Add", [mean, _scalar(b, 1e-6)])
    (rt,) = b.node("Sqrt", [e])
    (inv,) = b.node("Reciprocal", [rt])
    (n,) = b.node("Mul", [x, inv])
    (y,) = b.node("Mul", [n, b.const(b.randn(shape[-1]), "gamma")])
    return y, shape


def _block_pad_conv(b: _Builder, x: str, shape):
    if len(shape) != 4:
        return None
    r = b.rng
    pads = [0, 0, *[int(v) for v in r.integers(0, 2, size=2)], 0, 0, *[int(v) for v in r.integers(0, 2, size=2)]]
    inputs = [x, b.const(np.asarray(pads, np.int64), "pads")]
    value = 0.0 if r.random() < 0.7 else 1.5
    if value or r.random() < 0.5:
        inputs.append(b.const(np.asarray(value, np.float32), "padv"))
    (p,) = b.node("Pad", inputs, mode="constant")
    padded = (shape[0], shape[1], shape[2] + pads[2] + pads[6], shape[3] + pads[3] + pads[7])
    return _block_conv(b, p, padded)


def _block_reshape(b: _Builder, x: str, shape):
    r = b.rng
    size = int(np.prod(shape))
    if len(shape) == 4 and r.random() < 0.5:
        (f,) = b.node("Flatten", [x], axis=1)
        mid = (shape[0], size // shape[0])
    else:
        mid = (size,)
        name = b.fresh("r")
        s1 = b.const(np.asarray([size], np.int64), storage="init", name=f"{name}/shape")
        (f,) = b.node("Reshape", [x, s1], out_names=[name])
    target = tuple(shape) if r.random() < 0.5 else (shape[0], -1)
    trap = f"{f}/shape" if f"{f}/shape" not in b.names else b.fresh("sh")
    s2 = b.const(np.asarray(target, np.int64), storage=r.choice(["init", "constant"]), name=trap)
    (y,) = b.node("Reshape", [f, s2])
    return y, (tuple(shape) if target == tuple(shape) else (shape[0], size // shape[0]))


def _block_identity(b: _Builder, x: str, shape):
    r = b.rng
    y = x
    for _ in range(int(r.integers(1, 4))):
        if r.random() < 0.5:
            (y,) = b.node("Identity", [y])
        elif b.opset >= 12:
            inputs = [y]
            if r.random() < 0.5:
                inputs.append(b.const(np.asarray(0.3, np.float32), "ratio", storage="init"))
                if r.random() < 0.5:
                    inputs.append(b.const(np.asarray(False), "training", storage="init"))
            (y,) = b.node("Dropout", inputs)
        else:
            (y,) = b.node("Dropout", [y], ratio=0.3)
        if r.random() < 0.3:
            b.outputs.append(y)  # an output read again (and maybe listed twice)
    return y, shape


def _block_outputs(b: _Builder, x: str, shape):
    """Interface traps: an output read later, listed twice, copied to another output, CSE-able copies."""
    r = b.rng
    kind = r.choice(["read", "twice", "identity", "two_identities"])
    if kind == "read":
        b.outputs.append(x)
    elif kind == "twice":
        b.outputs.extend([x, x])
    elif kind == "identity":
        b.outputs.append(x)
        (y,) = b.node(str(r.choice(["Identity", "Dropout"])), [x])
        b.outputs.append(y)
    else:
        for _ in range(2):
            (y,) = b.node("Identity", [x])
            b.outputs.append(y)
    return x, shape


def _block_if(b: _Builder, x: str, shape):
    r = b.rng
    if "cond" not in b.feeds:
        b.inputs.append(helper.make_tensor_value_info("cond", TensorProto.BOOL, []))
        b.feeds["cond"] = np.asarray(bool(r.integers(0, 2)))
        b.names.add("cond")
    branches = []
    for tag in ("then", "else"):
        sub = _Builder(b.opset, np.random.default_rng(int(r.integers(1 << 30))), prefix=f"{b.prefix}{tag}_")
        sub.names = b.names  # one namespace: outer-scope capture is by name
        sub.allow_overridable = False
        kind = str(r.choice(["binary", "clip", "identity", "conv_bn", "gemm"]))
        res = BLOCKS[kind](sub, x, shape)
        if res is None or res[1] != tuple(shape):
            (y,) = sub.node("Identity", [x])
        else:
            y = res[0]
            if kind == "identity" or y == x:
                (y,) = sub.node("Identity", [y])
        out = helper.make_tensor_value_info(y, TensorProto.FLOAT, list(shape))
        branches.append(helper.make_graph(sub.nodes, f"{tag}_{b.fresh('g')}", [], [out],
                                          initializer=sub.initializers))
    (y,) = b.node("If", ["cond"], then_branch=branches[0], else_branch=branches[1])
    return y, shape


BLOCKS: dict[str, Block] = {
    "conv": _block_conv,
    "convtranspose": _block_convtranspose,
    "batchnorm": _block_batchnorm,
    "conv_bn": _block_conv_bn,
    "gemm": _block_gemm,
    "matmul": _block_matmul,
    "binary": _block_binary,
    "clip": _block_clip,
    "minmax": _block_minmax,
    "hardswish": _block_hardswish,
    "gelu": _block_gelu,
    "pad_conv": _block_pad_conv,
    "reshape": _block_reshape,
    "identity": _block_identity,
    "outputs": _block_outputs,
    "linear_bn": _block_linear_bn,
    "affine": _block_affine,
    "affine_conv": _block_affine_conv,
    "rmsnorm": _block_rmsnorm,
    "if": _block_if,
}
_WEIGHTS = {"conv": 3, "convtranspose": 2, "conv_bn": 3, "batchnorm": 2, "gemm": 3, "matmul": 3, "binary": 5,
            "clip": 2, "minmax": 2, "hardswish": 1, "gelu": 1, "pad_conv": 1, "reshape": 1, "identity": 2,
            "outputs": 2, "if": 1, "linear_bn": 2, "affine": 4, "affine_conv": 1, "rmsnorm": 1}


def random_case(seed: int, *, n_blocks: tuple[int, int] = (1, 6), stale_shapes: bool = True) -> Case:
    """A random case from ``seed`` (opset, input rank, 1–5 blocks, and, with probability
    ``STALE_PROBABILITY``, wrong declared shapes: see :func:`stale_annotations`)."""
    r = np.random.default_rng(seed)
    kinds = list(_WEIGHTS)
    p = np.asarray([_WEIGHTS[k] for k in kinds], float)
    n = int(r.integers(*n_blocks))
    blocks = [(str(r.choice(kinds, p=p / p.sum())), int(r.integers(1 << 30))) for _ in range(n)]
    opset, rank = int(r.choice(OPSETS)), int(r.choice([2, 3, 4, 4]))
    # drawn last, so the graphs of earlier seeds stay what they were
    stale = int(r.integers(1, 1 << 30)) if stale_shapes and r.random() < STALE_PROBABILITY else 0
    return Case(seed=seed, opset=opset, rank=rank, blocks=blocks, stale=stale)


def build(case: Case) -> tuple[onnx.ModelProto, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The model of ``case``, its feeds with the initializers' defaults, and feeds that override them."""
    r = np.random.default_rng(case.seed)
    b = _Builder(case.opset, r)
    shape = {2: (3, 4), 3: (2, 3, 4), 4: (int(r.integers(1, 3)), int(r.integers(1, 7)), 5, 5)}[case.rank]
    dims: list = list(shape)
    if r.random() < 0.3:
        dims[0] = "N"  # a symbolic batch: rules that need static ranks/shapes must still be right
    b.inputs.append(helper.make_tensor_value_info("x", TensorProto.FLOAT, dims))
    b.names.add("x")
    b.feeds["x"] = r.standard_normal(shape).astype(np.float32)
    x = "x"
    for kind, seed in case.blocks:
        b.rng = np.random.default_rng(seed)
        res = BLOCKS[kind](b, x, tuple(shape))
        if res is not None:
            x, shape = res
    if x == "x":
        (x,) = b.node("Identity", ["x"])
    b.outputs.append(x)
    outputs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in b.outputs]
    inputs = list(b.inputs)
    for init in b.initializers:
        if init.name in b.overridable:
            inputs.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    graph = helper.make_graph(b.nodes, "fuzz", inputs, outputs, initializer=b.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", case.opset)],
                              ir_version=_IR_FOR_OPSET[case.opset], producer_name="onnxforge.fuzz")
    _set_output_ranks(model, b.feeds)
    if case.stale:
        stale_annotations(model, case.stale)
    override = dict(b.feeds)
    override.update(b.overridable)
    return model, dict(b.feeds), override


def _set_output_ranks(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> None:
    # Graph outputs need a shape field (older IR versions): the rank onnxruntime gives, symbolic dims.
    try:
        ranks = [v.ndim for _, v in _run(_session(model.SerializeToString()), feeds)]
    except Exception:
        ranks = [0] * len(model.graph.output)  # the caller's checker reports the model as invalid
    for i, (out, rank) in enumerate(zip(model.graph.output, ranks)):
        out.type.tensor_type.shape.SetInParent()
        for j in range(rank):
            out.type.tensor_type.shape.dim.add().dim_param = f"out{i}_{j}"


def stale_annotations(model: onnx.ModelProto, seed: int) -> int:
    """Write wrong-but-plausible declared shapes into ``model`` (in place), as exporters leave them.

    The true shapes come from ONNX shape inference; each intermediate value gets a ``value_info``
    whose shape is, at random, correct or wrong — one dim changed, the rank raised or lowered,
    static dims made symbolic, or symbolic dims made static with wrong values — and each graph
    output's declared shape is wrong with probability 1/2. Element types stay right (a wrong type
    is a different model, one onnxruntime refuses). A lossless pass may correct or drop these
    annotations but must never let them change a value. Returns the number of wrong annotations.
    """
    r = np.random.default_rng(seed)
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:
        return 0
    outputs = {o.name for o in model.graph.output}
    wrong = 0
    del model.graph.value_info[:]
    for vi in inferred.graph.value_info:
        if vi.name in outputs or not vi.type.HasField("tensor_type"):
            continue
        t = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
        if not t.HasField("shape") or r.random() < 0.3:
            continue  # some values stay unannotated
        if r.random() < 0.6:
            dims, wrong = _wrong_dims(r, dims), wrong + 1
        model.graph.value_info.append(helper.make_tensor_value_info(vi.name, t.elem_type, dims))
    for out in model.graph.output:
        t = out.type.tensor_type
        # (an output that is also a graph input too: onnx_ir reads both declarations into one value)
        if r.random() < 0.5:
            dims = _wrong_dims(r, [d.dim_param or d.dim_value for d in t.shape.dim])
            out.type.CopyFrom(helper.make_tensor_type_proto(t.elem_type, dims))
            wrong += 1
    return wrong


def _wrong_dims(r: np.random.Generator, dims: list) -> list:
    dims = [None if d == "?" else d for d in dims]
    kind = str(r.choice(["value", "rank+", "rank-", "symbolic", "static"]))
    if kind == "value" and dims:
        i = int(r.integers(len(dims)))
        old = dims[i] if isinstance(dims[i], int) else 0
        dims[i] = int(r.choice([v for v in (1, 2, 3, 4, 5, 6, 12) if v != old]))
    elif kind == "rank+" or not dims:
        dims.insert(int(r.integers(len(dims) + 1)), int(r.choice([1, 1, 2, 3])))
    elif kind == "rank-":
        dims.pop(int(r.integers(len(dims))))
    elif kind == "symbolic":
        dims = [f"s{i}" for i in range(len(dims))]
    else:  # static where the true dims are symbolic (or static already): all of them, some wrong
        dims = [d if isinstance(d, int) and r.random() < 0.5 else int(r.choice([1, 2, 3, 4, 5])) for d in dims]
    return dims


def make_model(nodes: list[onnx.NodeProto], inputs: dict[str, tuple[int, ...]], outputs: list[str],
               initializers: dict[str, np.ndarray], *, opset: int = 13, overridable: tuple[str, ...] = (),
               seed: int = 0) -> tuple[onnx.ModelProto, list[dict[str, np.ndarray]]]:
    """A small float32 model for regression tests, and its feeds: ``[defaults, overridden]``.

    ``overridable`` names initializers that are also graph inputs; the second feed dict gives them
    other values (``default + U(0.5, 1.5)``).
    """
    r = np.random.default_rng(seed)
    feeds = {n: r.standard_normal(shape).astype(np.float32) for n, shape in inputs.items()}
    graph_inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(s)) for n, s in inputs.items()]
    override = dict(feeds)
    for name in overridable:
        array = np.asarray(initializers[name])
        graph_inputs.append(helper.make_tensor_value_info(
            name, helper.np_dtype_to_tensor_dtype(array.dtype), list(array.shape)))
        override[name] = np.asarray(array + r.uniform(0.5, 1.5, size=array.shape)).astype(array.dtype)
    graph = helper.make_graph(
        nodes, "regression", graph_inputs,
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        initializer=[numpy_helper.from_array(np.asarray(v), k) for k, v in initializers.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              ir_version=_IR_FOR_OPSET.get(opset, 8))
    _set_output_ranks(model, feeds)
    return model, [feeds, override]


# --------------------------------------------------------------------------- running and comparing


def _session(data: bytes) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 4
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def _feedable(session: ort.InferenceSession) -> set[str]:
    # onnxruntime lists initializers that are also graph inputs apart from the inputs
    return {i.name for i in session.get_inputs()} | {i.name for i in session.get_overridable_initializers()}


def _run(session: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> list[tuple[str, np.ndarray]]:
    names = [o.name for o in session.get_outputs()]
    known = _feedable(session)
    values = session.run(None, {k: v for k, v in feeds.items() if k in known})
    return list(zip(names, values))


def compare_by_name(expected: list[tuple[str, object]], actual: list[tuple[str, object]],
                    rtol: float = RTOL, atol: float = ATOL) -> tuple[str, str]:
    """``("ok", "")`` or ``(cause, detail)``: same output names in order, same shapes, close values.

    Values: ``|a - e| <= atol + rtol * max|e|`` per output (NaN equals NaN at the same place);
    non-numeric tensors (strings) must be equal; sequences compare element by element, optionals
    (``None``) must be ``None`` on both sides.
    """
    e_names, a_names = [n for n, _ in expected], [n for n, _ in actual]
    if e_names != a_names:
        missing = [n for n in e_names if n not in a_names]
        return "outputs", f"names {e_names} -> {a_names}" + (f" (missing {missing})" if missing else "")
    for (name, e), (_, a) in zip(expected, actual):
        cause, detail = compare_values(e, a, rtol, atol)
        if cause != "ok":
            return cause, f"{name}{detail}"
    return "ok", ""


def compare_values(e: object, a: object, rtol: float = RTOL, atol: float = ATOL) -> tuple[str, str]:
    """Compare one output value (tensor, sequence of values, or ``None``); see :func:`compare_by_name`."""
    if e is None or a is None or isinstance(e, (list, tuple)) or isinstance(a, (list, tuple)):
        if (e is None) != (a is None) or isinstance(e, (list, tuple)) != isinstance(a, (list, tuple)):
            return "type", f": {type(e).__name__} -> {type(a).__name__}"
        if e is None:
            return "ok", ""
        if len(e) != len(a):
            return "shape", f": sequence of {len(e)} -> {len(a)}"
        for i, (ei, ai) in enumerate(zip(e, a)):
            cause, detail = compare_values(ei, ai, rtol, atol)
            if cause != "ok":
                return cause, f"[{i}]{detail}"
        return "ok", ""
    e, a = np.asarray(e), np.asarray(a)
    if e.shape != a.shape:
        return "shape", f": {e.shape} -> {a.shape}"
    if e.dtype != a.dtype:
        return "dtype", f": {e.dtype} -> {a.dtype}"
    if not e.size:
        return "ok", ""
    if e.dtype.kind in "OSU":  # strings, bytes: no tolerance (ml_dtypes' float8/bfloat16 are kind "V")
        return ("ok", "") if np.array_equal(e, a) else ("value", ": values differ")
    e64, a64 = e.astype(np.float64), a.astype(np.float64)
    same_nan = np.isnan(e64) == np.isnan(a64)
    finite = np.isfinite(e64) & np.isfinite(a64)
    scale = float(np.max(np.abs(e64[np.isfinite(e64)]), initial=0.0))
    with np.errstate(invalid="ignore"):  # inf - inf where both are inf: masked by ``finite``
        diff = np.where(finite, np.abs(e64 - a64), np.where(e64 == a64, 0.0, np.inf))
    worst = float(np.max(np.where(same_nan & ~np.isnan(e64), diff, np.where(same_nan, 0.0, np.inf))))
    if worst > atol + rtol * scale:
        return "value", f": max abs diff {worst:.3g} (scale {scale:.3g})"
    return "ok", ""


def run_pipeline(model: ir.Model, spec: str, target: str = "cpu") -> None:
    """Run the pipeline ``spec`` (a preset, a pass name, or a pipeline string) on ``model`` in place,
    through the public API (``onnxforge.api.optimize``)."""
    from onnxforge.api import optimize as api_optimize

    api_optimize(model, spec, target=target)


def optimize(data: bytes, spec: str, target: str = "cpu") -> onnx.ModelProto | Outcome:
    """Load ``data`` (``onnxforge.ir.io.load``) and run ``spec`` on it through the public API: the
    result, or ``Outcome("refused" | "crash")``.

    A *refusal* is a typed :class:`~onnxforge.errors.OnnxforgeError` raised on purpose (the user's to
    fix, e.g. :class:`~onnxforge.errors.UnsupportedModelError`). ``PassFailedError`` and
    ``VerificationError`` are not refusals: the pipeline raises them when a pass hit a raw exception,
    left an invalid model, or changed the outputs, all bugs of ours.
    """
    from onnxforge.errors import OnnxforgeError, PassFailedError, VerificationError

    from onnxforge.ir.io import load

    try:
        # load() as the CLI and API do (it checks the input, refusing a malformed one); the bytes
        # give a fresh proto: onnx_ir's tensors wrap the proto's, and a pass could edit the caller's.
        model = load(data)
        run_pipeline(model, spec, target)
    except (PassFailedError, VerificationError) as e:
        return Outcome("crash", f"{type(e).__name__}: {str(e)[:300]}\n{traceback.format_exc(limit=-3)}")
    except OnnxforgeError as e:  # a clean, typed refusal of the whole model
        return Outcome("refused", f"{type(e).__name__}: {str(e)[:300]}")
    except Exception as e:
        return Outcome("crash", f"{type(e).__name__}: {str(e)[:300]}\n{traceback.format_exc(limit=-3)}")
    try:
        return ir.serde.serialize_model(model)
    except Exception as e:
        return Outcome("invalid", f"serialize: {type(e).__name__}: {str(e)[:300]}")


def check_case(case: Case, spec: str, target: str = "cpu") -> Outcome:
    """Build ``case``, run ``spec`` on it, and compare with the original (see module docstring)."""
    proto, feeds, override = build(case)
    return check_model(proto, spec, [feeds, override], target)


def check_model(proto: onnx.ModelProto, spec: str, feeds: list[dict[str, np.ndarray]],
                target: str = "cpu") -> Outcome:
    """Run ``spec`` on (a copy of) ``proto``; compare outputs by name on each feed dict.

    Feeds may name inputs a model does not have (an overridable initializer a pass turned into a
    plain one): they are dropped for that model, so a baked-in value shows up as a value difference.
    A model whose declared shapes are wrong (:func:`stale_annotations`) fails ``onnx.checker``'s
    full check as given; its validity, and the result's, is then judged with the annotations
    ignored (:func:`annotations_ignored`): they are advisory, only the values must not change.
    """
    data = proto.SerializeToString()
    try:
        reference = _session(data)
        expected = [_run(reference, f) for f in feeds]
        strict = full_check_passes(proto)
        if not strict:
            onnx.checker.check_model(annotations_ignored(proto, expected[0]), full_check=True)
    except Exception as e:  # the generator made something onnxruntime rejects: not the passes' fault
        return Outcome("skipped", f"generated model rejected: {type(e).__name__}: {str(e)[:200]}")
    out_proto = optimize(data, spec, target)
    if isinstance(out_proto, Outcome):
        return out_proto
    try:
        onnx.checker.check_model(out_proto if strict else annotations_ignored(out_proto, expected[0]),
                                 full_check=True)
    except Exception as e:
        return Outcome("invalid", f"{type(e).__name__}: {str(e)[:300]}")
    try:
        session = _session(out_proto.SerializeToString())
        actual = [_run(session, f) for f in feeds]
    except Exception as e:
        return Outcome("load", f"{type(e).__name__}: {str(e)[:300]}")
    changed = _feedable(reference) ^ _feedable(session)
    if changed:
        return Outcome("inputs", f"graph inputs changed: {sorted(changed)}")
    for i, (e, a) in enumerate(zip(expected, actual)):
        cause, detail = compare_by_name(e, a)
        if cause != "ok":
            return Outcome(("override-" if i else "") + cause, detail)
    return Outcome("ok")


def full_check_passes(proto: onnx.ModelProto) -> bool:
    """Whether ``onnx.checker`` with ``full_check`` (shape inference included) accepts ``proto``."""
    try:
        onnx.checker.check_model(proto, full_check=True)
        return True
    except Exception:
        return False


def annotations_ignored(proto: onnx.ModelProto, outputs: list[tuple[str, object]]) -> onnx.ModelProto:
    """A copy of ``proto`` without declared intermediate shapes (``value_info``) and with each graph
    output's shape replaced by symbolic dims of the rank it really has (``outputs``: a run's
    ``(name, value)`` pairs), for checking a model whose annotations may be stale."""
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    del copy.graph.value_info[:]
    ranks = {n: np.ndim(v) for n, v in outputs}
    for i, out in enumerate(copy.graph.output):
        if out.name in ranks and out.type.HasField("tensor_type"):
            shape = out.type.tensor_type.shape
            del shape.dim[:]
            for j in range(ranks[out.name]):
                shape.dim.add().dim_param = f"out{i}_{j}"
    return copy


def minimize(case: Case, spec: str, cause: str, target: str = "cpu") -> Case:
    """Drop blocks while ``check_case`` still fails with the same ``cause``."""
    current = case
    if case.stale and check_case(dataclasses.replace(case, stale=0), spec, target).cause == cause:
        current = dataclasses.replace(case, stale=0)  # the wrong shapes play no part
    changed = True
    while changed:
        changed = False
        for i in range(len(current.blocks)):
            trial = dataclasses.replace(current, blocks=current.blocks[:i] + current.blocks[i + 1:])
            if trial.blocks and check_case(trial, spec, target).cause == cause:
                current, changed = trial, True
                break
    return current
