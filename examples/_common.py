"""Shared helpers of the bundled example build scripts (examples/*/build.py).

Everything here runs offline: deterministic setup, a small training loop, ONNX export with the
torch exporter (weights folded back into the .onnx file), a check that ONNX Runtime reproduces the
torch outputs, and the .npz files qtune reads (one array per model input plus int64 `labels`).

The build scripts import this file by path (`sys.path` gets the examples folder), so it is a
plain module, not part of the `qtune` package.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

THREADS = 1
"""Fixed torch/ORT thread count of every build, so results do not depend on the machine's cores.

One thread: these models are small, and on a shared 2-core machine a second OpenMP thread made
a training step 10-50x slower whenever another process was busy (threads spin at barriers).
`--threads` of the build scripts overrides it (results may then differ in the last bits)."""

OPSET = 18
ATOL = 1e-4
"""Largest allowed |ORT - torch| difference of any output value of the exported model."""


# --------------------------------------------------------------------------------------------
# command line and "already built" handling
# --------------------------------------------------------------------------------------------
def parse_args(description: str, argv: list[str] | None = None,
               extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--force", action="store_true",
                        help="rebuild even when model.onnx, calib.npz and eval.npz already exist")
    parser.add_argument("--threads", type=int, default=THREADS,
                        help=f"torch threads for training (default {THREADS}: reproducible and "
                             "fastest on a busy machine)")
    if extra is not None:
        extra(parser)
    return parser.parse_args(argv)


def outputs_exist(paths: Iterable[Path]) -> bool:
    return all(Path(p).is_file() for p in paths)


class Timer:
    """Wall-clock since creation, for progress lines."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.start

    def __str__(self) -> str:
        return f"{self():.1f}s"


# --------------------------------------------------------------------------------------------
# determinism
# --------------------------------------------------------------------------------------------
def set_deterministic(seed: int, threads: int = THREADS) -> None:
    """Seed every generator, pin the thread count and ask torch for deterministic kernels."""
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set (only allowed once per process, before parallel work)
        pass
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------
def predict(model, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Logits of a torch model (eval mode, no grad) over a numpy array, in batches."""
    import torch

    model.eval()
    outputs = []
    with torch.inference_mode():
        for start in range(0, len(x), batch_size):
            outputs.append(model(torch.from_numpy(x[start:start + batch_size])).numpy())
    return np.concatenate(outputs)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(axis=1) == labels).mean())


def train(model, x: np.ndarray, y: np.ndarray, *, epochs: int, batch_size: int, lr: float,
          seed: int, weight_decay: float = 5e-4, val: tuple[np.ndarray, np.ndarray] | None = None,
          augment: Callable[[object, object], object] | None = None) -> None:
    """Train with AdamW and a one-cycle learning-rate schedule; prints one line per epoch.

    `augment(batch, generator)` may transform each training batch (a float tensor) using the given
    torch.Generator, so augmentation is as reproducible as the rest. `val` is only reported.
    """
    import torch
    from torch import nn

    generator = torch.Generator().manual_seed(seed)
    inputs, targets = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
    steps_per_epoch = -(-len(x) // batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, epochs=epochs, steps_per_epoch=steps_per_epoch, pct_start=0.25)
    loss_fn = nn.CrossEntropyLoss()
    clock = Timer()
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        total_loss, correct = 0.0, 0
        for start in range(0, len(x), batch_size):
            index = order[start:start + batch_size]
            batch, target = inputs[index], targets[index]
            if augment is not None:
                batch = augment(batch, generator)
            optimizer.zero_grad(set_to_none=True)
            logits = model(batch)
            loss = loss_fn(logits, target)
            loss.backward()
            optimizer.step()
            schedule.step()
            total_loss += float(loss.detach()) * len(index)
            correct += int((logits.argmax(dim=1) == target).sum())
        line = (f"  epoch {epoch:2d}/{epochs}  loss {total_loss / len(x):.4f}  "
                f"train acc {correct / len(x):.4f}")
        if val is not None:
            line += f"  val acc {accuracy(predict(model, val[0]), val[1]):.4f}"
        print(f"{line}  [{clock}]", flush=True)
    model.eval()


def random_shift(max_shift: int) -> Callable[[object, object], object]:
    """Augmentation: translate each image by up to `max_shift` pixels (zero padding)."""
    import torch

    def shift(batch, generator):
        n, c, h, w = batch.shape
        padded = torch.nn.functional.pad(batch, (max_shift,) * 4)
        dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
        dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
        # per image, the rows dy..dy+h-1 and columns dx..dx+w-1 of the padded image
        rows = (dy[:, None] + torch.arange(h)).view(n, 1, h, 1).expand(n, c, h, w + 2 * max_shift)
        cols = (dx[:, None] + torch.arange(w)).view(n, 1, 1, w).expand(n, c, h, w)
        return padded.gather(2, rows).gather(3, cols)

    return shift


# --------------------------------------------------------------------------------------------
# ONNX export and verification
# --------------------------------------------------------------------------------------------
def _quiet_exporter() -> None:
    # The exporter logs a warning per torchvision op it cannot register (torchvision is absent).
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module="copyreg")


def _strip_stack_traces(proto) -> None:
    """Drop the exporter's per-node Python stack traces: they hold this machine's absolute paths
    (so the same build in another folder would differ) and are most of the graph's metadata."""
    for node in proto.graph.node:
        kept = [prop for prop in node.metadata_props if prop.key != "pkg.torch.onnx.stack_trace"]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)


