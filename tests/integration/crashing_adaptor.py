"""A third-party adaptor (registered by module:Class in the job) whose quantize kills its process,
as a framework segfault would."""

from __future__ import annotations

import os

from qtune.adaptors.onnxrt import OnnxRuntimeAdaptor


class CrashingAdaptor(OnnxRuntimeAdaptor):
    name = "crashing-onnxruntime"

    def quantize(self, tune_cfg, model, dataloader, q_func=None):  # noqa: ANN001, ANN201
        os._exit(17)
