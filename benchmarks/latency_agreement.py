"""Does the interleaved speed measurement agree with itself across processes and machine load?

Builds a real pair (a small ResNet-style CNN on 28×28 images, built in code, and its static int8
QDQ from onnxruntime.quantization.quantize_static, calibrated on Fashion-MNIST images when the
Debian data set is installed, else on seeded noise), then measures int8 against fp32 with
`qtune.runner.benchmark.measure_speed` in three separate processes, the third while CPU hog
processes run. Each process measures twice: timing runs by the thread's CPU time (what
`measure_against_fp32` uses with one thread) and by wall time. Prints, per clock, process and
batch size: speedup, interval, rounds, seconds; then whether the intervals agree (pairwise
overlap) and how far the point estimates spread. Exit status 1 when some intervals disagree.

Run:  python benchmarks/latency_agreement.py [--batch-sizes 1 16] [--threads 1] [--max-seconds 15]
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

INPUT = "image"
FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


# --- the model pair -------------------------------------------------------------------------------
def build_cnn(path: Path, seed: int = 0) -> Path:
    """conv 1→32 → residual block(32) → maxpool → conv 32→64 → residual block(64) → GAP → Gemm 10."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits: list = []
    nodes: list = []

    def conv(name: str, source: str, cin: int, cout: int, relu: bool = True) -> str:
        weight = (rng.normal(size=(cout, cin, 3, 3)) * np.sqrt(2.0 / (cin * 9))).astype(np.float32)
        inits.extend([numpy_helper.from_array(weight, f"{name}.w"),
                      numpy_helper.from_array((rng.normal(size=cout) * 0.01).astype(np.float32), f"{name}.b")])
        nodes.append(helper.make_node("Conv", [source, f"{name}.w", f"{name}.b"], [f"{name}.out"], name=name,
                                      pads=[1, 1, 1, 1]))
        if not relu:
            return f"{name}.out"
        nodes.append(helper.make_node("Relu", [f"{name}.out"], [f"{name}.relu"], name=f"{name}_relu"))
        return f"{name}.relu"

    def block(name: str, source: str, channels: int) -> str:
        inner = conv(f"{name}a", source, channels, channels)
        outer = conv(f"{name}b", inner, channels, channels, relu=False)
        nodes.append(helper.make_node("Add", [outer, source], [f"{name}.sum"], name=f"{name}_add"))
        nodes.append(helper.make_node("Relu", [f"{name}.sum"], [f"{name}.out"], name=f"{name}_relu"))
        return f"{name}.out"

    x = conv("stem", INPUT, 1, 32)
    x = block("block1", x, 32)
    nodes.append(helper.make_node("MaxPool", [x], ["pool"], name="pool", kernel_shape=[2, 2], strides=[2, 2]))
    x = conv("widen", "pool", 32, 64)
    x = block("block2", x, 64)
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["features"], name="flatten", axis=1))
    inits.extend([numpy_helper.from_array((rng.normal(size=(10, 64)) * 0.1).astype(np.float32), "fc.w"),
                  numpy_helper.from_array(np.zeros(10, np.float32), "fc.b")])
    nodes.append(helper.make_node("Gemm", ["features", "fc.w", "fc.b"], ["logits"], name="fc", transB=1))
    graph = helper.make_graph(nodes, "resnet_cnn", [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT,
                                                                                   ["N", 1, 28, 28])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="qtune-bench")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save_model(model, str(path))
    return path


def images(count: int) -> np.ndarray:
    """Fashion-MNIST training images scaled to 0..1 when installed, else seeded uniform noise."""
    if FASHION.is_file():
        with gzip.open(FASHION, "rb") as handle:
            raw = handle.read(16 + count * 28 * 28)
        pixels = np.frombuffer(raw[16:], dtype=np.uint8).reshape(count, 1, 28, 28)
        return (pixels / 255.0).astype(np.float32)
    return np.random.default_rng(1).random((count, 1, 28, 28), dtype=np.float32)


