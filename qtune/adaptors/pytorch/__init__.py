"""PyTorch adaptor (needs the `torch` extra): torch.export + FX graph-mode int8, x86 backend.

Importing this package registers `PyTorchAdaptor` under the name "pytorch". See README.md here
for the quantization path chosen and why.
"""

from qtune.adaptors.pytorch.adaptor import PyTorchAdaptor
from qtune.adaptors.pytorch.model import QuantizedTorchModel, TorchModel

__all__ = ["PyTorchAdaptor", "QuantizedTorchModel", "TorchModel"]
