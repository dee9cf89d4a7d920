"""A crafted `.pt2` must never run its payload inside qtune's loader (issue 12).

torch.export.load unpickles parts of the archive (sample inputs and use_pickle weights with
weights_only=False as a fallback, opaque constants with pickle.loads) and eval()s symbolic shapes
through sympy.sympify. Each archive below carries a payload that writes a marker file; loading it
through qtune must refuse the file with an error naming spec.model.path, and the marker must not
exist. The first test shows the payload does run under a bare torch.export.load.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from qtune.adaptors.pytorch.loading import load_model, safe_sym_expr  # noqa: E402
from qtune.spec.errors import ModelLoadError  # noqa: E402


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):  # noqa: ANN001, ANN201
        return torch.relu(self.fc(x))


class Payload:
    """Unpickling it writes `marker` (a stand-in for os.system)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (exec, (f"open({str(self.marker)!r}, 'w').write('payload ran')",))


def _program(path: Path, dynamic: bool = False) -> Path:
    example = (torch.randn(2, 4),)
    shapes = {"x": {0: torch.export.Dim("batch", min=1, max=1024)}} if dynamic else None
    torch.export.save(torch.export.export(Tiny().eval(), example, dynamic_shapes=shapes), str(path))
    return path


def _rewrite(source: Path, target: Path, replace: dict[str, bytes], add: dict[str, bytes] | None = None) -> Path:
    """Copy a zip archive, replacing members (by name suffix) and adding some (under its root folder)."""
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as dst:
        root = src.namelist()[0].split("/", 1)[0]
        for info in src.infolist():
            data = src.read(info.filename)
            for suffix, new in replace.items():
                if info.filename.endswith(suffix):
                    data = new
            dst.writestr(info.filename, data)
        for name, data in (add or {}).items():
            dst.writestr(f"{root}/{name}", data)
    return target


def _evil_pickle(marker: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save((Payload(marker),), buffer)
    return buffer.getvalue()


def _refused(path: Path, marker: Path) -> str:
    with pytest.raises(ModelLoadError) as info:
        load_model({"path": str(path)})
    assert not marker.exists(), "the archive's payload ran inside qtune's loader"
    message = str(info.value)
    assert message.startswith("spec.model.path:") and "\n" not in message
    return message


def test_a_legitimate_program_still_loads(tmp_path: Path) -> None:
    for dynamic in (False, True):
        model = load_model({"path": str(_program(tmp_path / f"ok{dynamic}.pt2", dynamic))})
        assert model.input_names == ["x"]


def test_crafted_sample_inputs_pickle_does_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    evil = _rewrite(_program(tmp_path / "ok.pt2"), tmp_path / "evil.pt2",
                    {"data/sample_inputs/model.pt": _evil_pickle(marker)})
    # proof the archive is hostile: torch's own loader runs the payload
    try:
        torch.export.load(str(evil))
    except Exception:  # noqa: BLE001, S110 - whatever torch makes of the rest
        pass
    assert marker.exists(), "the crafted archive should run its payload under a bare torch.export.load"
    marker.unlink()
    message = _refused(evil, marker)
    assert "evil.pt2" in message and "refusing" in message and "model.entrypoint" in message


def test_crafted_pickled_weight_does_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    source = _program(tmp_path / "ok.pt2")
    with zipfile.ZipFile(source) as src:
        config_name = next(n for n in src.namelist() if n.endswith("model_weights_config.json"))
        config = json.loads(src.read(config_name))
    first = next(iter(config["config"].values()))
    first["use_pickle"] = True
    evil = _rewrite(source, tmp_path / "evil.pt2", {
        "model_weights_config.json": json.dumps(config).encode(),
        f"data/weights/{first['path_name']}": _evil_pickle(marker)})
    assert "refusing" in _refused(evil, marker)


def test_crafted_opaque_constant_and_aoti_members_are_refused(tmp_path: Path) -> None:
    import pickle

    marker = tmp_path / "marker"
    source = _program(tmp_path / "ok.pt2")
    with zipfile.ZipFile(source) as src:
        config_name = next(n for n in src.namelist() if n.endswith("model_constants_config.json"))
    config = {"config": {"c": {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True,
                               "tensor_meta": None}}}
    evil = _rewrite(source, tmp_path / "evil.pt2", {"model_constants_config.json": json.dumps(config).encode()},
                    {"data/constants/opaque_obj_0": pickle.dumps(Payload(marker))})
    assert "object" in _refused(evil, marker)
    aoti = _rewrite(source, tmp_path / "aoti.pt2", {}, {"data/aotinductor/model/model.so": b"\x7fELF"})
    assert "unexpected member" in _refused(aoti, marker)
    assert config_name  # the layout this test edits exists


def test_crafted_symbolic_expression_does_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    source = _program(tmp_path / "ok.pt2", dynamic=True)
    with zipfile.ZipFile(source) as src:
        model_name = next(n for n in src.namelist() if n.endswith("models/model.json"))
        text = src.read(model_name).decode()
    assert '"expr_str"' in text, "a dynamic program carries symbolic expressions"
    payload = f"__import__('pathlib').Path({str(marker)!r}).write_text('payload ran')"
    document = json.loads(text)

    def poison(item):  # noqa: ANN001, ANN202
        if isinstance(item, dict):
            return {k: (payload if k == "expr_str" else poison(v)) for k, v in item.items()}
        if isinstance(item, list):
            return [poison(v) for v in item]
        return item

    evil = _rewrite(source, tmp_path / "evil.pt2", {"models/model.json": json.dumps(poison(document)).encode()})
    assert "plain arithmetic" in _refused(evil, marker)


def test_symbolic_expression_grammar() -> None:
    for ok in ("s0", "s77 + 1", "Max(2, s0)", "FloorDiv(s0, 2)*s1 - 3", "Eq(Mod(s0, 8), 0)", "oo", "1.5e3*u0"):
        assert safe_sym_expr(ok), ok
    for bad in ("__import__('os')", "eval(chr(49))", "s0.__class__", "open", "[s0]", "lambda: 1", "exec"):
        assert not safe_sym_expr(bad), bad

