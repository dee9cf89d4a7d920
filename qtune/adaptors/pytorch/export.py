"""Writing models a user can load for inference without qtune.

  fp32 model       -> <dir>/model.pt2: the torch.export program (`torch.export.load(p).module()`)
  quantized model  -> <dir>/model.pt: TorchScript (`torch.jit.load(p)`). torch.export cannot
                      serialize the packed int8 weights of torch.ao's quantized modules (they are
                      TorchScript classes without `__obj_flatten__`), TorchScript can, and it runs
                      without Python code from qtune or from the model's package.
  both             -> <dir>/qtune_model.json: inputs (order, dtype), outputs, the tune config,
                      which ops are int8 and which stayed fp32 and why.
`export_onnx` writes ONNX: the fp32 graph, or for a static int8 model its QDQ form (the reference
quantized graph: QuantizeLinear/DequantizeLinear around fp32 ops, which ONNX Runtime fuses into
int8 kernels).
"""

from __future__ import annotations

import copy
import io
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import fx

from qtune.adaptors.pytorch.model import QuantizedTorchModel, TorchModel
from qtune.adaptors.pytorch.quantize import quiet

logger = logging.getLogger(__name__)


def scriptable(module: fx.GraphModule) -> fx.GraphModule:
    """A copy whose ATen calls name the op packet (`aten.sym_size`) rather than one overload
    (`aten.sym_size.int`): TorchScript resolves packets, not overload attributes."""
    module = copy.deepcopy(module)
    for node in module.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            node.target = node.target.overloadpacket
    module.recompile()
    return module


def _script(model: QuantizedTorchModel) -> torch.jit.ScriptModule:
    with quiet():
        return torch.jit.script(scriptable(model.module))


def save(model: TorchModel | QuantizedTorchModel, path: Path) -> Path:
    path = Path(path)
    if isinstance(model, QuantizedTorchModel):
        target = path if path.suffix == ".pt" else path / "model.pt"
        target.parent.mkdir(parents=True, exist_ok=True)
        with quiet():
            torch.jit.save(_script(model), str(target))
        meta = {
            "format": "torchscript",
            "load": "torch.jit.load(path); call with the inputs in this order",
            "inputs": model.input_names,
            "tune_config": model.tune_cfg,
            "int8_ops": model.quantized_ops,
            "fp32_ops": model.fp32_ops,
        }
    elif isinstance(model, TorchModel):
        target = path if path.suffix == ".pt2" else path / "model.pt2"
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.export.save(model.export(), str(target))
        meta = {"format": "torch.export", "load": "torch.export.load(path).module()", "inputs": model.input_names}
    else:
        raise TypeError(f"cannot save {type(model).__name__}")
    (target.parent / "qtune_model.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
    logger.info("saved %s", target)
    return target


def size(model: TorchModel | QuantizedTorchModel) -> int:
    buffer = io.BytesIO()
    if isinstance(model, QuantizedTorchModel):
        with quiet():
            torch.jit.save(_script(model), buffer)
    else:
        torch.export.save(model.export(), buffer)
    return len(buffer.getvalue())


def export_onnx(model: TorchModel | QuantizedTorchModel, path: Path, opset: int = 18) -> Path:
    """ONNX of the fp32 model, or the QDQ form of a static int8 model."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(model, TorchModel):
        program = model.export()
    elif isinstance(model, QuantizedTorchModel):
        if model.prepared is None or model.tune_cfg.get("approach") == "dynamic":
            raise ValueError("ONNX export of a dynamic int8 torch model is not supported: export the fp32 "
                             "model and quantize it with the onnxruntime adaptor (dynamic MatMul)")
        from torch.ao.quantization.quantize_fx import _convert_to_reference_decomposed_fx

        with quiet():
            reference = _convert_to_reference_decomposed_fx(copy.deepcopy(model.prepared))
        specs = model.fp32.input_specs
        example, dynamic = _examples(model.fp32, specs)
        program = torch.export.export(reference, (), kwargs=example, dynamic_shapes=dynamic)
    else:
        raise TypeError(f"cannot export {type(model).__name__}")
    with quiet():
        onnx_program = torch.onnx.export(program, dynamo=True, opset_version=opset, external_data=False)
    assert onnx_program is not None
    onnx_program.save(str(path))
    logger.info("exported ONNX %s", path)
    return path


def _examples(fp32: TorchModel, specs: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from qtune.adaptors.pytorch.model import example_inputs

    if specs:
        return example_inputs(specs)
    program = fp32.export()
    args, kwargs = program.example_inputs
    tensors = dict(kwargs) if kwargs else dict(zip(fp32.input_names, args, strict=False))
    return tensors, None  # type: ignore[return-value]
