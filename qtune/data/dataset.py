"""Framework-neutral data: named numpy input arrays plus labels, iterated in batches."""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qtune.spec.errors import DataError, QtuneError
from qtune.spec.load import resolve_path
from qtune.spec.models import DatasetSpec, EvaluationSpec

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


def _call_entrypoint(entrypoint: str, field: str, base_dir: Path | None) -> Any:
    from qtune.spec.entrypoints import load_entrypoint

    function = load_entrypoint(entrypoint, field, base_dir, kind="callable",
                               allowed="module:function returning (inputs, labels) or a qtune Dataset")
    try:
        return function()
    except QtuneError:
        raise
    except Exception as exc:  # noqa: BLE001 - user code may raise anything
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise DataError(f"data entrypoint {entrypoint} raised {type(exc).__name__}: {first}") from None


def _from_entrypoint(entrypoint: str, input_names: list[str] | None, field: str, base_dir: Path | None) -> Dataset:
    result = _call_entrypoint(entrypoint, field, base_dir)
    if isinstance(result, Dataset):
        return result
    if not (isinstance(result, tuple) and len(result) == 2):
        raise DataError(f"data entrypoint {entrypoint} must return (inputs, labels) or a qtune Dataset, "
                        f"got {type(result).__name__}")
    inputs, labels = result
    if isinstance(inputs, np.ndarray):
        if not input_names or len(input_names) != 1:
            raise DataError(f"data entrypoint {entrypoint} returned one array; the model needs named inputs "
                            f"{input_names}: return a dict keyed by input name")
        inputs = {input_names[0]: inputs}
    if not isinstance(inputs, dict):
        raise DataError(f"data entrypoint {entrypoint} returned inputs of type {type(inputs).__name__}; "
                        "allowed: a dict of arrays keyed by input name, or one array")
    return Dataset({k: np.asarray(v) for k, v in inputs.items()},
                   None if labels is None else np.asarray(labels))


def _from_npz(path: Path, labels_key: str, input_names: list[str] | None, with_labels: bool) -> Dataset:
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise DataError(f"{path.name} holds pickled Python objects (an object array), which qtune does not "
                            "load; allowed: numeric, bool or string (unicode) arrays") from None
        raise DataError(f"cannot read data file {path}: {exc}") from None
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"cannot read data file {path} (allowed: an .npz written by numpy.savez): {exc}") from None
    labels = arrays.pop(labels_key, None)
    if input_names is not None:
        missing = [name for name in input_names if name not in arrays]
        if missing:
            plus = f", plus '{labels_key}' for the metric" if with_labels else ""
            raise DataError(
                f"{path.name} lacks arrays for model inputs {missing}; it has {sorted(arrays)} "
                f"(allowed: one array per model input, named like the input{plus})"
            )
        arrays = {name: arrays[name] for name in input_names}
    return Dataset(arrays, labels)


def load_dataset(spec: DatasetSpec, job_file: str | Path | None, input_names: list[str] | None,
                 samples: int | None = None) -> Dataset:
    """Load a data set named by the job, keeping only the model's inputs (in the model's order)."""
    with_labels = isinstance(spec, EvaluationSpec)
    which = "evaluation" if with_labels else "calibration"
    base_dir = Path(job_file).resolve().parent if job_file is not None else None
    if spec.entrypoint:
        dataset = _from_entrypoint(spec.entrypoint, input_names, f"spec.data.{which}.entrypoint", base_dir)
    else:
        dataset = _from_npz(resolve_path(job_file, spec.path or ""), spec.labels, input_names, with_labels)
    if len(dataset) == 0:
        raise DataError("data set is empty")
    return dataset.take(samples if samples is not None else spec.samples)
