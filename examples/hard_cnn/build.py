"""Build the hard CNN case: a small CNN on Fashion-MNIST where int8 everywhere fails 1% relative.

Two of its four convolutions are made hostile to int8 without changing the fp32 function
(examples/_hostile.py), so exactly those (with their fused Relu) must stay fp32. Trains in about
half a minute with one thread, deterministic and offline (Debian dataset-fashion-mnist).

Writes model.onnx (input `image` [batch, 1, 28, 28], output `logits` [batch, 10]), calib.npz
(256 training images) and eval.npz (a fixed class-balanced 2,000 test images). `--force` rebuilds.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import _common  # noqa: E402
import _hostile  # noqa: E402

SEED = 0
INPUT, OUTPUT = "image", "logits"
TRAIN_SIZE, EVAL_SIZE, CALIB_SIZE = 12000, 2000, 256
MODEL, CALIB, EVAL = HERE / "model.onnx", HERE / "calib.npz", HERE / "eval.npz"


def make_model():  # noqa: ANN201
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),        # 14 x 14
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),        # 7 x 7
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(64, 10),
    )


def make_hostile(model):  # noqa: ANN001, ANN201
    """Conv 2 (index 2) and conv 4 (index 6) get an outlier input channel fed by a dead channel."""
    for producer, consumer in ((0, 2), (4, 6)):
        model[producer], model[consumer] = _hostile.hostile_pair(model[producer], model[consumer])
    return model


def main(argv: list[str] | None = None) -> int:
    import importlib.util

    # examples/fashion_mnist/build.py: its idx reader (loaded by path: both scripts are named build.py)
    spec = importlib.util.spec_from_file_location("fashion_mnist_build", HERE.parent / "fashion_mnist" / "build.py")
    fashion = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fashion)
    args = _common.parse_args(__doc__.splitlines()[0], argv)
    if not args.force and _common.outputs_exist([MODEL, CALIB, EVAL]):
        acc, count = _common.npz_accuracy(MODEL, EVAL)
        print(f"hard_cnn: already built; fp32 accuracy {acc:.4f} ({count} images)")
        return 0
    _common.set_deterministic(SEED, args.threads)
    import torch

    data = fashion.load_fashion_mnist()
    x_train = (data["train_images"][:TRAIN_SIZE] / 255.0).astype(np.float32)[:, None]
    y_train = data["train_labels"][:TRAIN_SIZE].astype(np.int64)
    eval_index = _common.stratified_subset(data["test_labels"], EVAL_SIZE, SEED)
    x_eval = (data["test_images"][eval_index] / 255.0).astype(np.float32)[:, None]
    y_eval = data["test_labels"][eval_index].astype(np.int64)
    calib = _common.stratified_subset(y_train, CALIB_SIZE, SEED)
    torch.manual_seed(SEED)
    model = make_model()
    _common.train(model, x_train, y_train, epochs=3, batch_size=64, lr=3e-3, seed=SEED)
    before = _common.predict(model, x_eval)
    model = make_hostile(model).eval()
    after = _common.predict(model, x_eval)
    assert np.abs(after - before).max() < 1e-3, "the hostile edit must not change the fp32 function"
    _common.write_npz(CALIB, INPUT, x_train[calib], y_train[calib])
    _common.write_npz(EVAL, INPUT, x_eval, y_eval)
    _common.export_onnx(model, x_eval, MODEL, input_name=INPUT, output_name=OUTPUT)
    _common.verify_onnx(MODEL, model, x_eval, atol=1e-3)
    acc, count = _common.npz_accuracy(MODEL, EVAL)
    print(f"hard_cnn: fp32 ORT accuracy {acc:.4f} ({count} images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
