"""Building blocks shared by the models: activations by name and weight-standardised convolutions.

Activations (``ACTIVATIONS``):

* ``"relu"``: :class:`torch.nn.ReLU`.
* ``"tanh"``: :class:`torch.nn.Tanh`.
* ``"tempered_sigmoid"``: :class:`TemperedSigmoid`, ``s * sigmoid(T x) - o`` (Papernot et al.,
  "Tempered Sigmoid Activations for Deep Learning with Differential Privacy", AAAI 2021). Bounded
  activations keep the gradient norms small, so less of them is lost to clipping; with the default
  ``s=2, T=2, o=1`` it equals tanh.

Weight standardisation (:class:`WSConv2d`) re-parametrises a convolution by a zero-mean kernel of
fixed norm per output channel, as in the WideResNets of De et al. 2022 (with GroupNorm it replaces
what BatchNorm does for optimisation, without mixing examples).
"""

from __future__ import annotations

import torch
from torch import nn

ACTIVATIONS = ("relu", "tanh", "tempered_sigmoid")


class TemperedSigmoid(nn.Module):
    """``scale * sigmoid(temperature * x) - offset``: a bounded activation with range (-offset, scale - offset).

    Example:
        >>> x = torch.linspace(-3, 3, 7)
        >>> torch.allclose(TemperedSigmoid()(x), torch.tanh(x), atol=1e-6)
        True
    """

    def __init__(self, scale: float = 2.0, temperature: float = 2.0, offset: float = 1.0) -> None:
        super().__init__()
        if not (scale > 0 and temperature > 0):
            raise ValueError(f"TemperedSigmoid needs scale > 0 and temperature > 0, got {scale} and {temperature}")
        self.scale, self.temperature, self.offset = float(scale), float(temperature), float(offset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * torch.sigmoid(self.temperature * x) - self.offset

    def extra_repr(self) -> str:
        return f"scale={self.scale}, temperature={self.temperature}, offset={self.offset}"


def make_activation(name: str) -> nn.Module:
    """A fresh module for activation ``name`` (one of ``ACTIVATIONS``); none has parameters or state."""
    if name == "relu":
        return nn.ReLU()
    if name == "tanh":
        return nn.Tanh()
    if name == "tempered_sigmoid":
        return TemperedSigmoid()
    raise ValueError(f"model.activation must be one of {ACTIVATIONS}, got {name!r}")


WS_EPS = 1e-4  # floor on fan_in * var, as in jax_privacy's WSConv2D


def standardize_weight(weight: torch.Tensor, eps: float = WS_EPS) -> torch.Tensor:
    """Scaled weight standardisation of a conv kernel [C_out, C_in, kh, kw], per output channel.

    ``(w - mean) / sqrt(max(fan_in * var, eps))``: every output channel's kernel has mean 0 and
    squared norm 1 (fan_in = C_in kh kw), so a unit-variance input gives a unit-variance output.
    """
    fan_in = weight[0].numel()
    mean = weight.mean(dim=(1, 2, 3), keepdim=True)  # [C_out, 1, 1, 1]
    var = weight.var(dim=(1, 2, 3), unbiased=False, keepdim=True)  # [C_out, 1, 1, 1]
    return (weight - mean) * torch.rsqrt(torch.clamp(var * fan_in, min=eps))


class WSConv2d(nn.Conv2d):
    """A Conv2d whose kernel is standardised (:func:`standardize_weight`) in every forward.

    The trainable parameter is the raw ``weight``; gradients (and per-sample gradients) are taken
    with respect to it, through the standardisation. Why that matters for DP-SGD: Opacus's Conv2d
    formula would give the gradient with respect to the *standardised* kernel, which is not the
    gradient of any parameter. Opacus looks its formulas up by exact type, finds none for this
    subclass and computes its per-sample gradients with ``torch.func`` on this module's own forward
    (correct); the fast engine's manual backend maps its conv gradients through the standardisation's
    Jacobian (``engines.ghost.raw_weight_grads``). ``tests/test_models.py`` checks both against Opacus.

    Example:
        >>> conv = WSConv2d(3, 8, 3, padding=1)
        >>> w = conv.standardized_weight()
        >>> bool(w.mean(dim=(1, 2, 3)).abs().max() < 1e-6), bool(((w ** 2).sum((1, 2, 3)) - 1).abs().max() < 1e-4)
        (True, True)
    """

    def standardized_weight(self) -> torch.Tensor:
        return standardize_weight(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.standardized_weight(), self.bias)
