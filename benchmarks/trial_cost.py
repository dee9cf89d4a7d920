"""What cheaper trials save: a failing trial, and a whole `qtune tune`, with and without the savings.

A trial that fails the accuracy criterion now (1) stops evaluating as soon as the criterion is out of
reach (early stopping, qtune/runner/evaluation.py; off with QTUNE_EARLY_STOPPING=0) and (2) is not
benchmarked (qtune/runner/trial.py). Per case this script:

1. tunes the job twice with `qtune tune`, QTUNE_EARLY_STOPPING=0 then 1, in fresh folders, and
   asserts that both runs try the same configs in the same order with the same pass/fail verdicts
   and pick the same winner; it prints both wall times;
2. takes the failing trials of that run and times, in one process on the run's workspace (baseline
   and calibration cache already there), the phases of each: quantize, the full evaluation, the
   early-stopped evaluation (as the run does it: trials the strategy ranks, `full_evaluation`, are
   never cut short) and the speed measurement against fp32 a failing trial used to get. A failing
   trial cost `quantize + full evaluation + benchmark` before, and costs `quantize + evaluation as
   run` now.

Each case runs with the strategies in STRATEGIES (basic, and exhaustive capped at 6 trials: basic
ranks its first failing trials, which are therefore never cut short). The whole runs use
`objective: size`, so that every decision is a pure function of the accuracies
(with `latency` the speed-aware strategy also reads noisy timings, and two runs could legitimately
differ); benchmark settings are the job's own (defaults: batch sizes [1, 32], at least 5 rounds, up
to 20 s per batch size), and passing trials are benchmarked in both runs.

Cases (all built offline and deterministically):
- `digit_strings`: examples/digit_strings (string labels, its own exact-match metric with bounds());
- `hostile_mlp`: the 13-layer MLP of tests/integration/sensitive_model.py, 3 int8-hostile layers;
- `deep_cnn`: examples/hard_cnn's trained Fashion-MNIST CNN (2 hostile convs) deepened in code with
  64 residual blocks (1x1 conv, ReLU, 1x1 conv, add; small seeded weights, dead channels kept dead),
  ~200 nodes, 2,000 evaluation images.

    python benchmarks/trial_cost.py [case ...] [--max-failing 3] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qtune.protocol import SUCCEEDED  # noqa: E402

CASES = ("digit_strings", "hostile_mlp", "deep_cnn")
STRATEGIES = {"digit_strings": ("basic",), "hostile_mlp": ("basic", "exhaustive"), "deep_cnn": ("basic", "exhaustive")}
"""basic ranks its first (default) trials by accuracy even when they fail, so they are never cut short
(Strategy.needs_full_evaluation); exhaustive ranks nothing: every failing trial may stop early."""
EXHAUSTIVE_TRIALS = 6


# --- the cases ---------------------------------------------------------------------------------------
def _build_example(name: str, needs: tuple[str, ...]) -> Path:
    folder = ROOT / "examples" / name
    if not all((folder / file).exists() for file in needs):
        subprocess.run([sys.executable, str(folder / "build.py")], check=True, cwd=ROOT)
    return folder


def case_digit_strings(folder: Path) -> dict[str, Any]:
    source = _build_example("digit_strings", ("model.onnx", "calib.npz", "eval.npz"))
    for file in ("model.onnx", "calib.npz", "eval.npz", "sequence_metrics.py"):
        shutil.copy2(source / file, folder / file)
    return yaml.safe_load((source / "job.yaml").read_text())


def case_hostile_mlp(folder: Path) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT / "tests" / "integration"))
    from sensitive_model import build_sensitive_mlp

    model, calib, evaluation, _ = build_sensitive_mlp(folder)
    return {"apiVersion": "qtune.io/v1alpha1", "kind": "QuantizationJob", "metadata": {"name": "hostile-mlp"},
            "spec": {"model": {"framework": "onnxruntime", "path": model.name},
                     "data": {"calibration": {"path": calib.name, "samples": 200},
                              "evaluation": {"path": evaluation.name, "metric": "top1"}},
                     "quantization": {"approach": "static", "format": "QDQ"},
                     "tuning": {"strategy": "basic", "accuracyCriterion": {"relative": 0.01}, "maxTrials": 12}}}


DEEP_BLOCKS = {2: 16, 4: 32}
"""Residual blocks inserted after the n-th Relu of examples/hard_cnn (32 channels at 14x14, 64 at 7x7)."""
BRANCH_SCALE = 0.02


def case_deep_cnn(folder: Path) -> dict[str, Any]:
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    source = _build_example("hard_cnn", ("model.onnx", "calib.npz", "eval.npz"))
    model = onnx.load(str(source / "model.onnx"))
    graph = model.graph
    relus = [node for node in graph.node if node.op_type == "Relu"]
    with np.load(source / "calib.npz") as calib:
        feed = {name: calib[name] for name in calib.files if name != "labels"}
    # channels that are always 0 after a Relu (the dead units of the hostile edit) must stay 0
    probe = onnx.load(str(source / "model.onnx"))
    probe.graph.output.extend([helper.make_empty_tensor_value_info(node.output[0]) for node in relus])
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    values = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed), strict=True))
    rng = np.random.default_rng(0)
    nodes = list(graph.node)
    for position, count in sorted(DEEP_BLOCKS.items(), reverse=True):
        relu = relus[position - 1]
        activations = values[relu.output[0]]
        channels = activations.shape[1]
        dead = np.abs(activations).max(axis=(0, 2, 3)) == 0
        current, new_nodes = relu.output[0], []
        consumers = [n for n in nodes if current in n.input]
        for block in range(count):
            prefix = f"deep{position}_{block}"
            w1 = rng.normal(0, np.sqrt(2.0 / channels), (channels, channels, 1, 1)).astype(np.float32)
            w2 = rng.normal(0, BRANCH_SCALE / np.sqrt(channels), (channels, channels, 1, 1)).astype(np.float32)
            w2[dead] = 0.0
            graph.initializer.extend([numpy_helper.from_array(w1, f"{prefix}.w1"),
                                      numpy_helper.from_array(np.zeros(channels, np.float32), f"{prefix}.b1"),
                                      numpy_helper.from_array(w2, f"{prefix}.w2"),
                                      numpy_helper.from_array(np.zeros(channels, np.float32), f"{prefix}.b2")])
            new_nodes += [
                helper.make_node("Conv", [current, f"{prefix}.w1", f"{prefix}.b1"], [f"{prefix}.c1"],
                                 name=f"/{prefix}/conv1"),
                helper.make_node("Relu", [f"{prefix}.c1"], [f"{prefix}.r1"], name=f"/{prefix}/relu"),
                helper.make_node("Conv", [f"{prefix}.r1", f"{prefix}.w2", f"{prefix}.b2"], [f"{prefix}.c2"],
                                 name=f"/{prefix}/conv2"),
                helper.make_node("Add", [current, f"{prefix}.c2"], [f"{prefix}.out"], name=f"/{prefix}/add"),
            ]
            current = f"{prefix}.out"
        for consumer in consumers:
            consumer.input[:] = [current if name == relu.output[0] else name for name in consumer.input]
        at = nodes.index(relu) + 1
        nodes[at:at] = new_nodes
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(model)
    onnx.save(model, str(folder / "model.onnx"))
    for file in ("calib.npz", "eval.npz"):
        shutil.copy2(source / file, folder / file)
    job = yaml.safe_load((source / "job.yaml").read_text())
    job["metadata"]["name"] = "deep-cnn-int8"
    return job


# --- whole runs -----------------------------------------------------------------------------------------
def tune(folder: Path, early: bool) -> tuple[float, dict[str, Any], dict[str, Any] | None, int]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["QTUNE_EARLY_STOPPING"] = "1" if early else "0"
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "qtune.cli.main", "tune", str(folder / "job.yaml"), "--fresh"],
                          capture_output=True, text=True, env=env, cwd=folder)
    seconds = time.perf_counter() - started
    if done.returncode not in (0, 3, 4):
        raise SystemExit(f"qtune tune {folder} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    history = json.loads((folder / "out" / "history.json").read_text())
    best_file = folder / "out" / "best_config.json"
    best = json.loads(best_file.read_text()) if best_file.exists() else None
    return seconds, history, best, done.returncode


def same_decisions(full: dict[str, Any], early: dict[str, Any], best_full: Any, best_early: Any) -> None:
    assert [t["config_key"] for t in full["trials"]] == [t["config_key"] for t in early["trials"]], \
        "the trial sequence differs with early stopping"
    assert [t["passed"] for t in full["trials"]] == [t["passed"] for t in early["trials"]], \
        "a verdict differs with early stopping"
    assert (best_full or {}).get("trial") == (best_early or {}).get("trial"), "the winner differs"
    assert (best_full or {}).get("tune_config") == (best_early or {}).get("tune_config"), "the winner differs"


# --- one failing trial, phase by phase ------------------------------------------------------------------
def trial_phases(folder: Path, record: dict[str, Any]) -> dict[str, Any]:
    from qtune.runner.benchmark import measure_against_fp32
    from qtune.runner.context import JobContext
    from qtune.spec import load_job
    from qtune.tuning import codec
    from qtune.tuning.config import TuneConfig
    from qtune.tuning.criterion import Criterion

    job = load_job(folder / "job.yaml")
    context = JobContext(job, folder, folder / ".qtune" / job.name)
    baseline = context.load_baseline().accuracy
    config = codec.load(TuneConfig, record["tune_config"])
    started = time.perf_counter()
    quantized = context.adaptor.quantize(codec.dump(config), context.model, context.calibration_loader())
    quantize = time.perf_counter() - started
    context.early_stopping = False
    started = time.perf_counter()
    full = context.evaluate(quantized, baseline_score=baseline)
    full_seconds = time.perf_counter() - started
    context.early_stopping = not record.get("full_evaluation", False)
    started = time.perf_counter()
    now = context.evaluate(quantized, baseline_score=baseline)
    now_seconds = time.perf_counter() - started
    criterion = Criterion.from_spec(job.spec.tuning.accuracy_criterion)
    assert not criterion.passes(full.score, baseline) and not criterion.passes(now.score, baseline)
    started = time.perf_counter()
    measure_against_fp32(context, {"candidate": quantized})
    benchmark = time.perf_counter() - started
    return {"trial": record["index"], "quantize": quantize, "eval_full": full_seconds, "eval_now": now_seconds,
            "samples_now": now.samples if now.stopped_early else full.samples, "samples": full.total or full.samples,
            "ranked": bool(record.get("full_evaluation")), "benchmark": benchmark,
            "before": quantize + full_seconds + benchmark, "after": quantize + now_seconds}


def _ops(folder: Path, name: str) -> tuple[int, int]:
    import onnx

    space = json.loads((folder / ".qtune" / name / "space.json").read_text())
    ops = space.get("ops") or space.get("op_order") or space.get("graph_order") or []
    model = next(folder.glob("*.onnx"))
    return len(onnx.load(str(model), load_external_data=False).graph.node), len(ops)


def run_case(case: str, strategy: str, root: Path, max_failing: int) -> dict[str, Any]:
    runs: dict[bool, tuple[float, dict[str, Any], dict[str, Any] | None, int]] = {}
    job: dict[str, Any] = {}
    for early in (False, True):
        folder = root / f"{case}-{strategy}" / ("early" if early else "full")
        folder.mkdir(parents=True)
        job = globals()[f"case_{case}"](folder)
        job["spec"]["tuning"]["objective"] = "size"
        job["spec"]["tuning"]["strategy"] = strategy
        if strategy == "exhaustive":
            job["spec"]["tuning"]["maxTrials"] = EXHAUSTIVE_TRIALS
        job["spec"]["tuning"]["parallelTrials"] = 1
        job["spec"]["output"] = {"path": "out"}
        (folder / "job.yaml").write_text(yaml.safe_dump(job, sort_keys=False))
        runs[early] = tune(folder, early)
        print(f"  {case}/{strategy}: tune {'with' if early else 'without'} early stopping: {runs[early][0]:.1f}s, "
              f"{len(runs[early][1]['trials'])} trials (exit {runs[early][3]})", flush=True)
    (full_s, full, best_full, _), (early_s, early, best_early, _) = runs[False], runs[True]
    same_decisions(full, early, best_full, best_early)
    folder = root / f"{case}-{strategy}" / "early"
    failing = [t for t in early["trials"] if t["passed"] is False and t["status"] == SUCCEEDED]
    phases = []
    for record in failing[:max_failing]:
        phases.append(trial_phases(folder, record))
        p = phases[-1]
        print(f"  {case}: trial {p['trial']}: quantize {p['quantize']:.2f}s, evaluation {p['eval_full']:.2f}s full / "
              f"{p['eval_now']:.2f}s as run ({p['samples_now']}/{p['samples']} samples), benchmark "
              f"{p['benchmark']:.2f}s", flush=True)
    nodes, ops = _ops(folder, job["metadata"]["name"])
    in_run = {name: sum(t["timings"].get("total", 0.0) for t in run["trials"] if t["passed"] is False)
              for name, run in (("full", full), ("early", early))}
    return {"case": f"{case} ({strategy})", "nodes": nodes, "ops": ops, "trials": len(early["trials"]),
            "failing": len(failing),
            "phases": phases, "tune_full": full_s, "tune_early": early_s, "failing_in_run": in_run,
            "winner": (best_early or {}).get("trial"), "baseline": early.get("baseline", {}).get("accuracy")}


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def print_tables(results: list[dict[str, Any]]) -> None:
    print("\nA failing trial (mean over the measured failing trials; seconds)")
    header = ("case", "nodes", "q-ops", "measured", "quantize", "eval full", "eval as run", "samples as run",
              "benchmark", "before", "after", "saved")
    rows = []
    for r in results:
        p = r["phases"]
        if not p:
            rows.append((r["case"], r["nodes"], r["ops"], "0", *["-"] * 8))
            continue
        before, after = _mean([x["before"] for x in p]), _mean([x["after"] for x in p])
        samples = f"{_mean([x['samples_now'] for x in p]):.0f}/{p[0]['samples']}"
        ranked = sum(x["ranked"] for x in p)
        rows.append((r["case"], r["nodes"], r["ops"], f"{len(p)}" + (f" ({ranked} ranked)" if ranked else ""),
                     f"{_mean([x['quantize'] for x in p]):.2f}", f"{_mean([x['eval_full'] for x in p]):.2f}",
                     f"{_mean([x['eval_now'] for x in p]):.2f}", samples, f"{_mean([x['benchmark'] for x in p]):.2f}",
                     f"{before:.2f}", f"{after:.2f}", f"{100 * (1 - after / before):.0f}%"))
    _table(header, rows)
    print("\nA whole `qtune tune` (objective size; same trial sequence, verdicts and winner asserted)")
    header = ("case", "trials", "failing", "winner", "without early stop", "with early stop", "saved",
              "failing trials' time (w/o -> with)", "before this change (est.)")
    rows = []
    for r in results:
        bench = _mean([x["benchmark"] for x in r["phases"]])
        estimate = r["tune_full"] + r["failing"] * bench if r["phases"] else float("nan")
        rows.append((r["case"], r["trials"], r["failing"], r["winner"], f"{r['tune_full']:.1f}s",
                     f"{r['tune_early']:.1f}s", f"{100 * (1 - r['tune_early'] / r['tune_full']):.0f}%",
                     f"{r['failing_in_run']['full']:.1f}s -> {r['failing_in_run']['early']:.1f}s",
                     f"{estimate:.1f}s" if r["phases"] else "-"))
    _table(header, rows)
    print("\n'before' = quantize + full evaluation + benchmark (a failing trial until now); 'after' = quantize +"
          " evaluation as the run does it (stopped early unless the strategy ranks the trial), no benchmark."
          " 'before this change (est.)' = the run without early stopping + one benchmark per failing trial."
          " 'quantize' is a re-run in this process (the workspace caches the trial's quantized model); the"
          " trial process's own total is in the runs' history.json (timings).")


def _table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> None:
    cells = [tuple(str(c) for c in header), *[tuple(str(c) for c in row) for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for n, row in enumerate(cells):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
        if n == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cases", nargs="*", help=f"some of {', '.join(CASES)} (default: all)")
    parser.add_argument("--max-failing", type=int, default=3, help="failing trials timed phase by phase per case")
    parser.add_argument("--keep", help="work in this folder and keep it (default: a temporary folder)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.cases) - set(CASES))
    if unknown:
        parser.error(f"unknown case {unknown[0]!r}; allowed: {', '.join(CASES)}")
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="qtune-trial-cost-"))
    root.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        for case in args.cases or CASES:
            for strategy in STRATEGIES[case]:
                print(f"{case} ({strategy}) ...", flush=True)
                results.append(run_case(case, strategy, root, args.max_failing))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print_tables(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
