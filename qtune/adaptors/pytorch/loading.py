"""Loading a model without ever unpickling arbitrary objects.

Allowed forms (spec.model):
  path: model.pt2                      a `torch.export` program (torch.export.save/load), checked
                                       first: see "`.pt2` archives" below
  entrypoint: pkg.module:build         a function returning an nn.Module (fp32, eval mode) ...
  weights: model.pt | .safetensors     ... plus its state_dict, loaded with weights_only=True
A file written with `torch.save(model)` (a pickled module) is refused: loading it would run
arbitrary code from the file.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import logging
import pickle
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

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


# --------------------------------------------------------------------------- .pt2 archives
# torch.export.load is not safe on untrusted files: it unpickles weights and constants with
# weights_only=False (and falls back to it for sample inputs), unpickles "opaque" constants with
# pickle.loads, loads TorchBind objects and AOTInductor shared libraries, and parses the program's
# symbolic shapes with sympy.sympify, which eval()s its string. So a .pt2 is checked BEFORE torch
# sees it, and loaded with guards for what the check cannot see:
#   1. members: only the torch.export.save layout (format "pt2"); no AOTInductor code, no custom or
#      opaque object constants, no legacy (torch 2.7) layout;
#   2. every member torch would unpickle (sample inputs, use_pickle weights/constants) must load
#      with torch's restricted unpickler (weights_only=True: an allow-list of tensor/storage
#      rebuild functions, OrderedDict and plain containers; any other global is refused);
#   3. the program (models/*.json): node targets only torch.ops.*, torch.sym_*, _operator.*,
#      math.*; every symbolic expression only numbers, operators, symbols (s0, u1, ...) and
#      torch's sympy functions;
#   4. during torch.export.load, torch.load is forced to weights_only=True and sympy.sympify
#      refuses any string failing the expression grammar of 3.

PT2_FIX = ("export the model again with torch.export.save, or give model.entrypoint 'module:function' "
           "building the nn.Module plus model.weights (a state_dict, loaded with weights_only=True)")
_SAFE_TARGET = re.compile(r"(torch\.ops|_operator|math)\.[A-Za-z_][\w.]*|torch\.sym_\w+")
_EXPR_TOKEN = re.compile(r"\s+|\d+\.\d*(?:[eE][-+]?\d+)?|\d+|[A-Za-z_]\w*|'[a-z]{1,4}\d+'|\*\*|//|[-+*/%(),<>=!&|~]")
_SYMBOL = re.compile(r"[a-z]{1,4}\d+")
_EXPR_NAMES = frozenset({
    "oo", "zoo", "nan", "True", "False", "Integer", "Rational", "Float", "Symbol", "Abs", "Max", "Min", "Mod",
    "floor", "ceiling", "sqrt", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "And", "Or", "Not", "Piecewise", "Pow",
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv",
    "LShift", "RShift", "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt", "RoundToInt",
    "RoundDecimal", "ToFloat", "FloatPow", "PowByNatural", "IntTrueDiv", "FloatTrueDiv", "Identity",
    # assumptions of Symbol('s0', positive=True, integer=True)
    "positive", "negative", "nonnegative", "nonpositive", "integer", "real", "finite", "zero", "nonzero",
})
_MEMBER_LIMIT = 64 * 1024 * 1024
"""Largest pickle member read for the check (sample inputs and pickled tensors are small)."""


class UnsafeArchive(Exception):
    """A .pt2 archive that loading could make run code."""


def safe_sym_expr(text: str) -> bool:
    """True when `text` is only numbers, operators, symbols and torch's sympy functions (no calls of
    builtins, no attributes, no strings: nothing eval() could turn into code)."""
    pos = 0
    while pos < len(text):
        m = _EXPR_TOKEN.match(text, pos)
        if not m:
            return False
        token = m.group(0)
        if (token[0].isalpha() or token[0] == "_") and not (
                token in _EXPR_NAMES or _SYMBOL.fullmatch(token)
                or re.fullmatch(r"(BitwiseFn|OpaqueUnaryFn)_[a-z0-9_]+", token)):
            return False
        pos = m.end()
    return True


def _check_program_json(name: str, document: Any) -> None:
    stack = [document]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            for key, value in item.items():
                if key == "target" and isinstance(value, str) and not _SAFE_TARGET.fullmatch(value):
                    raise UnsafeArchive(f"{name}: graph node target {value[:80]!r} is not a torch operator")
                if key == "expr_str" and isinstance(value, str) and not safe_sym_expr(value):
                    raise UnsafeArchive(f"{name}: symbolic expression {value[:80]!r} is not plain arithmetic")
                if key == "range_constraints" and isinstance(value, dict):
                    bad = [k for k in value if not safe_sym_expr(str(k))]
                    if bad:
                        raise UnsafeArchive(f"{name}: range constraint {bad[0][:80]!r} is not a symbol")
                stack.append(value)


def _check_pickle(archive: zipfile.ZipFile, member: str) -> None:
    info = archive.getinfo(member)
    if info.file_size > _MEMBER_LIMIT:
        raise UnsafeArchive(f"{member}: {info.file_size} bytes of pickled data")
    try:
        torch.load(io.BytesIO(archive.read(member)), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeArchive(f"{member} pickles Python objects{_pickled_class(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - any other reason it is not a plain tensor pickle
        raise UnsafeArchive(f"{member} is not a tensor pickle: {_first_line(exc, 120)}") from None


def check_pt2_archive(archive: zipfile.ZipFile) -> None:
    """Raise UnsafeArchive unless the archive is a torch.export.save program torch can load without
    running anything from it (steps 1-3 above)."""
    names = [n for n in archive.namelist() if not n.endswith("/")]
    roots = {n.split("/", 1)[0] for n in names}
    if len(roots) != 1 or any("/" not in n for n in names):
        raise UnsafeArchive("not the torch.export.save layout (one top folder)")
    root = roots.pop() + "/"
    files = {n[len(root):] for n in names}
    if any(".." in f.split("/") for f in files):
        raise UnsafeArchive("member paths leave the archive")
    fixed = {"archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id"}
    models = sorted(f for f in files if re.fullmatch(r"models/\w+\.json", f))
    if not models:
        raise UnsafeArchive("no program (models/*.json)")
    pickled: set[str] = set()
    raw: set[str] = set()
    for config_name, folder in (("weights", "data/weights/"), ("constants", "data/constants/")):
        for model in models:
            stem = model[len("models/"):-len(".json")]
            config_file = f"{folder}{stem}_{config_name}_config.json"
            if config_file not in files:
                raise UnsafeArchive(f"{config_file} missing (legacy or foreign layout)")
            try:
                config = json.loads(archive.read(root + config_file)).get("config") or {}
            except ValueError:
                raise UnsafeArchive(f"{config_file} is not JSON") from None
            for entry in config.values():
                path_name = str(entry.get("path_name", ""))
                if "/" in path_name or (config_name == "constants" and not path_name.startswith("tensor_")):
                    raise UnsafeArchive(f"constant {path_name!r} is an object, not a tensor")
                (pickled if entry.get("use_pickle") else raw).add(folder + path_name)
    samples = {f"data/sample_inputs/{m[len('models/'):-len('.json')]}.pt" for m in models}
    allowed = fixed | set(models) | pickled | raw | samples | {
        f for f in files if re.fullmatch(r"data/(weights|constants)/\w+_(weights|constants)_config\.json", f)}
    for f in sorted(files):
        if f not in allowed and not f.startswith("extra/"):
            raise UnsafeArchive(f"unexpected member {f!r} (AOTInductor code, custom objects and legacy "
                                f"members are refused)")
    for member in sorted((pickled | samples) & files):
        _check_pickle(archive, root + member)
    for model in models:
        try:
            document = json.loads(archive.read(root + model))
        except ValueError:
            raise UnsafeArchive(f"{model} is not JSON") from None
        _check_program_json(model, document)


@contextlib.contextmanager
def _guarded_torch_load() -> Iterator[None]:
    """torch.load forced to weights_only=True and sympy.sympify refusing non-arithmetic strings,
    while torch.export.load runs (step 4 above)."""
    import sympy

    real_load, real_sympify = torch.load, sympy.sympify

    def load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return real_load(*args, **kwargs)

    def sympify(a: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(a, str) and not safe_sym_expr(a):
            raise UnsafeArchive(f"symbolic expression {a[:80]!r} is not plain arithmetic")
        return real_sympify(a, *args, **kwargs)

    with mock.patch.object(torch, "load", load), mock.patch.object(sympy, "sympify", sympify):
        yield


def _classify_foreign(path: Path, reason: str) -> ModelLoadError:
    """The error for a .pt2 that is not a torch.export archive: say what it is, loading it safely."""
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        return ModelLoadError(
            f"spec.model.path: {path.name} is a pickled Python object (torch.save(model)), not a torch.export "
            f"program; refusing to unpickle it. Allowed: {ALLOWED_FORMS}")
    except Exception:  # noqa: BLE001 - not a torch file at all
        return ModelLoadError(f"spec.model.path: cannot load {path} as a torch.export program: {reason}; "
                              f"allowed: {ALLOWED_FORMS}")
    return ModelLoadError(f"spec.model.path: {path.name} is a weights file, not a model: give model.entrypoint "
                          f"'module:function' that builds the module and model.weights: {path.name}")


def _load_program(path: Path) -> torch.export.ExportedProgram:
    if not path.is_file():
        raise ModelLoadError(f"spec.model.path: model file not found: {path}")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            formats = [n for n in names if n.count("/") == 1 and n.endswith("/archive_format")]
            if not formats or archive.read(formats[0]).strip() != b"pt2":
                raise _classify_foreign(path, "not written by torch.export.save")
            check_pt2_archive(archive)
    except zipfile.BadZipFile:
        raise ModelLoadError(f"spec.model.path: cannot load {path} as a torch.export program: not a zip "
                             f"archive; allowed: {ALLOWED_FORMS}") from None
    except UnsafeArchive as exc:
        raise ModelLoadError(f"spec.model.path: {path.name}: refusing to load it, loading could run code "
                             f"from the file ({exc}); {PT2_FIX}") from None
    try:
        with _guarded_torch_load():
            return torch.export.load(str(path))
    except UnsafeArchive as exc:
        raise ModelLoadError(f"spec.model.path: {path.name}: refusing to load it, loading could run code "
                             f"from the file ({exc}); {PT2_FIX}") from None
    except pickle.UnpicklingError as exc:
        raise ModelLoadError(f"spec.model.path: {path.name}: refusing to unpickle it: it pickles Python "
                             f"objects{_pickled_class(exc)}; {PT2_FIX}") from None
    except Exception as exc:  # noqa: BLE001 - torch.export.load raises many kinds on a bad file
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
