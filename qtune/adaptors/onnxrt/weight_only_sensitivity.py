"""Weight-only op sensitivity: how far the model's output moves with one layer quantized (the rest fp32).

Why this measure: the layers weight-only quantization touches are few (the MatMuls with constant weights)
and each is quick to quantize (ORT's C++ block quantizer), so one whole-model run per layer on a few samples
is affordable, and it measures what the criterion sees: how much of the layer's error reaches the output
through LayerNorm, residuals and attention. A layer-local measure (the layer's own output error, as
`sensitivity.py` computes for int8) ranked MiniLM's layers poorly for a cosine criterion: the accuracy was not
monotone along its ranking and 16 of 37 layers had to go to 8 bits. The local measure remains the fallback
when the whole model is too large to copy per layer or a run fails.

Score = ||y_q - y||² / ||y||² on the metric's output (spec.data.evaluation.output), MAX_SAMPLES samples.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Any

import numpy as np

from qtune.adaptors.onnxrt.graph import GraphView
from qtune.adaptors.onnxrt.model import OnnxModel
from qtune.adaptors.onnxrt.quantize import QuantPlan
from qtune.adaptors.onnxrt.session import check_feed, output_index
from qtune.adaptors.onnxrt.weight_only import APPROACH, quantize_proto
from qtune.tuning.config import TuneConfig

logger = logging.getLogger(__name__)

MAX_SAMPLES = 8
MAX_MODEL_BYTES = 1 << 30
"""Above this the per-layer copies cost too much memory (and 2 GB is protobuf's limit): the local measure."""


def _output(proto: Any, feed: dict[str, np.ndarray], output: str | int | None, threads: int | None) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = int(threads)
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    index = output_index(session, output)
    return np.asarray(session.run(None, check_feed(session, feed))[index], dtype=np.float64)


def output_errors(source: OnnxModel, cfg: TuneConfig, inputs: dict[str, np.ndarray], output: str | int | None,
                  threads: int | None = None) -> dict[str, float]:
    """{op: relative MSE of the model output with only that op quantized as in `cfg`}; {} when not measurable."""
    proto = source.load()
    if proto.ByteSize() > MAX_MODEL_BYTES:
        logger.info("weight-only sensitivity: model over %d bytes, layer-local measure instead", MAX_MODEL_BYTES)
        return {}
    view = GraphView(proto)
    feed = {name: np.asarray(array)[:MAX_SAMPLES] for name, array in inputs.items()}
    targets = [name for name, op in cfg.ops.items() if not op.is_fp32 and name in view.by_name]
    started = time.perf_counter()
    try:
        reference = _output(proto, feed, output, threads)
        scores = {name: 0.0 for name in cfg.ops}
        norm = float(np.sum(reference * reference)) + 1e-12
        for name in targets:
            single, _ = quantize_proto(copy.deepcopy(proto), view, QuantPlan(APPROACH, "QOperator",
                                                                             {name: cfg.ops[name]}, {}),
                                       lambda: [feed])  # gptq (a default restricted to it) fits to these samples
            diff = _output(single, feed, output, threads) - reference
            scores[name] = float(np.sum(diff * diff)) / norm
    except Exception as exc:  # noqa: BLE001 - the layer-local measure is the fallback
        logger.warning("weight-only sensitivity: whole-model runs failed (%s: %s); layer-local measure instead",
                       type(exc).__name__, exc)
        return {}
    logger.info("weight-only sensitivity: %d layers, one whole-model run each, in %.1fs", len(targets),
                time.perf_counter() - started)
    return scores
