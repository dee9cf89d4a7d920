"""Build the outlier transformer: the hard transformer's 2-layer pre-norm architecture trained on
scikit-learn digits, with activation outlier channels as real language models have them.

Large language models carry a few hidden channels whose activations are 10-100x larger than the rest
(the SmoothQuant and LLM.int8() papers), mostly set by the LayerNorm scales. Here the same arises from a
function-preserving edit after training: in every LayerNorm, OUTLIER_CHANNELS channels get their scale
and bias multiplied by OUTLIER_FACTOR and the matching input columns of the Linear layers reading them
divided by it. The fp32 function is unchanged (checked), but a per-tensor int8 activation scale after
each LayerNorm is then OUTLIER_FACTOR times too coarse for the other channels. No hostile weights
(unlike examples/hard_transformer). Deterministic, offline, ~20 s.

Writes model.onnx (input `image` [batch, 8, 8], output `logits` [batch, 10]), calib.npz and
eval.npz (600 held-out images). `--force` rebuilds; `--out DIR` writes elsewhere.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import _common  # noqa: E402

SEED = 0
INPUT, OUTPUT = "image", "logits"
OUTLIER_CHANNELS = (3, 17, 29)
OUTLIER_FACTOR = 40.0


def add_outliers(model) -> None:  # noqa: ANN001
    """Scale OUTLIER_CHANNELS of every block's LayerNorm output up and the readers' weights down."""
    import torch

    channels = list(OUTLIER_CHANNELS)
    with torch.no_grad():
        for block in model.blocks:
            for norm, readers in ((block.norm1, [block.qkv]), (block.norm2, [block.ffn1])):
                norm.weight[channels] *= OUTLIER_FACTOR
                norm.bias[channels] *= OUTLIER_FACTOR
                for linear in readers:
                    linear.weight[:, channels] /= OUTLIER_FACTOR


def build(folder: Path, force: bool = False, threads: int = _common.THREADS) -> Path:
    """Build into `folder` (skipped when the files exist and not `force`); returns the model path."""
    model_path, calib_path, eval_path = folder / "model.onnx", folder / "calib.npz", folder / "eval.npz"
    if not force and _common.outputs_exist([model_path, calib_path, eval_path]):
        return model_path
    folder.mkdir(parents=True, exist_ok=True)
    _common.set_deterministic(SEED, threads)
    import importlib.util

    import torch

    source = HERE.parent / "hard_transformer" / "build.py"
    spec = importlib.util.spec_from_file_location("hard_transformer_build", source)
    hard = importlib.util.module_from_spec(spec)  # examples/hard_transformer/build.py: the architecture
    spec.loader.exec_module(hard)
    x_train, x_eval, y_train, y_eval, calib = hard.digits_split()  # the same split, the same SEED (0)
    torch.manual_seed(SEED)
    model = hard.make_model()
    _common.train(model, x_train, y_train, epochs=30, batch_size=32, lr=3e-3, seed=SEED)
    before = _common.predict(model, x_eval)
    add_outliers(model)
    after = _common.predict(model, x_eval)
    assert np.abs(after - before).max() < 1e-3, "the outlier edit must not change the fp32 function"
    _common.write_npz(calib_path, INPUT, x_train[calib], y_train[calib])
    _common.write_npz(eval_path, INPUT, x_eval, y_eval)
    _common.export_onnx(model, x_eval, model_path, input_name=INPUT, output_name=OUTPUT)
    _common.verify_onnx(model_path, model, x_eval, atol=1e-3)
    return model_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rebuild even when the files exist")
    parser.add_argument("--threads", type=int, default=_common.THREADS)
    parser.add_argument("--out", type=Path, default=HERE, help="output folder (default: beside this file)")
    args = parser.parse_args(argv)
    path = build(args.out, args.force, args.threads)
    acc, count = _common.npz_accuracy(path, args.out / "eval.npz")
    print(f"outlier_transformer: fp32 ORT accuracy {acc:.4f} ({count} images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