class _Reader:
    def __init__(self, data: np.ndarray) -> None:
        self._batches = iter([{INPUT: data[i:i + 32]} for i in range(0, len(data), 32)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def build_pair(folder: Path) -> tuple[Path, Path]:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    fp32, int8 = folder / "cnn_fp32.onnx", folder / "cnn_int8.onnx"
    if not fp32.is_file():
        build_cnn(fp32)
    if not int8.is_file():
        quantize_static(str(fp32), str(int8), _Reader(images(256)), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)
    return fp32, int8


# --- one measuring process ------------------------------------------------------------------------
CLOCKS = {"cpu": time.thread_time, "wall": time.perf_counter}


def clocks(threads: int) -> dict:
    """CPU time of the calling thread only times a run that stays on it: one thread."""
    return CLOCKS if threads == 1 else {"wall": CLOCKS["wall"]}


def worker(fp32: Path, int8: Path, batch_sizes: list[int], threads: int, max_seconds: float) -> None:
    """Measure in this process and print one JSON line: {clock: {batch: SpeedMeasurement}}."""
    from qtune.adaptors.onnxrt import OnnxRuntimeAdaptor
    from qtune.runner.benchmark import measure_speed
    from qtune.spec.models import BenchmarkSpec

    with tempfile.TemporaryDirectory() as scratch:
        adaptor = OnnxRuntimeAdaptor({"workspace": scratch, "threads": threads})
        settings = BenchmarkSpec(max_seconds=max_seconds)
        result: dict[str, dict] = {name: {} for name in clocks(threads)}
        for size in batch_sizes:
            batch = {INPUT: images(size)}
            runners = {"fp32": adaptor.make_runner(fp32, batch, threads),
                       "int8": adaptor.make_runner(int8, batch, threads)}
            for name, clock in clocks(threads).items():
                measured = measure_speed(runners, "fp32", batch_size=size, settings=settings, threads=threads,
                                         clock=clock, wall_clock=time.perf_counter)
                result[name][str(size)] = measured["int8"].model_dump()
    print(json.dumps(result))


def run_worker(fp32: Path, int8: Path, args: argparse.Namespace, hogs: int) -> dict[str, dict]:
    hog_processes = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(hogs)]
    try:
        if hog_processes:
            time.sleep(1.0)  # let the hogs get going
        command = [sys.executable, __file__, "--worker", str(fp32), str(int8), "--threads", str(args.threads),
                   "--max-seconds", str(args.max_seconds), "--batch-sizes", *map(str, args.batch_sizes)]
        done = subprocess.run(command, check=True, capture_output=True, text=True)
    finally:
        for hog in hog_processes:
            hog.terminate()
            hog.wait()
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-seconds", type=float, default=15.0,
                        help="budget of one measurement (per clock, batch size and process)")
    parser.add_argument("--hogs", type=int, default=1, help="CPU hog processes during the third measurement")
    parser.add_argument("--models", type=Path, default=Path(tempfile.gettempdir()) / "qtune-latency-agreement")
    parser.add_argument("--worker", nargs=2, type=Path, metavar=("FP32", "INT8"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker, args.batch_sizes, args.threads, args.max_seconds)
        return 0

    args.models.mkdir(parents=True, exist_ok=True)
    fp32, int8 = build_pair(args.models)
    print(f"models: {fp32} vs {int8}; {args.threads} thread(s), budget {args.max_seconds:g} s per batch size")
    runs = [("quiet #1", 0), ("quiet #2", 0), (f"{args.hogs} CPU hog(s)", args.hogs)]
    results = {label: run_worker(fp32, int8, args, hogs) for label, hogs in runs}

    all_agree = True
    for clock in clocks(args.threads):
        print(f"\n{clock} time\n{'process':<14} {'batch':>5}  {'speedup [interval]':<22} "
              f"{'fp32 → int8 p50 (ms)':<22} {'rounds × runs':<14} {'seconds':>7}")
        for label, measured in results.items():
            for size, m in measured[clock].items():
                interval = f"{m['speedup']:.3f}× [{m['low']:.3f}–{m['high']:.3f}]"
                latency = f"{m['fp32_p50_ms']:.3f} → {m['p50_ms']:.3f}"
                effort = f"{m['rounds']} × {m['runs_per_window']}"
                print(f"{label:<14} {size:>5}  {interval:<22} {latency:<22} {effort:<14} {m['seconds']:>7.1f}")
        all_agree &= agreement(clock, {label: measured[clock] for label, measured in results.items()},
                               args.batch_sizes)
    return 0 if all_agree else 1


def agreement(clock: str, results: dict[str, dict[str, dict]], batch_sizes: list[int]) -> bool:
    """Print, per batch size, whether every pair of intervals overlaps; True when all do."""
    all_agree = True
    for size in map(str, batch_sizes):
        ms = [(label, measured[size]) for label, measured in results.items()]
        pairs = itertools.combinations([m for _, m in ms], 2)
        overlap = all(a["low"] <= b["high"] and b["low"] <= a["high"] for a, b in pairs)
        points = [m["speedup"] for _, m in ms]
        spread = max(points) / min(points) - 1.0
        widest = max((m["high"] - m["low"]) / m["speedup"] for _, m in ms)
        all_agree &= overlap
        print(f"{clock} time, batch {size}: intervals {'agree (all pairs overlap)' if overlap else 'DISAGREE'}; "
              f"speedups spread {spread:.1%}; widest interval ±{widest / 2:.1%}")
    return all_agree


if __name__ == "__main__":
    sys.exit(main())
