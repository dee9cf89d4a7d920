"""Build the digit-strings example: read 4-digit strings from strips of 8x8 digit glyphs.

A sequence task with string labels, scored by a metric of the example's own
(`sequence_metrics.py`, beside the job file): the exact match of the decoded string. No built-in
metric of qtune fits it, and no subclassing is needed: the job names `sequence_metrics:ExactMatch`
and qtune imports it from the job's folder.

Writes into this folder:
  model.onnx  fp32 reader, input `strip` [batch, 4, 64] float32 (four 8x8 glyphs, pixels 0..1),
              output `logits` [batch, 4, 10] (one digit distribution per position)
  calib.npz   `strip` only: 256 strips of training glyphs (calibration needs no labels)
  eval.npz    `strip` + `labels`: 400 strips of held-out glyphs, labels unicode strings such as
              "3071" (numpy '<U4', read with allow_pickle=False)

Deterministic and offline (scikit-learn's `load_digits`). Skips work when the three files exist;
`--force` rebuilds. Run:  python examples/digit_strings/build.py
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
LENGTH = 4
INPUT, OUTPUT = "strip", "logits"
CALIB_STRIPS, EVAL_STRIPS = 256, 400
MODEL, CALIB, EVAL = HERE / "model.onnx", HERE / "calib.npz", HERE / "eval.npz"


def make_glyph_classifier():
    from torch import nn

    return nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 64), nn.ReLU(), nn.Linear(64, 10))


def make_reader(glyphs):
    """[batch, 4, 64] -> [batch, 4, 10]: the glyph classifier applied at every position."""
    from torch import nn

    class StripReader(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.glyphs = glyphs

        def forward(self, strip):
            return self.glyphs(strip)

    return StripReader().eval()


def strips(images: np.ndarray, labels: np.ndarray, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` strips of LENGTH glyphs drawn (reproducibly) from `images`, with their digit strings."""
    rng = np.random.default_rng(seed)
    index = rng.integers(0, len(images), size=(count, LENGTH))
    x = images[index].astype(np.float32)                                # count x 4 x 64
    text = np.array(["".join(str(d) for d in row) for row in labels[index]])  # '<U4'
    return x, text


def decode(logits: np.ndarray) -> np.ndarray:
    return np.array(["".join(str(d) for d in row) for row in logits.argmax(axis=-1)])


def exact_match(model_path: Path, npz_path: Path) -> tuple[float, int]:
    session = _common.ort_session(model_path)
    with np.load(npz_path, allow_pickle=False) as data:
        x, labels = data[INPUT], data["labels"]
    return float((decode(_common.ort_predict(session, x)) == labels).mean()), len(labels)


def main(argv: list[str] | None = None) -> int:
    args = _common.parse_args(__doc__.splitlines()[0], argv)
    if not args.force and _common.outputs_exist([MODEL, CALIB, EVAL]):
        score, count = exact_match(MODEL, EVAL)
        print(f"digit_strings: files exist (--force rebuilds); fp32 exact match on {EVAL.name}: {score:.4f} "
              f"({count} strips)")
        return 0
    clock = _common.Timer()
    _common.set_deterministic(SEED, args.threads)
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.data / 16.0).astype(np.float32)                    # N x 64, 0..1
    labels = digits.target.astype(np.int64)
    x_train, x_eval, y_train, y_eval = train_test_split(images, labels, test_size=500, stratify=labels,
                                                        random_state=SEED)
    print(f"digit_strings: training the glyph classifier on {len(x_train)} glyphs")
    torch.manual_seed(SEED)
    glyphs = make_glyph_classifier()
    _common.train(glyphs, x_train, y_train, epochs=30, batch_size=32, lr=3e-3, seed=SEED)
    reader = make_reader(glyphs)

    x_calib, _ = strips(x_train, y_train, CALIB_STRIPS, SEED + 1)
    x_strip, y_strip = strips(x_eval, y_eval, EVAL_STRIPS, SEED + 2)
    _common.write_arrays(CALIB, {INPUT: x_calib})
    _common.write_arrays(EVAL, {INPUT: x_strip, "labels": y_strip})
    _common.export_onnx(reader, x_strip, MODEL, input_name=INPUT, output_name=OUTPUT)
    _common.verify_onnx(MODEL, reader, x_strip)
    score, count = exact_match(MODEL, EVAL)
    print(f"digit_strings: done in {clock}; fp32 exact match on {EVAL.name}: {score:.4f} ({count} strips)")
    print(f"next: qtune tune {os.path.relpath(HERE / 'job.yaml')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
