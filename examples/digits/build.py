"""Build the digits example: a small CNN on scikit-learn's 8x8 digits, exported to ONNX.

Writes into this folder:
  model.onnx  fp32 CNN, input `image` [batch, 1, 8, 8] float32 (pixels scaled to 0..1),
              output `logits` [batch, 10]
  calib.npz   300 images from the training split (qtune uses the first `samples` of them)
  eval.npz    600 held-out images, never seen in training

Deterministic and offline (the data ship inside scikit-learn). Skips work when the three files
exist; `--force` rebuilds. Run:  python examples/digits/build.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import _common  # noqa: E402

SEED = 0
INPUT, OUTPUT = "image", "logits"
EVAL_SIZE, CALIB_SIZE = 600, 300
MODEL, CALIB, EVAL = HERE / "model.onnx", HERE / "calib.npz", HERE / "eval.npz"


def make_model():
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),                                   # 32 x 4 x 4
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),                                   # 64 x 2 x 2
        nn.Flatten(),
        nn.Linear(64 * 2 * 2, 128), nn.ReLU(),
        nn.Dropout(0.2),
        nn.Linear(128, 10),
    )


def load_data() -> tuple[np.ndarray, ...]:
    """Stratified split: 1,197 train / 600 eval; calibration is a stratified 300 of train."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]   # N x 1 x 8 x 8, 0..1
    labels = digits.target.astype(np.int64)
    x_train, x_eval, y_train, y_eval = train_test_split(
        images, labels, test_size=EVAL_SIZE, stratify=labels, random_state=SEED)
    calib = _common.stratified_subset(y_train, CALIB_SIZE, SEED)
    return x_train, y_train, x_train[calib], y_train[calib], x_eval, y_eval


def main(argv: list[str] | None = None) -> int:
    args = _common.parse_args(__doc__.splitlines()[0], argv)
    if not args.force and _common.outputs_exist([MODEL, CALIB, EVAL]):
        acc, count = _common.npz_accuracy(MODEL, EVAL)
        print(f"digits: {MODEL.name}, {CALIB.name}, {EVAL.name} already exist (--force rebuilds); "
              f"fp32 ORT accuracy on {EVAL.name}: {acc:.4f} ({count} images)")
        return 0

    clock = _common.Timer()
    _common.set_deterministic(SEED, args.threads)
    import torch

    print("digits: loading scikit-learn load_digits")
    x_train, y_train, x_calib, y_calib, x_eval, y_eval = load_data()
    print(f"  train {len(x_train)}, calibration {len(x_calib)} (from train), eval {len(x_eval)} (held out)")

    print("digits: training the CNN")
    torch.manual_seed(SEED)
    model = make_model()
    print(f"  {sum(p.numel() for p in model.parameters()):,} parameters")
    _common.train(model, x_train, y_train, epochs=40, batch_size=32, lr=3e-3, seed=SEED,
                  augment=_common.random_shift(1))
    torch_acc = _common.accuracy(_common.predict(model, x_eval), y_eval)
    print(f"  torch fp32 eval accuracy {torch_acc:.4f}  [{clock}]")

    print("digits: exporting to ONNX")
    _common.write_npz(CALIB, INPUT, x_calib, y_calib)
    _common.write_npz(EVAL, INPUT, x_eval, y_eval)
    _common.export_onnx(model, x_eval, MODEL, input_name=INPUT, output_name=OUTPUT)
    _common.verify_onnx(MODEL, model, x_eval)

    acc, count = _common.npz_accuracy(MODEL, EVAL)
    print(f"digits: done in {clock}; fp32 ORT accuracy on {EVAL.name}: {acc:.4f} ({count} images)")
    print(f"next: qtune tune {os.path.relpath(HERE / 'job.yaml')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
