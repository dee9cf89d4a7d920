"""Can a busy machine fake qtune's speedup? Claims with and without a CPU hog against a quiet independent re-measure.

For each case (a real CNN and its static int8 QDQ) and thread count, qtune's claim is measured as a
trial measures it (`qtune.runner.benchmark.measure_against_fp32` on a JobContext, fp32 and int8
interleaved in one process, contention checked every window), once with no hog and once while one
`python3 -c "while 1: pass"` process holds a core. The reference is independent: fp32 alone in one
process, int8 alone in another, each with ONNX Runtime's default session options at the same
thread count, alternated three times, each run's wall time kept only from stretches in which the
process's threads did not wait for a CPU (this machine is shared; a reference taken while it was
busy is no reference).

A claim passes when it is within 15% of the reference at the thread count it was measured with
(a claim that fell back to one thread on a busy machine is compared with the 1-thread reference,
and says it fell back), or when it says the machine was too busy to claim a figure. A confident
figure more than 15% off fails (exit status 1). The machine's own load (CPU pressure, load
average) is printed, since other work may run beside the benchmark.

Cases: `digits` (examples/digits: a trained CNN on 8×8 digits, built by its build.py, batch 64) and
`resnet28` (benchmarks/latency_agreement.py's ResNet-style CNN on 28×28 images, batch 16).

On a machine shared with other work, `--reference-priority` runs the reference processes (only them)
at the highest scheduling priority in their own autogroup (root), so the reference is nearly quiet.

Run:  python benchmarks/contention.py [--cases digits resnet28] [--threads 1 2] [--max-seconds 10]
      [--reference-priority] [--claim-priority] [--undetected]
      [--spinning stop|on|off]   (intra-op spinning of qtune's sessions for threads > 1; stop: qtune's)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from tune_examples import stalled_us  # noqa: E402

TOLERANCE = 0.15
INPUT = "image"
DIGITS = ROOT / "examples" / "digits"


# --- the cases ------------------------------------------------------------------------------------
class _Reader:
    def __init__(self, images: np.ndarray) -> None:
        self._batches = iter([{INPUT: images[i:i + 32]} for i in range(0, len(images), 32)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def build_case(name: str, folder: Path) -> dict[str, str | int]:
    """{fp32, int8, eval, batch} of a case, built offline into `folder` (skipped when present)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    folder.mkdir(parents=True, exist_ok=True)
    if name == "digits":
        if not (DIGITS / "model.onnx").is_file():
            subprocess.run([sys.executable, str(DIGITS / "build.py")], check=True)
        fp32, evaluation, batch = DIGITS / "model.onnx", DIGITS / "eval.npz", 64
        images = np.load(DIGITS / "calib.npz")[INPUT][:200]
    elif name == "resnet28":
        from latency_agreement import build_cnn
        from latency_agreement import images as resnet_images

        fp32, evaluation, batch = folder / "resnet28.onnx", folder / "resnet28_eval.npz", 16
        if not fp32.is_file():
            build_cnn(fp32)
        images = resnet_images(256)
        if not evaluation.is_file():
            np.savez(evaluation, **{INPUT: images[:64], "labels": np.zeros(64, np.int64)})
    else:
        raise SystemExit(f"unknown case {name!r}")
    int8 = folder / f"{name}_int8.onnx"
    if not int8.is_file():
        quantize_static(str(fp32), str(int8), _Reader(images), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)
    return {"fp32": str(fp32), "int8": str(int8), "eval": str(evaluation), "batch": batch}


# --- worker: qtune's claim ------------------------------------------------------------------------
def claim(case: dict, threads: int, max_seconds: float, spinning: str, detect: bool = True) -> dict:
    """measure_against_fp32 as a trial runs it; the measurement as a dict. `detect=False`: without the
    contention checks (what qtune claimed before them), for comparison."""
    import yaml

    from qtune.adaptors.onnxrt import session as ort_session
    from qtune.runner import benchmark
    from qtune.runner.benchmark import measure_against_fp32
    from qtune.runner.context import JobContext
    from qtune.spec.load import load_job

    ort_session.SPINNING = spinning
    if not detect:
        benchmark.default_probe = lambda: None  # type: ignore[assignment,return-value]
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        spec = {"apiVersion": "qtune.io/v1alpha1", "kind": "QuantizationJob", "metadata": {"name": "contention"},
                "spec": {"model": {"framework": "onnxruntime", "path": case["fp32"]},
                         "data": {"calibration": {"path": case["eval"]},
                                  "evaluation": {"path": case["eval"], "metric": "top1"}},
                         "tuning": {"objective": "latency"},
                         "benchmark": {"batchSizes": [case["batch"]], "threads": threads, "maxSeconds": max_seconds},
                         "output": {"path": str(folder / "out")}}}
        (folder / "job.yaml").write_text(yaml.safe_dump(spec))
        context = JobContext(load_job(folder / "job.yaml"), folder, folder / "workspace", threads=threads)
        measured = measure_against_fp32(context, {"int8": Path(case["int8"])})
    return measured["int8"][str(case["batch"])].model_dump()


