"""What the x86 backend of torch's FX quantization can do, per op type and per op.

Mapping of qtune's vocabulary to torch (say it plainly; users compare with ONNX Runtime):
  activation dtype uint8  -> torch.quint8 (the x86/fbgemm kernels take unsigned activations;
                              signed int8 activations are not offered by these kernels)
  weight dtype int8       -> torch.qint8, symmetric (per_channel_symmetric / per_tensor_symmetric)
  algorithm minmax        -> MinMaxObserver (static) / per-batch min-max (dynamic)
  algorithm kl            -> HistogramObserver: torch's histogram observer searches the range that
                              minimises the L2 quantization error over a 2048-bin histogram. It is
                              the nearest thing torch has to KL calibration, not KL itself.
  algorithm percentile    -> not offered: torch.ao has no percentile observer.
  reduce_range            -> 7-bit activations (static: observer quant range 0..127; dynamic: the
                              `reduce_range` flag of quantized::linear_dynamic). Needed only on
                              CPUs without VNNI.
  approach static         -> prepare_fx/convert_fx with observers, calibrated
  approach dynamic        -> prepare_fx/convert_fx with dynamic qconfigs: Linear only (activations
                              quantized per batch at run time). Dynamic convolution is not offered:
                              it is slower than fp32 on CPU.
"""

from __future__ import annotations

import copy
from typing import Any

from qtune.adaptors.pytorch.graph import OpInfo

ACTIVATION = {
    "dtype": ["uint8", "fp32"],
    "scheme": ["asym", "sym"],
    "granularity": ["per_tensor"],
    "algorithm": ["minmax", "kl"],
    "reduce_range": [False, True],
}
WEIGHT = {
    "dtype": ["int8", "fp32"],
    "scheme": ["sym"],
    "granularity": ["per_channel", "per_tensor"],
    "algorithm": ["minmax"],
    "reduce_range": [False, True],
}
APPROACHES = {
    "Linear": ["static", "dynamic"],
    "Conv1d": ["static"],
    "Conv2d": ["static"],
    "Conv3d": ["static"],
}
TYPE_NOTES = {
    "Conv1d": "static only: dynamic quantization of convolutions is slower than fp32 on CPU",
    "Conv2d": "static only: dynamic quantization of convolutions is slower than fp32 on CPU",
    "Conv3d": "static only: dynamic quantization of convolutions is slower than fp32 on CPU",
}

# Fusions the x86 backend config of FX quantization performs before quantizing (BatchNorm is folded
# into the convolution; the ReLU runs inside the int8 kernel). Written in qtune's op-type names;
# when the first op falls back to fp32, the whole pattern stays fp32.
FUSED_PATTERNS: list[list[str]] = [
    ["Conv1d", "BatchNorm1d", "ReLU"],
    ["Conv2d", "BatchNorm2d", "ReLU"],
    ["Conv3d", "BatchNorm3d", "ReLU"],
    ["Conv1d", "BatchNorm1d"],
    ["Conv2d", "BatchNorm2d"],
    ["Conv3d", "BatchNorm3d"],
    ["Conv1d", "ReLU"],
    ["Conv2d", "ReLU"],
    ["Conv3d", "ReLU"],
    ["Linear", "BatchNorm1d"],
    ["Linear", "ReLU"],
]


def op_capability(op: OpInfo) -> dict[str, Any]:
    return {
        "activation": copy.deepcopy(ACTIVATION),
        "weight": copy.deepcopy(WEIGHT),
        "approach": list(APPROACHES[op.op_type]),
    }


def build_capability(ops: list[OpInfo], notes: dict[str, str]) -> dict[str, Any]:
    """LPOT-shaped capability of the lifted graph's quantizable ops (see qtune.adaptors.base)."""
    optypewise: dict[str, Any] = {}
    opwise: dict[tuple[str, str], Any] = {}
    all_notes = dict(notes)
    for op in ops:
        optypewise.setdefault(op.op_type, op_capability(op))
        opwise[(op.name, op.op_type)] = op_capability(op)
        if op.op_type in TYPE_NOTES:
            all_notes.setdefault(op.name, TYPE_NOTES[op.op_type])
    return {
        "optypewise": optypewise,
        "opwise": opwise,
        "graph_order": [op.name for op in ops],
        "notes": all_notes,
    }


def fused_patterns(present_types: set[str]) -> list[list[str]]:
    """The backend's fusions restricted to patterns whose op types all occur in the model."""
    return [list(p) for p in FUSED_PATTERNS if set(p) <= present_types]
