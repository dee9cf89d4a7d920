"""Third-party adaptors (named by module:Class in the job) that misbehave in a trial process:
one dies in quantize, as a framework segfault would; one hangs."""

from __future__ import annotations

import os
import time

from qtune.adaptors.onnxrt import OnnxRuntimeAdaptor


class CrashingAdaptor(OnnxRuntimeAdaptor):
    name = "crashing-onnxruntime"

    def quantize(self, tune_cfg, model, dataloader, q_func=None):  # noqa: ANN001, ANN201
        os._exit(17)


class HangingAdaptor(OnnxRuntimeAdaptor):
    name = "hanging-onnxruntime"

    def quantize(self, tune_cfg, model, dataloader, q_func=None):  # noqa: ANN001, ANN201
        time.sleep(600)
