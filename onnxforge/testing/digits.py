"""The demo's data and model: scikit-learn's bundled 8x8 digits (no download) and a small CNN.

    >>> x_train, y_train, x_test, y_test = load_digits_split()   # (1437|360, 1, 8, 8) float32, int64
    >>> module = train_digits_cnn(seed=0)                          # zoo's digits_cnn, trained (~2 s)
    >>> accuracy(model, x_test, y_test)                            # top-1 in onnxruntime, 0..1

Pixels (0..16) are scaled to [-1, 1]: ``x / 8 - 1``. The split is stratified and fixed (360 test
samples, ``random_state=0``). Training is deterministic for a given seed (one torch thread).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from onnxforge.errors import MissingDependencyError

__all__ = ["N_TEST", "accuracy", "load_digits_split", "predict", "train_digits_cnn"]

N_TEST = 360


def load_digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, y_train, x_test, y_test)``: float32 ``(N, 1, 8, 8)`` in [-1, 1] and int64 labels;
    1437 train and 360 test samples, stratified, always the same."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:
        raise MissingDependencyError("the digits data needs scikit-learn: pip install scikit-learn") from exc
    data = load_digits()
    x = (data.images.astype(np.float32) / 8.0 - 1.0).reshape(-1, 1, 8, 8)
    y = data.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=N_TEST, random_state=0, stratify=y)
    return (
        np.ascontiguousarray(x_train),
        np.ascontiguousarray(y_train),
        np.ascontiguousarray(x_test),
        np.ascontiguousarray(y_test),
    )


def train_digits_cnn(seed: int = 0, epochs: int = 8, lr: float = 3e-3, batch: int = 32, threads: int = 1):
    """Train the zoo's ``digits_cnn`` on the digits training split; returns the module in eval mode.

    Adam with a cosine learning-rate schedule and light weight decay. Deterministic for a given
    ``seed`` and ``threads`` (one thread by default: multi-threaded reductions can reorder sums).
    About 97-99% test accuracy in a few seconds on a CPU.
    """
    from onnxforge.torch_export import import_torch
    from onnxforge.testing import zoo

    torch = import_torch()
    x_train, y_train, _, _ = load_digits_split()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(seed)
        module = zoo.build("digits_cnn")
        torch.manual_seed(seed)
        for m in module.modules():  # train from fresh init; keep the zoo's architecture only
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
        x, y = torch.from_numpy(x_train), torch.from_numpy(y_train)
        optimizer = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=1e-4)
        steps = epochs * ((len(x) + batch - 1) // batch)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
        gen = torch.Generator().manual_seed(seed)
        module.train()
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=gen)
            for i in range(0, len(x), batch):
                idx = order[i : i + batch]
                loss = torch.nn.functional.cross_entropy(module(x[idx]), y[idx])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
    finally:
        torch.set_num_threads(previous_threads)
    return module.eval()


def _session(model, providers=None) -> ort.InferenceSession:
    if isinstance(model, ir.Model):
        model = ir.to_proto(model)
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    if isinstance(model, (str, os.PathLike)):
        model = os.fspath(Path(model))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model, opts, providers=list(providers or ["CPUExecutionProvider"]))


def predict(model, x: np.ndarray, batch: int = 256, providers=None) -> np.ndarray:
    """Logits of ``model`` (``onnx_ir.Model``, ``ModelProto``, bytes or a path) on ``x``, in batches.

    A model with a fixed batch size gets batches of that size (the last one padded)."""
    session = _session(model, providers)
    inp = session.get_inputs()[0]
    fixed = inp.shape[0] if inp.shape and isinstance(inp.shape[0], int) else None
    step = fixed or batch
    x = np.asarray(x)
    outputs = []
    for i in range(0, len(x), step):
        chunk = x[i : i + step]
        n = len(chunk)
        if fixed and n < fixed:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], fixed - n, axis=0)])
        outputs.append(session.run(None, {inp.name: chunk.astype(np.float32, copy=False)})[0][:n])
    return np.concatenate(outputs)


def accuracy(model, x: np.ndarray, y: np.ndarray, batch: int = 256, providers=None) -> float:
    """Top-1 accuracy (0..1) of ``model`` run in onnxruntime on ``x`` against labels ``y``."""
    logits = predict(model, x, batch=batch, providers=providers)
    return float(np.mean(np.argmax(logits.reshape(len(logits), -1), axis=1) == np.asarray(y)))


BUNDLED_MODEL = Path(__file__).resolve().parents[2] / "examples" / "digits_cnn.onnx"


def bundled_model_and_data(batch: int = 128):
    """The bundled trained digits CNN (``examples/digits_cnn.onnx``) with its data: ``(model,
    calibration, x_test, y_test)``, the calibration data being the training split in batches of
    ``batch`` (a ``CalibrationData``). Shared by the pruning tests."""
    from onnxforge.runtime.data import CalibrationData

    x_train, _, x_test, y_test = load_digits_split()
    model = ir.serde.deserialize_model(onnx.load(str(BUNDLED_MODEL)))
    name = model.graph.inputs[0].name
    calib = CalibrationData.from_iterable([{name: x_train[i : i + batch]} for i in range(0, len(x_train), batch)])
    return model, calib, x_test, y_test
