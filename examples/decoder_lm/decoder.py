"""The decoder language model of examples/decoder_lm: a pre-norm causal transformer over characters, in torch
(for training) and written out as an ONNX graph with a KV cache (for ONNX Runtime and qtune).

The ONNX graph is written node by node with `onnx.helper` from the trained weights rather than exported: the
KV-cache form (past keys and values in, present ones out, positions and the causal mask computed from the past
length) is then exactly what ONNX Runtime's own LLM exports look like, with every weight a constant 2-D
`MatMul` input that weight-only quantization (MatMulNBits) takes, and nothing the exporter would have to guess
about a past of length 0. `build.py` checks that ONNX Runtime reproduces torch, for a whole window and for the
same window as prefill + one-token decode steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

ALPHABET = "\n" + "".join(chr(c) for c in range(32, 127))
"""The vocabulary: newline and printable ASCII (96 symbols); any other character of the text reads as '?'."""
OPSET = 17
INPUT_IDS, LOGITS = "input_ids", "logits"


@dataclass(frozen=True)
class Config:
    d_model: int = 2048
    layers: int = 2
    heads: int = 16
    mlp: int = 5632
    max_positions: int = 256
    vocabulary: int = len(ALPHABET)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads


def past_names(layer: int) -> tuple[str, str]:
    return f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"


def present_names(layer: int) -> tuple[str, str]:
    return f"present.{layer}.key", f"present.{layer}.value"


def encode(text: str) -> np.ndarray:
    """Character ids of `text` (tabs as spaces, characters outside the alphabet as '?')."""
    table = {c: i for i, c in enumerate(ALPHABET)}
    unknown = table["?"]
    return np.array([table.get(c, unknown) for c in text.replace("\t", " ")], np.int64)


def torch_model(config: Config):  # noqa: ANN201 - torch is imported lazily
    """A fresh (seeded by the caller) torch decoder of `config`."""
    import torch
    from torch import nn
    from torch.nn import functional

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            d = config.d_model
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
            self.up, self.down = nn.Linear(d, config.mlp, bias=False), nn.Linear(config.mlp, d, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            batch, length, d = x.shape
            h = self.ln1(x)
            q, k, v = (p(h).view(batch, length, config.heads, config.head_dim).transpose(1, 2)
                       for p in (self.q, self.k, self.v))
            attended = functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.o(attended.transpose(1, 2).reshape(batch, length, d))
            return x + self.down(functional.silu(self.up(self.ln2(x))))

    class Decoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(config.vocabulary, config.d_model)
            self.position = nn.Embedding(config.max_positions, config.d_model)
            self.blocks = nn.ModuleList(Block() for _ in range(config.layers))
            self.ln_f = nn.LayerNorm(config.d_model)
            self.head = nn.Linear(config.d_model, config.vocabulary, bias=False)
            for name, parameter in self.named_parameters():
                if parameter.dim() == 2:
                    scale = 0.02 / (2 * config.layers) ** 0.5 if name.endswith(("o.weight", "down.weight")) else 0.02
                    nn.init.normal_(parameter, std=scale)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            x = self.embed(ids) + self.position(torch.arange(ids.shape[1]))
            for block in self.blocks:
                x = block(x)
            return self.head(self.ln_f(x))

    return Decoder()


class _Graph:
    """Nodes and constants of the ONNX graph being written, with fresh names."""

    def __init__(self) -> None:
        self.nodes: list = []
        self.initializers: list = []
        self.count = 0

    def const(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], output: str | None = None, **attributes: object) -> str:
        from onnx import helper

        self.count += 1
        output = output or f"{op_type.lower()}_{self.count}"
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=f"/{op_type}_{self.count}",
                                           **attributes))
        return output


def _weight(parameter) -> np.ndarray:  # noqa: ANN001 - a torch tensor
    return parameter.detach().float().numpy()


def _layer_norm(graph: _Graph, x: str, norm, prefix: str) -> str:  # noqa: ANN001
    scale = graph.const(f"{prefix}.weight", _weight(norm.weight))
    bias = graph.const(f"{prefix}.bias", _weight(norm.bias))
    return graph.op("LayerNormalization", [x, scale, bias], axis=-1, epsilon=float(norm.eps))


def _linear(graph: _Graph, x: str, linear, name: str) -> str:  # noqa: ANN001
    return graph.op("MatMul", [x, graph.const(f"{name}.weight", _weight(linear.weight).T)])


def _attention(graph: _Graph, x: str, block, layer: int, config: Config, mask: str) -> str:  # noqa: ANN001
    prefix = f"blocks.{layer}"
    h = _layer_norm(graph, x, block.ln1, f"{prefix}.ln1")
    split = graph.const(f"{prefix}.heads_shape", np.array([0, 0, config.heads, config.head_dim], np.int64))
    heads = {}
    for part in ("q", "k", "v"):
        projected = _linear(graph, h, getattr(block, part), f"{prefix}.{part}")
        heads[part] = graph.op("Transpose", [graph.op("Reshape", [projected, split])], perm=[0, 2, 1, 3])
    (past_key, past_value), (present_key, present_value) = past_names(layer), present_names(layer)
    keys = graph.op("Concat", [past_key, heads["k"]], present_key, axis=2)
    values = graph.op("Concat", [past_value, heads["v"]], present_value, axis=2)
    scores = graph.op("MatMul", [heads["q"], graph.op("Transpose", [keys], perm=[0, 1, 3, 2])])
    scale = graph.const(f"{prefix}.scale", np.array(1.0 / np.sqrt(config.head_dim), np.float32))
    probabilities = graph.op("Softmax", [graph.op("Add", [graph.op("Mul", [scores, scale]), mask])], axis=-1)
    attended = graph.op("Transpose", [graph.op("MatMul", [probabilities, values])], perm=[0, 2, 1, 3])
    merge = graph.const(f"{prefix}.merge_shape", np.array([0, 0, config.d_model], np.int64))
    return graph.op("Add", [x, _linear(graph, graph.op("Reshape", [attended, merge]), block.o, f"{prefix}.o")])


def _mlp(graph: _Graph, x: str, block, layer: int) -> str:  # noqa: ANN001
    prefix = f"blocks.{layer}"
    up = _linear(graph, _layer_norm(graph, x, block.ln2, f"{prefix}.ln2"), block.up, f"{prefix}.up")
    activated = graph.op("Mul", [up, graph.op("Sigmoid", [up])])
    return graph.op("Add", [x, _linear(graph, activated, block.down, f"{prefix}.down")])


def _positions_and_mask(graph: _Graph) -> tuple[str, str]:
    """Positions past..past+new-1 of the new tokens, and the additive causal mask [new, past+new]."""
    zero, one = graph.const("zero", np.array(0, np.int64)), graph.const("one", np.array(1, np.int64))
    axis0 = graph.const("axis0", np.array([0], np.int64))
    past = graph.op("Squeeze", [graph.op("Shape", [past_names(0)[0]], start=2, end=3), axis0])
    new = graph.op("Squeeze", [graph.op("Shape", [INPUT_IDS], start=1, end=2), axis0])
    total = graph.op("Add", [past, new])
    positions = graph.op("Range", [past, total, one])
    keys = graph.op("Range", [zero, total, one])
    column = graph.op("Unsqueeze", [positions, graph.const("axis1", np.array([1], np.int64))])
    allowed = graph.op("LessOrEqual", [keys, column])
    mask = graph.op("Where", [allowed, graph.const("open", np.array(0.0, np.float32)),
                              graph.const("closed", np.array(-1e9, np.float32))])
    return positions, mask


def write_onnx(model, config: Config, path: Path) -> None:  # noqa: ANN001 - the torch Decoder
    """The trained `model` as an ONNX graph with a KV cache (module docstring); weights in the one file."""
    import onnx
    from onnx import TensorProto, helper

    graph = _Graph()
    positions, mask = _positions_and_mask(graph)
    embedded = graph.op("Gather", [graph.const("embed.weight", _weight(model.embed.weight)), INPUT_IDS])
    placed = graph.op("Gather", [graph.const("position.weight", _weight(model.position.weight)), positions])
    x = graph.op("Add", [embedded, placed])
    for layer, block in enumerate(model.blocks):
        x = _mlp(graph, _attention(graph, x, block, layer, config, mask), block, layer)
    normed = _layer_norm(graph, x, model.ln_f, "ln_f")
    graph.op("MatMul", [normed, graph.const("head.weight", _weight(model.head.weight).T)], LOGITS)
    cache = ["batch", config.heads, "past", config.head_dim]
    present = ["batch", config.heads, "total", config.head_dim]
    inputs = [helper.make_tensor_value_info(INPUT_IDS, TensorProto.INT64, ["batch", "sequence"])]
    outputs = [helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, ["batch", "sequence", config.vocabulary])]
    for layer in range(config.layers):
        inputs += [helper.make_tensor_value_info(name, TensorProto.FLOAT, cache) for name in past_names(layer)]
        outputs += [helper.make_tensor_value_info(name, TensorProto.FLOAT, present) for name in present_names(layer)]
    onnx_graph = helper.make_graph(graph.nodes, "decoder_lm", inputs, outputs, graph.initializers)
    onnx_model = helper.make_model(onnx_graph, opset_imports=[helper.make_opsetid("", OPSET)])
    onnx_model.ir_version = 8
    onnx.checker.check_model(onnx_model, full_check=True)
    onnx.save(onnx_model, str(path))


def empty_past(config: Config, batch: int) -> dict[str, np.ndarray]:
    """Past keys and values of length 0 for `batch` sequences: the cache of a prefill."""
    shape = (batch, config.heads, 0, config.head_dim)
    return {name: np.zeros(shape, np.float32) for layer in range(config.layers) for name in past_names(layer)}
