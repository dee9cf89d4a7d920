"""The fp32 canaries: rounds of a measurement that no counter flags, but whose fp32 window shows them held back.

Load the counters cannot see: a virtual machine's vCPUs can be held back by its host, which no
counter inside it shows (no steal time on some hypervisors). Measured on a 2-core VM here, quiet by
every counter: for seconds at a time its 2-thread runs took up to 1.7x longer, int8 graphs (more ops,
more thread joins) more than fp32, so a config measured 0.93x in such a stretch and 1.35x outside it.
The fp32 runs are the canary: a round whose fp32 window ran more than `SLOW_FACTOR` times slower than
its quiet time (the fastest fp32 window of the measurement, or the fastest fp32 figure this job has
measured on this machine: the baseline's and every earlier measurement's, `qtune.runner.quiet_reference`) counts as
contended like the others.

A stretch can outlast a whole measurement, and then the fastest window is a slow one. Measured here
on PP-OCRv4's recogniser, batch 1, fp32 and int8 interleaved in one process, 2 threads: for 10–30 s
at a time fp32 took 26–32 ms instead of 13 ms and int8 10–12 ms instead of 7.5 ms (the speedup read
2.6–2.8× for a true 1.7×), with no run delay, pressure or steal, while the same models with ONE
thread, timed by CPU time in the same rounds, did not move (fp32 20.2–22.4 ms, speedup 1.69–1.79×).
Two threads slower than one is no property of the model: so a wall-clock measurement with several
threads also times the fp32 model with one thread now and then (`ONE_THREAD_EVERY`), and a round
whose fp32 window ran `ONE_THREAD_MARGIN` times slower than that counts as contended (for models
whose one-thread run takes at least `ONE_THREAD_CHECK_MS`: below that, thread start-up can honestly
make two threads lose).
"""

from __future__ import annotations

SLOW_FACTOR = 1.3
"""A round whose fp32 window median exceeds this multiple of the fp32 quiet time is contended: quiet windows
of one model varied by about ±10% here, stretches of host load made them 1.5–1.7× slower."""

ONE_THREAD_EVERY = 6
"""With several threads, the one-thread fp32 window runs in the first round and every this many rounds after
(it barely moves: 20.2–22.4 ms in the stretch above), so it costs a tenth of the measurement at batch 1 and
up to a quarter where one run fills a window (PP-OCRv4 at batch 8: 186 ms every 6 rounds of 137 ms)."""
ONE_THREAD_CHECK_MS = 2.0
"""The one-thread check applies when the fp32 model's one-thread run takes at least this long (CPU time): below
it, waking a second thread can honestly cost more than it saves, and two threads may lose on a quiet machine."""
ONE_THREAD_MAX_MODEL_BYTES = 1 << 30
"""The one-thread check runs the fp32 model in a session of its own (ONNX Runtime: a second copy of its weights);
above this size on disk it is left out, so a pod's memory limit holds (the quiet-time checks remain)."""
ONE_THREAD_MARGIN = 1.15
"""... and a round counts as held back when its fp32 window took more than this multiple of the one-thread time:
a model that several threads do not speed up (a recurrent one) then reads quiet on a quiet machine, while the
stretch measured above (two threads 1.2–1.5x slower than one) is still caught."""


def with_slow_rounds(reasons: list[str | None], times: list[float], quiet_ms: float | None,
                      one_thread_ms: float | None = None, threads: int = 1) -> list[str | None]:
    """`reasons`, plus for each round without one whether its fp32 window (median `times`) ran more than
    SLOW_FACTOR times the quiet time (`quiet_ms`, or the fastest fp32 window of all rounds so far), or, with
    several `threads`, ONE_THREAD_MARGIN times slower than the fp32 model with one thread (`one_thread_ms`,
    CPU time)."""
    floor = min(times + ([quiet_ms] if quiet_ms else []))
    held_back_ms = (ONE_THREAD_MARGIN * one_thread_ms if threads > 1 and one_thread_ms is not None
                    and one_thread_ms >= ONE_THREAD_CHECK_MS else None)
    out: list[str | None] = []
    for reason, took in zip(reasons, times, strict=True):
        if reason is None and floor > 0 and took > SLOW_FACTOR * floor:
            reason = (f"fp32 ran {took / floor:.2f}x its quiet time ({took:.3g} against {floor:.3g} ms): load "
                      "this machine's counters do not show")
        elif reason is None and held_back_ms is not None and one_thread_ms and took > held_back_ms:
            reason = (f"fp32 with {threads} threads ran {took / one_thread_ms:.2f}x slower than with one ({took:.3g} "
                      f"against {one_thread_ms:.3g} ms of CPU time): a CPU of ours was held back, which this "
                      "machine's counters do not show")
        out.append(reason)
    return out


def one_thread_affordable(model: object) -> bool:
    """Whether the one-thread check may hold a second copy of `model` (`ONE_THREAD_MAX_MODEL_BYTES`): a model that
    says its size on disk (an ONNX model) and is larger is not; one that does not say (an in-memory torch module,
    which the one-thread runner shares) is."""
    size = getattr(model, "size", None)
    return not isinstance(size, int) or size <= ONE_THREAD_MAX_MODEL_BYTES
