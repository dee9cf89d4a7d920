"""Build the hard transformer case: a 2-layer pre-norm transformer on scikit-learn digits (the 8
rows of an 8x8 image are 8 tokens of 8 pixels) where int8 everywhere fails 1% relative.

Both feed-forward blocks are made hostile to int8 without changing the fp32 function
(examples/_hostile.py): their second Linear must stay fp32. Deterministic, offline, ~20 s.

Writes model.onnx (input `image` [batch, 8, 8], output `logits` [batch, 10]), calib.npz and
eval.npz (600 held-out images). `--force` rebuilds.
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
DIM, HIDDEN, LAYERS = 32, 64, 2
MODEL, CALIB, EVAL = HERE / "model.onnx", HERE / "calib.npz", HERE / "eval.npz"


def make_model():  # noqa: ANN201
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm1, self.norm2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
            self.qkv, self.out = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)
            self.ffn1, self.ffn2 = nn.Linear(DIM, HIDDEN), nn.Linear(HIDDEN, DIM)

        def forward(self, x):  # noqa: ANN001, ANN202
            q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
            attention = torch.softmax(q @ k.transpose(1, 2) / DIM ** 0.5, dim=-1)
            x = x + self.out(attention @ v)
            return x + self.ffn2(torch.relu(self.ffn1(self.norm2(x))))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(8, DIM)
            self.position = nn.Parameter(torch.zeros(1, 8, DIM))
            self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
            self.head = nn.Linear(DIM, 10)

        def forward(self, x):  # noqa: ANN001, ANN202
            x = self.embed(x) + self.position
            for block in self.blocks:
                x = block(x)
            return self.head(x.mean(dim=1))

    return Net()


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's digits in [0, 1]: (x_train, x_eval, y_train, y_eval, calibration indices into the training
    set); 600 held out, 300 calibration images, both stratified."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int64)
    x_train, x_eval, y_train, y_eval = train_test_split(images, labels, test_size=600, stratify=labels,
                                                        random_state=SEED)
    return x_train, x_eval, y_train, y_eval, _common.stratified_subset(y_train, 300, SEED)


def main(argv: list[str] | None = None) -> int:
    args = _common.parse_args(__doc__.splitlines()[0], argv)
    if not args.force and _common.outputs_exist([MODEL, CALIB, EVAL]):
        acc, count = _common.npz_accuracy(MODEL, EVAL)
        print(f"hard_transformer: already built; fp32 accuracy {acc:.4f} ({count} images)")
        return 0
    _common.set_deterministic(SEED, args.threads)
    import torch

    x_train, x_eval, y_train, y_eval, calib = digits_split()
    torch.manual_seed(SEED)
    model = make_model()
    _common.train(model, x_train, y_train, epochs=30, batch_size=32, lr=3e-3, seed=SEED)
    before = _common.predict(model, x_eval)
    for block in model.blocks:
        block.ffn1, block.ffn2 = _hostile.hostile_pair(block.ffn1, block.ffn2)
    after = _common.predict(model, x_eval)
    assert np.abs(after - before).max() < 1e-3, "the hostile edit must not change the fp32 function"
    _common.write_npz(CALIB, INPUT, x_train[calib], y_train[calib])
    _common.write_npz(EVAL, INPUT, x_eval, y_eval)
    _common.export_onnx(model, x_eval, MODEL, input_name=INPUT, output_name=OUTPUT)
    _common.verify_onnx(MODEL, model, x_eval, atol=1e-3)
    acc, count = _common.npz_accuracy(MODEL, EVAL)
    print(f"hard_transformer: fp32 ORT accuracy {acc:.4f} ({count} images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
