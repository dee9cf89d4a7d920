"""Calibration statistics: collected once per (model, calibration data, algorithm), reused by
every static trial of the job.

torch's observers keep statistics that do not depend on the quantization scheme: MinMaxObserver
keeps min/max, HistogramObserver keeps min/max and a 2048-bin histogram; the scale and zero point
are computed from them only at convert time. So one calibration run with every quantizable op
observed records the statistics of every tensor that any static tune config can observe; a trial
prepares its own config and loads the recorded statistics into its observers (keyed by the name of
the observed graph node, stable across configs) instead of running the data again.

The cache is a weights-only `torch.save` file in the adaptor workspace:
    <workspace>/calibration/<model fingerprint>-<data fingerprint>-<algorithm>.pt
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import fx
from torch.ao.quantization import QConfigMapping
from torch.ao.quantization.observer import HistogramObserver, ObserverBase
from torch.ao.quantization.quantize_fx import prepare_fx

from qtune.adaptors.pytorch.model import to_tensors
from qtune.adaptors.pytorch.qconfig import OBSERVERS, calibration_qconfig

logger = logging.getLogger(__name__)

ABSURD_RANGE = 1e6
"""|min| or |max| beyond this (or non-finite) marks a tensor as not quantizable: typically the
large negative constant of an attention mask."""

_STAT_NAMES = ("min_val", "max_val", "histogram")


def calibration_batches(dataloader: Iterable[Any], samples: int) -> list[dict[str, np.ndarray]]:
    """The first `samples` samples of the loader, as the loader's batches (last one truncated)."""
    batches: list[dict[str, np.ndarray]] = []
    taken = 0
    for inputs, _labels in dataloader:
        size = len(next(iter(inputs.values())))
        keep = min(size, samples - taken)
        if keep <= 0:
            break
        batches.append({name: array[:keep] for name, array in inputs.items()})
        taken += keep
    return batches


def data_fingerprint(batches: list[dict[str, np.ndarray]]) -> str:
    digest = hashlib.sha256()
    for batch in batches:
        for name in sorted(batch):
            array = np.ascontiguousarray(batch[name])
            digest.update(name.encode() + str(array.shape).encode() + str(array.dtype).encode())
            digest.update(array.tobytes())
    return digest.hexdigest()[:16]


def observers_by_node(prepared: fx.GraphModule) -> dict[str, ObserverBase]:
    """Observer modules of a prepared graph keyed by the name of the node they observe."""
    modules = dict(prepared.named_modules())
    found: dict[str, ObserverBase] = {}
    for node in prepared.graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), ObserverBase):
            continue
        observed = node.args[0]
        if isinstance(observed, fx.Node):
            found.setdefault(observed.name, modules[node.target])
    return found


def _stats(observer: ObserverBase) -> dict[str, torch.Tensor]:
    return {name: getattr(observer, name).detach().clone() for name in _STAT_NAMES if hasattr(observer, name)}


class CalibrationCache:
    """Statistics per algorithm for one (model, data) pair, on disk in the workspace."""

    def __init__(self, folder: Path, model_fingerprint: str, data_key: str) -> None:
        self.folder = folder
        self.model_fingerprint = model_fingerprint
        self.data_key = data_key
        self._memory: dict[str, dict[str, Any]] = {}

    def path(self, algorithm: str) -> Path:
        return self.folder / f"{self.model_fingerprint}-{self.data_key}-{algorithm}.pt"

    def get(self, algorithm: str) -> dict[str, Any] | None:
        if algorithm in self._memory:
            return self._memory[algorithm]
        path = self.path(algorithm)
        if not path.is_file():
            return None
        try:
            stats = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - a damaged cache is recomputed, never fatal
            logger.warning("ignoring unreadable calibration cache %s: %s", path, exc)
            return None
        self._memory[algorithm] = stats
        return stats

    def put(self, algorithm: str, stats: dict[str, Any]) -> None:
        self._memory[algorithm] = stats
        self.folder.mkdir(parents=True, exist_ok=True)
        # atomic: parallel trials of one job may write the same file
        handle, temporary = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
        os.close(handle)
        torch.save(stats, temporary)
        os.replace(temporary, self.path(algorithm))


def collect(graph: fx.GraphModule, op_names: list[str], algorithm: str, example: tuple[torch.Tensor, ...],
            batches: list[dict[str, np.ndarray]], input_names: list[str],
            backend_config: Any) -> dict[str, Any]:
    """Run the calibration data once with every quantizable op statically observed by `algorithm`.

    Returns {"stats": {node: {min_val, max_val[, histogram]}}, "ops": {node: [op names]}}."""
    if algorithm not in OBSERVERS:
        raise ValueError(f"calibration algorithm {algorithm!r} is not available in torch; "
                         f"allowed: {', '.join(OBSERVERS)}")
    mapping = QConfigMapping().set_global(None)  # type: ignore[arg-type]
    for name in op_names:
        mapping.set_module_name(name, calibration_qconfig(algorithm))
    prepared = prepare_fx(copy.deepcopy(graph), mapping, example, backend_config=backend_config)
    with torch.inference_mode():
        for batch in batches:
            prepared(*to_tensors(batch, input_names))
    return {
        "stats": {name: _stats(observer) for name, observer in observers_by_node(prepared).items()},
        "ops": ops_touching(prepared, set(op_names)),
    }


def ops_touching(prepared: fx.GraphModule, op_names: set[str]) -> dict[str, list[str]]:
    """Observed node -> quantizable ops that read or produce it (fused modules keep the op's name)."""
    modules = dict(prepared.named_modules())
    touching: dict[str, set[str]] = {}
    for node in prepared.graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), ObserverBase):
            continue
        observed = node.args[0]
        if not isinstance(observed, fx.Node):
            continue
        names = touching.setdefault(observed.name, set())
        if observed.op == "call_module" and observed.target in op_names:
            names.add(observed.target)
        for user in node.users:
            if user.op == "call_module" and user.target in op_names:
                names.add(user.target)
    return {key: sorted(value) for key, value in touching.items()}


def load_into(prepared: fx.GraphModule, stats_by_algorithm: dict[str, dict[str, dict[str, torch.Tensor]]]) -> list[str]:
    """Load recorded statistics into a trial's observers. Returns the nodes that had none."""
    missing = []
    for node_name, observer in observers_by_node(prepared).items():
        if getattr(observer, "is_dynamic", False) or not hasattr(observer, "min_val"):
            continue
        algorithm = "kl" if isinstance(observer, HistogramObserver) else "minmax"
        stats = stats_by_algorithm.get(algorithm, {}).get(node_name)
        if stats is None:
            missing.append(node_name)
            continue
        for name, value in stats.items():
            current = getattr(observer, name, None)
            if isinstance(current, torch.Tensor):
                if current.shape != value.shape:
                    current.resize_(value.shape)
                current.copy_(value)
    return missing


def absurd_ranges(stats: dict[str, dict[str, torch.Tensor]]) -> dict[str, tuple[float, float]]:
    """Observed nodes whose range is non-finite or absurdly large."""
    bad = {}
    for node_name, values in stats.items():
        if "min_val" not in values or values["min_val"].numel() != 1:
            continue
        low, high = float(values["min_val"]), float(values["max_val"])
        if not (math.isfinite(low) and math.isfinite(high)) or max(abs(low), abs(high)) > ABSURD_RANGE:
            if math.isinf(low) and math.isinf(high) and low > high:
                continue  # never observed (empty observer)
            bad[node_name] = (low, high)
    return bad
