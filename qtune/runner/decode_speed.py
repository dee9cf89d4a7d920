"""Decode speed of a language model with a KV cache (spec.benchmark.decode).

At batch 1 a decode step is a matrix-vector product per weight, bound by the bytes of the weights, while a
prompt (prefill) is a matrix-matrix product bound by arithmetic: the two can rank the same quantized models
differently, so both are measured, each as its own workload of the one interleaved measurement
(`qtune.runner.benchmark.measure_speed`: the same windows, rounds, contention checks and intervals as a batch
size; a figure's `batch_size` is 1):

- `PREFILL`: one run of the prompt (`promptTokens` tokens, a past of length 0); `p50_ms` is the prompt's time.
- `DECODE`: one run is one new token, fed the previous run's present keys and values as its past; after
  `newTokens` steps the cache starts again from the prompt's. `p50_ms` is the time per token, so tokens per
  second are 1000 / `p50_ms`, and a speedup is the ratio of the times per token.

Every model (fp32 and each candidate) decodes with its own cache, as it would in use. The tokens fed are the
prompt text's own next tokens (teacher forcing): a step's cost does not depend on which token it is, and every
model then does the same work. The objective `latency` of a job with `decode` decides on `DECODE`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from qtune.spec.errors import SpecError
from qtune.tuning.history import DECODE_KEY

if TYPE_CHECKING:
    from qtune.adaptors.base import StepModel
    from qtune.runner.context import JobContext

logger = logging.getLogger(__name__)

PREFILL = "prefill"
DECODE = DECODE_KEY
FIELD = "spec.benchmark.decode"
TOKENS = "input_ids"
OPTIONAL_INPUTS = ("attention_mask", "position_ids")
"""Inputs besides the tokens and the cache that a decode step can be fed: ones, and the new tokens' positions."""

Runner = Callable[[], None]
Make = Callable[[Any, int], Runner]
"""(model, threads) -> a runner of one inference per call (`qtune.runner.benchmark`)."""


@dataclass(frozen=True)
class KvLayout:
    """How a model takes its cache: each past input with the present output that feeds it next step, the
    empty past (batch 1, length 0) of each, and which optional inputs it has."""

    pairs: list[tuple[str, int]]  # (past input, index of its present output)
    empty: dict[str, np.ndarray]
    token_dtype: Any
    optional: tuple[str, ...]

    def feed(self, tokens: np.ndarray, past: dict[str, np.ndarray], past_length: int) -> dict[str, np.ndarray]:
        """The inputs of one run: `tokens` [1, n] after `past_length` cached positions."""
        feed = {TOKENS: tokens.astype(self.token_dtype, copy=False), **past}
        if "attention_mask" in self.optional:
            feed["attention_mask"] = np.ones((1, past_length + tokens.shape[1]), np.int64)
        if "position_ids" in self.optional:
            feed["position_ids"] = np.arange(past_length, past_length + tokens.shape[1], dtype=np.int64)[None]
        return feed


def _present_for(past: str, presents: list[str], position: int) -> str:
    """The present output that feeds `past`: by name (past_key_values.0.key <- present.0.key), else by order."""
    for candidate in (past.replace("past_key_values", "present"), past.replace("past", "present")):
        if candidate in presents:
            return candidate
    return presents[position]


def _empty(name: str, shape: list[int | str | None], dtype: Any) -> np.ndarray:
    """The past `name` of batch 1 and length 0: its first dimension is the batch, its other dynamic one the length."""
    dynamic = [i for i, dim in enumerate(shape) if not (isinstance(dim, int) and dim > 0)]
    if len(dynamic) != 2 or dynamic[0] != 0:
        raise SpecError(FIELD, f"the model's past input {name!r} has shape {shape}: decode needs a dynamic batch "
                               "(first dimension) and one dynamic past-length dimension")
    return np.zeros([1 if i == 0 else 0 if i in dynamic else dim for i, dim in enumerate(shape)], dtype)


