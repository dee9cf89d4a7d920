"""qtune: accuracy-driven int8 tuning of ONNX Runtime and PyTorch models."""

__version__ = "0.1.0"
