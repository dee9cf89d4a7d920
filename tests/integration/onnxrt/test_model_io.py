"""Loading, validating, copying and saving ONNX models (with external data)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_builders as builders
import pytest
from onnx import TensorProto, helper
from ort_helpers import default_config, load

from qtune.adaptors import get_adaptor_class
from qtune.adaptors.onnxrt import OnnxRuntimeAdaptor
from qtune.spec.errors import ModelLoadError
from qtune.tuning import codec


def test_registered_under_onnxruntime() -> None:
    assert get_adaptor_class("onnxruntime") is OnnxRuntimeAdaptor


def test_loads_model_and_reports_inputs_size_opset(adaptor: OnnxRuntimeAdaptor, mlp_path: Path) -> None:
    model = load(adaptor, mlp_path)
    assert adaptor.input_names(model) == [builders.INPUT]
    assert model.output_names() == ["logits"]
    assert model.opset == 17
    assert adaptor.model_size(model) == mlp_path.stat().st_size


def test_missing_file(adaptor: OnnxRuntimeAdaptor, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"not found: .*nope\.onnx"):
        load(adaptor, tmp_path / "nope.onnx")


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        (b"", "is empty"),
        (b"\xff\xfe\x00garbage" * 50, "not a valid ONNX protobuf"),
        (b"just some text, not a model", "not"),
    ],
)
def test_corrupt_file(adaptor: OnnxRuntimeAdaptor, tmp_path: Path, content: bytes, pattern: str) -> None:
    path = tmp_path / "broken.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=pattern) as error:
        load(adaptor, path)
    assert "broken.onnx" in str(error.value) and "\n" not in str(error.value)


def test_other_protobuf_is_not_a_model(adaptor: OnnxRuntimeAdaptor, tmp_path: Path) -> None:
    path = tmp_path / "tensor.onnx"
    path.write_bytes(onnx.numpy_helper.from_array(np.zeros((3, 3), np.float32), "t").SerializeToString())
    with pytest.raises(ModelLoadError, match="tensor.onnx"):
        load(adaptor, path)


def test_checker_failure(adaptor: OnnxRuntimeAdaptor, tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["undefined_tensor"], ["y"], name="relu")], "bad",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    path = tmp_path / "bad.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(ModelLoadError, match=r"bad\.onnx fails onnx\.checker"):
        load(adaptor, path)


def test_missing_external_data(adaptor: OnnxRuntimeAdaptor, tmp_path: Path) -> None:
    path = builders.save(builders.mlp_proto(), tmp_path / "ext" / "mlp.onnx", external=True)
    (path.parent / "mlp.onnx.data").unlink()
    with pytest.raises(ModelLoadError, match=r"missing external data file.*mlp\.onnx\.data"):
        load(adaptor, path)


def test_external_data_load_copy_quantize(adaptor: OnnxRuntimeAdaptor, tmp_path: Path, mlp_data) -> None:
    path = builders.save(builders.mlp_proto(), tmp_path / "ext" / "mlp.onnx", external=True)
    model = load(adaptor, path)
    assert [p.name for p in model.files()] == ["mlp.onnx", "mlp.onnx.data"]
    assert adaptor.model_size(model) > path.stat().st_size  # weights counted

    copied = adaptor.save_model(model, tmp_path / "copy")
    assert sorted(p.name for p in copied.parent.iterdir()) == ["mlp.onnx.data", "model.onnx"]
    assert load(adaptor, copied).files()[1].is_file()

    optimized = adaptor.optimized(model).model
    assert len(optimized.files()) == 2 and all(p.is_file() for p in optimized.files())
    quantized = adaptor.quantize(codec.dump(default_config(adaptor.query_fw_capability(model))), model,
                                 mlp_data["calib"].loader(50))
    assert len(quantized.files()) == 2, "a model with external data is saved with external data"
    accuracy = adaptor.evaluate(quantized, mlp_data["eval"].loader(100))
    assert accuracy > 0.9


def test_save_model_large_uses_external_data(tmp_path: Path) -> None:
    from qtune.adaptors.onnxrt.model import save_model

    proto = builders.mlp_proto()
    saved = save_model(proto, tmp_path / "small.onnx")
    assert saved.files() == [saved.path]
    forced = save_model(proto, tmp_path / "forced.onnx", external=True)
    assert [p.name for p in forced.files()] == ["forced.onnx", "forced.onnx.data"]