# --- worker: one model alone, for the reference ---------------------------------------------------
def alone(model: str, batch_file: str, batch: int, threads: int, seconds: float) -> dict:
    """Wall time per run of one model in this process, default session options, only from ~75 ms stretches
    in which our threads did not wait for a CPU."""
    import onnxruntime as ort

    from qtune.runner.contention import CpuProbe, contention, load_between

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    images = np.load(batch_file)[INPUT]
    feed = {session.get_inputs()[0].name: np.concatenate([images] * (-(-batch // len(images))))[:batch]}
    for _ in range(20):
        session.run(None, feed)
    started = time.perf_counter()
    session.run(None, feed)
    per_chunk = max(1, round(0.075 / (time.perf_counter() - started)))
    probe = CpuProbe()
    clean: list[float] = []
    cpu: list[float] = []  # one thread: the run's CPU time, every chunk (a reference contention cannot bias)
    chunks = contended = 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        before, times = probe.sample(), []
        for _ in range(per_chunk):
            begin, begin_cpu = time.perf_counter(), time.thread_time()
            session.run(None, feed)
            times.append((time.perf_counter() - begin) * 1000.0)
            cpu.append((time.thread_time() - begin_cpu) * 1000.0)
        chunks += 1
        if contention(load_between(before, probe.sample(), threads)):
            contended += 1
        else:
            clean.extend(times)
    return {"p50_ms": statistics.median(clean) if clean else None, "clean_runs": len(clean), "chunks": chunks,
            "contended_chunks": contended, "cpu_p50_ms": statistics.median(cpu) if threads == 1 else None}


PRIORITY = ["setsid", "sh", "-c", 'echo -20 > /proc/self/autogroup 2>/dev/null; exec nice -n -20 "$@"', "-"]
"""--reference-priority: a reference process in its own scheduler autogroup at the highest priority, so other
work on a shared machine takes (almost) no CPU from it (root only; else it runs at normal priority)."""


def _worker(args: list[str], priority: bool = False) -> dict:
    command = (PRIORITY if priority else []) + [sys.executable, __file__, *args]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def reference(case: dict, threads: int, seconds: float, priority: bool, alternations: int = 3) -> dict:
    """fp32 alone and int8 alone in separate processes, alternated; the ratio of the medians of the
    processes' clean medians (None when no process found a quiet stretch)."""
    runs: dict[str, list[dict]] = {"fp32": [], "int8": []}
    for _ in range(alternations):
        for name in ("fp32", "int8"):
            runs[name].append(_worker(["--alone", case[name], case["eval"], str(case["batch"]), str(threads),
                                       str(seconds)], priority))
    medians = {name: [r["p50_ms"] for r in rs if r["p50_ms"] is not None] for name, rs in runs.items()}
    cpu = {name: [r["cpu_p50_ms"] for r in rs if r.get("cpu_p50_ms")] for name, rs in runs.items()}
    chunks = sum(r["chunks"] for rs in runs.values() for r in rs)
    contended = sum(r["contended_chunks"] for rs in runs.values() for r in rs)
    speedup = (statistics.median(medians["fp32"]) / statistics.median(medians["int8"])
               if medians["fp32"] and medians["int8"] else None)
    return {"speedup": speedup, "fp32_ms": statistics.median(medians["fp32"]) if medians["fp32"] else None,
            "int8_ms": statistics.median(medians["int8"]) if medians["int8"] else None,
            "contended_share": contended / max(chunks, 1),
            "cpu_speedup": (statistics.median(cpu["fp32"]) / statistics.median(cpu["int8"])
                            if cpu["fp32"] and cpu["int8"] else None),
            "spread": ([round(m, 3) for m in medians["fp32"]], [round(m, 3) for m in medians["int8"]])}


def run_claim(name: str, threads: int, args: argparse.Namespace, hog: bool, detect: bool = True) -> dict:
    """A claim in its own process; without a hog optionally at the highest priority (`--claim-priority`:
    the other work of a shared machine then takes almost no CPU from it, a nearly quiet machine)."""
    hog_process = subprocess.Popen([sys.executable, "-c", "while 1: pass"]) if hog else None
    try:
        if hog_process:
            time.sleep(0.5)
        return _worker(["--claim", name, str(threads), str(args.max_seconds), args.spinning, str(args.models),
                        "detect" if detect else "undetected"], priority=args.claim_priority and not hog)
    finally:
        if hog_process:
            hog_process.terminate()
            hog_process.wait()


# --- the verdict ----------------------------------------------------------------------------------
def judge(measured: dict, references: dict[int, dict]) -> tuple[str, float | None]:
    """(verdict, claim / reference at the claim's thread count)."""
    if not measured["trusted"]:
        return "says too busy to claim", None
    ref = references.get(measured["threads"], {}).get("speedup")
    source = ""
    if ref is None and references.get(measured["threads"], {}).get("cpu_speedup"):
        ref, source = references[measured["threads"]]["cpu_speedup"], "vs the CPU-time reference (never quiet), "
    if ref is None:
        return "no quiet reference", None
    ratio = measured["speedup"] / ref
    ok = abs(ratio - 1.0) <= TOLERANCE
    prefix = "fell back to 1 thread, " if measured.get("requested_threads", 0) > measured["threads"] else ""
    return prefix + source + ("within 15%" if ok else "WRONG (confident figure off by more than 15%)"), ratio


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["digits", "resnet28"])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--max-seconds", type=float, default=10.0, help="qtune's budget per claim")
    parser.add_argument("--reference-seconds", type=float, default=3.0, help="per reference process")
    parser.add_argument("--spinning", choices=["stop", "on", "off"], default="stop",
                        help="intra-op spinning of the claim's sessions (qtune.adaptors.onnxrt.session.SPINNING)")
    parser.add_argument("--reference-priority", action="store_true",
                        help="run the reference processes at the highest scheduling priority (a shared machine)")
    parser.add_argument("--models", type=Path, default=Path(tempfile.gettempdir()) / "qtune-contention")
    parser.add_argument("--claim-priority", action="store_true",
                        help="run the claims without a hog at the highest scheduling priority (a nearly quiet machine)")
    parser.add_argument("--undetected", action="store_true",
                        help="also claim each figure without the contention checks, for comparison")
    parser.add_argument("--claim", nargs=6, help=argparse.SUPPRESS)
    parser.add_argument("--alone", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.claim:
        name, threads, max_seconds, spinning, models, detect = args.claim
        print(json.dumps(claim(build_case(name, Path(models)), int(threads), float(max_seconds), spinning,
                               detect == "detect")))
        return 0
    if args.alone:
        model, batch_file, batch, threads, seconds = args.alone
        print(json.dumps(alone(model, batch_file, int(batch), int(threads), float(seconds))))
        return 0

    started, pressure = time.time(), stalled_us()
    load_before = os.getloadavg()
    rows, wrong = [], 0
    for name in args.cases:
        case = build_case(name, args.models)
        for threads in args.threads:
            references = {threads: reference(case, threads, args.reference_seconds, args.reference_priority)}
            for hog in (False, True):
                measured = run_claim(name, threads, args, hog)
                if measured["threads"] not in references:
                    references[measured["threads"]] = reference(case, measured["threads"], args.reference_seconds,
                                                                args.reference_priority)
                verdict, ratio = judge(measured, references)
                wrong += verdict.startswith("WRONG") or "WRONG" in verdict
                rows.append((name, threads, hog, measured, references, verdict, ratio))
                print(_row(rows[-1]), flush=True)
                if args.undetected:
                    before = run_claim(name, threads, args, hog, detect=False)
                    ref = references.get(before["threads"], {}).get("speedup")
                    off = f" ({before['speedup'] / ref:.2f} of the reference)" if ref else ""
                    print(f"{'':<9} without the contention checks: {before['speedup']:.2f}× "
                          f"[{before['low']:.2f}–{before['high']:.2f}] ({before['threads']} thr){off}", flush=True)
    elapsed = time.time() - started
    pressure_after = stalled_us()
    busy = (pressure_after - pressure) / 1e6 / elapsed if pressure is not None and pressure_after is not None else None
    print(f"\nmachine: {os.cpu_count()} CPUs; load average {load_before[0]:.2f} → {os.getloadavg()[0]:.2f}; "
          + (f"some task waited for a CPU {busy:.0%} of the {elapsed:.0f} s (PSI, hogs included)" if busy is not None
             else "PSI not available"))
    print(f"{len(rows)} claims, {wrong} confident figure(s) more than 15% off a quiet independent re-measure")
    return 1 if wrong else 0


def _row(row: tuple) -> str:
    name, threads, hog, m, references, verdict, ratio = row
    ref = references.get(m["threads"], {})
    asked = references.get(threads, {})
    how = f"{m['threads']} thr {'CPU' if m['cpu_clock'] else 'wall'}"
    flags = (f"contended {m['contended_rounds']}, busy {m['busy']}, trusted {m['trusted']}")
    ref_text = (f"{ref['speedup']:.2f}× ({ref['fp32_ms']:.3f}/{ref['int8_ms']:.3f} ms, "
                f"{ref['contended_share']:.0%} contended)" if ref.get("speedup") else
                f"none quiet ({ref.get('contended_share', 1):.0%} contended)")
    if ref.get("cpu_speedup"):
        ref_text += f", CPU time {ref['cpu_speedup']:.2f}×"
    asked_text = "" if m["threads"] == threads or not asked.get("speedup") else \
        f"; reference at {threads} thr {asked['speedup']:.2f}×"
    return (f"{name:<9} {threads} thr {'hog ' if hog else 'none'}  claim {m['speedup']:.2f}× "
            f"[{m['low']:.2f}–{m['high']:.2f}] ({how}; {flags}; {m['rounds']} rounds, {m['seconds']:.1f}s)  "
            f"reference {ref_text}{asked_text}  → {verdict}" + (f" ({ratio:.2f})" if ratio else ""))


if __name__ == "__main__":
    sys.exit(main())
