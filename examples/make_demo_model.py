"""Build the bundled demo: train the digits CNN, export it, write the model and its data.

    python examples/make_demo_model.py [--out-dir examples] [--seed 0] [--epochs 8]

Writes (deterministically, for a given seed):

``digits_cnn.onnx``
    The zoo's ``digits_cnn`` trained on scikit-learn's 8x8 digits, exported with the dynamo exporter
    at opset 18: input ``input`` float32 ``[batch, 1, 8, 8]`` (pixels scaled to [-1, 1] as
    ``x / 8 - 1``), output ``output`` float32 ``[batch, 10]`` (logits). Conv+BatchNorm+ReLU blocks
    and a residual Add are kept unfused, for onnxforge to fold.

``digits_data.npz``
    ``input``   float32 (256, 1, 8, 8): calibration samples, the first 256 training images (the key is
                the model's input name, so ``CalibrationData.from_npz`` feeds it directly);
    ``x_test``  float32 (360, 1, 8, 8): the held-out test images;
    ``y_test``  int64   (360,): their labels 0-9.

Prints the fp32 test accuracy (onnxruntime).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from onnxforge.torch_export import export
from onnxforge.testing.digits import accuracy, load_digits_split, train_digits_cnn

N_CALIBRATION = 256


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args(argv)

    import torch

    x_train, _, x_test, y_test = load_digits_split()
    start = time.perf_counter()
    module = train_digits_cnn(seed=args.seed, epochs=args.epochs)
    trained_s = time.perf_counter() - start

    args.out_dir.mkdir(parents=True, exist_ok=True)
    model_path = args.out_dir / "digits_cnn.onnx"
    model = export(module, (torch.from_numpy(x_train[:1]),), model_path, opset=18, dynamo=True)
    model_path_size = model_path.stat().st_size

    data_path = args.out_dir / "digits_data.npz"
    tmp = data_path.with_name(data_path.name + f".tmp{os.getpid()}.npz")
    np.savez_compressed(tmp, input=x_train[:N_CALIBRATION], x_test=x_test, y_test=y_test)
    os.replace(tmp, data_path)

    with torch.no_grad():
        torch_acc = float((module(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean())
    onnx_acc = accuracy(model_path, x_test, y_test)
    ops = sorted({n.op_type for n in model.graph})
    print(f"trained in {trained_s:.1f} s (seed {args.seed}, {args.epochs} epochs)")
    print(f"wrote {model_path} ({model_path_size / 1024:.1f} KiB; {len(model.graph)} nodes: {', '.join(ops)})")
    print(f"wrote {data_path} (input {x_train[:N_CALIBRATION].shape}, x_test {x_test.shape}, y_test {y_test.shape})")
    print(f"fp32 test accuracy: onnxruntime {onnx_acc:.4f}, torch {torch_acc:.4f} ({len(y_test)} images)")
    return 0 if abs(onnx_acc - torch_acc) < 1e-9 else 1


if __name__ == "__main__":
    sys.exit(main())
