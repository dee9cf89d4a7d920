"""Independent re-measurement of a language model's decode and prefill speed (benchmarks/tune_examples.py).

Each model runs alone in a `python` process of its own (ONNX Runtime's default options, nothing imported from
qtune), the two processes taking turns in windows of about 0.25 s, A B B A, as tune_examples.py re-measures a
batch size. One decode run is one new token fed the previous run's present keys and values (the cache starts
again from the prompt's after `new` tokens); one prefill run is the prompt with an empty past. Prints nothing;
`remeasure_decode` returns the median per-round ratio (fp32 time / model time), its range, and both medians.

    python benchmarks/decode_remeasure.py fp32.onnx candidate.onnx eval.npz [--prompt 64] [--new 32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import textwrap
from pathlib import Path

from tune_examples import WINDOW_SECONDS, WindowProcess

ONE_DECODER = textwrap.dedent("""
    import json, statistics, sys, time
    import numpy as np, onnxruntime as ort
    path, npz, mode, prompt, new, threads = sys.argv[1:7]
    prompt, new, threads = int(prompt), int(new), int(threads)
    o = ort.SessionOptions(); o.intra_op_num_threads = threads; o.inter_op_num_threads = 1
    o.log_severity_level = 3
    s = ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])
    with np.load(npz) as data:
        tokens = np.resize(data["input_ids"][0].reshape(-1), prompt + new).astype(np.int64)
    pasts = [i for i in s.get_inputs() if "past" in i.name]
    outputs = [o.name for o in s.get_outputs()]
    empty = {i.name: np.zeros([1 if k == 0 else 0 if not isinstance(d, int) else d for k, d in enumerate(i.shape)],
                              np.float32) for i in pasts}
    index = {i.name: outputs.index(i.name.replace("past_key_values", "present")) for i in pasts}
    prefill = {"input_ids": tokens[None, :prompt], **empty}
    first = s.run(None, prefill)
    start = {name: first[k] for name, k in index.items()}
    state = {"cache": start, "step": 0}
    def decode():
        if state["step"] == new:
            state["cache"], state["step"] = start, 0
        step = state["step"]
        out = s.run(None, {"input_ids": tokens[None, prompt + step:prompt + step + 1], **state["cache"]})
        state["cache"] = {name: out[k] for name, k in index.items()}
        state["step"] = step + 1
    run = decode if mode == "decode" else (lambda: s.run(None, prefill))
    for _ in range(3): run()
    t = time.perf_counter(); run()
    print(json.dumps({"ready": time.perf_counter() - t}), flush=True)
    for line in sys.stdin:
        times = []
        for _ in range(int(line)):
            t = time.perf_counter(); run(); times.append(time.perf_counter() - t)
        print(json.dumps({"ms": 1e3 * statistics.median(times)}), flush=True)
""")

def remeasure_decode(fp32: Path, model: Path, npz: Path, mode: str, prompt: int, new: int, threads: int,
                     rounds: int = 15) -> dict:
    """fp32 against `model` in `mode` (decode: ms per token; prefill: ms per prompt), each in its own process."""
    workers = {"fp32": WindowProcess(ONE_DECODER, fp32, npz, mode, prompt, new, threads),
               "model": WindowProcess(ONE_DECODER, model, npz, mode, prompt, new, threads)}
    try:
        per_window = max(1, round(WINDOW_SECONDS / max(w.run_seconds for w in workers.values())))
        fp32_ms, model_ms, ratios = [], [], []
        for index in range(rounds):
            order = ("fp32", "model") if index % 2 == 0 else ("model", "fp32")
            times = {name: workers[name].window(per_window) for name in order}
            fp32_ms.append(times["fp32"])
            model_ms.append(times["model"])
            ratios.append(times["fp32"] / times["model"])
    finally:
        for worker in workers.values():
            worker.close()
    return {"speedup": statistics.median(ratios), "low": min(ratios), "high": max(ratios),
            "fp32_ms": statistics.median(fp32_ms), "model_ms": statistics.median(model_ms), "rounds": rounds,
            "runs_per_window": per_window}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("fp32", type=Path)
    parser.add_argument("model", type=Path)
    parser.add_argument("npz", type=Path)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    for mode in ("decode", "prefill"):
        result = remeasure_decode(args.fp32, args.model, args.npz, mode, args.prompt, args.new, args.threads,
                                  args.rounds)
        print(json.dumps({"mode": mode, **result}))


if __name__ == "__main__":
    main()
