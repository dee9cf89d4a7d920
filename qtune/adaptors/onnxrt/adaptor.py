"""`OnnxRuntimeAdaptor`: the qtune adaptor contract implemented on ONNX Runtime's quantization API."""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from qtune.adaptors.base import Adaptor, LatencyStats, StepModel, adaptor_registry
from qtune.adaptors.onnxrt import calibration as calib
from qtune.adaptors.onnxrt import quantize as q
from qtune.adaptors.onnxrt import smooth_quant as sq
from qtune.adaptors.onnxrt import weight_only as wo
from qtune.adaptors.onnxrt.capability import (
    build_capability,
    fused_patterns,
    ops_touching,
    registries,
    static_non_finite_tensors,
)
from qtune.adaptors.onnxrt.graph import GraphView
from qtune.adaptors.onnxrt.model import OnnxModel, load_onnx_model
from qtune.adaptors.onnxrt.optimize import OptimizedModel, optimize
from qtune.adaptors.onnxrt.sensitivity import op_sensitivity
from qtune.adaptors.onnxrt.session import SessionCache, benchmark, check_feed, make_runner, output_index, step_model
from qtune.adaptors.onnxrt.workspace import file_lock, read_json, write_json_atomic
from qtune.data import DataLoader, Dataset, Metric
from qtune.data.metrics import TopK
from qtune.spec.errors import ModelLoadError
from qtune.tuning import codec
from qtune.tuning.config import TuneConfig

logger = logging.getLogger(__name__)

QUANTIZE_VERSION = 2
"""Bump when the quantization recipe changes, so cached quantized models are rebuilt."""


