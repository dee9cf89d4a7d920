"""SmoothQuant (issue 22, part 3): does it let more ops stay int8 at the same criterion?

Per model: the fp32 accuracy; static int8 of every op (the tuner's default config) without SmoothQuant and
with it at each alpha of `alpha: auto`; then, without SmoothQuant and with each alpha, how many of the
quantizable ops stay int8 when ops fall back to fp32 one at a time, most sensitive first (the adaptor's
own per-op sensitivity), until the example's criterion (relative 1% top-1) holds. This is an adaptor-level
search, not a `qtune tune` run: the same adaptor, configs and criterion, without the strategy's speed
stages, so that the figure measures accuracy only (a tune run also trades ops for speed).

Models: examples/outlier_transformer (built here when absent), examples/hard_transformer and
examples/minilm_spam's ONNX export (when built: python examples/<name>/build.py).

    nice -n 19 python benchmarks/smooth_quant.py [outlier_transformer hard_transformer minilm_spam]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ALPHAS = (0.3, 0.5, 0.7, 0.85)
CRITERION = 0.01
logger = logging.getLogger("smooth_quant")
CASES = {
    "outlier_transformer": ("model.onnx", "calib.npz", "eval.npz", 200, None),
    "hard_transformer": ("model.onnx", "calib.npz", "eval.npz", 200, None),
    "minilm_spam": ("build/minilm_spam.onnx", "build/calib.npz", "build/eval.npz", 100, "logits"),
}


def _dataset(path: Path, limit: int | None = None) -> tuple[Any, np.ndarray]:
    from qtune.data import Dataset

    with np.load(path) as data:
        arrays = {k: data[k][:limit] for k in data.files if k != "labels"}
        labels = data["labels"][:limit]
    return Dataset(arrays, labels), labels


class Bench:
    """One model through the onnxruntime adaptor: accuracy of a config, fallback search."""

    def __init__(self, model_path: Path, calib: Path, evaluation: Path, samples: int, output: str | None,
                 workspace: Path) -> None:
        from qtune.adaptors.onnxrt import OnnxRuntimeAdaptor
        from qtune.spec.models import QuantizationSpec
        from qtune.tuning.space import build_space

        self.adaptor = OnnxRuntimeAdaptor({"workspace": str(workspace), "threads": 2, "output": output})
        self.model = self.adaptor.load_model({"framework": "onnxruntime", "path": str(model_path)})
        self.calib, _ = _dataset(calib, samples)
        self.eval, self.labels = _dataset(evaluation)
        self.adaptor.info["calibration_data"] = self.calib
        capability = self.adaptor.query_fw_capability(self.model)
        self.space = build_space(capability, QuantizationSpec(approach="static"), [], samples)
        self.base = self.space.default_config("static")
        self.fp32 = self.accuracy(None)

    def config(self, alpha: float | None) -> Any:
        from qtune.tuning.space import SMOOTH_QUANT

        return self.base if alpha is None else replace(self.base, extras={SMOOTH_QUANT: alpha})

    def accuracy(self, config: Any) -> float:
        from qtune.tuning import codec

        model = self.model if config is None else self.adaptor.quantize(codec.dump(config), self.model,
                                                                         self.calib.loader(32))
        predictions = self.adaptor.predict(model, self.eval.loader(64))
        return float((np.argmax(predictions, axis=-1) == self.labels).mean())

    def passes(self, accuracy: float) -> bool:
        return accuracy >= self.fp32 * (1 - CRITERION)

    def int8_kept(self, alpha: float | None) -> tuple[int, float, int]:
        """(ops kept int8, accuracy, trials): fall back the most sensitive op, one at a time, until it passes."""
        from qtune.tuning import codec

        config = self.config(alpha)
        order = self.adaptor.op_sensitivity(self.model, codec.dump(config), self.calib)
        ranked = sorted(config.quantized_ops(), key=lambda n: -order.get(n, 0.0))
        trials, fp32 = 0, []
        while True:
            candidate = config.with_fallback(fp32)
            accuracy = self.accuracy(candidate)
            trials += 1
            if self.passes(accuracy) or len(fp32) == len(ranked):
                return len(candidate.quantized_ops()), accuracy, trials
            fp32.append(ranked[len(fp32)])


def measure(name: str) -> dict[str, Any]:
    folder = ROOT / "examples" / name
    model, calib, evaluation, samples, output = CASES[name]
    if name == "outlier_transformer" and not (folder / model).is_file():
        sys.path.insert(0, str(folder))
        from build import build  # examples/outlier_transformer/build.py

        build(folder)
    if not (folder / model).is_file():
        return {"name": name, "skipped": f"not built: python examples/{name}/build.py"}
    with tempfile.TemporaryDirectory(prefix="qtune-sq-") as workspace:
        bench = Bench(folder / model, folder / calib, folder / evaluation, samples, output, Path(workspace))
        row: dict[str, Any] = {"name": name, "fp32": bench.fp32, "ops": len(bench.base.quantized_ops())}
        row["all_int8"] = {"off": bench.accuracy(bench.config(None))}
        row["all_int8"].update({a: bench.accuracy(bench.config(a)) for a in ALPHAS})
        row["smoothing"] = bench.adaptor.last_quantization.get("smooth_quant", {})
        row["kept"] = {"off": bench.int8_kept(None)}
        row["kept"].update({a: bench.int8_kept(a) for a in ALPHAS})
    return row


def report(row: dict[str, Any]) -> None:
    if "skipped" in row:
        print(f"{row['name']}: skipped ({row['skipped']})")
        return
    print(f"{row['name']}: fp32 top-1 {row['fp32']:.4f}, {row['ops']} quantizable ops, "
          f"criterion {CRITERION:.0%} relative")
    smoothing = row["smoothing"]
    print(f"  SmoothQuant groups (alpha {smoothing.get('alpha')}): "
          + "; ".join(f"{g['activation']} -> {','.join(g['matmuls'])} via {g['absorber']} (max/median "
                      f"{g['outlier_ratio']})" for g in smoothing.get("groups", [])) or "  none")
    for reason in sorted(set(smoothing.get("skipped", {}).values())):
        count = sum(1 for r in smoothing["skipped"].values() if r == reason)
        print(f"  skipped {count}: {reason}")
    header = ("SmoothQuant", "all-int8 top-1", "ops int8 at criterion", "top-1 there", "trials")
    print(f"  {header[0]:>12} {header[1]:>15} {header[2]:>22} {header[3]:>12} {header[4]:>7}")
    for key, accuracy in row["all_int8"].items():
        kept, kept_accuracy, trials = row["kept"][key]
        label = "off" if key == "off" else f"alpha {key}"
        share = f"{kept}/{row['ops']}"
        print(f"  {label:>12} {accuracy:>15.4f} {share:>22} {kept_accuracy:>12.4f} {trials:>7}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*", default=list(CASES), choices=[*CASES, []])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    for name in args.cases:
        report(measure(name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
