"""fp32 vs int8 MiniLM spam classifier with the PyTorch adaptor directly (no tuner).

For a few configs (static int8 of every Linear; dynamic int8 with per-channel and per-tensor
weights, 8-bit and 7-bit activations) it quantizes, evaluates top-1 accuracy on the held-out mails
and the mean cosine similarity of the sentence embeddings to fp32, and benchmarks batch 32 x 128
tokens. The benchmark interleaves the variants (A B C A B C ...) over several rounds and reports
the median of the round medians, and the quietest round's medians (the minimum over rounds, what
the hardware does when nothing else runs): on a shared machine only ratios measured in one run
mean much.

Run after build.py:  python examples/minilm_spam/measure.py [--rounds 5] [--threads 2]
Writes examples/minilm_spam/build/measure.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

logger = logging.getLogger("minilm_spam.measure")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=5, help="timed runs per variant and round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cosine-samples", type=int, default=320)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    import torch

    from qtune.adaptors import get_adaptor_class
    from qtune.data import create_metric, load_dataset
    from qtune.spec import load_job
    from qtune.tuning import codec
    from qtune.tuning.space import build_space

    torch.set_num_threads(args.threads)
    job_file = HERE / "job.yaml"
    job = load_job(job_file)
    spec = job.spec
    model_spec = spec.model.model_dump()
    adaptor = get_adaptor_class("pytorch")({"workspace": str(HERE / "build" / "measure-workspace"),
                                            "job_dir": str(HERE), "threads": args.threads, "output": 0})
    started = time.perf_counter()
    fp32 = adaptor.load_model(model_spec)
    load_seconds = time.perf_counter() - started
    names = adaptor.input_names(fp32)
    calibration = load_dataset(spec.data.calibration, job_file, names)
    evaluation = load_dataset(spec.data.evaluation, job_file, names)
    cosine_set = evaluation.take(args.cosine_samples)
    batch = {name: array[:32] for name, array in evaluation.inputs.items()}

    capability = adaptor.query_fw_capability(fp32)
    patterns = adaptor.query_fused_patterns(fp32)
    static = build_space(capability, spec.quantization.model_copy(update={"approach": "static"}), patterns,
                         len(calibration)).default_config("static")
    dynamic = build_space(capability, spec.quantization.model_copy(update={"approach": "dynamic"}), patterns,
                          len(calibration)).default_config("dynamic")

    def variant(base, **weight_or_activation):  # noqa: ANN001, ANN202
        data = codec.dump(base)
        for op in data["ops"].values():
            for role, changes in weight_or_activation.items():
                op[role].update(changes)
        return data

    configs = {
        "static int8 (all Linear, minmax, per-channel)": codec.dump(static),
        "dynamic int8 per-channel": codec.dump(dynamic),
        "dynamic int8 per-channel, 7-bit activations": variant(dynamic, activation={"reduce_range": True}),
        "dynamic int8 per-tensor": variant(dynamic, weight={"granularity": "per_tensor"}),
    }

    reference = adaptor.predict(fp32, cosine_set.loader(32), output=1)
    results: dict[str, dict] = {}
    models = {"fp32": fp32}
    phase = time.perf_counter()
    accuracy = adaptor.evaluate(fp32, evaluation.loader(32), metric=create_metric("top1"))
    results["fp32"] = {"accuracy": accuracy, "cosine": 1.0, "evaluate_s": round(time.perf_counter() - phase, 1),
                       "load_s": round(load_seconds, 1), "ops": len(capability["graph_order"])}
    logger.info("fp32: accuracy %.4f (%d ops, load %.1fs)", accuracy, len(capability["graph_order"]), load_seconds)
    for label, config in configs.items():
        phase = time.perf_counter()
        quantized = adaptor.quantize(config, fp32, calibration.loader(32))
        timings = dict(adaptor.timings)
        evaluated = time.perf_counter()
        accuracy = adaptor.evaluate(quantized, evaluation.loader(32), metric=create_metric("top1"))
        evaluate_seconds = time.perf_counter() - evaluated
        cosine = create_metric("cosine")
        cosine.update(adaptor.predict(quantized, cosine_set.loader(32), output=1), reference)
        models[label] = quantized
        results[label] = {"accuracy": accuracy, "cosine": round(cosine.result(), 4), "timings": timings,
                          "evaluate_s": round(evaluate_seconds, 1), "int8_ops": len(quantized.quantized_ops),
                          "quantize_and_evaluate_s": round(time.perf_counter() - phase, 1)}
        logger.info("%s: accuracy %.4f, cosine %.4f, %s", label, accuracy, cosine.result(), timings)

    rounds: dict[str, list[float]] = {label: [] for label in models}
    for _ in range(args.rounds):
        for label, model in models.items():
            stats = adaptor.benchmark(model, batch, warmup=1, runs=args.runs, threads=args.threads)
            rounds[label].append(stats.p50_ms)
    baseline = statistics.median(rounds["fp32"])
    for label in models:
        latency = statistics.median(rounds[label])
        best = min(rounds[label])
        results[label].update(latency_ms=round(latency, 1), speedup=round(baseline / latency, 2),
                              best_round_ms=round(best, 1), best_round_speedup=round(min(rounds["fp32"]) / best, 2),
                              round_medians_ms=[round(v, 1) for v in rounds[label]])
    fp32_accuracy = results["fp32"]["accuracy"]
    for label, result in results.items():
        result["meets_1pct_relative"] = result["accuracy"] >= fp32_accuracy * 0.99
        print(f"{label:48s} top1 {result['accuracy']:.4f}  cosine {result['cosine']:.4f}  "
              f"batch32 {result['latency_ms']:7.1f} ms  x{result['speedup']:.2f} "
              f"(quietest round {result['best_round_ms']:6.1f} ms x{result['best_round_speedup']:.2f})  "
              f"{'meets' if result['meets_1pct_relative'] else 'misses'} 1%")
    out = HERE / "build" / "measure.json"
    out.write_text(json.dumps({"threads": args.threads, "rounds": args.rounds, "runs": args.runs,
                               "eval_mails": len(evaluation), "results": results}, indent=2))
    logger.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
