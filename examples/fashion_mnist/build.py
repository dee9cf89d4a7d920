"""Build the Fashion-MNIST example: a small ResNet-style CNN, exported to ONNX.

Reads Fashion-MNIST from the Debian package `dataset-fashion-mnist`
(/usr/share/datasets/fashion-mnist/*.gz, idx format) and writes into this folder:
  model.onnx  fp32 ResNet-style CNN (BatchNorm folded into Conv at export), input `image`
              [batch, 1, 28, 28] float32 (pixels scaled to 0..1), output `logits` [batch, 10]
  calib.npz   256 images from the training set
  eval.npz    a fixed, class-balanced 2,000 of the 10,000 test images (keeps trials fast)

Deterministic and offline. Skips work when the three files exist; `--force` rebuilds.
Run:  python examples/fashion_mnist/build.py
"""

from __future__ import annotations

import gzip
import os
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import _common  # noqa: E402

SEED = 0
INPUT, OUTPUT = "image", "logits"
EVAL_SIZE, CALIB_SIZE = 2000, 256
DATA_DIR = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FILES = {
    "train_images": "train-images-idx3-ubyte.gz", "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz", "test_labels": "t10k-labels-idx1-ubyte.gz",
}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
MODEL, CALIB, EVAL = HERE / "model.onnx", HERE / "calib.npz", HERE / "eval.npz"


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
def read_idx(path: Path) -> np.ndarray:
    """Parse an idx file (gzip-compressed): magic 0x00 0x00 <dtype> <ndim>, big-endian dims, data."""
    with gzip.open(path, "rb") as handle:
        raw = handle.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise SystemExit(f"{path} is not an idx file of unsigned bytes")
    ndim = raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise SystemExit(f"{path}: header says {dims} but holds {data.size} values (truncated?)")
    return data.reshape(dims)


def load_fashion_mnist() -> dict[str, np.ndarray]:
    missing = [name for name in FILES.values() if not (DATA_DIR / name).is_file()]
    if missing:
        raise SystemExit(
            f"Fashion-MNIST not found in {DATA_DIR} (missing {', '.join(missing)}).\n"
            "Install it with:  sudo apt-get install dataset-fashion-mnist\n"
            "or point FASHION_MNIST_DIR at a folder holding the four idx .gz files.")
    arrays = {key: read_idx(DATA_DIR / name) for key, name in FILES.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.shape[1:] != (28, 28) or len(images) != len(labels):
            raise SystemExit(f"unexpected Fashion-MNIST {split} shapes {images.shape}, {labels.shape}")
    return arrays


def as_input(images: np.ndarray) -> np.ndarray:
    """uint8 N x 28 x 28 -> float32 N x 1 x 28 x 28 in 0..1 (what model.onnx expects)."""
    return (images.astype(np.float32) / 255.0)[:, None, :, :]


# --------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------
def make_model(width: int):
    import torch
    from torch import nn

    class BasicBlock(nn.Module):
        """conv-bn-relu-conv-bn plus identity (or 1x1 conv-bn projection) shortcut, relu."""

        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.shortcut = nn.Identity()
            if stride != 1 or cin != cout:
                self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return torch.relu(y + self.shortcut(x))

    w = width
    return nn.Sequential(
        nn.Conv2d(1, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),   # w x 28 x 28
        nn.MaxPool2d(2),                                                      # w x 14 x 14
        BasicBlock(w, w, 1),
        BasicBlock(w, 2 * w, 2),                                              # 2w x 7 x 7
        BasicBlock(2 * w, 4 * w, 2),                                          # 4w x 4 x 4
        nn.AvgPool2d(4), nn.Flatten(),                                        # global average (AveragePool)
        nn.Linear(4 * w, 10),
    )


def _options(parser) -> None:
    parser.add_argument("--epochs", type=int, default=3, help="training epochs (default 3)")
    parser.add_argument("--train-size", type=int, default=40000,
                        help="train on a class-balanced subset of this many of the 60,000 images (default 40,000)")
    parser.add_argument("--width", type=int, default=24, help="channels of the first stage (default 24)")


def main(argv: list[str] | None = None) -> int:
    args = _common.parse_args(__doc__.splitlines()[0], argv, extra=_options)
    if not args.force and _common.outputs_exist([MODEL, CALIB, EVAL]):
        acc, count = _common.npz_accuracy(MODEL, EVAL)
        print(f"fashion_mnist: {MODEL.name}, {CALIB.name}, {EVAL.name} already exist (--force rebuilds); "
              f"fp32 ORT accuracy on {EVAL.name}: {acc:.4f} ({count} images)")
        return 0

    clock = _common.Timer()
    _common.set_deterministic(SEED, args.threads)
    import torch

    print(f"fashion_mnist: reading idx files from {DATA_DIR}")
    data = load_fashion_mnist()
    y_train_all, y_test = data["train_labels"].astype(np.int64), data["test_labels"].astype(np.int64)
    train_index = _common.stratified_subset(y_train_all, args.train_size, SEED)
    x_train, y_train = as_input(data["train_images"][train_index]), y_train_all[train_index]
    calib_index = _common.stratified_subset(y_train, CALIB_SIZE, SEED + 1)
    x_test = as_input(data["test_images"])
    eval_index = _common.stratified_subset(y_test, EVAL_SIZE, SEED)
    print(f"  train {len(x_train)}, calibration {len(calib_index)} (from train), "
          f"eval {len(eval_index)} of the {len(y_test)} test images")

    print(f"fashion_mnist: training the ResNet-style CNN (width {args.width}, {args.epochs} epochs, "
          f"{args.threads} thread{'s' if args.threads > 1 else ''})")
    torch.manual_seed(SEED)
    model = make_model(args.width)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"  {parameters:,} parameters")
    train_clock = _common.Timer()
    _common.train(model, x_train, y_train, epochs=args.epochs, batch_size=128, lr=4e-3, seed=SEED)
    train_seconds = train_clock()
    test_logits = _common.predict(model, x_test)
    print(f"  trained in {train_seconds:.0f}s; torch fp32 accuracy: full test set "
          f"{_common.accuracy(test_logits, y_test):.4f}, eval subset "
          f"{_common.accuracy(test_logits[eval_index], y_test[eval_index]):.4f}  [{clock}]")

    print("fashion_mnist: exporting to ONNX")
    _common.write_npz(CALIB, INPUT, x_train[calib_index], y_train[calib_index])
    _common.write_npz(EVAL, INPUT, x_test[eval_index], y_test[eval_index])
    _common.export_onnx(model, x_test, MODEL, input_name=INPUT, output_name=OUTPUT)
    _common.verify_onnx(MODEL, model, x_test[eval_index])

    acc, count = _common.npz_accuracy(MODEL, EVAL)
    session = _common.ort_session(MODEL)
    full = _common.accuracy(_common.ort_predict(session, x_test), y_test)
    print(f"fashion_mnist: done in {clock}; fp32 ORT accuracy on {EVAL.name}: {acc:.4f} ({count} images), "
          f"on the full test set: {full:.4f} ({len(y_test)} images)")
    print(f"next: qtune tune {os.path.relpath(HERE / 'job.yaml')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
