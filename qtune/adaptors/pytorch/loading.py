"""Loading a model without ever unpickling arbitrary objects.

Allowed forms (spec.model):
  path: model.pt2                      a `torch.export` program (torch.export.save/load)
  entrypoint: pkg.module:build         a function returning an nn.Module (fp32, eval mode) ...
  weights: model.pt | .safetensors     ... plus its state_dict, loaded with weights_only=True
A file written with `torch.save(model)` (a pickled module) is refused: loading it would run
arbitrary code from the file.
"""

from __future__ import annotations

import inspect
import logging
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qtune.adaptors.pytorch.model import InputSpec, TorchModel
from qtune.spec.entrypoints import EntrypointError, load_entrypoint
from qtune.spec.errors import ModelLoadError

logger = logging.getLogger(__name__)

ALLOWED_FORMS = (
    "a torch.export program (.pt2, written by torch.export.save), or model.entrypoint "
    "'module:function' returning an nn.Module plus model.weights (a state_dict saved with "
    "torch.save(model.state_dict()) or a .safetensors file)"
)


def _import_entrypoint(entrypoint: str, job_dir: Path | None) -> Any:
    """The model factory, imported like every entrypoint of a job (qtune.spec.entrypoints)."""
    try:
        return load_entrypoint(entrypoint, "spec.model.entrypoint", job_dir, kind="callable",
                               allowed="module:function returning an nn.Module")
    except EntrypointError as exc:
        raise ModelLoadError(str(exc)) from None


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _pickled_class(exc: BaseException) -> str:
    """` (tiny.Tiny)`: the first class torch's weights-only unpickler refused, when it says."""
    found = re.search(r"GLOBAL ([\w.]+)", _ANSI.sub("", str(exc)))
    return f" ({found.group(1)})" if found else ""


def _first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's text, without terminal colour codes (torch adds them)."""
    text = _ANSI.sub("", str(exc)).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:limit].rstrip(" .,")


