"""Calibration within a memory budget, on a real third-party CNN: PP-OCRv4's text detector.

The goal this checks (issue 18): calibrating 100 images of 320x640 stays under 4 GB peak RSS (it took
14.5 GB), and chunked calibration gives the ranges one collection call over all samples gives.

The model: `ch_PP-OCRv4_det_infer.onnx` inside the wheel `rapidocr-onnxruntime==1.4.4` (a PyPI package
that carries its weights), input `x` [N, 3, H, W] float, pre-optimised by qtune as in a job (opset 13,
ORT's quant_pre_process); the calibrated tensors are those qtune calibrates (every input and output of
the op types ORT can quantize).

The data: 100 (--samples) synthetic but realistic 320x640 pages, deterministic: a paper-like
background (gradient, low-frequency blotches, noise) with 3-9 text lines in several DejaVu fonts
(Debian `fonts-dejavu-core`), sizes, inks and slight blur, normalised as PP-OCR's detector expects
(RGB / 255, ImageNet mean and std, CHW).

Every case runs in its own `python` process (so peaks do not mix); the child reports its peak RSS
(VmHWM) and its RSS before calibrating (interpreter, ONNX Runtime, the model and the 246 MB of images).
- before, one call: ORT's calibrators as `quantize_static` drives them, ONE collect_data call over the
  samples (ORT's default session). Histograms (KL) hold every calibrated tensor of every sample of the
  call; 100 samples would need ~35 GB here, so this runs on --one-call-samples (default 4 and 8) and the
  peak at --samples is extrapolated linearly (peak = a + b x samples), and says so.
- before, qtune: what qtune did before this change: MinMax in one call with runs of 16 samples, KL one
  call per 16 samples, ORT's default session, MinMax first (as a trial that needs KL does).
- after: qtune's `calibrate` with the memory budget (--budget, default: qtune's default 2 GiB): probe,
  chunks, priority-order session, histograms seeded with the MinMax range; MinMax then KL.
Then the ranges: on --compare-samples (default 8) samples, qtune's chunked calibration under a small
budget (one sample per call) against one ORT call over all of them, per algorithm (MinMax, KL,
percentile): the largest difference of any tensor's range; and for KL/percentile also ORT's own chunk
merging without the seed (what qtune did before), to show what the seed changes.

    python benchmarks/calibration_memory.py [--wheel path.whl] [--samples 100] [--skip-before]

The wheel is taken from --wheel, else the cache folder (shared with benchmarks/third_party_ocr.py),
else `pip download`ed into it.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from rapidocr_wheel import DETECTOR, WHEEL_NAME, WHEEL_VERSION, extract_model, find_wheel  # noqa: E402

MODEL_MEMBER = DETECTOR
FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
FONTS = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSansMono.ttf", "DejaVuSerif.ttf",
         "DejaVuSerif-Bold.ttf", "DejaVuSansCondensed.ttf")
HEIGHT, WIDTH = 320, 640
MEAN, STD = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
SEED = 18
GOAL_BYTES = 4 * 10**9
GIB = 1 << 30
WORDS = """invoice total amount date number customer address street city order price quantity item
payment account balance due receipt station platform departure arrival gate seat coach ticket valid
until monday tuesday wednesday thursday friday saturday sunday january february march april""".split()


# --- the model ---------------------------------------------------------------------------------------
def optimise(model: Path, workspace: Path) -> tuple[Path, str, list[str]]:
    """qtune's pre-optimised model, its hash, and the op types qtune calibrates (as OnnxRuntimeAdaptor)."""
    from qtune.adaptors.onnxrt import OnnxRuntimeAdaptor
    from qtune.adaptors.onnxrt.capability import registries
    from qtune.adaptors.onnxrt.graph import GraphView
    from qtune.adaptors.onnxrt.model import OnnxModel

    adaptor = OnnxRuntimeAdaptor({"workspace": str(workspace)})
    opt = adaptor.optimized(OnnxModel(model))
    qdq, qoperator, _ = registries()
    op_types = sorted({node.op_type for node in GraphView(opt.model.graph_only()).nodes} & (qdq | qoperator))
    return opt.model.path, opt.source_hash, op_types


