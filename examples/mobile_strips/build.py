"""Build the mobile-strips example: a MobileNetV3-style recogniser reading 4-digit strips.

The kind of model where int8 can only pay in a few compute ops: inverted residual blocks (1x1 expand,
depthwise, 1x1 project, BatchNorm folded by the exporter), hard-swish and hard-sigmoid written out as
x * clip(x + 3, 0, 6) / 6 (Add, Clip, Mul, Div, as PaddlePaddle's exports carry them), squeeze-excite
gates (ReduceMean, two 1x1 convs, hard-sigmoid, Mul), and a head of two pre-norm self-attention blocks
(MatMul, Softmax; LayerNorm written out as ReduceMean, Sub, Mul, Sqrt, Div, as exports for opsets before
17 carry it) over the strip's 32 columns. 34 Conv and 13 MatMul among about 190 elementwise and shape
ops; most of the time is in the wide 1x1 convs (160 -> 960 channels) and the MatMuls.

Where all-int8 fails: the head's residual stream carries one "massive activation" (OUTLIER below, as
trained transformers do), so an int8 residual Add, with one scale per tensor, rounds the other channels
away (exact match 87% -> 84% here, against a 1% criterion), while the compute ops alone in int8 keep it
(LayerNorm, in fp32, brings the MatMuls' inputs back into range). A tuner must find the compute ops.

Writes into this folder:
  model.onnx  fp32 recogniser, input `strip` [batch, 1, 32, 128] float32 (four digits of scikit-learn's
              8x8 set upscaled to 24x24, each at a random offset around its 32x32 cell, with its own ink
              level, on a background of random level and noise; pixels 0..1), output `logits`
              [batch, 4, 10] (one digit distribution per position)
  calib.npz   `strip` only: 256 strips of training digits (calibration needs no labels)
  eval.npz    `strip` + `labels`: 600 strips of held-out digits, labels unicode strings such as "3071"

The metric is the exact match of the whole string (`sequence_metrics:ExactMatch` beside the job file).
Deterministic and offline; training takes about 3.5 minutes of CPU time (one thread). Skips work when
the three files exist; `--force` rebuilds. Run:  python examples/mobile_strips/build.py
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
LENGTH, CELL, GLYPH, SPILL = 4, 32, 24, 4
INPUT, OUTPUT = "strip", "logits"
TRAIN_STRIPS, CALIB_STRIPS, EVAL_STRIPS = 3200, 256, 600
EPOCHS, BATCH, LR, WEIGHT_DECAY = 3, 64, 6e-3, 0.0
MODEL, CALIB, EVAL = HERE / "model.onnx", HERE / "calib.npz", HERE / "eval.npz"

# A MobileNetV3-style table with strides (2, 1) after the first two blocks, so the strip keeps its columns as
# text recognisers do, and wide 1x1 convs where the feature map is small (that is where int8 pays):
# (kernel, expanded channels, output channels, squeeze-excite, activation, stride)
BLOCKS = (
    (3, 24, 48, False, "relu", (2, 2)),     # 16 x 64 -> 8 x 32
    (3, 144, 64, True, "relu", (2, 1)),     # 4 x 32
    (3, 256, 64, True, "hswish", (1, 1)),
    (3, 256, 64, True, "hswish", (1, 1)),
    (5, 576, 160, True, "hswish", (2, 1)),  # 2 x 32
    (3, 960, 160, True, "hswish", (1, 1)),
    (3, 960, 160, True, "hswish", (1, 1)),
)
STEM, HEAD_DIM, HEADS, HEAD_BLOCKS = 24, 128, 4, 2
OUTLIER_CHANNEL, OUTLIER = 0, 500.0
"""One channel of the attention head's residual stream starts at a large constant (a learned position
that carries it): the "massive activations" of trained transformers (a few residual channels hundreds
of times larger than the rest, Sun et al. 2024; LLM.int8()'s outlier features). LayerNorm removes it
before each MatMul; an int8 residual Add (one scale per tensor) cannot keep the small channels beside it."""
COLUMNS = LENGTH * CELL // 4  # the backbone's output width (strides 2, 2)


def make_model():  # noqa: ANN201
    """The recogniser: stem, BLOCKS, a 1x1 neck, columns averaged over height, a learned position per column,
    HEAD_BLOCKS pre-norm self-attention blocks over the 32 columns, a final LayerNorm, then each of the 4
    digits read from the mean of its 8 columns."""
    import torch
    from torch import nn
    from torch.nn import functional

    class HardSwish(nn.Module):
        """Trains with torch's fused kernel; exports as x * clip(x + 3, 0, 6) / 6 (the same function)."""

        def forward(self, x):  # noqa: ANN001, ANN202
            if self.training:
                return functional.hardswish(x)
            return x * torch.clamp(x + 3.0, 0.0, 6.0) / 6.0

    class HardSigmoid(nn.Module):
        """Trains with torch's fused kernel; exports as clip(x + 3, 0, 6) / 6 (the same function)."""

        def forward(self, x):  # noqa: ANN001, ANN202
            if self.training:
                return functional.hardsigmoid(x)
            return torch.clamp(x + 3.0, 0.0, 6.0) / 6.0

    def activation(name: str) -> nn.Module:
        return HardSwish() if name == "hswish" else nn.ReLU()

    class SqueezeExcite(nn.Module):
        def __init__(self, channels: int) -> None:
            super().__init__()
            hidden = max(8, channels // 4)
            self.reduce, self.expand = nn.Conv2d(channels, hidden, 1), nn.Conv2d(hidden, channels, 1)
            self.gate = HardSigmoid()

        def forward(self, x):  # noqa: ANN001, ANN202
            squeezed = functional.adaptive_avg_pool2d(x, 1)
            return x * self.gate(self.expand(functional.relu(self.reduce(squeezed))))

    class InvertedResidual(nn.Module):
        def __init__(self, cin: int, kernel: int, expanded: int, cout: int, se: bool, act: str,
                     stride: tuple[int, int]) -> None:
            super().__init__()
            layers: list[nn.Module] = []
            if expanded != cin:
                layers += [nn.Conv2d(cin, expanded, 1, bias=False), nn.BatchNorm2d(expanded), activation(act)]
            layers += [nn.Conv2d(expanded, expanded, kernel, stride, kernel // 2, groups=expanded, bias=False),
                       nn.BatchNorm2d(expanded), activation(act)]
            if se:
                layers.append(SqueezeExcite(expanded))
            layers += [nn.Conv2d(expanded, cout, 1, bias=False), nn.BatchNorm2d(cout)]
            self.body = nn.Sequential(*layers)
            self.residual = stride == (1, 1) and cin == cout

        def forward(self, x):  # noqa: ANN001, ANN202
            y = self.body(x)
            return x + y if self.residual else y

    class LayerNorm(nn.Module):
        """Written out (ReduceMean, Sub, Mul, Sqrt, Div, Mul, Add), as exports for opsets before 17 and
        PaddlePaddle's carry it: the statistics are elementwise ops of their own."""

        def __init__(self, dim: int, eps: float = 1e-5) -> None:
            super().__init__()
            self.weight, self.bias, self.eps = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.zeros(dim)), eps

        def forward(self, x):  # noqa: ANN001, ANN202
            centred = x - x.mean(dim=-1, keepdim=True)
            variance = (centred * centred).mean(dim=-1, keepdim=True)
            return centred / torch.sqrt(variance + self.eps) * self.weight + self.bias

    class AttentionBlock(nn.Module):
        """A pre-norm transformer block (ViT/SVTR style): the residual stream itself is never normalised."""

        def __init__(self, dim: int, heads: int) -> None:
            super().__init__()
            self.heads = heads
            self.norm1, self.norm2 = LayerNorm(dim), LayerNorm(dim)
            self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
            self.up, self.down = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
            self.act = HardSwish()

        def forward(self, x):  # noqa: ANN001, ANN202  [batch, columns, dim]
            batch, columns, dim = x.shape
            qkv = self.qkv(self.norm1(x)).reshape(batch, columns, 3, self.heads, dim // self.heads)
            q, k, v = qkv.permute(2, 0, 3, 1, 4)
            weights = torch.softmax(q @ k.transpose(-1, -2) * (dim // self.heads) ** -0.5, dim=-1)
            x = x + self.out((weights @ v).transpose(1, 2).reshape(batch, columns, dim))
            return x + self.down(self.act(self.up(self.norm2(x))))

    class Recogniser(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, STEM, 3, 2, 1, bias=False), nn.BatchNorm2d(STEM), HardSwish())
            blocks, channels = [], STEM
            for kernel, expanded, cout, se, act, stride in BLOCKS:
                blocks.append(InvertedResidual(channels, kernel, expanded, cout, se, act, stride))
                channels = cout
            self.blocks = nn.Sequential(*blocks)
            self.neck = nn.Sequential(nn.Conv2d(channels, HEAD_DIM, 1, bias=False), nn.BatchNorm2d(HEAD_DIM),
                                      HardSwish())
            position = torch.zeros(1, COLUMNS, HEAD_DIM)
            position[..., OUTLIER_CHANNEL] = OUTLIER
            self.position = nn.Parameter(position)
            self.attention = nn.Sequential(*(AttentionBlock(HEAD_DIM, HEADS) for _ in range(HEAD_BLOCKS)))
            self.norm = LayerNorm(HEAD_DIM)
            self.classify = nn.Linear(HEAD_DIM, 10)

        def forward(self, strip):  # noqa: ANN001, ANN202
            features = self.neck(self.blocks(self.stem(strip))).mean(dim=2).transpose(1, 2)  # [batch, 32, dim]
            features = self.norm(self.attention(features + self.position))
            batch, columns, dim = features.shape
            digits = features.reshape(batch, LENGTH, columns // LENGTH, dim).mean(dim=2)
            return self.classify(digits)                                                    # [batch, 4, 10]

    return Recogniser()


def upscale_glyphs(images: np.ndarray) -> np.ndarray:
    """8x8 glyphs (0..1) -> GLYPH x GLYPH, bilinear."""
    import torch
    from torch.nn import functional

    small = torch.from_numpy(images.reshape(-1, 1, 8, 8))
    return functional.interpolate(small, size=(GLYPH, GLYPH), mode="bilinear", align_corners=False)[:, 0].numpy()


def strips(glyphs: np.ndarray, labels: np.ndarray, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` strips [1, CELL, LENGTH * CELL] and their digit strings: LENGTH glyphs drawn (reproducibly) from
    `glyphs`, each at a random offset around its cell (neighbours may touch or overlap by a few pixels), with
    its own ink intensity, on a background of random level and noise, as scanned text lines look."""
    rng = np.random.default_rng(seed)
    index = rng.integers(0, len(glyphs), size=(count, LENGTH))
    tops = rng.integers(0, CELL - GLYPH + 1, size=(count, LENGTH))
    lefts = rng.integers(-SPILL, CELL - GLYPH + SPILL + 1, size=(count, LENGTH))
    ink = rng.uniform(0.45, 1.0, size=(count, LENGTH)).astype(np.float32)
    background = rng.uniform(0.0, 0.25, size=(count, 1, 1, 1)).astype(np.float32)
    noise = rng.uniform(0.04, 0.12, size=(count, 1, 1, 1)).astype(np.float32)
    x = np.zeros((count, 1, CELL, LENGTH * CELL), dtype=np.float32)
    for n in range(count):
        for position in range(LENGTH):
            top = tops[n, position]
            left = int(np.clip(position * CELL + lefts[n, position], 0, LENGTH * CELL - GLYPH))
            window = x[n, 0, top:top + GLYPH, left:left + GLYPH]
            np.maximum(window, ink[n, position] * glyphs[index[n, position]], out=window)
    x = background + (1.0 - background) * x + noise * rng.standard_normal(x.shape, dtype=np.float32)
    text = np.array(["".join(str(d) for d in row) for row in labels[index]])
    return np.clip(x, 0.0, 1.0).astype(np.float32), text


def decode(logits: np.ndarray) -> np.ndarray:
    return np.array(["".join(str(d) for d in row) for row in np.asarray(logits).argmax(axis=-1)])


def train(model, x: np.ndarray, digits: np.ndarray, *, epochs: int, seed: int) -> None:  # noqa: ANN001
    """AdamW + one-cycle, cross-entropy summed over the 4 positions; one line per epoch."""
    import torch
    from torch import nn

    generator = torch.Generator().manual_seed(seed)
    inputs, targets = torch.from_numpy(x), torch.from_numpy(digits)
    steps = -(-len(x) // BATCH)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=LR, epochs=epochs, steps_per_epoch=steps,
                                                   pct_start=0.2)
    loss_fn = nn.CrossEntropyLoss()
    clock = _common.Timer()
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        total, correct = 0.0, 0
        for start in range(0, len(x), BATCH):
            index = order[start:start + BATCH]
            logits = model(inputs[index])
            loss = loss_fn(logits.reshape(-1, 10), targets[index].reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * len(index)
            correct += int((logits.argmax(-1) == targets[index]).all(dim=1).sum())
        print(f"  epoch {epoch}/{epochs}  loss {total / len(x):.4f}  train exact {correct / len(x):.4f}  [{clock}]",
              flush=True)
    model.eval()


def exact_match(model_path: Path, npz_path: Path) -> tuple[float, int]:
    session = _common.ort_session(model_path)
    with np.load(npz_path, allow_pickle=False) as data:
        x, labels = data[INPUT], data["labels"]
    return float((decode(_common.ort_predict(session, x, batch_size=64)) == labels).mean()), len(labels)


def main(argv: list[str] | None = None) -> int:
    args = _common.parse_args(__doc__.splitlines()[0], argv, extra=_extra_args)
    if not args.force and _common.outputs_exist([MODEL, CALIB, EVAL]):
        score, count = exact_match(MODEL, EVAL)
        print(f"mobile_strips: files exist (--force rebuilds); fp32 exact match on {EVAL.name}: {score:.4f} "
              f"({count} strips)")
        return 0
    clock = _common.Timer()
    _common.set_deterministic(SEED, args.threads)
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.data / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int64)
    x_train, x_eval, y_train, y_eval = train_test_split(images, labels, test_size=500, stratify=labels,
                                                        random_state=SEED)
    glyphs_train, glyphs_eval = upscale_glyphs(x_train), upscale_glyphs(x_eval)
    x_strips, text_train = strips(glyphs_train, y_train, TRAIN_STRIPS, SEED + 1)
    digits_train = np.array([[int(c) for c in t] for t in text_train], dtype=np.int64)
    x_calib, _ = strips(glyphs_train, y_train, CALIB_STRIPS, SEED + 2)
    x_eval_strips, y_eval_strips = strips(glyphs_eval, y_eval, EVAL_STRIPS, SEED + 3)
    print(f"mobile_strips: training on {TRAIN_STRIPS} strips of {len(x_train)} glyphs [{clock}]", flush=True)
    torch.manual_seed(SEED)
    model = make_model()
    train(model, x_strips, digits_train, epochs=args.epochs, seed=SEED)

    _common.write_arrays(CALIB, {INPUT: x_calib})
    _common.write_arrays(EVAL, {INPUT: x_eval_strips, "labels": y_eval_strips})
    _common.export_onnx(model, x_eval_strips, MODEL, input_name=INPUT, output_name=OUTPUT)
    _common.verify_onnx(MODEL, model, x_eval_strips[:128])
    score, count = exact_match(MODEL, EVAL)
    print(f"mobile_strips: done in {clock}; fp32 exact match on {EVAL.name}: {score:.4f} ({count} strips)")
    print(f"next: qtune tune {os.path.relpath(HERE / 'job.yaml')}")
    return 0


def _extra_args(parser) -> None:  # noqa: ANN001
    parser.add_argument("--epochs", type=int, default=EPOCHS, help=f"training epochs (default {EPOCHS})")


if __name__ == "__main__":
    sys.exit(main())