def export_onnx(model, sample: np.ndarray, path: Path, *, input_name: str, output_name: str,
                opset: int = OPSET) -> None:
    """Export `model` (eval mode) with a dynamic batch axis to one self-contained .onnx file.

    Uses the torch.export-based exporter (`dynamo=True`, the default of torch 2.13; it needs
    onnxscript and runs offline). Its optimiser folds eval-mode BatchNorm into the preceding Conv.
    The exporter may write weights to a side `.data` file: the model is loaded with its external
    data and saved back as one file, written atomically.
    """
    import onnx
    import torch

    _quiet_exporter()
    model.eval()
    path = Path(path)
    example = torch.from_numpy(sample[:2])
    batch = torch.export.Dim("batch", min=1)
    with tempfile.TemporaryDirectory(prefix="qtune-export-") as tmp:
        raw = Path(tmp) / "raw.onnx"
        torch.onnx.export(
            model, (example,), str(raw), dynamo=True, opset_version=opset,
            input_names=[input_name], output_names=[output_name],
            dynamic_shapes=({0: batch},), external_data=False, optimize=True, verbose=False,
        )
        proto = onnx.load(str(raw), load_external_data=True)
    # the dynamic axis gets a readable name whatever the exporter called it
    for value in list(proto.graph.input) + list(proto.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_param = "batch"
    _strip_stack_traces(proto)
    proto.producer_name = "qtune-example"
    onnx.checker.check_model(proto, full_check=True)
    tmp_path = path.with_name(path.name + ".tmp")
    onnx.save(proto, str(tmp_path), save_as_external_data=False)
    os.replace(tmp_path, path)
    ops = sorted({node.op_type for node in proto.graph.node})
    print(f"  wrote {path.name}: opset {opset}, {len(proto.graph.node)} nodes, ops {', '.join(ops)}, "
          f"{path.stat().st_size / 1024:.0f} KiB")
    if "BatchNormalization" in ops:
        print("  note: BatchNormalization was not folded into Conv")


def ort_session(path: Path, threads: int = THREADS):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_predict(session, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    input_name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {input_name: x[start:start + batch_size]})[0]
                           for start in range(0, len(x), batch_size)])


def verify_onnx(path: Path, model, x: np.ndarray, atol: float = ATOL) -> float:
    """ORT's outputs of the exported model must match torch's within `atol` (batch 1 and larger)."""
    session = ort_session(path)
    reference = predict(model, x)
    got = ort_predict(session, x)
    single = ort_predict(session, x[:1], batch_size=1)
    diff = max(float(np.abs(got - reference).max()), float(np.abs(single - reference[:1]).max()))
    if not diff <= atol:
        raise SystemExit(f"ONNX Runtime output differs from torch by {diff:.2e} (> {atol:.0e}) on {path}")
    print(f"  ORT matches torch on {len(x)} samples: max |diff| {diff:.1e} (tolerance {atol:.0e})")
    return diff


# --------------------------------------------------------------------------------------------
# data files
# --------------------------------------------------------------------------------------------
def write_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """`arrays` as one .npz file, written atomically; prints each array's shape and dtype."""
    path = Path(path)
    tmp_path = path.with_name(path.name + ".tmp")
    with open(tmp_path, "wb") as handle:
        np.savez(handle, **arrays)
    os.replace(tmp_path, path)
    shapes = ", ".join(f"{k} {tuple(v.shape)} {v.dtype}" for k, v in arrays.items())
    print(f"  wrote {path.name}: {shapes}")


def write_npz(path: Path, input_name: str, x: np.ndarray, labels: np.ndarray) -> None:
    """One array per model input (float32) plus int64 `labels`, written atomically."""
    if len(x) != len(labels):
        raise ValueError(f"{len(x)} inputs but {len(labels)} labels")
    write_arrays(path, {input_name: np.ascontiguousarray(x, dtype=np.float32),
                        "labels": np.asarray(labels, dtype=np.int64)})


def npz_accuracy(model_path: Path, npz_path: Path) -> tuple[float, int]:
    """fp32 top-1 accuracy of an ONNX model on a qtune .npz file, with ONNX Runtime alone."""
    session = ort_session(model_path)
    input_name = session.get_inputs()[0].name
    with np.load(npz_path) as data:
        x, labels = data[input_name], data["labels"]
    return accuracy(ort_predict(session, x), labels), len(labels)


def stratified_subset(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Sorted indices of `count` samples with (near) equal class shares, reproducible."""
    from sklearn.model_selection import train_test_split

    if count >= len(labels):
        return np.arange(len(labels))
    chosen, _ = train_test_split(np.arange(len(labels)), train_size=count, stratify=labels,
                                 random_state=seed)
    return np.sort(chosen)
