"""Fixtures for the ONNX Runtime adaptor tests: models built in code on scikit-learn digits."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
for folder in (HERE, HERE.parent):  # onnx_builders, and tests/integration/sensitive_model.py
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

pytest.importorskip("onnxruntime")
pytest.importorskip("sklearn")

import onnx_builders as builders  # noqa: E402

from qtune.adaptors.onnxrt import OnnxRuntimeAdaptor  # noqa: E402
from qtune.data import Dataset  # noqa: E402


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx-models")


@pytest.fixture(scope="session")
def mlp_path(model_dir: Path) -> Path:
    return builders.save(builders.mlp_proto(), model_dir / "mlp.onnx")


@pytest.fixture(scope="session")
def cnn_path(model_dir: Path) -> Path:
    return builders.save(builders.cnn_proto(), model_dir / "cnn.onnx")


@pytest.fixture(scope="session")
def mlp_data() -> dict[str, Dataset]:
    data = builders.digits()
    return {"calib": Dataset(builders.mlp_input(data["x_train"][:100]), data["y_train"][:100]),
            "eval": Dataset(builders.mlp_input(data["x_eval"]), data["y_eval"])}


@pytest.fixture(scope="session")
def cnn_data() -> dict[str, Dataset]:
    data = builders.digits()
    return {"calib": Dataset(builders.cnn_input(data["x_train"][:100]), data["y_train"][:100]),
            "eval": Dataset(builders.cnn_input(data["x_eval"]), data["y_eval"])}


@pytest.fixture
def adaptor(tmp_path: Path) -> OnnxRuntimeAdaptor:
    return OnnxRuntimeAdaptor({"workspace": str(tmp_path / "workspace"), "threads": 1})