def kv_layout(model: StepModel) -> KvLayout:
    """The model's cache inputs and outputs, or a SpecError naming spec.benchmark.decode and what it lacks."""
    inputs = {name: (shape, dtype) for name, shape, dtype in model.inputs}
    if TOKENS not in inputs:
        raise SpecError(FIELD, f"the model has no {TOKENS} input (its inputs: {sorted(inputs)}); a decode "
                               f"measurement feeds token ids as {TOKENS}")
    pasts = [name for name in inputs if "past" in name.lower()]
    presents = [name for name in model.outputs if "present" in name.lower()]
    if not pasts or len(pasts) != len(presents):
        raise SpecError(FIELD, f"the model has no KV cache to decode with: past inputs {pasts}, present outputs "
                               f"{presents}; it needs past inputs (names with 'past') and as many present outputs "
                               "(names with 'present'), or remove spec.benchmark.decode")
    other = sorted(set(inputs) - set(pasts) - {TOKENS})
    unknown = [name for name in other if name not in OPTIONAL_INPUTS]
    if unknown:
        raise SpecError(FIELD, f"the model has inputs a decode step cannot fill: {unknown}; allowed besides "
                               f"{TOKENS} and the past inputs: {', '.join(OPTIONAL_INPUTS)}")
    pairs = [(past, model.outputs.index(_present_for(past, presents, i))) for i, past in enumerate(pasts)]
    empty = {past: _empty(past, *inputs[past]) for past in pasts}
    return KvLayout(pairs, empty, inputs[TOKENS][1], tuple(other))


class DecodeLoop:
    """A runner: each call decodes one token with the cache of the previous call (module docstring)."""

    def __init__(self, model: StepModel, layout: KvLayout, tokens: np.ndarray, prompt: int, new: int) -> None:
        self.run, self.layout, self.prompt, self.new = model.run, layout, prompt, new
        self.steps = [tokens[None, prompt + i:prompt + i + 1] for i in range(new)]
        outputs = self.run(layout.feed(tokens[None, :prompt], dict(layout.empty), 0))
        self.start = self._cache(outputs)
        self.cache, self.step = self.start, 0

    def _cache(self, outputs: list[Any]) -> dict[str, Any]:
        return {past: outputs[index] for past, index in self.layout.pairs}

    def __call__(self) -> None:
        if self.step == self.new:
            self.cache, self.step = self.start, 0
        outputs = self.run(self.layout.feed(self.steps[self.step], self.cache, self.prompt + self.step))
        self.cache = self._cache(outputs)
        self.step += 1


def prompt_tokens(context: JobContext, count: int) -> np.ndarray:
    """`count` token ids: the first evaluation sample's (calibration's without evaluation data), repeated if short."""
    source = context.evaluation_set if context.spec.data.evaluation.has_data else context.calibration_set
    if TOKENS not in source.inputs:
        raise SpecError(FIELD, f"the data has no {TOKENS} array to take the prompt from (it has "
                               f"{sorted(source.inputs)})")
    first = np.asarray(source.inputs[TOKENS][0]).reshape(-1)
    if first.size == 0:
        raise SpecError(FIELD, f"the first sample's {TOKENS} is empty: no prompt to take")
    return np.resize(first, count)


def step_model(context: JobContext, model: Any, threads: int) -> StepModel:
    try:
        return context.adaptor.step_model(model, threads)
    except NotImplementedError as exc:
        raise SpecError(FIELD, f"{exc}: the {context.spec.model.framework} adaptor cannot measure decode speed; "
                               "remove spec.benchmark.decode") from None


def decode_workloads(context: JobContext) -> list[tuple[str, int, Make]]:
    """The prefill and decode workloads of the job's `spec.benchmark.decode`: (key, batch size, make)."""
    settings = context.spec.benchmark.decode
    if settings is None:
        return []
    layout = kv_layout(step_model(context, context.model, context.benchmark_threads))
    tokens = prompt_tokens(context, settings.prompt_tokens + settings.new_tokens)
    prefill = layout.feed(tokens[None, :settings.prompt_tokens], dict(layout.empty), 0)

    def make_prefill(model: Any, threads: int) -> Runner:
        return context.adaptor.make_runner(model, prefill, threads)

    def make_decode(model: Any, threads: int) -> Runner:
        return DecodeLoop(step_model(context, model, threads), layout, tokens, settings.prompt_tokens,
                          settings.new_tokens)

    return [(PREFILL, 1, make_prefill), (DECODE, 1, make_decode)]


def tokens_per_second(ms_per_token: float) -> float:
    return 1000.0 / ms_per_token if ms_per_token > 0 else 0.0
