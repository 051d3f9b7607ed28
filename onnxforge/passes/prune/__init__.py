"""Pruning passes: ``prune-channels`` (structured, with dependency groups), ``reconstruct``
(gradient-free layer-wise re-fit to the unpruned teacher), ``prune-magnitude`` and ``sparsity-2-4``
(unstructured / 2:4 semi-structured zeros), ``distill`` (knowledge-distillation fine-tuning to the
teacher on unlabeled data). Importing this package registers them."""

from onnxforge.passes.prune import channels, distill, reconstruct, sparsity  # noqa: F401  (register the passes)

__all__ = ["channels", "distill", "reconstruct", "sparsity"]