# --- the data ----------------------------------------------------------------------------------------
def page(rng: np.random.Generator, fonts: list[Path]) -> np.ndarray:
    """One 320x640 RGB page with text lines, uint8 [H, W, 3]."""
    from PIL import Image, ImageDraw, ImageFilter, ImageFont

    base = rng.uniform(150, 250, 3)
    gradient = np.linspace(0, rng.uniform(-40, 40), WIDTH)[None, :, None] \
        + np.linspace(0, rng.uniform(-30, 30), HEIGHT)[:, None, None]
    coarse = Image.fromarray(np.clip(128 + rng.normal(0, 14, (HEIGHT // 40, WIDTH // 40)), 0, 255).astype(np.uint8))
    blotches = np.asarray(coarse.resize((WIDTH, HEIGHT), Image.BICUBIC), dtype=np.float32)[:, :, None] - 128
    pixels = np.clip(base + gradient + blotches + rng.normal(0, 6, (HEIGHT, WIDTH, 3)), 0, 255)
    image = Image.fromarray(pixels.astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.5))
    draw = ImageDraw.Draw(image)
    y = int(rng.integers(4, 30))
    for _ in range(int(rng.integers(3, 10))):
        size = int(rng.integers(14, 44))
        font = ImageFont.truetype(str(fonts[int(rng.integers(len(fonts)))]), size)
        words = [WORDS[int(i)] for i in rng.integers(0, len(WORDS), int(rng.integers(1, 5)))]
        text = " ".join(words + [str(int(rng.integers(1, 99999)))] if rng.random() < 0.5 else words)
        ink = tuple(int(v) for v in rng.integers(0, 90, 3))
        draw.text((int(rng.integers(4, WIDTH // 3)), y), text, font=font, fill=ink)
        y += size + int(rng.integers(4, 30))
        if y > HEIGHT - 20:
            break
    if rng.random() < 0.4:
        image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.0))))
    return np.asarray(image, dtype=np.uint8)


def make_pages(count: int) -> np.ndarray:
    paths = [FONT_DIR / name for name in FONTS]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise SystemExit(f"fonts missing ({', '.join(missing)} in {FONT_DIR}): apt-get install fonts-dejavu-core")
    rng = np.random.default_rng(SEED)
    pages = np.stack([page(rng, paths) for _ in range(count)]).astype(np.float32) / 255.0
    return np.ascontiguousarray(((pages - MEAN) / STD).transpose(0, 3, 1, 2))


# --- the child: one case in its own process ----------------------------------------------------------
def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


class _Reader:
    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._feeds = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def _ort_calibrator(model: Path, op_types: list[str], algorithm: str, tmp: str):
    """An ORT calibrator as ORT creates it (default session), with qtune's histogram options."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    from qtune.adaptors.onnxrt.calibration import HISTOGRAM_OPTIONS
    from qtune.adaptors.onnxrt.capability import ORT_ALGORITHM_NAMES

    return create_calibrator(model, op_types, augmented_model_path=str(Path(tmp) / f"{algorithm}.onnx"),
                             calibrate_method=CalibrationMethod[ORT_ALGORITHM_NAMES[algorithm]],
                             extra_options=HISTOGRAM_OPTIONS.get(algorithm, {}))


def _ranges(tensors) -> dict[str, list[float]]:
    from qtune.adaptors.onnxrt.calibration import tensor_range

    return {name: list(tensor_range(tensors, name)) for name in tensors.keys()}


def child(args: argparse.Namespace) -> None:
    import contextlib
    import io

    import onnxruntime  # noqa: F401 - loaded before the "RSS before calibrating" reading

    from qtune.adaptors.onnxrt import calibration  # noqa: F401

    x = np.ascontiguousarray(np.load(args.data)[:args.samples])
    before = _status_bytes("VmRSS")
    op_types = json.loads(args.op_types)
    started = time.perf_counter()
    out: dict[str, object] = {"rss_before": before}
    with tempfile.TemporaryDirectory(prefix="calib-mem-") as tmp, contextlib.redirect_stdout(io.StringIO()):
        if args.case == "one-call":  # ORT's default: one collect_data over every sample
            calibrator = _ort_calibrator(Path(args.model), op_types, args.algorithm, tmp)
            calibrator.collect_data(_Reader([{"x": x[i:i + 1]} for i in range(len(x))]))
            out["ranges"] = _ranges(calibrator.compute_data())
        elif args.case == "qtune-before":  # MinMax one call of runs of 16, then KL one call per 16
            calibrator = _ort_calibrator(Path(args.model), op_types, "minmax", tmp)
            calibrator.collect_data(_Reader([{"x": x[i:i + 16]} for i in range(0, len(x), 16)]))
            minmax = calibrator.compute_data()
            del calibrator
            out["ranges"] = _ranges(minmax)
            if args.algorithm != "minmax":
                calibrator = _ort_calibrator(Path(args.model), op_types, args.algorithm, tmp)
                for i in range(0, len(x), 16):
                    calibrator.collect_data(_Reader([{"x": x[i:i + 16]}]))
                out["ranges"] = _ranges(calibrator.compute_data())
        elif args.case in ("after", "unseeded"):
            from qtune.adaptors.onnxrt import calibration as calib

            data = calib.CalibrationSet({"x": x}, len(x), f"bench{len(x)}")
            steps = []
            minmax = calib.calibrate(Path(args.model), args.model_hash, data, "minmax", Path(tmp), op_types,
                                     memory_limit=args.budget)
            steps.append(("minmax", minmax))
            result = minmax
            if args.algorithm != "minmax":
                seed = None if args.case == "unseeded" else minmax.tensors
                result = calib.calibrate(Path(args.model), args.model_hash, data, args.algorithm, Path(tmp),
                                         op_types, memory_limit=args.budget, seed_ranges=seed)
                steps.append((args.algorithm, result))
            out["ranges"] = _ranges(result.tensors)
            out["steps"] = [{"algorithm": name, "peak": step.peak_rss_bytes, "exact": step.peak_exact,
                             "chunk": step.plan.chunk, "sample_bytes": step.plan.sample_bytes,
                             "budget": step.budget.limit_bytes, "seconds": round(step.seconds, 1)}
                            for name, step in steps]
    out["seconds"] = round(time.perf_counter() - started, 1)
    out["peak"] = max(_status_bytes("VmHWM"), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    from qtune.adaptors.memory import process_peak_bytes

    out["peak"] = max(int(out["peak"]), process_peak_bytes() or 0)  # qtune resets VmHWM; it keeps the max
    Path(args.out).write_text(json.dumps(out))


# --- the parent ----------------------------------------------------------------------------------------
def run_case(common: list[str], case: str, algorithm: str, samples: int, budget: int | None,
             folder: Path) -> dict:
    out = folder / f"{case}-{algorithm}-{samples}-{budget}.json"
    command = [sys.executable, __file__, "--child", case, "--algorithm", algorithm, "--samples", str(samples),
               "--out", str(out), *common] + (["--budget-bytes", str(budget)] if budget is not None else [])
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"case {case} {algorithm} {samples} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(out.read_text())
    result["wall"] = time.perf_counter() - started
    return result


def gib(value: float) -> str:
    return f"{value / GIB:.2f} GiB ({value / 1e9:.2f} GB)"


def largest_difference(a: dict[str, list[float]], b: dict[str, list[float]]) -> tuple[float, str]:
    """The largest |difference| of a range bound over tensors present in both, relative to the range width."""
    worst, where = 0.0, ""
    for name in sorted(set(a) & set(b)):
        width = max(abs(a[name][1] - a[name][0]), 1e-12)
        for i in (0, 1):
            diff = abs(a[name][i] - b[name][i]) / width
            if diff > worst:
                worst, where = diff, name
    return worst, where


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "qtune-bench" / "ppocrv4")
    parser.add_argument("--wheel", type=Path, help=f"a local {WHEEL_NAME} {WHEEL_VERSION} wheel (else cache, else pip)")
    parser.add_argument("--samples", type=int, default=100, help="calibration images (default 100)")
    parser.add_argument("--algorithms", default="minmax,kl", help="of the memory cases (default minmax,kl)")
    parser.add_argument("--budget", default=None, help="memoryLimit of the after case (default: qtune's, 2Gi)")
    parser.add_argument("--one-call-samples", default="4,8", help="sample counts of the one-call case (extrapolated)")
    parser.add_argument("--before-samples", type=int, default=32,
                        help="samples of the qtune-before case (its peak is reached in the first 16; default 32)")
    parser.add_argument("--compare-samples", type=int, default=8, help="samples of the range comparison")
    parser.add_argument("--skip-before", action="store_true", help="only the after case and the comparison")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--algorithm", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--model-hash", help=argparse.SUPPRESS)
    parser.add_argument("--op-types", help=argparse.SUPPRESS)
    parser.add_argument("--budget-bytes", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        args.case, args.budget = args.child, args.budget_bytes
        child(args)
        return 0

    from qtune.spec.quantity import memory_bytes

    cache = args.cache.expanduser().resolve()
    cache.mkdir(parents=True, exist_ok=True)
    model = extract_model(find_wheel(cache, args.wheel), MODEL_MEMBER, cache / "ch_PP-OCRv4_det_infer.onnx")
    data_file = cache / f"det-pages-{args.samples}-seed{SEED}.npy"
    if not data_file.exists():
        started = time.perf_counter()
        np.save(data_file, make_pages(args.samples))
        print(f"rendered {args.samples} pages in {time.perf_counter() - started:.1f}s -> {data_file}")
    opt_path, model_hash, op_types = optimise(model, cache / "workspace")
    common = ["--data", str(data_file), "--model", str(opt_path), "--model-hash", model_hash,
              "--op-types", json.dumps(op_types)]
    budget = memory_bytes(args.budget) if args.budget else None
    algorithms = [a for a in args.algorithms.split(",") if a]
    print(f"PP-OCRv4 det ({model.name}), {args.samples} pages of {HEIGHT}x{WIDTH}; calibrated op types: "
          f"{', '.join(op_types)}")
    with tempfile.TemporaryDirectory(prefix="calib-mem-bench-") as tmp:
        folder = Path(tmp)
        failed = False
        for algorithm in algorithms:
            print(f"\n== {algorithm}")
            if not args.skip_before:
                points = []
                for count in [int(c) for c in args.one_call_samples.split(",") if c]:
                    result = run_case(common, "one-call", algorithm, count, None, folder)
                    points.append((count, result["peak"]))
                    print(f"  before, one ORT call over {count:3d} samples: peak {gib(result['peak'])} "
                          f"({result['seconds']:.0f}s)")
                if len(points) >= 2:
                    (n0, p0), (n1, p1) = points[0], points[-1]
                    slope = (p1 - p0) / (n1 - n0)
                    estimate = p0 + slope * (args.samples - n0)
                    print(f"  before, one ORT call over {args.samples} samples: ~{gib(estimate)} EXTRAPOLATED "
                          f"linearly ({gib(slope)} per sample), not run")
                count = min(args.before_samples, args.samples)
                result = run_case(common, "qtune-before", algorithm, count, None, folder)
                first = "" if algorithm == "minmax" else ", MinMax first as in a trial"
                print(f"  before, qtune (runs of 16, one call per 16 for histograms), {count} samples: peak "
                      f"{gib(result['peak'])} ({result['seconds']:.0f}s{first})")
            result = run_case(common, "after", algorithm, args.samples, budget, folder)
            for step in result["steps"]:
                print(f"  after, qtune {step['algorithm']}: {step['chunk']} samples per call "
                      f"({gib(step['sample_bytes'])} per sample, budget {gib(step['budget'])}), peak "
                      f"{gib(step['peak'])}{'' if step['exact'] else ' (upper bound)'}, {step['seconds']:.0f}s")
            verdict = "under" if result["peak"] < GOAL_BYTES else "OVER"
            failed |= result["peak"] >= GOAL_BYTES
            print(f"  after, process peak over {args.samples} samples: {gib(result['peak'])} (RSS before calibrating "
                  f"{gib(result['rss_before'])}): {verdict} the 4 GB goal")

        count = args.compare_samples
        print(f"\n== ranges: chunked (one sample per call) against one ORT call over {count} samples")
        for algorithm in ("minmax", "kl", "percentile"):
            reference = run_case(common, "one-call", algorithm, count, None, folder)["ranges"]
            chunked = run_case(common, "after", algorithm, count, 1, folder)["ranges"]
            worst, where = largest_difference(reference, chunked)
            line = f"  {algorithm:10s} qtune chunked: largest difference {worst:.2e} of a range's width"
            if algorithm != "minmax":
                unseeded = run_case(common, "unseeded", algorithm, count, 1, folder)["ranges"]
                raw, raw_where = largest_difference(reference, unseeded)
                line += f"; without the MinMax seed (ORT's own merging): {raw:.2e} ({raw_where})"
            elif where:
                line += f" ({where})"
            print(line, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
