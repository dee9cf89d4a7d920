"""Tune each bundled example from scratch and print a table per example.

Figures: fp32 and int8 accuracy, int8/fp32 latency ratio (p50 at batch 1 and at the largest
configured batch, measured interleaved A B A B over several rounds in this one process, median
of round medians, fixed threads), trials to the criterion, tuning wall time, and each trial's
time split (calibration, quantize, evaluate, benchmark).

    python benchmarks/tune_examples.py [digits fashion_mnist minilm_spam minilm_spam_onnx] [--rounds 5]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = {
    "digits": ("examples/digits/build.py", "examples/digits/job.yaml"),
    "fashion_mnist": ("examples/fashion_mnist/build.py", "examples/fashion_mnist/job.yaml"),
    "minilm_spam": ("examples/minilm_spam/build.py", "examples/minilm_spam/job.yaml"),
    "minilm_spam_onnx": ("examples/minilm_spam/build.py", "examples/minilm_spam/job-onnx.yaml"),
}


def interleaved_ratio(context, fp32_model, int8_model, batch: dict, rounds: int,  # noqa: ANN001
                      runs: int) -> tuple[float, float, float]:
    """(fp32 ms, int8 ms, int8/fp32) as the median of per-round medians, A and B alternating."""
    adaptor, threads = context.adaptor, context.benchmark_threads
    fp32_times, int8_times = [], []
    for _ in range(rounds):
        fp32_times.append(adaptor.benchmark(fp32_model, batch, 3, runs, threads).p50_ms)
        int8_times.append(adaptor.benchmark(int8_model, batch, 3, runs, threads).p50_ms)
    a, b = statistics.median(fp32_times), statistics.median(int8_times)
    return a, b, b / a


def run_example(name: str, rounds: int) -> None:
    from qtune.local import tune
    from qtune.runner.context import JobContext
    from qtune.spec import load_job

    build, job_path = EXAMPLES[name]
    if not (ROOT / build).exists():
        print(f"\n## {name}: not available ({build} missing)")
        return
    subprocess.run([sys.executable, str(ROOT / build)], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    job_file = ROOT / job_path
    job = load_job(job_file)
    with tempfile.TemporaryDirectory(prefix=f"qtune-bench-{name}-") as scratch:
        started = time.monotonic()
        outcome = tune(job, job_file, output_dir=Path(scratch) / "out", workspace=Path(scratch) / "ws")
        wall = time.monotonic() - started
        print(f"\n## {name}  ({job.spec.model.framework}, strategy {job.spec.tuning.strategy}, "
              f"criterion {job.spec.tuning.accuracy_criterion.model_dump(exclude_none=True)})")
        print(f"stopped: {outcome.stop_reason} -> {outcome.outcome}; trials run: {len(outcome.history.trials)}; "
              f"tuning wall time: {wall:.1f}s (baseline step {outcome.baseline.seconds:.1f}s)")
        best = outcome.best
        print(f"fp32 accuracy: {outcome.baseline.accuracy:.4f}")
        if best is None:
            print("int8: no configuration met the criterion")
        else:
            first_pass = min(t.index for t in outcome.history.trials if t.passed)
            print(f"int8 accuracy: {best.accuracy:.4f} (best = trial {best.index}, "
                  f"{len(best.config.fp32_ops())}/{len(best.config.ops)} ops fp32, approach {best.config.approach}); "
                  f"trials to the criterion: {first_pass + 1}")
            context = JobContext(job, job_file.parent, Path(scratch) / "ws", threads=context_threads(job))
            # the winner again, from its tune config (calibration comes from the job's cache)
            int8_model = context.adaptor.quantize(best.tune_config, context.model, context.calibration_loader())
            print(f"{'batch':>6} {'fp32 p50 ms':>12} {'int8 p50 ms':>12} {'int8/fp32':>10}")
            for size, batch in context.benchmark_batches().items():
                a, b, ratio = interleaved_ratio(context, context.model, int8_model, batch, rounds,
                                                job.spec.benchmark.runs)
                print(f"{size:>6} {a:>12.3f} {b:>12.3f} {ratio:>10.3f}")
        print(f"{'trial':>5} {'status':>9} {'accuracy':>9} {'pass':>5} {'calib s':>8} {'quant s':>8} "
              f"{'eval s':>7} {'bench s':>8} {'total s':>8}")
        for t in outcome.history.trials:
            s = t.timings or {}
            accuracy = f"{t.accuracy:.4f}" if t.accuracy is not None else "-"
            print(f"{t.index:>5} {t.status:>9} {accuracy:>9} {'yes' if t.passed else 'no':>5} "
                  f"{s.get('calibration', 0):>8.2f} {s.get('quantize', 0):>8.2f} {s.get('evaluate', 0):>7.2f} "
                  f"{s.get('benchmark', 0):>8.2f} {s.get('total', 0):>8.2f}")


def context_threads(job) -> int:  # noqa: ANN001
    from qtune.local.executor import cpu_slots

    return job.spec.benchmark.threads or len(cpu_slots(job.spec.tuning.parallel_trials)[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("examples", nargs="*", default=list(EXAMPLES))
    parser.add_argument("--rounds", type=int, default=5, help="interleaved latency rounds")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    sys.path.insert(0, str(ROOT))
    for name in args.examples:
        run_example(name, args.rounds)


if __name__ == "__main__":
    main()
