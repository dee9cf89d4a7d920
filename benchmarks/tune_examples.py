"""Tune every bundled example and the hard cases from scratch; check each claimed speedup independently.

Cases: the bundled examples (digits, fashion_mnist, minilm_spam ONNX and PyTorch, when their build
scripts work offline here) and hard cases where int8 everywhere fails the criterion and a few ops
must stay fp32: `hard_cnn`, `hard_transformer` (examples/hard_*) and the hostile MLP of
tests/integration/sensitive_model.py. Per case it prints: trials to the first passing config, trials
run, the outcome, the claimed speedup of the winner with its interval, and an INDEPENDENT
re-measurement: a separate `python` process loads the fp32 model and the winner in ONNX Runtime
sessions (threads as in the job) and times them interleaved A B A B over >= 7 rounds; its median
ratio and spread (min-max of the per-round ratios) are compared with the claim: "agree" when
within 15% or when the intervals overlap.

    python benchmarks/tune_examples.py [case ...] [--rounds 9] [--runs 50]
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = {
    "digits": ("examples/digits/build.py", "examples/digits/job.yaml"),
    "fashion_mnist": ("examples/fashion_mnist/build.py", "examples/fashion_mnist/job.yaml"),
    "minilm_spam_onnx": ("examples/minilm_spam/build.py", "examples/minilm_spam/job-onnx.yaml"),
    "minilm_spam": ("examples/minilm_spam/build.py", "examples/minilm_spam/job.yaml"),
    "hard_cnn": ("examples/hard_cnn/build.py", "examples/hard_cnn/job.yaml"),
    "hard_transformer": ("examples/hard_transformer/build.py", "examples/hard_transformer/job.yaml"),
    "hostile_mlp": (None, None),
}

MLP_JOB = """\
apiVersion: qtune.io/v1alpha1
kind: QuantizationJob
metadata: {name: hostile-mlp}
spec:
  model: {framework: onnxruntime, path: sensitive_mlp.onnx}
  data:
    calibration: {path: calib.npz, samples: 200}
    evaluation: {path: eval.npz, metric: top1}
  quantization: {approach: static, format: QDQ}
  tuning:
    strategy: basic
    accuracyCriterion: {relative: 0.01, higherIsBetter: true}
    objective: latency
    maxTrials: 12
    parallelTrials: 1
    seed: 0
  benchmark: {batchSizes: [1, 64], threads: 1}
