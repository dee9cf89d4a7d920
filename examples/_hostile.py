"""Function-preserving edits that make chosen layers hostile to int8 (for the hard-case examples).

As in tests/integration/sensitive_model.py: the producing layer gets one extra output unit or
channel with zero weights and a negative bias (dead after its ReLU: always exactly 0); the
consuming layer gets the matching extra input filled with an outlier ±10^4 × max|W| in every
output channel. fp32 output is unchanged (outlier × 0 = 0), but int8 weights, per tensor or per
channel, get a scale so large that every other weight of that layer rounds to 0: accuracy
collapses unless exactly those layers stay fp32.
"""

from __future__ import annotations

OUTLIER_FACTOR = 1e4


def _grow(module, extra_out: int = 0, extra_in: int = 0):  # noqa: ANN001, ANN202
    """A copy of a Linear/Conv2d with `extra_out` more outputs and `extra_in` more inputs (new
    weights zero, new biases zero)."""
    import torch
    from torch import nn

    weight = module.weight.detach()
    if isinstance(module, nn.Linear):
        grown = nn.Linear(module.in_features + extra_in, module.out_features + extra_out)
    else:
        grown = nn.Conv2d(module.in_channels + extra_in, module.out_channels + extra_out, module.kernel_size,
                          module.stride, module.padding)
    with torch.no_grad():
        grown.weight.zero_()
        grown.bias.zero_()
        grown.weight[: weight.shape[0], : weight.shape[1]] = weight
        grown.bias[: weight.shape[0]] = module.bias.detach()
    return grown


def hostile_pair(producer, consumer):  # noqa: ANN001, ANN201
    """(new producer, new consumer): a dead unit in `producer`, its outlier input in `consumer`."""
    import torch

    new_producer = _grow(producer, extra_out=1)
    new_consumer = _grow(consumer, extra_in=1)
    with torch.no_grad():
        new_producer.bias[-1] = -1.0
        outlier = OUTLIER_FACTOR * float(consumer.weight.detach().abs().max())
        signs = torch.where(torch.arange(new_consumer.weight.shape[0]) % 2 == 0, 1.0, -1.0)
        shape = (-1,) + (1,) * (new_consumer.weight.dim() - 2)
        new_consumer.weight[:, -1] = outlier * signs.view(shape)
    return new_producer, new_consumer