@adaptor_registry
class OnnxRuntimeAdaptor(Adaptor):
    """ONNX Runtime (CPUExecutionProvider). Models are `OnnxModel` handles (paths on disk).

    Workspace layout (shared by all trials of a job, safe for concurrent processes):
      hashes/<stat key>.txt                               model content hash, computed once per job
      optimized/<model hash>-vN/{model.onnx, meta.json}   pre-optimised fp32 graph (+ .data)
      calibration/<hash>-<data>-<algorithm>-n<count>.json ORT TensorsData per algorithm
      models/<tune config key>/{model.onnx, calibration.json, meta.json}  quantized model, the
          ranges merged for it, and the record of what was done (plan, exclusions, timings)
    `.locks/` folders hold the inter-process locks.
    """

    name = "onnxruntime"

    def __init__(self, framework_specific_info: dict[str, Any]) -> None:
        super().__init__(framework_specific_info)
        self._sessions = SessionCache()
        self._hashes: dict[tuple[str, int, int], str] = {}
        self._optimized: dict[str, OptimizedModel] = {}
        self._capabilities: dict[str, tuple[dict[str, Any], dict[str, str]]] = {}
        self.notes: dict[str, str] = {}
        """Op (or tensor) → why it was restricted, accumulated over capability and quantize calls."""
        self.last_quantization: dict[str, Any] = {}
        self.calibration_peaks: list[int] = []
        """Peak RSS (bytes) of every calibration this instance measured, in order (cache hits add none)."""

    # --- settings -----------------------------------------------------------------------------
    def _quantization_setting(self, snake: str, default: Any) -> Any:
        section = self.info.get("quantization") or {}
        if hasattr(section, "model_dump"):
            section = section.model_dump()
        camel = snake.split("_")[0] + "".join(part.title() for part in snake.split("_")[1:])
        for key in (snake, camel):
            if key in section and section[key] is not None:
                return section[key]
        return default

    @property
    def keep_non_finite_fp32(self) -> bool:
        return bool(self._quantization_setting("keep_non_finite_fp32", True))

    @property
    def quant_format(self) -> str:
        return str(self._quantization_setting("format", "QDQ"))

    # --- model I/O ------------------------------------------------------------------------------
    def load_model(self, model_spec: dict[str, Any]) -> OnnxModel:
        path = model_spec.get("path")
        if not path:
            raise ModelLoadError("spec.model.path is required by the onnxruntime adaptor (a .onnx file); "
                                 "model.entrypoint is for pytorch")
        resolved = Path(path)
        if not resolved.is_absolute() and self.info.get("job_dir"):
            resolved = Path(self.info["job_dir"]) / resolved
        model = load_onnx_model(resolved)
        declared = [item.get("name") if isinstance(item, dict) else getattr(item, "name", None)
                    for item in (model_spec.get("inputs") or [])]
        unknown = [name for name in declared if name and name not in model.input_names()]
        if unknown:
            raise ModelLoadError(f"spec.model.inputs: model file {resolved.name} has no input(s) {unknown}; "
                                 f"allowed: its inputs {model.input_names()}")
        return model

    def save_model(self, model: Any, path: Path) -> Path:
        model = _as_model(model)
        path = Path(path)
        if path.suffix != ".onnx":
            path = path / "model.onnx"
        return model.copy_to(path).path

    def model_size(self, model: Any) -> int:
        return _as_model(model).size

    def input_names(self, model: Any) -> list[str]:
        return _as_model(model).input_names()

    # --- hashing and pre-optimisation ----------------------------------------------------------
    def model_hash(self, model: Any) -> str:
        """Content hash, computed once per job: remembered per (path, size, mtime) in memory and
        in the workspace, so other trial processes do not read the model again."""
        model = _as_model(model)
        stat = model.path.stat()
        key = (str(model.path), stat.st_size, stat.st_mtime_ns)
        if key not in self._hashes:
            marker = self.workspace / "hashes" / (hashlib.sha1(repr(key).encode()).hexdigest() + ".txt")
            if marker.is_file():
                self._hashes[key] = marker.read_text().strip()
            else:
                self._hashes[key] = model.hash()
                marker.parent.mkdir(parents=True, exist_ok=True)
                tmp = marker.with_suffix(f".{id(self)}.tmp")
                tmp.write_text(self._hashes[key])
                tmp.replace(marker)
        return self._hashes[key]

    def optimized(self, model: Any) -> OptimizedModel:
        """The pre-optimised fp32 model (built once per job, shared through the workspace)."""
        model = _as_model(model)
        root = (self.workspace / "optimized").resolve()
        if root in model.path.parents:  # already an optimised model of this workspace
            meta = read_json(model.path.parent / "meta.json")
            if meta is not None:
                return OptimizedModel.from_meta(model.path.parent, meta)
        digest = self.model_hash(model)
        if digest not in self._optimized:
            self._optimized[digest] = optimize(model, digest, root)
        return self._optimized[digest]

    # --- capability -----------------------------------------------------------------------------
    def _capability(self, opt: OptimizedModel) -> tuple[dict[str, Any], dict[str, str]]:
        """(capability, ops forced to fp32 → reason) of an optimised model, cached per instance."""
        digest = opt.source_hash
        if digest in self._capabilities:
            return self._capabilities[digest]
        view = GraphView(opt.model.load())
        approach = str(self._quantization_setting("approach", "auto"))
        problems = static_non_finite_tensors(view)
        if approach != wo.APPROACH:  # weight-only quantizes no calibrated activation range
            problems.update(self._known_range_problems(opt))
        for tensor, why in problems.items():
            logger.warning("tensor %s: %s", tensor, why)
        quantizable = {node.name for node in view.nodes}
        forced = ops_touching(view, problems, quantizable) if self.keep_non_finite_fp32 else {}
        model_notes = {f"tensor:{tensor}": why for tensor, why in problems.items()}
        model_notes.update(opt.notes)
        if approach == wo.APPROACH:
            capability = wo.weight_only_capability(view, forced, model_notes)
        else:
            capability = build_capability(view, self.quant_format, opt.per_channel, forced, model_notes, approach)
        self.notes.update(capability["notes"])
        self._capabilities[digest] = (capability, forced)
        return capability, forced

    def _known_range_problems(self, opt: OptimizedModel) -> dict[str, str]:
        """Non-finite/absurd ranges measured by an earlier MinMax calibration of this model (any
        calibration data), or by calibrating now when the job handed calibration data over in
        framework_specific_info["calibration_data"] (a Dataset or DataLoader)."""
        from onnxruntime.quantization.calibrate import load_tensors_data

        cache_dir = self.workspace / "calibration"
        data = self.info.get("calibration_data")
        if data is not None:
            loader = data.loader(32) if isinstance(data, Dataset) else data
            count = self.info.get("calibration_sampling_size") or self._quantization_setting(
                "calibration_samples", None) or 100
            samples = calib.collect_samples(loader, int(count))
            return calib.problem_tensors(self._calibrate(opt, samples, "minmax", set()).tensors)
        problems: dict[str, str] = {}
        for path in sorted(cache_dir.glob(f"{opt.source_hash[:16]}-*-minmax-*.json")):
            try:
                problems.update(calib.problem_tensors(load_tensors_data(path)))
            except Exception as exc:  # noqa: BLE001
                logger.debug("unreadable calibration cache %s: %s", path, exc)
        return problems

    def _calibrate(self, opt: OptimizedModel, samples: calib.CalibrationSet, algorithm: str,
                   skip: set[str], seed_ranges: Any = None) -> calib.Calibration:
        # The same tensors whatever the format or config, so one file serves every trial.
        qdq, qoperator, _ = registries()
        op_types = sorted({node.op_type for node in GraphView(opt.model.graph_only()).nodes} & (qdq | qoperator))
        limit = self.info.get("calibration_memory_limit")
        result = calib.calibrate(opt.model.path, opt.source_hash, samples, algorithm,
                                 self.workspace / "calibration", op_types, skip,
                                 data_files=opt.model.external_data_files(),
                                 memory_limit=int(limit) if limit is not None else None, seed_ranges=seed_ranges)
        if result.peak_rss_bytes is not None:
            self.calibration_peaks.append(result.peak_rss_bytes)
        return result

    def query_fw_capability(self, model: Any) -> dict[str, Any]:
        opt = self.optimized(model)
        capability, _ = self._capability(opt)
        return capability

    def query_fused_patterns(self, model: Any) -> list[list[str]]:
        opt = self.optimized(model)
        return fused_patterns(GraphView(opt.model.graph_only()))

    # --- quantization -----------------------------------------------------------------------------
    def quantize(self, tune_cfg: dict[str, Any], model: Any, dataloader: DataLoader, q_func: Any = None) -> OnnxModel:
        cfg = codec.load(TuneConfig, tune_cfg)
        opt = self.optimized(model)
        capability, forced = self._capability(opt)
        quantizable = {name: entry for (name, _), entry in capability["opwise"].items()}
        source = opt.model
        view = GraphView(source.load())
        out_dir = self.workspace / "models" / cfg.key()
        output = out_dir / "model.onnx"

        samples = None
        if cfg.approach == "static" or (cfg.approach == wo.APPROACH and wo.uses_calibration(cfg)):  # gptq reads data
            samples = calib.collect_samples(dataloader or [], cfg.calibration_sampling_size)
            if samples.count == 0:
                from qtune.spec.errors import DataError

                raise DataError("the calibration data yielded no samples")
            check_feed(self._sessions.get(source.path, self.info.get("threads")), samples.inputs)
        identity = {"version": QUANTIZE_VERSION, "model": opt.source_hash, "config": cfg.key(),
                    "data": samples.fingerprint if samples else None, "count": samples.count if samples else None,
                    "keep_non_finite_fp32": self.keep_non_finite_fp32}
        # One writer per config: a concurrent trial with the same config waits, then reuses.
        with file_lock(self.workspace / "models" / ".locks" / f"{cfg.key()}.lock"):
            meta = read_json(out_dir / "meta.json")
            if meta is not None and meta.get("identity") == identity and output.is_file():
                logger.info("quantized model for config %s already in the workspace", cfg.key())
                self.timings = {"calibration": 0.0, "quantize": 0.0}
                self.last_quantization = {**meta, "reused": True,
                                          "calibration": dict.fromkeys(meta.get("calibration", {}), "cached")}
                return OnnxModel(output)
            if out_dir.exists():
                shutil.rmtree(out_dir)
            out_dir.mkdir(parents=True)
            return self._quantize_into(cfg, opt, view, quantizable, forced, samples, identity, out_dir)

    def _quantize_into(self, cfg: TuneConfig, opt: OptimizedModel, view: GraphView,
                       quantizable: dict[str, dict[str, Any]], forced: dict[str, str],
                       samples: calib.CalibrationSet | None, identity: dict[str, Any], out_dir: Path) -> OnnxModel:
        source = opt.model
        output = out_dir / "model.onnx"
        calibration_seconds = 0.0
        calibration_log: dict[str, str] = {}
        """algorithm → "measured" | "cached": which statistics this call computed or reused."""
        passes: dict[str, list[str]] = {}
        """weight-only: MatMulNBits setting → ops quantized with it (one ORT pass each)."""
        done: dict[str, Any] = {}  # meta.json besides the plan: weight_only_passes, smooth_quant (what SQ did)
        started = time.perf_counter()
        if cfg.approach == wo.APPROACH:
            plan = wo.plan_weight_only(view, cfg, quantizable, forced)
            if plan.quantized:
                passes = wo.run_weight_only(source, view, plan, output, samples.batches if samples else None)
        elif cfg.approach == "dynamic":
            plan = q.plan_dynamic(view, cfg, quantizable, forced)
            if plan.quantized:
                q.run_dynamic(source, view, plan, output, opt.per_channel)
        else:
            assert samples is not None
            if cfg.extras.get(sq.EXTRA_KEY) is not None:  # SmoothQuant: quantize the smoothed fp32 model
                opt, done["smooth_quant"] = self._smoothed(opt, samples, sq.config_alpha(cfg.extras[sq.EXTRA_KEY]))
                source, view = opt.model, GraphView(opt.model.load())
            plan = q.plan_static(view, cfg, quantizable, forced)
            if plan.quantized:
                measured = self._calibrate(opt, samples, "minmax", set())
                minmax = measured.tensors
                calibration_seconds += measured.seconds
                calibration_log["minmax"] = "cached" if measured.cache_hit else "measured"
                problems = calib.problem_tensors(minmax)
                if problems:
                    plan = self._without_problem_ops(view, cfg, quantizable, forced, plan, problems)
                owners = q.owner_algorithms(plan)
                by_algorithm = {"minmax": minmax}
                for algorithm in sorted(set(owners.values()) - {"minmax"}):
                    measured = self._calibrate(opt, samples, algorithm, set(problems), seed_ranges=minmax)
                    by_algorithm[algorithm] = measured.tensors
                    calibration_seconds += measured.seconds
                    calibration_log[algorithm] = "cached" if measured.cache_hit else "measured"
                ranges = calib.merged_tensors_data(minmax, by_algorithm, owners)
                q.fill_overrides(plan, view, ranges, opt.per_channel)
                if plan.quantized:
                    q.run_static(source, view, plan, ranges, output, out_dir / "calibration.json")
        if not plan.quantized:
            logger.info("no op is quantized in config %s: the model stays fp32", cfg.key())
            source.copy_to(output)
        quantize_seconds = time.perf_counter() - started - calibration_seconds
        self.timings = {"calibration": round(calibration_seconds, 4), "quantize": round(quantize_seconds, 4)}
        record = {"identity": identity, "plan": plan.record(), "timings": self.timings,
                  "calibration": calibration_log, "optimizer_steps": opt.steps}
        if passes:
            done["weight_only_passes"] = passes
        record.update(done)
        write_json_atomic(out_dir / "meta.json", record)
        self.last_quantization = record
        logger.info("quantized %d ops (%d fp32) with %s/%s in %.2fs (calibration %.2fs)", len(plan.quantized),
                    len(plan.excluded), cfg.approach, plan.quant_format, quantize_seconds, calibration_seconds)
        return OnnxModel(output)

    def _smoothed(self, opt: OptimizedModel, samples: calib.CalibrationSet,
                  alpha: float | str) -> tuple[OptimizedModel, dict[str, Any]]:
        return sq.smoothed_model(opt, samples, alpha, self.workspace / "smoothed", self.info.get("threads"))

    def _without_problem_ops(self, view: GraphView, cfg: TuneConfig, quantizable: dict[str, dict[str, Any]],
                             forced: dict[str, str], plan: q.QuantPlan, problems: dict[str, str]) -> q.QuantPlan:
        """The static plan with the ops touching non-finite/absurd ranges kept fp32 (unless the job says not to)."""
        for tensor, why in problems.items():
            self.notes[f"tensor:{tensor}"] = why
        if not self.keep_non_finite_fp32:
            logger.warning("tensors with non-finite/absurd ranges are quantized as asked "
                           "(quantization.keepNonFiniteFp32 is false): %s", sorted(problems))
            return plan
        extra = ops_touching(view, problems, set(plan.quantized))
        for name, why in extra.items():
            logger.warning("op %s kept fp32: %s", name, why)
            self.notes[name] = why
        return q.plan_static(view, cfg, quantizable, {**forced, **extra})

    # --- running ------------------------------------------------------------------------------------
    def evaluate(self, model: Any, dataloader: DataLoader, postprocess: Any = None,
                 metric: Metric | None = None, measurer: Any = None, iteration: int = -1,
                 tensorboard: bool = False) -> float:
        session = self._sessions.get(_as_model(model).path, self.info.get("threads"))
        index = output_index(session, self.info.get("output"))
        metric = metric if metric is not None else TopK(1)
        for step, (inputs, labels) in enumerate(dataloader):
            if 0 <= iteration <= step:
                break
            outputs = session.run(None, check_feed(session, inputs))
            prediction = postprocess(outputs) if postprocess is not None else outputs[index]
            metric.update(np.asarray(prediction), labels)
        return float(metric.result())

    def run(self, model: Any, inputs: dict[str, Any]) -> list[Any]:
        session = self._sessions.get(_as_model(model).path, self.info.get("threads"))
        return list(session.run(None, check_feed(session, inputs)))

    def predict(self, model: Any, dataloader: DataLoader, output: str | int | None = None) -> np.ndarray:
        session = self._sessions.get(_as_model(model).path, self.info.get("threads"))
        index = output_index(session, output if output is not None else self.info.get("output"))
        parts = [session.run(None, check_feed(session, inputs))[index] for inputs, _ in dataloader]
        return np.concatenate(parts) if parts else np.empty((0,))

    def benchmark(self, model: Any, inputs: dict[str, Any], warmup: int, runs: int, threads: int) -> LatencyStats:
        session = self._sessions.get(_as_model(model).path, threads)
        return benchmark(session, check_feed(session, inputs), warmup, runs, threads)

    def make_runner(self, model: Any, inputs: dict[str, Any], threads: int) -> Callable[[], None]:
        session = self._sessions.get(_as_model(model).path, threads)
        return make_runner(session, check_feed(session, inputs))

    def step_model(self, model: Any, threads: int) -> StepModel:
        return step_model(self._sessions.get(_as_model(model).path, threads))

    # --- sensitivity ----------------------------------------------------------------------------------
    def op_sensitivity(self, model: Any, tune_cfg: dict[str, Any], dataset: Dataset) -> dict[str, float]:
        from onnxruntime.quantization.calibrate import load_tensors_data

        cfg = codec.load(TuneConfig, tune_cfg)
        opt = self.optimized(model)
        if cfg.approach == wo.APPROACH and isinstance(dataset, Dataset):
            from qtune.adaptors.onnxrt.weight_only_sensitivity import output_errors

            scores = output_errors(opt.model, cfg, dataset.take(32).inputs, self.info.get("output"),
                                   self.info.get("threads"))
            if scores:
                return scores
        if isinstance(dataset, Dataset):
            inputs = dataset.take(32).inputs
            full = dataset.take(cfg.calibration_sampling_size)
            samples = calib.collect_samples(full.loader(64), cfg.calibration_sampling_size)
        else:
            samples = calib.collect_samples(dataset, cfg.calibration_sampling_size)
            inputs = {name: array[:32] for name, array in samples.inputs.items()}
        if cfg.approach == "static" and cfg.extras.get(sq.EXTRA_KEY) is not None:  # the model the config quantizes
            opt = self._smoothed(opt, samples, sq.config_alpha(cfg.extras[sq.EXTRA_KEY]))[0]
        ranges: dict[str, Any] = {}
        for algorithm in ("minmax", "kl", "percentile"):
            path = calib.cache_path(self.workspace / "calibration", opt.source_hash, samples, algorithm)
            if path.is_file():
                ranges[algorithm] = load_tensors_data(path)
        started = time.perf_counter()
        scores = op_sensitivity(opt.model.path, cfg, inputs, ranges)
        logger.info("op sensitivity of %d ops in %.2fs", len(scores), time.perf_counter() - started)
        return scores

    def op_time_shares(self, model: Any, tune_cfg: dict[str, Any], dataloader: DataLoader,
                       inputs: dict[str, Any], threads: int) -> dict[str, dict[str, float]]:
        """ORT's per-node profiler on the pre-optimised fp32 model and on `tune_cfg` quantized (the
        same model trial 0 uses: it is cached in the workspace). Failures only cost the profile."""
        from qtune.adaptors.onnxrt.profile import time_shares

        started = time.perf_counter()
        try:
            opt = self.optimized(model)
            quantized = self.quantize(tune_cfg, model, dataloader)
            session = self._sessions.get(opt.model.path, threads)
            feed = check_feed(session, inputs)
            shares = time_shares(opt.model.path, _as_model(quantized).path, feed,
                                 list(codec.load(TuneConfig, tune_cfg).ops), threads=threads)
        except Exception as exc:  # noqa: BLE001 - the profile is an optimisation aid, never fatal
            logger.warning("per-op profile unavailable (%s: %s); the search uses a prior by op type",
                           type(exc).__name__, exc)
            return {}
        logger.info("per-op profile in %.2fs", time.perf_counter() - started)
        return shares


def _as_model(model: Any) -> OnnxModel:
    if isinstance(model, OnnxModel):
        return model
    if isinstance(model, str | Path):
        return OnnxModel(Path(model))
    path = getattr(model, "path", None)
    if path is not None:
        return OnnxModel(Path(path))
    raise TypeError(f"expected an OnnxModel or a path, got {type(model).__name__}")