def load_state_dict(path: Path, field: str = "spec.model.weights") -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ModelLoadError(f"{field}: weights file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ModelLoadError(f"{field}: a .safetensors weights file needs the safetensors package") from None
        try:
            return load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise ModelLoadError(f"{field}: cannot read weights file {path}: {_first_line(exc, 300)}") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ModelLoadError(
            f"{field}: {path.name} is not a weights-only file: it pickles Python objects{_pickled_class(exc)} "
            f"(torch.save(model)), and unpickling could run any code: refusing to unpickle it. Allowed: {ALLOWED_FORMS}"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as exc:
        raise ModelLoadError(f"{field}: cannot read weights file {path}: {_first_line(exc, 300)}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"{field}: {path.name} does not hold a state_dict (name -> tensor); "
                             f"allowed: {ALLOWED_FORMS}")
    return state


def _load_program(path: Path) -> torch.export.ExportedProgram:
    if not path.is_file():
        raise ModelLoadError(f"spec.model.path: model file not found: {path}")
    try:
        return torch.export.load(str(path))
    except Exception as exc:  # noqa: BLE001 - torch.export.load raises many kinds on a bad file
        try:
            torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise ModelLoadError(
                f"spec.model.path: {path.name} is a pickled Python object (torch.save(model)), not a torch.export "
                f"program; "
                f"refusing to unpickle it. Allowed: {ALLOWED_FORMS}"
            ) from None
        except Exception:  # noqa: BLE001, S110 - not a torch file at all: report the export error
            pass
        else:
            raise ModelLoadError(
                f"spec.model.path: {path.name} is a weights file, not a model: give model.entrypoint "
                f"'module:function' that builds the module and model.weights: {path.name}"
            ) from None
        raise ModelLoadError(f"spec.model.path: cannot load {path} as a torch.export program: "
                             f"{_first_line(exc, 300)}; allowed: {ALLOWED_FORMS}") from None


def _input_specs(model_spec: dict[str, Any], info_inputs: list[dict[str, Any]] | None) -> list[InputSpec] | None:
    raw = model_spec.get("inputs") or info_inputs
    if not raw:
        return None
    return [InputSpec(i["name"], i.get("shape"), i.get("dtype") or "float32") for i in raw]


def _forward_inputs(module: nn.Module) -> list[str]:
    parameters = inspect.signature(module.forward).parameters.values()
    return [p.name for p in parameters
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is inspect.Parameter.empty]


def load_model(model_spec: dict[str, Any], job_dir: Path | None = None,
               info_inputs: list[dict[str, Any]] | None = None) -> TorchModel:
    specs = _input_specs(model_spec, info_inputs)
    path = Path(model_spec["path"]) if model_spec.get("path") else None
    entrypoint = model_spec.get("entrypoint")
    if path is not None and job_dir is not None and not path.is_absolute():
        path = job_dir / path
    if entrypoint:
        weights = model_spec.get("weights") or (str(path) if path is not None else None)
        factory = _import_entrypoint(entrypoint, job_dir)
        try:
            module = factory()
        except Exception as exc:  # noqa: BLE001 - user code
            raise ModelLoadError(f"spec.model.entrypoint: {entrypoint} raised {type(exc).__name__}: "
                                 f"{_first_line(exc, 300)}") from None
        if isinstance(module, torch.export.ExportedProgram):
            return _from_program(module, entrypoint, specs)
        if not isinstance(module, nn.Module):
            raise ModelLoadError(f"spec.model.entrypoint: {entrypoint} returned {type(module).__name__}; "
                                 "allowed: an nn.Module or a torch.export ExportedProgram")
        if weights:
            weights_path = Path(weights)
            if job_dir is not None and not weights_path.is_absolute():
                weights_path = job_dir / weights_path
            field = "spec.model.weights" if model_spec.get("weights") else "spec.model.path"
            state = load_state_dict(weights_path, field)
            expected = module.state_dict()
            missing = [k for k in expected if k not in state]
            unexpected = [k for k in state if k not in expected]
            wrong = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
                     if k in state and tuple(state[k].shape) != tuple(v.shape)]
            if missing or unexpected or wrong:
                raise ModelLoadError(
                    f"spec.model.weights: {weights_path.name} do not match {entrypoint}: missing {missing[:5]}, "
                    f"unexpected {unexpected[:5]}, wrong shape {wrong[:3]}"
                )
            module.load_state_dict(state, strict=True)
        module.eval()
        names = [s.name for s in specs] if specs else _forward_inputs(module)
        model = TorchModel(source=entrypoint, input_names=names, module=module, input_specs=specs)
        if specs:
            model.lifted()  # export now: errors surface at load time
        return model
    if path is None:
        raise ModelLoadError(f"spec.model: give model.path or model.entrypoint; allowed: {ALLOWED_FORMS}")
    if path.suffix != ".pt2":
        # still check what it is, to say precisely why it is refused
        try:
            load_state_dict(path, "spec.model.path")
        except ModelLoadError:
            raise
        raise ModelLoadError(
            f"spec.model.path: {path.name} is a weights file, not a model: give model.entrypoint "
            f"'module:function' that builds the module and model.weights: {path.name}"
        )
    return _from_program(_load_program(path), path.name, specs)


def _from_program(program: torch.export.ExportedProgram, source: str, specs: list[InputSpec] | None) -> TorchModel:
    signature_inputs = [spec.arg.name for spec in program.graph_signature.input_specs
                        if spec.kind == torch.export.graph_signature.InputKind.USER_INPUT]
    names = [s.name for s in specs] if specs else signature_inputs
    if len(names) != len(signature_inputs):
        raise ModelLoadError(f"spec.model.inputs: {source}: names {len(names)} inputs, "
                             f"the program takes {len(signature_inputs)}: {signature_inputs}")
    model = TorchModel(source=source, input_names=names, exported=program, input_specs=specs)
    model.lifted()
    static = [node.name for node in program.graph.nodes if node.op == "placeholder" and node.name in signature_inputs
              and isinstance(getattr(node.meta.get("val"), "shape", [None])[0], int)]
    if static:
        logger.warning("%s: inputs %s were exported with a fixed batch size; data and benchmark batches must "
                       "match it (export with dynamic_shapes for a dynamic batch)", source, static)
    return model
