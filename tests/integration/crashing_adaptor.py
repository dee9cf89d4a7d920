"""Third-party adaptors (named by module:Class in the job) that misbehave in a trial process:
one dies in quantize, as a framework segfault would; one hangs. In the baseline step (which
quantizes too, to profile the int8 graph) they behave, so the job gets as far as its trials."""

from __future__ import annotations

import os
import sys
import time

from qtune.adaptors.onnxrt import OnnxRuntimeAdaptor


def _in_trial() -> bool:
    return len(sys.argv) > 1 and sys.argv[1] == "trial"


class CrashingAdaptor(OnnxRuntimeAdaptor):
    name = "crashing-onnxruntime"

    def quantize(self, tune_cfg, model, dataloader, q_func=None):  # noqa: ANN001, ANN201
        if not _in_trial():
            return super().quantize(tune_cfg, model, dataloader, q_func)
        os._exit(17)


class HangingAdaptor(OnnxRuntimeAdaptor):
    name = "hanging-onnxruntime"

    def quantize(self, tune_cfg, model, dataloader, q_func=None):  # noqa: ANN001, ANN201
        if not _in_trial():
            return super().quantize(tune_cfg, model, dataloader, q_func)
        time.sleep(600)
