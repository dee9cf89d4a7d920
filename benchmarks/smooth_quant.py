"""SmoothQuant (issue 22, part 3): does it let more ops stay int8 at the same criterion?

Per model: the fp32 accuracy; static int8 of every op (the tuner's default config) without SmoothQuant and
with it at each alpha of `alpha: auto`; then, without SmoothQuant and with each alpha, how many of the
quantizable ops stay int8 when ops fall back to fp32 one at a time, most sensitive first (the adaptor's
own per-op sensitivity), until the example's criterion (relative 1% top-1) holds. This is an adaptor-level
search, not a `qtune tune` run: the same adaptor, configs and criterion, without the strategy's speed
stages, so that the figure measures accuracy only (a tune run also trades ops for speed).

Models: examples/outlier_transformer (built here when absent), examples/hard_transformer and
examples/minilm_spam's ONNX export (when built: python examples/<name>/build.py), the latter twice: top-1 of
the spam label, and the cosine similarity of its sentence embeddings to fp32's (`minilm_spam_cosine`).

    nice -n 19 python benchmarks/smooth_quant.py [outlier_transformer hard_transformer minilm_spam ...]

Measured 2026-12-06 (2 threads, a busy 2-core machine: load 10-24; accuracy figures do not depend on it):

  case                 metric (fp32)    all-int8: off / a0.3 / a0.5 / a0.7 / a0.85  int8 ops at criterion: off -> SQ
  outlier_transformer  top-1 (0.9600)   0.9333 / 0.9600 / 0.9617 / 0.9617 / 0.9617  30/32 -> 32/32 (every alpha)
  hard_transformer     top-1 (0.9600)   0.6533 at every alpha (nothing smoothed)     30/32 -> 30/32
  minilm_spam          top-1 (0.9575)   0.9487 / 0.9000 / 0.9413 / 0.9575 / 0.9513  165/165 (off passes) -> 164 (a0.5)
  minilm_spam_cosine   cosine (1.0)     0.7827 / 0.6817 / 0.7819 / 0.7856 / 0.7848  22/165 -> 68/165 (a0.5)

outlier_transformer: four LayerNorm outputs (three fused by ORT into SkipLayerNormalization) with outlier
channels 40-55x the median; all four folded, no Mul. hard_transformer has no activation outliers (its
hostility is in the weights: an always-zero input channel with a huge weight row), so no input qualifies
(max/median 1.0-1.9) and SmoothQuant changes nothing. minilm_spam: 15 inputs qualify (LayerNorm outputs,
max/median 4.5-15; GELU outputs 4.2-14.6), all with an inserted Mul (post-norm: the normalised tensor also
feeds the residual Add); alpha 0.7 lifts all-int8 top-1 to fp32's, alpha 0.3 hurts, and at the cosine
criterion alpha 0.5 keeps three times as many ops int8.

alpha per_layer (each group its own alpha by its local int8 error, smooth_alpha.py), measured 2026-12-07 (load
6-19, other work beside it): outlier_transformer picks 0.8-0.9 for its four groups, all-int8 top-1 0.9617, 34/34
ops int8 (as alpha 0.5; this build quantizes 34 ops). minilm_spam picks 0.7-0.9 (mostly 0.9): all-int8 top-1
0.9487 (passes, as without SQ); cosine all-int8 0.7848, 56/165 ops int8 at the criterion against 68 (alpha 0.5)
and 64 (alpha 0.7): the local error favours a strong alpha that the whole model does not. The 15 inserted Muls
take 4.0-4.9 % of MiniLM's all-int8 kernel time (ORT profiler, 30 runs of batch 32, 2 threads), per_layer or not.
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
ALPHAS: tuple[float | str, ...] = (0.3, 0.5, 0.7, 0.85, "per_layer")
PROFILE_RUNS = 30
CRITERION = 0.01
logger = logging.getLogger("smooth_quant")
CASES = {  # folder, model, calibration, evaluation (samples), calibration samples, output, metric
    "outlier_transformer": ("outlier_transformer", "model.onnx", "calib.npz", ("eval.npz", None), 200, None, "top1"),
    "hard_transformer": ("hard_transformer", "model.onnx", "calib.npz", ("eval.npz", None), 200, None, "top1"),
    "minilm_spam": ("minilm_spam", "build/minilm_spam.onnx", "build/calib.npz", ("build/eval.npz", None), 100,
                    "logits", "top1"),
    "minilm_spam_cosine": ("minilm_spam", "build/minilm_spam.onnx", "build/calib.npz", ("build/eval.npz", 320),
                           100, "sentence_embedding", "cosine"),
}
"""top1: relative 1 % below fp32 (the examples' criterion); cosine: the mean cosine similarity of the output to
fp32's at least 0.98 (absolute 0.02, as examples/minilm_spam/job-cosine.yaml)."""


def _dataset(path: Path, limit: int | None = None) -> tuple[Any, np.ndarray]:
    from qtune.data import Dataset

    with np.load(path) as data:
        arrays = {k: data[k][:limit] for k in data.files if k != "labels"}
        labels = data["labels"][:limit]
    return Dataset(arrays, labels), labels


class Bench:
    """One model through the onnxruntime adaptor: accuracy of a config, fallback search."""

    def __init__(self, model_path: Path, calib: Path, evaluation: tuple[Path, int | None], samples: int,
                 output: str | None, metric: str, workspace: Path) -> None:
        from qtune.adaptors.onnxrt import OnnxRuntimeAdaptor
        from qtune.spec.models import QuantizationSpec
        from qtune.tuning.space import build_space

        self.adaptor = OnnxRuntimeAdaptor({"workspace": str(workspace), "threads": 2, "output": output})
        self.model = self.adaptor.load_model({"framework": "onnxruntime", "path": str(model_path)})
        self.calib, _ = _dataset(calib, samples)
        self.eval, self.labels = _dataset(*evaluation)
        self.metric, self.reference = metric, None
        self.adaptor.info["calibration_data"] = self.calib
        capability = self.adaptor.query_fw_capability(self.model)
        self.space = build_space(capability, QuantizationSpec(approach="static"), [], samples)
        self.base = self.space.default_config("static")
        self.reference = self.adaptor.predict(self.model, self.eval.loader(64))
        self.fp32 = self.accuracy(None)

    def config(self, alpha: float | str | None) -> Any:
        from qtune.tuning.space import SMOOTH_QUANT

        return self.base if alpha is None else replace(self.base, extras={SMOOTH_QUANT: alpha})

    def quantized(self, config: Any) -> Any:
        from qtune.tuning import codec

        return self.adaptor.quantize(codec.dump(config), self.model, self.calib.loader(32))

    def accuracy(self, config: Any) -> float:
        model = self.model if config is None else self.quantized(config)
        predictions = self.adaptor.predict(model, self.eval.loader(64))
        if self.metric == "cosine":
            a, b = predictions.reshape(len(predictions), -1), self.reference.reshape(len(predictions), -1)
            return float(np.mean((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)))
        return float((np.argmax(predictions, axis=-1) == self.labels).mean())

    def passes(self, accuracy: float) -> bool:
        if self.metric == "cosine":
            return accuracy >= self.fp32 - 2 * CRITERION
        return accuracy >= self.fp32 * (1 - CRITERION)

    def mul_cost(self, alpha: float | str) -> tuple[int, float]:
        """(inserted Muls, their share of the all-int8 model's kernel time): ORT's profiler over PROFILE_RUNS
        runs of a 32-sample batch, 2 threads, after one warm-up run."""
        import json

        import onnxruntime as ort

        model = self.quantized(self.config(alpha))
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.enable_profiling = 2, True
        options.profile_file_prefix = str(Path(self.adaptor.workspace) / "sq-profile")
        session = ort.InferenceSession(str(model.path), options, providers=["CPUExecutionProvider"])
        feed = {name: array[:32] for name, array in self.eval.take(32).inputs.items()}
        for _ in range(PROFILE_RUNS + 1):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
        kernels = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
        total = sum(e["dur"] for e in kernels)
        muls = [e for e in kernels if "_smooth_mul" in e["name"]]
        return len({e["name"] for e in muls}), sum(e["dur"] for e in muls) / max(total, 1)

    def int8_kept(self, alpha: float | str | None) -> tuple[int, float, int]:
        """(ops kept int8, score, trials): the fewest most-sensitive ops in fp32 that pass (1, 2, 4, ... then
        bisection; the adaptor's per-op sensitivity of this config ranks them)."""
        from qtune.tuning import codec

        config = self.config(alpha)
        order = self.adaptor.op_sensitivity(self.model, codec.dump(config), self.calib)
        ranked = sorted(config.quantized_ops(), key=lambda n: -order.get(n, 0.0))
        tried: dict[int, float] = {}

        kept: dict[int, int] = {}
        """fallback count → ops the adaptor really quantized (ops forced fp32, e.g. by a mask range, are not)."""

        def score(count: int) -> float:
            if count not in tried:
                tried[count] = self.accuracy(config.with_fallback(ranked[:count]))
                kept[count] = len(self.adaptor.last_quantization.get("plan", {}).get("quantized", []))
            return tried[count]

        low, high = -1, 0  # low: fails (or none yet), high: the count probed next / passing
        while not self.passes(score(high)) and high < len(ranked):
            low, high = high, min(len(ranked), max(1, 2 * high))
        while high - low > 1 and self.passes(score(high)):
            middle = (low + high) // 2
            if middle <= low:
                break
            if self.passes(score(middle)):
                high = middle
            else:
                low = middle
        return kept[high] if high in kept else len(ranked) - high, score(high), len(tried)


def measure(name: str, alphas: tuple[float | str, ...] = ALPHAS) -> dict[str, Any]:
    example, model, calib, (evaluation, count), samples, output, metric = CASES[name]
    folder = ROOT / "examples" / example
    if name == "outlier_transformer" and not (folder / model).is_file():
        sys.path.insert(0, str(folder))
        from build import build  # examples/outlier_transformer/build.py

        build(folder)
    if not (folder / model).is_file():
        return {"name": name, "skipped": f"not built: python examples/{example}/build.py"}
    with tempfile.TemporaryDirectory(prefix="qtune-sq-") as workspace:
        bench = Bench(folder / model, folder / calib, (folder / evaluation, count), samples, output, metric,
                      Path(workspace))
        row: dict[str, Any] = {"name": name, "fp32": bench.fp32, "metric": metric}
        row["all_int8"] = {"off": bench.accuracy(bench.config(None))}
        row["ops"] = len(bench.adaptor.last_quantization["plan"]["quantized"])  # all-int8: what the adaptor quantizes
        row["smoothing"] = {}
        for alpha in ALPHAS:
            row["all_int8"][alpha] = bench.accuracy(bench.config(alpha))
            row["smoothing"][alpha] = bench.adaptor.last_quantization.get("smooth_quant", {})
        row["mul_cost"] = {a: bench.mul_cost(a) for a in (0.5, "per_layer")}
        row["kept"] = {"off": bench.int8_kept(None)}
        row["kept"].update({a: bench.int8_kept(a) for a in alphas})
    return row


def report(row: dict[str, Any]) -> None:
    if "skipped" in row:
        print(f"{row['name']}: skipped ({row['skipped']})")
        return
    rule = f"{CRITERION:.0%} relative" if row["metric"] == "top1" else f"cosine >= {1 - 2 * CRITERION:.2f}"
    print(f"{row['name']}: fp32 {row['metric']} {row['fp32']:.4f}, {row['ops']} quantizable ops, criterion {rule}")
    for alpha in (0.5, "per_layer"):
        smoothing = row["smoothing"].get(alpha, {})
        print(f"  SmoothQuant groups (alpha {alpha}): "
              + ("; ".join(f"{g['activation']} -> {','.join(g['matmuls'])} via {g['absorber']} (max/median "
                           f"{g['outlier_ratio']}, alpha {g.get('alpha')})" for g in smoothing.get("groups", []))
                 or "none"))
        reasons = [why.split(" (")[0] for why in smoothing.get("skipped", {}).values()]
        for reason in sorted(set(reasons)):
            print(f"    skipped {reasons.count(reason)}: {reason}")
        muls, share = row["mul_cost"][alpha]
        print(f"    inserted Muls: {muls}, {share:.1%} of the all-int8 model's kernel time (ORT profiler, "
              f"{PROFILE_RUNS} runs of batch 32, 2 threads)")
    header = ("SmoothQuant", f"all-int8 {row['metric']}", "ops int8 at criterion", "score there", "trials")
    print(f"  {header[0]:>12} {header[1]:>15} {header[2]:>22} {header[3]:>12} {header[4]:>7}")
    for key, accuracy in row["all_int8"].items():
        kept, kept_accuracy, trials = row["kept"].get(key, ("-", float("nan"), 0))
        label = "off" if key == "off" else f"alpha {key}"
        share = f"{kept}/{row['ops']}"
        print(f"  {label:>12} {accuracy:>15.4f} {share:>22} {kept_accuracy:>12.4f} {trials:>7}")


def _alpha(text: str) -> float | str:
    return text if text == "per_layer" else float(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*", default=list(CASES), choices=[*CASES, []])
    parser.add_argument("--alphas", type=_alpha, nargs="+", default=list(ALPHAS),
                        help="the alphas whose int8 op count is searched (all-int8 is measured at every alpha)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    for name in args.cases:
        report(measure(name, tuple(args.alphas)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
