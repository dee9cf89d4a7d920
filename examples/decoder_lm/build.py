"""Build the decoder language model example: a 2048-wide causal transformer with a KV cache, trained here.

  data   CPython's own documentation text, `pydoc_data.topics` (shipped with every CPython, ~465,000
         characters), topics in sorted order, characters as tokens (decoder.ALPHABET, 96 symbols). The last
         HELD_OUT share of the text is held out: evaluation windows come only from it, training and
         calibration windows only from the rest.
  model  decoder.Config: d_model 2048, 2 pre-norm blocks of 16-head attention and a 2048 -> 5632 -> 2048 SiLU
         MLP, learned positions, an untied head: 13 weight MatMuls (per block q, k, v, o, up, down; the head),
         ~80 M parameters, ~330 MB in fp32. Trained from scratch (no pretrained model of this shape ships
         offline): AdamW, STEPS steps of BATCH random windows of WINDOW characters, warm-up then cosine decay,
         matmuls in bfloat16 autocast, fp32 weights. Deterministic: the same seed, steps and thread count
         give the same weights (tests/unit/test_decoder_lm_example.py builds a tiny config twice).
  onnx   decoder.write_onnx: inputs input_ids [batch, sequence] int64 and past_key_values.<layer>.key/value
         [batch, 16, past, 128] float32; outputs logits [batch, sequence, 96] and present.<layer>.key/value
         [batch, 16, past + sequence, 128]. A past of length 0 is a prefill, a one-token input with the
         previous present as past is a decode step. Checked against torch both ways.

Writes into examples/decoder_lm/build/ (git-ignored): decoder_lm.onnx, calib.npz and eval.npz (input_ids,
the empty past arrays [N, 16, 0, 128], labels = the next character of every position), build.json (what
was built, train and held-out perplexity, size, time).

Run from anywhere:  python examples/decoder_lm/build.py [--force] [--steps N] [--threads 2]
Then:               qtune tune examples/decoder_lm/job.yaml
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import _common  # noqa: E402
from decoder import INPUT_IDS, LOGITS, Config, empty_past, encode, torch_model, write_onnx  # noqa: E402

logger = logging.getLogger("decoder_lm.build")

SEED = 0
STEPS, BATCH, WINDOW, LR = 60, 2, 128, 3e-4
WARMUP = 5
HELD_OUT = 0.1
CALIB_WINDOWS, EVAL_WINDOWS = 32, 64
OUT = HERE / "build"
ONNX, CALIB, EVAL, INFO = (OUT / "decoder_lm.onnx", OUT / "calib.npz", OUT / "eval.npz", OUT / "build.json")


def corpus() -> str:
    from pydoc_data.topics import topics

    return "\n".join(topics[key] for key in sorted(topics))


def split(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    cut = int(len(ids) * (1.0 - HELD_OUT))
    return ids[:cut], ids[cut:]


def windows(ids: np.ndarray, count: int, window: int = WINDOW) -> tuple[np.ndarray, np.ndarray]:
    """`count` consecutive non-overlapping windows from the start of `ids`, and their next-character labels."""
    count = min(count, (len(ids) - 1) // window)
    inputs = ids[:count * window].reshape(count, window)
    labels = ids[1:count * window + 1].reshape(count, window)
    return inputs.copy(), labels.copy()


def train(config: Config, ids: np.ndarray, *, steps: int, batch: int, window: int, seed: int,
          threads: int, lr: float = LR) -> object:
    """A decoder of `config` trained on random windows of `ids` (deterministic for a seed and thread count)."""
    import torch
    from torch.nn import functional

    _common.set_deterministic(seed, threads)
    model = torch_model(config)
    generator = torch.Generator().manual_seed(seed)
    data = torch.from_numpy(ids)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, steps))
    model.train()
    started = time.perf_counter()
    for step in range(steps):
        starts = torch.randint(0, len(ids) - window - 1, (batch,), generator=generator)
        rows = torch.stack([data[s:s + window + 1] for s in starts.tolist()])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(rows[:, :-1])
        loss = functional.cross_entropy(logits.float().reshape(-1, config.vocabulary), rows[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 10 == 0 or step == steps - 1:
            logger.info("step %d/%d: loss %.3f (%.0f s)", step + 1, steps, loss.item(), time.perf_counter() - started)
    model.eval()
    return model


def _lr_factor(step: int, steps: int) -> float:
    if step < WARMUP:
        return (step + 1) / WARMUP
    progress = (step - WARMUP) / max(1, steps - WARMUP)
    return 0.1 + 0.9 * 0.5 * (1.0 + np.cos(np.pi * progress))


def torch_perplexity(model, inputs: np.ndarray, labels: np.ndarray, batch: int = 8) -> float:  # noqa: ANN001
    import torch
    from torch.nn import functional

    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(inputs), batch):
            logits = model(torch.from_numpy(inputs[start:start + batch])).float()
            target = torch.from_numpy(labels[start:start + batch])
            total += float(functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                    reduction="sum"))
            count += target.numel()
    return float(np.exp(total / count))


def check_onnx(model, config: Config, path: Path, sample: np.ndarray, threads: int) -> float:  # noqa: ANN001
    """Largest |ORT - torch| logit over `sample` [1, length], run whole and as prefill + one-token decode steps."""
    import onnxruntime as ort
    import torch

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    with torch.inference_mode():
        expected = model(torch.from_numpy(sample)).float().numpy()
    whole = session.run([LOGITS], {INPUT_IDS: sample, **empty_past(config, 1)})[0]
    half = sample.shape[1] // 2
    names = [o.name for o in session.get_outputs()]
    outputs = session.run(None, {INPUT_IDS: sample[:, :half], **empty_past(config, 1)})
    stepped = [outputs[0]]
    for position in range(half, sample.shape[1]):
        past = {name.replace("present", "past_key_values"): value for name, value in zip(names[1:], outputs[1:],
                                                                                          strict=True)}
        outputs = session.run(None, {INPUT_IDS: sample[:, position:position + 1], **past})
        stepped.append(outputs[0])
    return float(max(np.abs(whole - expected).max(), np.abs(np.concatenate(stepped, axis=1) - expected).max()))


def write_data(config: Config, train_ids: np.ndarray, held_out: np.ndarray) -> dict[str, float]:
    calib_inputs, calib_labels = windows(train_ids, CALIB_WINDOWS)
    eval_inputs, eval_labels = windows(held_out, EVAL_WINDOWS)
    np.savez(CALIB, **{INPUT_IDS: calib_inputs}, **empty_past(config, len(calib_inputs)), labels=calib_labels)
    np.savez(EVAL, **{INPUT_IDS: eval_inputs}, **empty_past(config, len(eval_inputs)), labels=eval_labels)
    return {"calibration_windows": len(calib_inputs), "evaluation_windows": len(eval_inputs)}


def build(args: argparse.Namespace) -> dict[str, object]:
    started = time.perf_counter()
    config = Config()
    train_ids, held_out = split(encode(corpus()))
    model = train(config, train_ids, steps=args.steps, batch=BATCH, window=WINDOW, seed=SEED,
                  threads=args.threads)
    trained = time.perf_counter() - started
    OUT.mkdir(parents=True, exist_ok=True)
    write_onnx(model, config, ONNX)
    info: dict[str, object] = {"config": config.__dict__, "steps": args.steps, "batch": BATCH, "window": WINDOW,
                               "seed": SEED, "threads": args.threads, "train_characters": len(train_ids),
                               "held_out_characters": len(held_out), **write_data(config, train_ids, held_out)}
    train_windows = windows(train_ids, EVAL_WINDOWS // 4)
    info["train_perplexity"] = round(torch_perplexity(model, *train_windows), 4)
    info["held_out_perplexity"] = round(torch_perplexity(model, *windows(held_out, EVAL_WINDOWS)), 4)
    info["onnx_max_abs_difference"] = check_onnx(model, config, ONNX, train_windows[0][:1, :48], args.threads)
    info["size_mb"] = round(ONNX.stat().st_size / 1e6, 1)
    info["train_seconds"], info["seconds"] = round(trained, 1), round(time.perf_counter() - started, 1)
    INFO.write_text(json.dumps(info, indent=2) + "\n")
    return info


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    def extra(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--steps", type=int, default=STEPS, help=f"training steps (default {STEPS})")

    args = _common.parse_args(__doc__.splitlines()[0], argv, extra)
    if not args.force and _common.outputs_exist([ONNX, CALIB, EVAL, INFO]):
        logger.info("already built (--force rebuilds): %s", INFO.read_text())
        return
    info = build(args)
    if info["onnx_max_abs_difference"] > 1e-3:
        raise SystemExit(f"ONNX Runtime differs from torch by {info['onnx_max_abs_difference']:.2e}")
    logger.info("built: %s", json.dumps(info))


if __name__ == "__main__":
    main()