"""

# The independent check: its own process, its own sessions, nothing imported from qtune.
REMEASURE = textwrap.dedent("""
    import json, statistics, sys, time
    import numpy as np, onnxruntime as ort
    fp32_path, int8_path, npz, batch, threads, rounds, runs = sys.argv[1:8]
    batch, threads, rounds, runs = int(batch), int(threads), int(rounds), int(runs)
    def session(path):
        o = ort.SessionOptions(); o.intra_op_num_threads = threads; o.inter_op_num_threads = 1
        o.log_severity_level = 3
        return ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])
    a, b = session(fp32_path), session(int8_path)
    with np.load(npz) as data:
        feed = {}
        for item in a.get_inputs():
            x = data[item.name]
            x = np.concatenate([x] * (-(-batch // len(x))))[:batch]
            feed[item.name] = x
    def one(s):
        t = time.perf_counter(); s.run(None, feed); return time.perf_counter() - t
    for s in (a, b):
        for _ in range(3): s.run(None, feed)
    slowest = max(one(a), one(b))
    runs = max(3, min(runs, int(0.3 / slowest)))  # windows of about 0.3 s, as long models need
    def window(s):
        for _ in range(2): s.run(None, feed)
        times = []
        for _ in range(runs):
            t = time.perf_counter(); s.run(None, feed); times.append(time.perf_counter() - t)
        return statistics.median(times)
    ratios, fa, fb = [], [], []
    for r in range(rounds):
        first, second = (a, b) if r % 2 == 0 else (b, a)
        t1, t2 = window(first), window(second)
        ta, tb = (t1, t2) if r % 2 == 0 else (t2, t1)
        fa.append(ta); fb.append(tb); ratios.append(ta / tb)
    print(json.dumps({"speedup": statistics.median(ratios), "low": min(ratios), "high": max(ratios),
                      "fp32_ms": 1e3 * statistics.median(fa), "int8_ms": 1e3 * statistics.median(fb)}))
""")


def remeasure(fp32: Path, int8: Path, npz: Path, batch: int, threads: int, rounds: int, runs: int) -> dict:
    out = subprocess.run([sys.executable, "-c", REMEASURE, str(fp32), str(int8), str(npz), str(batch),
                          str(threads), str(rounds), str(runs)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def prepare(name: str, scratch: Path) -> Path | None:
    """Build the case (offline) and return its job file, or None when it cannot be built here."""
    if name == "hostile_mlp":
        sys.path.insert(0, str(ROOT / "tests" / "integration"))
        from sensitive_model import build_sensitive_mlp

        build_sensitive_mlp(scratch / "mlp")
        job_file = scratch / "mlp" / "job.yaml"
        job_file.write_text(MLP_JOB)
        return job_file
    build, job_path = EXAMPLES[name]
    if not (ROOT / build).exists() or not (ROOT / job_path).exists():
        return None
    done = subprocess.run([sys.executable, str(ROOT / build)], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"  build failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
        return None
    return ROOT / job_path


def run_case(name: str, rounds: int, runs: int) -> dict | None:
    from qtune.local import tune
    from qtune.spec import load_job

    with tempfile.TemporaryDirectory(prefix=f"qtune-bench-{name}-") as tmp:
        scratch = Path(tmp)
        print(f"\n## {name}", flush=True)
        job_file = prepare(name, scratch)
        if job_file is None:
            print("  not available here (build script missing or failed offline)")
            return None
        job = load_job(job_file)
        started = time.monotonic()
        outcome = tune(job, job_file, output_dir=scratch / "out", workspace=scratch / "ws")
        wall = time.monotonic() - started
        history = outcome.history
        passing = [t for t in history.trials if t.passed]
        first = 1 + min(t.index for t in passing) if passing else None
        row = {"case": name, "framework": job.spec.model.framework, "trials": len(history.trials),
               "first_pass": first, "outcome": outcome.outcome, "wall_s": round(wall, 1)}
        print(f"  {job.spec.model.framework}; fp32 accuracy {outcome.baseline.accuracy:.4f}; trials to first pass "
              f"{first}; trials run {len(history.trials)}; outcome {outcome.outcome} ({outcome.stop_reason}); "
              f"{wall:.0f}s")
        for t in history.trials:
            speed = t.speed_at()
            accuracy = "-" if t.accuracy is None else f"{t.accuracy:.4f}"
            print(f"    trial {t.index}: {'pass' if t.passed else 'fail'} acc {accuracy}"
                  f" fp32 ops {len(t.config.fp32_ops())}/{len(t.config.ops)}"
                  f"{'' if speed is None else ' speed ' + speed.describe()}")
        best = outcome.best
        claimed = outcome.session.best_speed()
        if best is None or claimed is None:
            print("  winner: none" if best is None else "  winner has no speed figures")
            return row
        print(f"  winner: trial {best.index}, {len(best.config.fp32_ops())} ops fp32; claimed {claimed.describe()}")
        row.update(claimed=claimed.speedup, claimed_low=claimed.low, claimed_high=claimed.high)
        if job.spec.model.framework != "onnxruntime" or not best.model_path:
            print("  independent re-measurement: only for ONNX Runtime models")
            return row
        fp32_path = Path(job_file).parent / job.spec.model.path
        eval_npz = Path(job_file).parent / job.spec.data.evaluation.path
        threads = job.spec.benchmark.threads or claimed.threads or 1
        check = remeasure(fp32_path, Path(best.model_path), eval_npz, claimed.batch_size, threads, rounds, runs)
        within = abs(claimed.speedup - check["speedup"]) <= 0.15 * check["speedup"]
        overlap = claimed.low <= check["high"] and check["low"] <= claimed.high
        verdict = "agree" if (within or overlap) else "DISAGREE"
        print(f"  independent: {check['speedup']:.2f}x [{check['low']:.2f}-{check['high']:.2f}] (fp32 "
              f"{check['fp32_ms']:.3f} ms, int8 {check['int8_ms']:.3f} ms, batch {claimed.batch_size}, {threads} "
              f"thread(s), {rounds} rounds); claim {verdict} (within 15%: {within}, intervals overlap: {overlap})")
        if outcome.outcome == "GoalReached" and check["speedup"] < 1.0:
            print("  WARNING: GoalReached with a winner measured slower than fp32")
        row.update(independent=check["speedup"], independent_low=check["low"], independent_high=check["high"],
                   verdict=verdict)
        return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cases", nargs="*", default=list(EXAMPLES))
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds of the re-measurement (>= 7)")
    parser.add_argument("--runs", type=int, default=50, help="runs per window of the re-measurement")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    sys.path.insert(0, str(ROOT))
    rows = [row for name in args.cases if (row := run_case(name, max(7, args.rounds), args.runs))]
    print("\n| case | trials to first pass | trials | outcome | claimed | independent | verdict |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        claimed = f"{r['claimed']:.2f}x [{r['claimed_low']:.2f}-{r['claimed_high']:.2f}]" if "claimed" in r else "-"
        independent = (f"{r['independent']:.2f}x [{r['independent_low']:.2f}-{r['independent_high']:.2f}]"
                       if "independent" in r else "-")
        print(f"| {r['case']} | {r['first_pass']} | {r['trials']} | {r['outcome']} | {claimed} | {independent} | "
              f"{r.get('verdict', '-')} |")


if __name__ == "__main__":
    main()
