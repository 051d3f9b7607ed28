"""Rebuild a torch module at the widths of a pruned ONNX student, with the student's weights.

The dynamo exporter keeps state-dict keys as initializer names (``block1.0.weight``), and our passes
keep those names when they shrink a tensor. The mapping is read from the student's graph structure,
not from names alone:

* ``Conv`` / ``ConvTranspose`` / ``Gemm``: input 1 named ``P.weight`` -> module ``P``; its input 2
  (whatever its name, e.g. ``P.weight_bias`` after ``fold-batchnorm``) -> ``P.bias``;
* ``BatchNormalization``: inputs 1..4 named ``B.weight`` ... -> ``B.weight``, ``B.bias``,
  ``B.running_mean``, ``B.running_var``;
* any other initializer whose name is a state-dict key -> that key.

A BatchNorm of the teacher that is absent from the student was folded into its Conv (``O1``): the
copy gets that Conv and BatchNorm fused (``torch.nn.utils.fusion.fuse_conv_bn_eval``, the same math as
``fold-batchnorm``) and the BatchNorm becomes ``Identity`` before the student's values are loaded.
Which Conv a BatchNorm follows is read from an export of the teacher (Conv output -> BN input).

Every assigned parameter replaces the old one (shapes may shrink) and the layer's size attributes
(``in_channels``, ``out_features``, ``num_features``, ``groups`` of depthwise convs) are updated.
:func:`rebuild` then checks the result: the rebuilt module run in torch must give the student's
outputs in onnxruntime (``ORT_DISABLE_ALL``) within ``atol``; otherwise the mapping is wrong and it
raises :class:`~onnxforge.errors.UnsupportedModelError` instead of training the wrong network.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxforge.errors import UnsupportedModelError
from onnxforge.ir.graph import const_value

logger = logging.getLogger(__name__)

__all__ = ["RebuildResult", "rebuild", "student_weights"]

_QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "MatMulNBits", "QLinearConv", "QLinearMatMul",
                  "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger"}
_BN_KEYS = ("weight", "bias", "running_mean", "running_var")


@dataclass
class RebuildResult:
    module: Any
    assigned: list[str] = field(default_factory=list)   # state-dict keys loaded from the student
    resized: list[str] = field(default_factory=list)    # modules whose shapes changed
    fused_bn: list[str] = field(default_factory=list)   # BatchNorms fused into their Conv (student had O1)
    kept: list[str] = field(default_factory=list)       # teacher parameters with no student value
    max_abs_diff: float = 0.0                           # torch vs onnxruntime on the check inputs


def student_weights(student: ir.Model) -> dict[str, np.ndarray]:
    """``{state-dict key: array}`` read from the student's graph (see the module docstring)."""
    bad = sorted({n.op_type for n in student.graph if n.op_type in _QUANTIZED_OPS})
    if bad:
        raise UnsupportedModelError(
            f"distill: the student has quantized ops ({', '.join(bad)}); distill the float (pruned) model "
            f"and quantize afterwards (--then \"quantize-int8\"), or train the int8 model itself with the "
            f"distill pass (--passes \"quantize-int8,distill(loss=mse)\")"
        )
    out: dict[str, np.ndarray] = {}
    for node in student.graph:
        if node.op_type in ("Conv", "ConvTranspose", "Gemm") and len(node.inputs) > 1 and node.inputs[1] is not None:
            w = node.inputs[1]
            if w.name and w.name.endswith(".weight") and (arr := const_value(w)) is not None:
                prefix = w.name[: -len(".weight")]
                out[w.name] = arr
                if len(node.inputs) > 2 and node.inputs[2] is not None and (b := const_value(node.inputs[2])) is not None:
                    out[prefix + ".bias"] = b
        elif node.op_type == "BatchNormalization":
            scale = node.inputs[1]
            if scale is not None and scale.name and scale.name.endswith(".weight"):
                prefix = scale.name[: -len(".weight")]
                for key, value in zip(_BN_KEYS, node.inputs[1:5]):
                    if value is not None and (arr := const_value(value)) is not None:
                        out[f"{prefix}.{key}"] = arr
    for name, value in student.graph.initializers.items():
        if name not in out and value.const_value is not None:
            out[name] = value.const_value.numpy()
    return out


def _conv_bn_pairs(teacher_ir: ir.Model) -> dict[str, str]:
    """``{batchnorm module name: conv module name}`` from an export of the teacher."""
    pairs = {}
    for node in teacher_ir.graph:
        if node.op_type != "BatchNormalization":
            continue
        producer = node.inputs[0].producer() if node.inputs[0] is not None else None
        scale = node.inputs[1]
        if producer is None or producer.op_type not in ("Conv", "ConvTranspose") or scale is None:
            continue
        w = producer.inputs[1]
        if w is not None and w.name.endswith(".weight") and scale.name.endswith(".weight"):
            pairs[scale.name[: -len(".weight")]] = w.name[: -len(".weight")]
    return pairs


