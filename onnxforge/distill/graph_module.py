"""Run an ONNX graph in torch, with its weights as trainable parameters.

Distillation needs gradients through the student, but a pruned student exists only as ONNX, and the
original torch module is often not at hand (a model downloaded as ``.onnx``). :func:`graph_module`
builds a ``torch.nn.Module`` that interprets the graph node by node with ``torch.nn.functional``: the float initializers that a
``Conv`` / ``ConvTranspose`` / ``Gemm`` / ``MatMul`` reads as its weight or bias, and the scale and
bias of a ``BatchNormalization``, become ``nn.Parameter`` s; every other initializer and ``Constant``
is a fixed buffer. ``BatchNormalization`` always runs in inference form
(``g * (x - mean) / sqrt(var + eps) + b`` with the model's running statistics), so fine-tuning on a
few hundred unlabeled inputs moves only weights, never the statistics.

:func:`write_back` copies the trained parameters into a copy of the ONNX model (same graph, same
names, new initializer values). :func:`check` compares the module with onnxruntime
(``ORT_DISABLE_ALL``) and raises :class:`~onnxforge.errors.UnsupportedModelError` when they differ,
so a mistranslated op can never be trained on silently. An op outside :data:`SUPPORTED` raises the
same error naming the node.

A quantized (QDQ) graph runs with its rounding simulated and its int8 weights trained on their grid
(:mod:`onnxforge.distill.fake_quant`); ``write_back`` rounds them back to integers on the same scales.
Intermediate values are dropped after their last reader, so evaluation on large inputs holds only the
live activations.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxforge.distill import fake_quant
from onnxforge.errors import UnsupportedModelError
from onnxforge.ir.graph import const_value
from onnxforge.ir.io import deep_copy

logger = logging.getLogger(__name__)

__all__ = ["SUPPORTED", "check", "graph_module", "write_back"]

_TRAINABLE_INPUTS = {"Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (1, 2), "MatMul": (1,),
                     "BatchNormalization": (1, 2)}


def _attr(node: ir.Node, name: str, default: Any = None) -> Any:
    a = node.attributes.get(name)
    return default if a is None else a.value


def _ints(x) -> list[int]:
    return [int(v) for v in x.reshape(-1).tolist()]


def _torch():
    from onnxforge.torch_export import import_torch

    return import_torch()


def _tensor_dtype(onnx_type: int, torch):
    dt = ir.DataType(onnx_type)
    return {ir.DataType.FLOAT: torch.float32, ir.DataType.DOUBLE: torch.float64, ir.DataType.INT64: torch.int64,
            ir.DataType.INT32: torch.int32, ir.DataType.BOOL: torch.bool, ir.DataType.FLOAT16: torch.float16,
            ir.DataType.UINT8: torch.uint8, ir.DataType.INT8: torch.int8}[dt]


def _conv_padding(node: ir.Node, x, rank: int, torch):
    """Returns (x padded if the pads are asymmetric, the symmetric padding to give conv/pool)."""
    auto_pad = _attr(node, "auto_pad", "NOTSET")
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    if auto_pad not in ("NOTSET", "VALID"):
        raise UnsupportedModelError(f"distill: {node.op_type} {node.name!r}: auto_pad={auto_pad} is not supported")
    pads = list(_attr(node, "pads", [0] * (2 * rank))) if auto_pad == "NOTSET" else [0] * (2 * rank)
    begin, end = pads[:rank], pads[rank:]
    if begin == end:
        return x, tuple(begin)
    # F.pad takes (last dim begin, last dim end, ..., first spatial begin, end).
    flat = []
    for b, e in zip(reversed(begin), reversed(end)):
        flat += [b, e]
    return torch.nn.functional.pad(x, flat), (0,) * rank


def _build_class(torch):
    nn, F = torch.nn, torch.nn.functional

    class _GraphModule(nn.Module):
        def __init__(self, model: ir.Model, train_batchnorm: bool = True):
            super().__init__()
            graph = model.graph
            self.model = model
            self.input_names = [v.name for v in graph.inputs if v.name not in graph.initializers]
            self.output_names = [v.name for v in graph.outputs]
            self.nodes = list(graph)
            trainable: set[str] = set()
            for node in self.nodes:
                if node.op_type not in SUPPORTED:
                    raise UnsupportedModelError(
                        f"distill: op {node.op_type} (node {node.name!r}) is not supported by the torch graph "
                        f"runner; supported: {', '.join(sorted(SUPPORTED))}")
                if node.domain not in ("", "ai.onnx"):
                    raise UnsupportedModelError(f"distill: node {node.name!r} is in domain {node.domain!r}")
                for i in _TRAINABLE_INPUTS.get(node.op_type, ()):
                    if node.op_type == "BatchNormalization" and not train_batchnorm:
                        continue
                    if i < len(node.inputs) and node.inputs[i] is not None:
                        v = node.inputs[i]
                        if graph.initializers.get(v.name) is v and v.const_value is not None:
                            trainable.add(v.name)
            # A quantized weight or bias (a DequantizeLinear reading a constant integer tensor, feeding a
            # trainable input) is trained as a float parameter on its int8 grid (see .fake_quant).
            self._fake_quant: dict[int, str] = {}   # id(DequantizeLinear) -> its integer initializer
            self.quantized: dict[str, ir.Node] = {}  # integer initializer -> the DequantizeLinear reading it
            for node in self.nodes:
                if node.op_type != "DequantizeLinear" or node.inputs[0] is None:
                    continue
                v = node.inputs[0]
                if graph.initializers.get(v.name) is not v or v.const_value is None:
                    continue
                feeds_trainable = any(
                    use.node.op_type in _TRAINABLE_INPUTS and use.idx in _TRAINABLE_INPUTS[use.node.op_type]
                    for use in node.outputs[0].uses())
                if feeds_trainable and v.name not in self.quantized:
                    self._fake_quant[id(node)] = v.name
                    self.quantized[v.name] = node
            self.param_names: dict[str, str] = {}   # initializer name -> attribute key
            self.params = nn.ParameterDict()
            self._consts: dict[str, Any] = {}
            for k, (name, v) in enumerate(graph.initializers.items()):
                arr = v.const_value.numpy() if v.const_value is not None else None
                if arr is None:
                    continue
                t = torch.from_numpy(np.array(arr, copy=True))
                if name in trainable and t.is_floating_point():
                    key = f"p{k}"
                    self.params[key] = nn.Parameter(t)
                    self.param_names[name] = key
                elif name in self.quantized:
                    key = f"p{k}"
                    dq = self.quantized[name]
                    args = [t] + [_const_arg(i, torch) for i in dq.inputs[1:]]
                    self.params[key] = nn.Parameter(fake_quant.dequantize(dq, args, torch, F).detach().clone())
                    self.param_names[name] = key
                else:
                    self._consts[name] = t
            # Conv whose only reader is an inference BatchNormalization: folded at run time
            # (W' = W * g / sqrt(v + eps), b' = (b - m) * g / sqrt(v + eps) + beta), which is the same
            # function and the same gradients for W, b, g and beta, at the cost of one conv.
            self._conv_bn: dict[int, ir.Node] = {}
            self._conv_of: dict[int, ir.Node] = {}
            self._folded_bn: set[int] = set()
            outputs = set(self.output_names)
            for node in self.nodes:
                if node.op_type != "Conv" or len(node.outputs[0].consumers()) != 1:
                    continue
                bn = node.outputs[0].consumers()[0]
                if (bn.op_type == "BatchNormalization" and bn.inputs[0] is node.outputs[0]
                        and node.outputs[0].name not in outputs and len(bn.outputs) == 1
                        and not int(_attr(bn, "training_mode", 0))):
                    self._conv_bn[id(node)] = bn
                    self._conv_of[id(bn)] = node
                    self._folded_bn.add(id(bn))
            # value name -> index of the last node reading it: forward drops it there (activations of
            # large inputs would otherwise all stay alive until the end of the pass)
            last: dict[str, int] = {}
            for k, node in enumerate(self.nodes):
                for v in node.inputs:
                    if v is not None and v.name:
                        last[v.name] = k
            keep = set(self.output_names) | set(self.input_names) | set(graph.initializers)
            self._free_after: dict[int, list[str]] = {}
            for name, k in last.items():
                if name not in keep:
                    self._free_after.setdefault(k, []).append(name)
            for node in self.nodes:
                if node.op_type == "Constant":
                    arr = const_value(node.outputs[0])
                    if arr is None:
                        raise UnsupportedModelError(f"distill: Constant {node.name!r} has no tensor value")
                    self._consts[node.outputs[0].name] = torch.from_numpy(np.array(arr, copy=True))

        def forward(self, *inputs, extra: Sequence[str] = ()):
            env: dict[str, Any] = dict(self._consts)
            for name, key in self.param_names.items():
                env[name] = self.params[key]
            for name, x in zip(self.input_names, inputs):
                env[name] = x
            wanted = set(extra)
            for k, node in enumerate(self.nodes):
                if node.op_type == "Constant" or id(node) in self._folded_bn:
                    continue
                args = [env[v.name] if v is not None and v.name else None for v in node.inputs]
                bn = self._conv_bn.get(id(node))
                if id(node) in self._fake_quant:  # a trained weight, read on its int8 grid
                    out = fake_quant.fake_quantize(node, args[0], args[1], args[2] if len(args) > 2 else None, torch)
                elif bn is not None:  # Conv -> BatchNormalization: one conv with the BN folded in
                    node, args = bn, _fold_bn(node, args, bn, [env[v.name] for v in bn.inputs[1:5]])
                    out = _conv(self._conv_of[id(bn)], args, torch, F)
                else:
                    out = _OPS[node.op_type](node, args, torch, F)
                outs = out if isinstance(out, tuple) else (out,)
                for v, o in zip(node.outputs, outs):
                    if v is not None and v.name:
                        env[v.name] = o
                for name in self._free_after.get(k, ()):
                    if name not in wanted:
                        env.pop(name, None)
            result = [env[n] for n in self.output_names]
            if extra:
                missing = [n for n in extra if n not in env]
                if missing:  # e.g. a Conv output that was folded with its BatchNorm
                    raise UnsupportedModelError(f"distill: value(s) {missing} are not computed by the runner")
                return result, [env[n] for n in extra]
            return result

    return _GraphModule


_CLASS = None


def graph_module(model: ir.Model, train_batchnorm: bool = True):
    """A ``torch.nn.Module`` running ``model`` (built on first use: torch is an optional dependency).

    ``module(*inputs)`` returns the graph outputs in order; ``module(*inputs, extra=names)`` returns
    ``(outputs, [values named in names])``. ``module.param_names`` maps initializer names to keys of
    ``module.params``."""
    global _CLASS
    torch = _torch()
    if _CLASS is None:
        _CLASS = _build_class(torch)
    return _CLASS(model, train_batchnorm)


def write_back(module, model: ir.Model) -> ir.Model:
    """A copy of ``model`` whose trainable initializers hold ``module``'s current values (quantized
    weights rounded back onto their grid: same scales, new integers)."""
    copy = deep_copy(model)
    for name, key in module.param_names.items():
        v = copy.graph.initializers[name]
        arr = module.params[key].detach().cpu().numpy()
        old = v.const_value.numpy()
        dq = module.quantized.get(name)
        if dq is not None:
            scale = const_value(dq.inputs[1])
            zp = const_value(dq.inputs[2]) if len(dq.inputs) > 2 and dq.inputs[2] is not None else None
            arr = fake_quant.quantized_values(dq, arr, scale, zp, old.dtype)
        v.const_value = ir.Tensor(np.ascontiguousarray(arr.astype(old.dtype, copy=False)), name=name)
    return copy


def check(module, model: ir.Model, feeds: Mapping[str, np.ndarray], rtol: float = 1e-4,
          quantized_rtol: float = 0.1) -> float:
    """Max |torch - onnxruntime| over the outputs (by name), relative to the output's magnitude;
    raises :class:`UnsupportedModelError` above ``rtol``.

    A graph with ``QuantizeLinear`` is compared by its *mean* error relative to the output's mean
    magnitude, bound ``quantized_rtol`` or twice the same error of onnxruntime's own integer kernels
    (``ORT_ENABLE_ALL``) against its float simulation, whichever is larger: torch and onnxruntime sum a
    convolution in different orders, so a few values land on the other side of a rounding boundary
    (one integer in 500,000 at the first quantized layer of a YOLOX), and each such step moves
    everything downstream of it — by as much as the int8 kernels' own rounding moves it; a
    mistranslated op is off by the order of the output itself."""
    from onnxforge.runtime.session import make_session

    torch = _torch()
    quantized = any(n.op_type == "QuantizeLinear" for n in model.graph)
    expected = make_session(model, ("cpu",), optimize="disable").run(dict(feeds))
    kernels = make_session(model, ("cpu",), optimize="all").run(dict(feeds)) if quantized else {}
    with torch.no_grad():
        got = module(*[torch.from_numpy(np.asarray(feeds[n])) for n in module.input_names])

    def mean_rel(err, ref):
        return float(err.mean()) / (1e-12 + float(np.abs(ref).mean()))

    worst = 0.0
    for name, t in zip(module.output_names, got):
        ref = np.asarray(expected[name])
        if not ref.size:
            continue
        err = np.abs(t.numpy().astype(np.float64) - ref)
        if quantized:
            rel = mean_rel(err, ref)
            bound = max(quantized_rtol, 2.0 * mean_rel(np.abs(np.asarray(kernels[name], np.float64) - ref), ref))
        else:
            rel, bound = float(err.max()) / (1.0 + float(np.max(np.abs(ref)))), rtol
        if not rel <= bound:
            raise UnsupportedModelError(
                f"distill: the torch graph runner differs from onnxruntime on output {name!r} "
                f"(max abs {float(err.max()):.3g}, relative {rel:.3g}); not training on a mistranslated graph")
        worst = max(worst, rel)
    return worst


# --------------------------------------------------------------------------------------- ops


def _const_arg(v: ir.Value | None, torch):
    """A constant input (initializer or Constant) as a tensor, for set-up before the first forward."""
    if v is None:
        return None
    arr = const_value(v)
    if arr is None:
        raise UnsupportedModelError(f"distill: {v.name!r} (scale or zero point) is not a constant")
    return torch.from_numpy(np.array(arr, copy=True))


def _str_attr(node, name: str, default: str) -> str:
    value = _attr(node, name, default)
    return value.decode() if isinstance(value, bytes) else value


def _resize(node, a, torch, F):
    """Resize where ``F.interpolate`` computes exactly what onnxruntime does: nearest at integer scales
    (asymmetric/floor, half_pixel), bilinear (half_pixel, align_corners); anything else is refused
    rather than approximated."""
    x = a[0]
    mode = _str_attr(node, "mode", "nearest")
    ctm = _str_attr(node, "coordinate_transformation_mode", "half_pixel")
    sizes = a[3] if len(a) > 3 and a[3] is not None and a[3].numel() else None
    scales = a[2] if len(a) > 2 and a[2] is not None and a[2].numel() else None
    if sizes is not None:
        size = _ints(sizes.cpu().numpy())
    elif scales is not None:
        sc = scales.cpu().numpy().astype(np.float64)
        size = [int(np.floor(d * s)) for d, s in zip(x.shape, sc)]
    else:
        raise UnsupportedModelError(f"distill: Resize {node.name!r} has neither scales nor sizes")
    if list(size[:2]) != list(x.shape[:2]):
        raise UnsupportedModelError(f"distill: Resize {node.name!r} resizes the batch or channel axis")
    spatial = size[2:]
    if mode == "nearest":
        integer = all(o % i == 0 for o, i in zip(spatial, x.shape[2:]))
        nearest = _str_attr(node, "nearest_mode", "round_prefer_floor")
        # at integer scales, out[i] = in[floor(i / s)] for asymmetric/floor, and for half_pixel with
        # either rounding ((i + 0.5) / s - 0.5 is never half way between two integers there)
        same = (ctm == "asymmetric" and nearest == "floor") or (
            ctm in ("half_pixel", "pytorch_half_pixel") and nearest in ("round_prefer_floor", "round_prefer_ceil"))
        if not (integer and same):
            raise UnsupportedModelError(f"distill: Resize {node.name!r} nearest with {ctm}/{nearest} "
                                        f"at scales {spatial} / {list(x.shape[2:])} is not supported")
        return F.interpolate(x, size=spatial, mode="nearest")
    if mode == "linear" and ctm in ("half_pixel", "pytorch_half_pixel", "align_corners") and x.dim() == 4:
        return F.interpolate(x, size=spatial, mode="bilinear", align_corners=ctm == "align_corners")
    raise UnsupportedModelError(f"distill: Resize {node.name!r} mode={mode} coordinate mode {ctm} is not supported")


def _conv(node, a, torch, F):
    x, w = a[0], a[1]
    b = a[2] if len(a) > 2 else None
    rank = w.dim() - 2
    x, pad = _conv_padding(node, x, rank, torch)
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[rank]
    return fn(x, w, b, stride=tuple(_attr(node, "strides", [1] * rank)), padding=pad,
              dilation=tuple(_attr(node, "dilations", [1] * rank)), groups=int(_attr(node, "group", 1)))


def _fold_bn(conv: ir.Node, conv_args: list, bn: ir.Node, bn_args: list) -> list:
    """Conv arguments with the following BatchNormalization folded in (see ``forward``)."""
    x, w = conv_args[0], conv_args[1]
    b = conv_args[2] if len(conv_args) > 2 else None
    g, beta, mean, var = bn_args
    inv = g / (var + float(_attr(bn, "epsilon", 1e-5))).sqrt()
    w = w * inv.reshape([-1] + [1] * (w.dim() - 1))
    b = (beta - mean * inv) if b is None else ((b - mean) * inv + beta)
    return [x, w, b]


def _conv_transpose(node, a, torch, F):
    x, w = a[0], a[1]
    b = a[2] if len(a) > 2 else None
    rank = w.dim() - 2
    if _attr(node, "output_shape") is not None:
        raise UnsupportedModelError(f"distill: ConvTranspose {node.name!r} with output_shape is not supported")
    pads = list(_attr(node, "pads", [0] * (2 * rank)))
    if pads[:rank] != pads[rank:]:
        raise UnsupportedModelError(f"distill: ConvTranspose {node.name!r} with asymmetric pads is not supported")
    fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[rank]
    return fn(x, w, b, stride=tuple(_attr(node, "strides", [1] * rank)), padding=tuple(pads[:rank]),
              output_padding=tuple(_attr(node, "output_padding", [0] * rank)), groups=int(_attr(node, "group", 1)),
              dilation=tuple(_attr(node, "dilations", [1] * rank)))


def _batchnorm(node, a, torch, F):
    if int(_attr(node, "training_mode", 0)):
        raise UnsupportedModelError(f"distill: BatchNormalization {node.name!r} in training mode")
    return F.batch_norm(a[0], a[3], a[4], a[1], a[2], training=False, eps=float(_attr(node, "epsilon", 1e-5)))


def _clip(node, a, torch, F):
    lo = a[1] if len(a) > 1 and a[1] is not None else _attr(node, "min")
    hi = a[2] if len(a) > 2 and a[2] is not None else _attr(node, "max")
    lo = float(lo) if lo is not None else None
    hi = float(hi) if hi is not None else None
    if lo is not None and hi is not None:
        return F.hardtanh(a[0], lo, hi)  # one fused backward (clamp's costs four elementwise passes)
    return torch.clamp(a[0], lo, hi)


def _gemm(node, a, torch, F):
    x, w = a[0], a[1]
    if int(_attr(node, "transA", 0)):
        x = x.t()
    if int(_attr(node, "transB", 0)):
        w = w.t()
    y = float(_attr(node, "alpha", 1.0)) * (x @ w)
    if len(a) > 2 and a[2] is not None:
        y = y + float(_attr(node, "beta", 1.0)) * a[2]
    return y


def _pool(kind):
    def run(node, a, torch, F):
        x = a[0]
        kernel = list(_attr(node, "kernel_shape"))
        rank = len(kernel)
        strides = list(_attr(node, "strides", [1] * rank))
        ceil = bool(_attr(node, "ceil_mode", 0))
        pads = list(_attr(node, "pads", [0] * (2 * rank)))
        if pads[:rank] != pads[rank:]:
            x, pad = _conv_padding(node, x, rank, torch)
            if kind == "max" and any(pads):  # padded with zeros, not -inf: refuse rather than be wrong
                raise UnsupportedModelError(f"distill: MaxPool {node.name!r} with asymmetric pads")
        else:
            pad = tuple(pads[:rank])
        if kind == "max":
            fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[rank]
            return fn(x, kernel, strides, pad, dilation=tuple(_attr(node, "dilations", [1] * rank)), ceil_mode=ceil)
        fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[rank]
        return fn(x, kernel, strides, pad, ceil_mode=ceil,
                  count_include_pad=bool(_attr(node, "count_include_pad", 0)))
    return run


def _axes_of(node, a, idx=1):
    if len(a) > idx and a[idx] is not None:
        return _ints(a[idx].cpu().numpy())
    ax = _attr(node, "axes")
    return None if ax is None else [int(v) for v in ax]


def _reduce(fn_name):
    def run(node, a, torch, F):
        x = a[0]
        axes = _axes_of(node, a)
        keep = bool(_attr(node, "keepdims", 1))
        if not axes:
            if int(_attr(node, "noop_with_empty_axes", 0)):
                return x
            axes = list(range(x.dim()))
        return getattr(torch, fn_name)(x, dim=tuple(axes), keepdim=keep)
    return run


def _reshape(node, a, torch, F):
    x = a[0]
    shape = _ints(a[1].cpu().numpy())
    if not int(_attr(node, "allowzero", 0)):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def _flatten(node, a, torch, F):
    x = a[0]
    axis = int(_attr(node, "axis", 1))
    axis = axis + x.dim() if axis < 0 else axis
    lead = int(np.prod(x.shape[:axis])) if axis else 1
    return x.reshape(lead, -1)


def _shape(node, a, torch, F):
    dims = list(a[0].shape)
    start = int(_attr(node, "start", 0))
    end = _attr(node, "end")
    dims = dims[start:] if end is None else dims[start:int(end)]
    return torch.tensor(dims, dtype=torch.int64)


def _gather(node, a, torch, F):
    x, idx = a[0], a[1]
    axis = int(_attr(node, "axis", 0))
    axis = axis + x.dim() if axis < 0 else axis
    idx = idx.long()
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    out = torch.index_select(x, axis, idx.reshape(-1))
    return out.reshape(list(x.shape[:axis]) + list(idx.shape) + list(x.shape[axis + 1:]))


def _slice(node, a, torch, F):
    x = a[0]
    starts, ends = _ints(a[1].cpu().numpy()), _ints(a[2].cpu().numpy())
    axes = _ints(a[3].cpu().numpy()) if len(a) > 3 and a[3] is not None else list(range(len(starts)))
    steps = _ints(a[4].cpu().numpy()) if len(a) > 4 and a[4] is not None else [1] * len(starts)
    idx = [slice(None)] * x.dim()
    for s, e, ax, st in zip(starts, ends, axes, steps):
        if st <= 0:
            raise UnsupportedModelError(f"distill: Slice {node.name!r} with step {st}")
        n = x.shape[ax]
        s = max(0, min(n, s + n if s < 0 else s))
        e = max(0, min(n, e + n if e < 0 else e))
        idx[ax] = slice(s, e, st)
    return x[tuple(idx)]


def _squeeze(node, a, torch, F):
    axes = _axes_of(node, a)
    x = a[0]
    if axes is None:
        return x.squeeze()
    for ax in sorted((ax + x.dim() if ax < 0 else ax for ax in axes), reverse=True):
        x = x.squeeze(ax)
    return x


def _unsqueeze(node, a, torch, F):
    axes = _axes_of(node, a)
    x = a[0]
    out_rank = x.dim() + len(axes)
    for ax in sorted(ax + out_rank if ax < 0 else ax for ax in axes):
        x = x.unsqueeze(ax)
    return x


def _concat(node, a, torch, F):
    return torch.cat([t for t in a if t is not None], dim=int(_attr(node, "axis")))


def _split(node, a, torch, F):
    x = a[0]
    axis = int(_attr(node, "axis", 0))
    if len(a) > 1 and a[1] is not None:
        sizes = _ints(a[1].cpu().numpy())
    elif _attr(node, "split") is not None:
        sizes = [int(v) for v in _attr(node, "split")]
    else:  # equal parts (num_outputs, or one per output); the last part may be smaller
        parts = int(_attr(node, "num_outputs", len(node.outputs)))
        step = -(-x.shape[axis] // parts)
        sizes = [min(step, x.shape[axis] - i * step) for i in range(parts)]
    return tuple(torch.split(x, sizes, dim=axis))


def _softmax(node, a, torch, F):
    return torch.softmax(a[0], dim=int(_attr(node, "axis", -1)))


def _cast(node, a, torch, F):
    return a[0].to(_tensor_dtype(int(_attr(node, "to")), torch))


def _binary(fn):
    return lambda node, a, torch, F: fn(a[0], a[1])


_OPS = {
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "BatchNormalization": _batchnorm,
    "Relu": lambda node, a, torch, F: F.relu(a[0]),
    "LeakyRelu": lambda node, a, torch, F: F.leaky_relu(a[0], float(_attr(node, "alpha", 0.01))),
    "Sigmoid": lambda node, a, torch, F: torch.sigmoid(a[0]),
    "Tanh": lambda node, a, torch, F: torch.tanh(a[0]),
    "HardSigmoid": lambda node, a, torch, F: torch.clamp(
        float(_attr(node, "alpha", 0.2)) * a[0] + float(_attr(node, "beta", 0.5)), 0.0, 1.0),
    "HardSwish": lambda node, a, torch, F: a[0] * torch.clamp(a[0] / 6.0 + 0.5, 0.0, 1.0),
    "Clip": _clip,
    "Identity": lambda node, a, torch, F: a[0],
    "Dropout": lambda node, a, torch, F: a[0],
    "Erf": lambda node, a, torch, F: torch.erf(a[0]),
    "Sqrt": lambda node, a, torch, F: torch.sqrt(a[0]),
    "Exp": lambda node, a, torch, F: torch.exp(a[0]),
    "Add": _binary(lambda x, y: x + y),
    "Sub": _binary(lambda x, y: x - y),
    "Mul": _binary(lambda x, y: x * y),
    "Div": _binary(lambda x, y: x / y),
    "Pow": _binary(lambda x, y: x ** y),
    "MatMul": _binary(lambda x, y: x @ y),
    "Gemm": _gemm,
    "GlobalAveragePool": lambda node, a, torch, F: a[0].mean(dim=tuple(range(2, a[0].dim())), keepdim=True),
    "GlobalMaxPool": lambda node, a, torch, F: a[0].amax(dim=tuple(range(2, a[0].dim())), keepdim=True),
    "MaxPool": _pool("max"),
    "AveragePool": _pool("avg"),
    "ReduceMean": _reduce("mean"),
    "ReduceSum": _reduce("sum"),
    "Reshape": _reshape,
    "Flatten": _flatten,
    "Shape": _shape,
    "Gather": _gather,
    "Slice": _slice,
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Concat": _concat,
    "Transpose": lambda node, a, torch, F: a[0].permute(*[int(p) for p in _attr(node, "perm",
                                                                                 list(range(a[0].dim()))[::-1])]),
    "Softmax": _softmax,
    "Split": _split,
    "Cast": _cast,
    "Resize": _resize,
    "QuantizeLinear": fake_quant.quantize,
    "DequantizeLinear": fake_quant.dequantize,
    "Constant": None,
}
SUPPORTED = frozenset(_OPS)
"""Op types the graph module runs (default domain)."""
