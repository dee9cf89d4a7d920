"""Metric of the third-party OCR benchmark (benchmarks/third_party_ocr.py copies this file beside the job).

`CtcExactMatch` scores a CTC text recogniser: greedy decoding of its per-column character
probabilities ([batch, columns, classes]: argmax per column, repeats merged, blanks dropped), then
the share of lines whose decoded text equals the label. Spaces are ignored on both sides, as
PaddleOCR's own recognition metric does by default (`RecMetric(ignore_space=True)`): the recogniser
places spaces between words inconsistently, and a space is not what int8 is judged on here.

Class index 0 is the CTC blank; 1..n are the lines of `characters.txt` beside this file (the model's
`character` metadata, one per line); n+1 is the space, as in PP-OCR's `CTCLabelDecode`. It follows the
LPOT metric interface (update, reset, result) plus `higher_is_better` and `bounds`, so qtune can stop a
hopeless trial's evaluation early.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

CHARACTERS_FILE = Path(__file__).resolve().parent / "characters.txt"


def load_characters(path: Path = CHARACTERS_FILE) -> list[str]:
    """The decoding table: blank, the model's characters, then the space."""
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return ["", *lines, " "]


def ctc_greedy_decode(probabilities: np.ndarray, characters: list[str]) -> list[str]:
    """[batch, columns, classes] -> one string per line (repeats merged, blanks dropped)."""
    best = np.asarray(probabilities).argmax(axis=-1)
    texts = []
    for row in best:
        keep = np.ones(len(row), dtype=bool)
        keep[1:] = row[1:] != row[:-1]
        keep &= row != 0
        texts.append("".join(characters[index] for index in row[keep]))
    return texts


def without_spaces(text: str) -> str:
    return "".join(text.split())


class CtcExactMatch:
    """Share of lines read exactly (spaces ignored) by CTC greedy decoding."""

    higher_is_better = True

    def __init__(self) -> None:
        self.characters = load_characters()
        self.reset()

    def reset(self) -> None:
        self.correct, self.total = 0, 0

    def update(self, preds: np.ndarray, labels: np.ndarray) -> None:
        decoded = ctc_greedy_decode(preds, self.characters)
        self.correct += sum(without_spaces(text) == without_spaces(str(label))
                            for text, label in zip(decoded, labels, strict=True))
        self.total += len(decoded)

    def result(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def bounds(self, remaining_labels: np.ndarray) -> tuple[float, float]:
        left = len(remaining_labels)
        total = max(self.total + left, 1)
        return self.correct / total, (self.correct + left) / total