def _set_submodule(root, name: str, new) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _resize_attrs(module, torch) -> None:
    nn = torch.nn
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        out_c, in_per_group = module.weight.shape[:2]
        if module.groups > 1 and module.groups == module.in_channels == module.out_channels:
            module.groups = out_c  # depthwise stays depthwise
        module.out_channels, module.in_channels = out_c, in_per_group * module.groups
    elif isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        in_c, out_per_group = module.weight.shape[:2]
        module.in_channels, module.out_channels = in_c, out_per_group * module.groups
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        module.num_features = module.weight.shape[0] if module.weight is not None else module.running_mean.shape[0]
    elif isinstance(module, nn.LayerNorm) and module.weight is not None:
        module.normalized_shape = tuple(module.weight.shape)


def rebuild(teacher, student: ir.Model, example_inputs: tuple, *, teacher_ir: ir.Model | None = None,
            check: bool = True, atol: float = 1e-4) -> RebuildResult:
    """A deep copy of ``teacher`` reshaped to ``student`` and loaded with its weights (see module doc).

    ``example_inputs`` (a tuple of tensors) is used for the check; ``teacher_ir`` (the teacher's export)
    is only needed when BatchNorms were folded and is exported here if not given.
    """
    from onnxforge.torch_export import import_torch

    torch = import_torch()
    weights = student_weights(student)
    module = copy.deepcopy(teacher).eval()
    result = RebuildResult(module=module)
    state = module.state_dict()
    bn_modules = {name: m for name, m in module.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    folded = [name for name in bn_modules if f"{name}.weight" in state and f"{name}.running_mean" not in weights]
    if folded:
        if teacher_ir is None:
            from onnxforge.torch_export import export

            teacher_ir = export(teacher, example_inputs)
        pairs = _conv_bn_pairs(teacher_ir)
        for bn_name in folded:
            conv_name = pairs.get(bn_name)
            if conv_name is None or f"{conv_name}.weight" not in weights:
                raise UnsupportedModelError(
                    f"distill: BatchNorm {bn_name!r} is not in the student and no Conv it could have been folded "
                    f"into was found; export the student from the same module without renaming"
                )
            fused = torch.nn.utils.fusion.fuse_conv_bn_eval(module.get_submodule(conv_name), bn_modules[bn_name])
            _set_submodule(module, conv_name, fused)
            _set_submodule(module, bn_name, torch.nn.Identity())
            result.fused_bn.append(bn_name)
        state = module.state_dict()

    touched = set()
    for key, tensor in state.items():
        if key not in weights:
            if not key.endswith("num_batches_tracked"):
                result.kept.append(key)
            continue
        mod_name, _, attr = key.rpartition(".")
        owner = module.get_submodule(mod_name) if mod_name else module
        value = torch.from_numpy(np.array(weights[key], copy=True)).to(tensor.dtype)
        if isinstance(getattr(owner, attr), torch.nn.Parameter):
            setattr(owner, attr, torch.nn.Parameter(value))  # trainable, whatever the teacher's flags
        else:
            owner.register_buffer(attr, value)
        if tuple(value.shape) != tuple(tensor.shape):
            touched.add(mod_name)
        result.assigned.append(key)
    for name in sorted(touched):
        _resize_attrs(module.get_submodule(name) if name else module, torch)
    result.resized = sorted(touched)
    logger.info("distill: rebuilt %d tensors, resized %d modules, fused %d BatchNorms",
                len(result.assigned), len(result.resized), len(result.fused_bn))
    if check:
        result.max_abs_diff = _check(module, student, example_inputs, atol, torch)
    return result


def _check(module, student: ir.Model, example_inputs: tuple, atol: float, torch) -> float:
    """Max |torch(rebuilt) - onnxruntime(student)|; the module's outputs are in the order of the graph outputs."""
    from onnxforge.runtime.session import make_session

    feeds = {v.name: t.detach().cpu().numpy() for v, t in zip(student.graph.inputs, example_inputs)}
    expected = make_session(student, ("cpu",), optimize="disable").run(feeds)
    with torch.no_grad():
        try:
            got = module(*example_inputs)
        except RuntimeError as exc:
            raise UnsupportedModelError(f"distill: the rebuilt module does not run at the student's widths: {exc}") from None
    got = [got] if isinstance(got, torch.Tensor) else list(got)
    names = [v.name for v in student.graph.outputs]
    if len(got) != len(names):
        raise UnsupportedModelError(f"distill: the module returns {len(got)} outputs, the student {len(names)}")
    worst = 0.0
    for name, tensor in zip(names, got):
        ref = np.asarray(expected[name])
        diff = float(np.max(np.abs(tensor.numpy() - ref))) if ref.size else 0.0
        if not diff <= atol * (1.0 + float(np.max(np.abs(ref)))):
            raise UnsupportedModelError(
                f"distill: the rebuilt module differs from the student on output {name!r} (max abs {diff:.3g}); "
                f"the student's initializers do not map onto this module's state dict"
            )
        worst = max(worst, diff)
    return worst
