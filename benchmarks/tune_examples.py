"""Tune every bundled example and the hard cases from scratch; check each claimed speedup independently.

Cases: the bundled examples (digits, fashion_mnist, minilm_spam ONNX, ONNX weight-only and PyTorch, when their build
scripts work offline here) and hard cases where int8 everywhere fails the criterion and a few ops
must stay fp32: `hard_cnn`, `hard_transformer` (examples/hard_*), the hostile MLP of
tests/integration/sensitive_model.py, and `mobile_strips` (examples/mobile_strips: a MobileNetV3-style
recogniser whose speed lives in a few wide Conv/MatMul ops among many elementwise ones), and `decoder_lm`
(a 2048-wide decoder language model with a KV cache, weight-only, decode speed: its rows compare fp32, int4
everywhere (the ladder's first trial) and the winner on perplexity, decode tokens/s and prefill time, each
re-measured independently by benchmarks/decode_remeasure.py). Per case it
prints: trials to the first passing config, trials run, the outcome, the claimed speedup of the
winner with its interval, and an INDEPENDENT re-measurement at every batch size of the job: each
model alone in a `python` process of its own (ONNX Runtime's default options, threads as the claim
was measured with), the two processes taking turns in windows of about 0.25 s, A B B A, over >= 7
rounds and >= 50 runs of each; its median per-round ratio
and spread (min-max of the per-round ratios) are compared with the claim: "agree" when within 15%
or when the intervals overlap.

Contention rows (`<case>_hog`, e.g. `mobile_strips_hog`): the same tuning while a CPU hog
(`python3 -c "while 1: pass"`, pinned to CPU 0) runs, the hog stopped before the re-measurement, so
the claim made on a busy machine is checked against a quiet independent figure. A claim the run
itself marked untrusted (too busy to measure) is reported as such, not as a disagreement.

    python benchmarks/tune_examples.py [case ...] [--rounds 9] [--runs 50]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = {
    "digits": ("examples/digits/build.py", "examples/digits/job.yaml"),
    "fashion_mnist": ("examples/fashion_mnist/build.py", "examples/fashion_mnist/job.yaml"),
    "minilm_spam_onnx": ("examples/minilm_spam/build.py", "examples/minilm_spam/job-onnx.yaml"),
    "minilm_spam": ("examples/minilm_spam/build.py", "examples/minilm_spam/job.yaml"),
    "minilm_spam_weight_only": ("examples/minilm_spam/build.py", "examples/minilm_spam/job-weight-only.yaml"),
    "minilm_spam_weight_only_cosine": ("examples/minilm_spam/build.py",
                                       "examples/minilm_spam/job-weight-only-cosine.yaml"),
    "hard_cnn": ("examples/hard_cnn/build.py", "examples/hard_cnn/job.yaml"),
    "hard_transformer": ("examples/hard_transformer/build.py", "examples/hard_transformer/job.yaml"),
    "hostile_mlp": (None, None),
    "mobile_strips": ("examples/mobile_strips/build.py", "examples/mobile_strips/job.yaml"),
    "decoder_lm": ("examples/decoder_lm/build.py", "examples/decoder_lm/job.yaml"),
}
HOG_SUFFIX = "_hog"
"""`<case>_hog`: the case tuned while a CPU hog holds one core (the contention row)."""
HOG_CASES = ("mobile_strips_hog",)

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

# The independent check: each model alone in a process of its own (ORT's default options, spinning included,
# as a deployed model runs), the two processes taking turns window by window (the idle one waits on its pipe);
# nothing imported from qtune. Two sessions in ONE process would not do: after a run ORT's idle workers keep
# spinning and take a core from the other session's threads. Short windows in turn, as qtune's own, because
# this VM's speed drifts by up to 1.7x for seconds at a time (host load no counter here shows).
ONE_MODEL = textwrap.dedent("""
    import json, statistics, sys, time
    import numpy as np, onnxruntime as ort
    path, npz, batch, threads = sys.argv[1:5]
    batch, threads = int(batch), int(threads)
    o = ort.SessionOptions(); o.intra_op_num_threads = threads; o.inter_op_num_threads = 1
    o.log_severity_level = 3
    s = ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])
    with np.load(npz) as data:
        feed = {}
        for item in s.get_inputs():
            x = data[item.name]
            feed[item.name] = np.concatenate([x] * (-(-batch // len(x))))[:batch]
    for _ in range(3): s.run(None, feed)
    t = time.perf_counter(); s.run(None, feed)
    print(json.dumps({"ready": time.perf_counter() - t}), flush=True)
    for line in sys.stdin:  # one window per line: "<runs>"; answers its median run time
        times = []
        for _ in range(int(line)):
            t = time.perf_counter(); s.run(None, feed); times.append(time.perf_counter() - t)
        print(json.dumps({"ms": 1e3 * statistics.median(times)}), flush=True)
""")
WINDOW_SECONDS = 0.25


def stalled_us() -> int | None:
    """Microseconds some task of this machine waited for a CPU (PSI total), None without PSI."""
    try:
        with open("/proc/pressure/cpu") as f:
            return int(f.readline().split("total=")[1])
    except (OSError, IndexError, ValueError):
        return None


class WindowProcess:
    """One model in an ONNX Runtime session of its own process (`script`, run with `python -c` and `args`: it
    prints {"ready": seconds of one run}, then answers each line "<runs>" with {"ms": their median});
    `window(runs)` times `runs` runs there. decode_remeasure.py runs its decode loops through it too."""

    def __init__(self, script: str, *args: object) -> None:
        self.process = subprocess.Popen([sys.executable, "-c", script, *map(str, args)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)
        self.run_seconds = float(self._answer()["ready"])

    def _answer(self) -> dict:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the re-measure process ended (exit {self.process.wait()})")
        return json.loads(line)

    def window(self, runs: int) -> float:
        assert self.process.stdin is not None
        self.process.stdin.write(f"{runs}\n")
        self.process.stdin.flush()
        return float(self._answer()["ms"])

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait(timeout=60)


QUIET_PRESSURE = 0.10
"""The machine counts as quiet when tasks waited for a CPU less than this share of the time (PSI `some`)."""


def cpu_pressure(seconds: float = 0.0) -> float | None:
    """PSI: the share of time some task waited for a CPU, over the last 10 s (or measured over `seconds`)."""
    if seconds <= 0:
        try:
            with open("/proc/pressure/cpu") as f:
                return float(f.readline().split("avg10=")[1].split()[0]) / 100
        except (OSError, IndexError, ValueError):
            return None
    before = stalled_us()
    time.sleep(seconds)
    after = stalled_us()
    return None if before is None or after is None else (after - before) / 1e6 / seconds


def wait_for_quiet(limit_s: float) -> float | None:
    """Wait (at most `limit_s`) until the machine is quiet; returns the last pressure read (None: no PSI)."""
    deadline = time.monotonic() + limit_s
    pressure = cpu_pressure(2.0)
    while pressure is not None and pressure >= QUIET_PRESSURE and time.monotonic() < deadline:
        pressure = cpu_pressure(2.0)
    return pressure


def remeasure(fp32: Path, int8: Path, npz: Path, batch: int, threads: int, rounds: int, runs: int,
              quiet_wait_s: float = 60.0) -> dict:
    """The independent check (ONE_MODEL: each model alone in its own process, windows of about WINDOW_SECONDS
    in turn, at least `rounds` rounds alternating which goes first, `runs` runs per model at least); waits up to
    `quiet_wait_s` for a quiet machine first. Returns the median per-round ratio, its range over the rounds,
    both medians, and `pressure`: the share of time tasks waited for a CPU while it measured (None: no PSI)."""
    wait_for_quiet(quiet_wait_s)
    workers = {fp32: WindowProcess(ONE_MODEL, fp32, npz, batch, threads),
               int8: WindowProcess(ONE_MODEL, int8, npz, batch, threads)}
    try:
        per_window = max(1, round(WINDOW_SECONDS / max(w.run_seconds for w in workers.values())))
        rounds = max(rounds, -(-runs // per_window))
        stalled0, started = stalled_us(), time.perf_counter()
        ratios, fp32_ms, int8_ms = [], [], []
        for index in range(rounds):
            order = (fp32, int8) if index % 2 == 0 else (int8, fp32)
            times = {model: workers[model].window(per_window) for model in order}
            fp32_ms.append(times[fp32])
            int8_ms.append(times[int8])
            ratios.append(times[fp32] / times[int8])
        stalled1 = stalled_us()
    finally:
        for worker in workers.values():
            worker.close()
    pressure = (None if stalled0 is None or stalled1 is None
                else (stalled1 - stalled0) / 1e6 / (time.perf_counter() - started))
    return {"speedup": statistics.median(ratios), "low": min(ratios), "high": max(ratios),
            "fp32_ms": statistics.median(fp32_ms), "int8_ms": statistics.median(int8_ms), "pressure": pressure,
            "rounds": rounds}


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


@contextlib.contextmanager
def cpu_hog(cpu: int = 0) -> Iterator[int]:
    """`python3 -c "while 1: pass"` pinned to `cpu` for the duration; yields its pid, stops it (only it) after."""
    hog = subprocess.Popen([sys.executable, "-c", "while 1: pass"],
                           preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))
    try:
        yield hog.pid
    finally:
        hog.kill()
        hog.wait()


def claimed_at(outcome, best, batch_size: int):  # noqa: ANN001, ANN201
    """The winner's claimed speed at `batch_size`: the final (confirmed) figure at the deciding batch size,
    the trial's own figure at the others."""
    final = outcome.session.best_speed()
    if final is not None and str(outcome.session.batch_size) == str(batch_size):  # not a decode job's figure
        return final
    return best.speed_at(batch_size)


def flags(speed) -> str:  # noqa: ANN001
    """What the claim says about the machine while it was measured (fields of qtune's SpeedMeasurement)."""
    notes = []
    if getattr(speed, "busy", False):
        notes.append("busy")
    if not getattr(speed, "trusted", True):
        notes.append("UNTRUSTED")
    if getattr(speed, "requested_threads", 0):
        notes.append(f"asked {speed.requested_threads} threads")
    if getattr(speed, "cpu_clock", False):
        notes.append("cpu clock")
    return f" ({', '.join(notes)})" if notes else ""


def quietness(check: dict) -> str:
    pressure = check.get("pressure")
    if pressure is None:
        return "machine load unknown"
    return f"{'quiet' if pressure < QUIET_PRESSURE else 'NOT quiet'}: CPU pressure {100 * pressure:.0f}%"


def run_case(name: str, rounds: int, runs: int) -> dict | None:
    from qtune.local import tune
    from qtune.spec import load_job

    hog = name.endswith(HOG_SUFFIX)
    base = name.removesuffix(HOG_SUFFIX) if hog else name
    with tempfile.TemporaryDirectory(prefix=f"qtune-bench-{name}-") as tmp:
        scratch = Path(tmp)
        print(f"\n## {name}" + (" (a CPU hog on CPU 0 while tuning; the re-measure runs quiet)" if hog else ""),
              flush=True)
        job_file = prepare(base, scratch)
        if job_file is None:
            print("  not available here (build script missing or failed offline)")
            return None
        job = load_job(job_file)
        started = time.monotonic()
        with cpu_hog(0) if hog else contextlib.nullcontext():
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
                  f" fp32 ops {len(t.tune_config.fp32_ops())}/{len(t.tune_config.ops)}"
                  f"{'' if speed is None else ' speed ' + speed.describe() + flags(speed)}")
        best = outcome.best
        claimed = outcome.session.best_speed()
        if best is None or claimed is None:
            print("  winner: none" if best is None else "  winner has no speed figures")
            return row
        print(f"  winner: trial {best.index}, {len(best.tune_config.fp32_ops())} ops fp32; claimed {claimed.describe()}"
              f"{flags(claimed)}")
        row.update(claimed=claimed.speedup, claimed_low=claimed.low, claimed_high=claimed.high,
                   trusted=getattr(claimed, "trusted", True))
        if job.spec.model.framework != "onnxruntime" or not best.model_path:
            print("  independent re-measurement: only for ONNX Runtime models")
            return row
        fp32_path = Path(job_file).parent / job.spec.model.path
        eval_npz = Path(job_file).parent / job.spec.data.evaluation.path
        checks = []
        for batch_size in sorted(job.spec.benchmark.measured_batch_sizes):
            claim = claimed_at(outcome, best, batch_size)
            if claim is None:
                continue
            threads = claim.threads or job.spec.benchmark.threads or 1
            check = remeasure(fp32_path, Path(best.model_path), eval_npz, batch_size, threads, rounds, runs)
            within = abs(claim.speedup - check["speedup"]) <= 0.15 * check["speedup"]
            overlap = claim.low <= check["high"] and check["low"] <= claim.high
            trusted = getattr(claim, "trusted", True)
            verdict = ("agree" if (within or overlap) else "DISAGREE") if trusted else "not claimed (untrusted)"
            print(f"  b{batch_size}: claimed {claim.describe()}{flags(claim)}; independent {check['speedup']:.2f}x "
                  f"[{check['low']:.2f}-{check['high']:.2f}] (fp32 {check['fp32_ms']:.3f} ms, int8 "
                  f"{check['int8_ms']:.3f} ms, {threads} thread(s), {rounds} rounds, {quietness(check)}); {verdict} "
                  f"(within 15%: {within}, intervals overlap: {overlap})", flush=True)
            checks.append((batch_size, claim, check, verdict))
            if outcome.outcome == "GoalReached" and check["speedup"] < 1.0:
                print(f"  WARNING: GoalReached with a winner measured slower than fp32 at batch {batch_size}")
        if job.spec.benchmark.decode is not None:
            row["decode"] = decode_rows(job, job_file, history, best, rounds)
        if checks:
            batch_size, _, check, verdict = next((c for c in checks if c[0] == claimed.batch_size), checks[-1])
            row.update(independent=check["speedup"], independent_low=check["low"], independent_high=check["high"],
                       verdict=verdict,
                       per_batch={c[0]: (c[1].speedup, c[2]["speedup"], c[3]) for c in checks})
        return row


def _bits(record) -> str:  # noqa: ANN001
    """How a weight-only config holds its ops: counts by weight dtype (fp32 for ops left unquantized)."""
    counts: dict[str, int] = {}
    for op in record.tune_config.ops.values():
        dtype = "fp32" if op.is_fp32 or op.weight is None else op.weight.dtype
        counts[dtype] = counts.get(dtype, 0) + 1
    return ", ".join(f"{n} {dtype}" for dtype, n in sorted(counts.items()))


def decode_rows(job, job_file: Path, history, best, rounds: int) -> list[dict]:  # noqa: ANN001
    """fp32, int4 everywhere (the first trial whose quantized weights are all int4) and the winner: perplexity,
    decode tokens/s and prefill ms, each candidate re-measured against fp32 in processes of their own."""
    from decode_remeasure import remeasure_decode

    settings = job.spec.benchmark.decode
    fp32_path = Path(job_file).parent / job.spec.model.path
    eval_npz = Path(job_file).parent / job.spec.data.evaluation.path
    threads = job.spec.benchmark.threads or 2
    everywhere = next((t for t in history.trials if t.ok and t.model_path and not t.tune_config.fp32_ops()
                       and all(op.weight is None or op.weight.dtype == "int4" for op in t.tune_config.ops.values())),
                      None)
    rows = [{"model": "fp32", "perplexity": history.baseline.accuracy}]
    print(f"  fp32: perplexity {history.baseline.accuracy:.4f}")
    for label, record in (("int4 everywhere", everywhere), ("winner", best)):
        if record is None:
            print(f"  {label}: none")
            continue
        row = {"model": label, "trial": record.index, "perplexity": record.accuracy, "passed": record.passed,
               "bits": _bits(record)}
        for mode in ("decode", "prefill"):
            wait_for_quiet(60.0)
            stalled0, started = stalled_us(), time.perf_counter()
            check = remeasure_decode(fp32_path, Path(record.model_path), eval_npz, mode, settings.prompt_tokens,
                                     settings.new_tokens, threads, max(7, rounds))
            stalled1 = stalled_us()
            check["pressure"] = (None if stalled0 is None or stalled1 is None
                                 else (stalled1 - stalled0) / 1e6 / (time.perf_counter() - started))
            claim = record.speed_at(mode)
            row[mode] = {"claimed": None if claim is None else claim.describe() + flags(claim), "independent": check}
        decode, prefill = row["decode"]["independent"], row["prefill"]["independent"]
        print(f"  {label} (trial {record.index}, {row['bits']}): perplexity {record.accuracy:.4f} "
              f"({'pass' if record.passed else 'FAIL'})\n"
              f"    decode: independent {1000 / decode['fp32_ms']:.1f} -> {1000 / decode['model_ms']:.1f} tokens/s, "
              f"{decode['speedup']:.2f}x [{decode['low']:.2f}-{decode['high']:.2f}] ({quietness(decode)}); claimed "
              f"{row['decode']['claimed']}\n"
              f"    prefill ({settings.prompt_tokens} tokens): independent {prefill['fp32_ms']:.1f} -> "
              f"{prefill['model_ms']:.1f} ms, {prefill['speedup']:.2f}x [{prefill['low']:.2f}-{prefill['high']:.2f}] "
              f"({quietness(prefill)}); claimed {row['prefill']['claimed']}", flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cases", nargs="*", default=[*EXAMPLES, *HOG_CASES],
                        help=f"cases (default all): {', '.join([*EXAMPLES, *HOG_CASES])}; any case + '{HOG_SUFFIX}' "
                             "tunes it beside a CPU hog")
    parser.add_argument("--rounds", type=int, default=25,
                        help="interleaved rounds of the re-measure (>= 7; with 9, mobile_strips at batch 1 "
                             "read 1.39x [0.97-1.63] where 30 read 1.78x)")
    parser.add_argument("--runs", type=int, default=50, help="runs per window of the re-measurement")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    rows = [row for name in args.cases if (row := run_case(name, max(7, args.rounds), args.runs))]
    print("\n| case | trials to first pass | trials | outcome | claimed | independent | verdict | per batch "
          "(claimed / independent) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        claimed = f"{r['claimed']:.2f}x [{r['claimed_low']:.2f}-{r['claimed_high']:.2f}]" if "claimed" in r else "-"
        independent = (f"{r['independent']:.2f}x [{r['independent_low']:.2f}-{r['independent_high']:.2f}]"
                       if "independent" in r else "-")
        per_batch = "; ".join(f"b{b}: {c:.2f}x / {i:.2f}x" for b, (c, i, _) in sorted(r.get("per_batch", {}).items()))
        print(f"| {r['case']} | {r['first_pass']} | {r['trials']} | {r['outcome']} | {claimed} | {independent} | "
              f"{r.get('verdict', '-')} | {per_batch or '-'} |")


if __name__ == "__main__":
    main()
