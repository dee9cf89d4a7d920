"""Framework-neutral data: named numpy input arrays plus labels, iterated in batches."""

from __future__ import annotations

import hashlib
import importlib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qtune.spec.errors import DataError
from qtune.spec.load import resolve_path
from qtune.spec.models import DatasetSpec

Batch = tuple[dict[str, np.ndarray], np.ndarray | None]


@dataclass
class Dataset:
    """Samples along axis 0 of every input array (and of labels)."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None

    def __post_init__(self) -> None:
        sizes = {name: len(array) for name, array in self.inputs.items()}
        if self.labels is not None:
            sizes["labels"] = len(self.labels)
        if len(set(sizes.values())) > 1:
            raise DataError(f"arrays have different sample counts: {sizes}")

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values()))) if self.inputs else 0

    def take(self, count: int | None) -> Dataset:
        if count is None or count >= len(self):
            return self
        return Dataset({k: v[:count] for k, v in self.inputs.items()},
                       None if self.labels is None else self.labels[:count])

    def loader(self, batch_size: int) -> DataLoader:
        return DataLoader(self, batch_size)

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for name in sorted(self.inputs):
            array = np.ascontiguousarray(self.inputs[name])
            digest.update(name.encode())
            digest.update(str(array.shape).encode() + str(array.dtype).encode())
            digest.update(array.tobytes())
        return digest.hexdigest()[:16]


@dataclass
class DataLoader:
    """An iterable of (inputs, labels) batches: the `dataloader` of the adaptor contract."""

    dataset: Dataset
    batch_size: int

    def __iter__(self) -> Iterator[Batch]:
        total = len(self.dataset)
        for start in range(0, total, self.batch_size):
            stop = min(start + self.batch_size, total)
            inputs = {name: array[start:stop] for name, array in self.dataset.inputs.items()}
            labels = None if self.dataset.labels is None else self.dataset.labels[start:stop]
            yield inputs, labels

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)


def _call_entrypoint(entrypoint: str) -> Any:
    module_name, function_name = entrypoint.split(":")
    try:
        module = importlib.import_module(module_name)
        function = getattr(module, function_name)
    except (ImportError, AttributeError) as exc:
        raise DataError(f"cannot import data entrypoint {entrypoint}: {exc}") from None
    return function()


def _from_entrypoint(entrypoint: str, input_names: list[str] | None) -> Dataset:
    result = _call_entrypoint(entrypoint)
    if isinstance(result, Dataset):
        return result
    if not (isinstance(result, tuple) and len(result) == 2):
        raise DataError(f"data entrypoint {entrypoint} must return (inputs, labels) or a qtune Dataset")
    inputs, labels = result
    if isinstance(inputs, np.ndarray):
        if not input_names or len(input_names) != 1:
            raise DataError(f"data entrypoint {entrypoint} returned one array; the model needs named inputs")
        inputs = {input_names[0]: inputs}
    return Dataset({k: np.asarray(v) for k, v in dict(inputs).items()},
                   None if labels is None else np.asarray(labels))


def _from_npz(path: Path, labels_key: str, input_names: list[str] | None) -> Dataset:
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"cannot read data file {path}: {exc}") from None
    labels = arrays.pop(labels_key, None)
    if input_names is not None:
        missing = [name for name in input_names if name not in arrays]
        if missing:
            raise DataError(
                f"{path.name} lacks arrays for model inputs {missing}; it has {sorted(arrays)} "
                f"(one array per model input, plus '{labels_key}')"
            )
        arrays = {name: arrays[name] for name in input_names}
    return Dataset(arrays, labels)


def load_dataset(spec: DatasetSpec, job_file: str | Path | None, input_names: list[str] | None,
                 samples: int | None = None) -> Dataset:
    """Load a data set named by the job, keeping only the model's inputs (in the model's order)."""
    if spec.entrypoint:
        dataset = _from_entrypoint(spec.entrypoint, input_names)
    else:
        dataset = _from_npz(resolve_path(job_file, spec.path or ""), spec.labels, input_names)
    if len(dataset) == 0:
        raise DataError("data set is empty")
    return dataset.take(samples if samples is not None else spec.samples)
