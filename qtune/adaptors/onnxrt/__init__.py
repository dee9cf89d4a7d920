"""ONNX Runtime adaptor: importing this package registers `OnnxRuntimeAdaptor` as "onnxruntime"."""

from qtune.adaptors.onnxrt.adaptor import OnnxRuntimeAdaptor
from qtune.adaptors.onnxrt.model import OnnxModel, load_onnx_model, save_model

__all__ = ["OnnxModel", "OnnxRuntimeAdaptor", "load_onnx_model", "save_model"]
