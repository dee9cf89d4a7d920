"""Per-op time shares from ONNX Runtime's node profiler, in fp32 and in int8.

The strategy spends trials where the time is: it needs to know, per quantizable op, how much of the
fp32 model's time the op takes, and how much it takes once quantized. ORT's profiler
(`SessionOptions.enable_profiling`) writes a Chrome-trace JSON with one `<node>_kernel_time` event
per node and run. Node names after ORT's graph optimisation still say which op they came from:

- an fp32 fusion is named `fused <first op>` (FusedConv, FusedGemm: its Relu vanished into it);
- a QDQ fusion (DQ → Conv → Q to QLinearConv/QGemm) keeps the op's name;
- a weight-only MatMulNBits is named `<op>_Q4` / `<op>_Q8`;
- a QuantizeLinear/DequantizeLinear ORT could not fuse is named `<tensor>_QuantizeLinear` /
  `<tensor>_DequantizeLinear`; its time is the price of the op that made the tensor int8 (the
  consumer of a Q, the producer of a DQ), so it is attributed to that op.

Shares are fractions of the fp32 model's total node time, in both precisions, so
`fp32_share - int8_share` is the fraction of fp32 time that quantizing the op saves. What no
quantizable op accounts for goes to "(other)". Each node's time is the median over the runs,
so a burst of load on a shared machine moves it little.
"""

from __future__ import annotations

import json
import logging
import re
import statistics
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from qtune.adaptors.onnxrt.graph import GraphView

logger = logging.getLogger(__name__)

OTHER = "(other)"
WARMUP_RUNS = 3
_SUFFIXES = ("_kernel_time",)
_QDQ = ("_QuantizeLinear", "_DequantizeLinear")
_ACTIVATIONS = {"Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "Tanh", "Gelu", "FastGelu"}


def node_times(model_path: Path, feed: dict[str, np.ndarray], runs: int = 20, threads: int = 1) -> dict[str, float]:
    """{node name as profiled: median ms per run} over `runs` runs (after WARMUP_RUNS unprofiled-in-effect
    warm-up runs, whose events are dropped)."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="qtune-profile-") as tmp:
        options = ort.SessionOptions()
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        for _ in range(WARMUP_RUNS + runs):
            session.run(None, feed)
        trace = Path(session.end_profiling())
        events = json.loads(trace.read_text())
    durations: dict[str, list[float]] = defaultdict(list)
    for event in events:
        name = str(event.get("name", ""))
        if event.get("cat") != "Node" or not name.endswith(_SUFFIXES):
            continue
        for suffix in _SUFFIXES:
            name = name.removesuffix(suffix)
        durations[name].append(float(event.get("dur", 0.0)) / 1000.0)
    return {name: statistics.median(values[WARMUP_RUNS:] or values) for name, values in durations.items()}


def _fusion_head(view: GraphView, node: Any, ops: set[str]) -> Any:
    """The op a fused kernel ends at is often an activation named after its output (NCHWc layout
    names Conv+Relu `relu_nchwc`): walk back to the compute op the activation was fused into."""
    while node.op_type in _ACTIVATIONS and node.input and node.input[0] in view.producer:
        parent = view.producer[node.input[0]]
        if parent.name not in ops:
            break
        node = parent
    return node


def _clean(name: str) -> str:
    name = name.removeprefix("fused ")
    name = re.sub(r"_token_\d+$", "", name)
    name = re.sub(r"_Q[248]$", "", name)  # MatMulNBits: ORT's weight-only quantizer names it <op>_Q<bits>
    return name.removesuffix("_nchwc")


def attribute(times: dict[str, float], view: GraphView, ops: set[str]) -> dict[str, float]:
    """Profiled node times → {quantizable op: ms} (+ OTHER), following ORT's naming (module docstring):
    a node keeps its op's name, or takes the name of the tensor it computes (layout transforms),
    prefixed `fused ` or suffixed `_nchwc`/`_token_<n>`; Q/DQ nodes are named after their tensor."""
    out: dict[str, float] = defaultdict(float)
    for node, ms in times.items():
        name = _clean(node)
        owner: str | None = None
        if name in ops:
            owner = name
        elif any(marker in name for marker in _QDQ):
            marker = next(m for m in _QDQ if m in name)
            tensor = name[: name.index(marker)]
            producer = view.producer.get(tensor)
            consumers = [c.name for c in view.consumers.get(tensor, []) if c.name in ops]
            if marker == "_QuantizeLinear":
                owner = consumers[0] if consumers else (producer.name if producer is not None else None)
            else:
                owner = producer.name if producer is not None else (consumers[0] if consumers else None)
        elif name in view.producer:
            owner = view.producer[name].name
        if owner in ops and owner is not None:
            owner = _fusion_head(view, view.by_name[owner], ops).name
        out[owner if owner in ops else OTHER] += ms
    return dict(out)


def time_shares(fp32_path: Path, int8_path: Path, feed: dict[str, np.ndarray], ops: list[str], runs: int = 20,
                threads: int = 1) -> dict[str, Any]:
    """{"fp32": {op: share}, "int8": {op: share}}, shares of the fp32 model's total node time."""
    view = GraphView(onnx.load(str(fp32_path), load_external_data=False))
    wanted = set(ops)
    fp32 = attribute(node_times(fp32_path, feed, runs, threads), view, wanted)
    int8 = attribute(node_times(int8_path, feed, runs, threads), view, wanted)
    total = sum(fp32.values())
    if total <= 0:
        return {}
    shares = {"fp32": {name: round(ms / total, 6) for name, ms in sorted(fp32.items())},
              "int8": {name: round(ms / total, 6) for name, ms in sorted(int8.items())}}
    logger.info("per-op profile: fp32 %.3f ms, int8 %.3f ms per run; top ops by fp32 share: %s", total,
                sum(int8.values()), ", ".join(f"{n} {s:.0%}" for n, s in
                                              sorted(shares["fp32"].items(), key=lambda kv: -kv[1])[:5]))
    return shares
