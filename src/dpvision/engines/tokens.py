"""Per-example gradients of torchvision ViT's class token and position embedding (parameters outside any layer).

torchvision's ``VisionTransformer.forward`` puts ``class_token`` [1, 1, D] in front of each example's patch
tokens (``torch.cat([class_token.expand(B, -1, -1), x], dim=1)``: token 0) and hands them to its
``Encoder``, whose ``forward`` adds ``pos_embedding`` [1, T, D] to every example, h = input + pos_embedding
[B, T, D], right before its dropout. Both parameters reach example i's loss only through h_i, with the
identity as Jacobian, so with dh = dL/dh [B, T, D] (each example's loss gradient at its own tokens, from the
one batched backward):

    pos_embedding: g_i = dh_i [T, D]          class_token: g_i = dh_i[0] [D]

The manual backend asks for dh as one more output gradient (the autograd edge of the encoder dropout's input,
kept by a forward pre-hook); these per-example gradients are formed once and are both the tensors whose norms
are taken and the tensors summed. Only torchvision's own classes (exact type, ``forward`` not replaced on the
instance) qualify: for a subclass or any other module with a parameter of its own :func:`token_source` says
None and the backend refuses the model (the engine then falls back to another backend, with its notice).
"""

from __future__ import annotations

import torch
from torch import nn

from dpvision.engines.base import UnsupportedModelError

VIT_MODULE = "torchvision.models.vision_transformer"
# torchvision class -> its one parameter this rule covers
TOKEN_PARAMETERS = {"VisionTransformer": "class_token", "Encoder": "pos_embedding"}


def is_torchvision(module: nn.Module, name: str) -> bool:
    """Whether ``module`` is exactly torchvision's ``vision_transformer.<name>`` computing as torchvision does."""
    kind = type(module)
    return kind.__module__ == VIT_MODULE and kind.__qualname__ == name and "forward" not in vars(module)


def token_source(module: nn.Module, attr: str) -> nn.Module | None:
    """The torchvision ``Encoder`` whose h = input + pos_embedding carries the per-example gradients of
    parameter ``attr`` of ``module`` (:func:`token_gradients`), or None when this rule does not cover it."""
    name = type(module).__qualname__
    if TOKEN_PARAMETERS.get(name) != attr or not is_torchvision(module, name):
        return None
    encoder = module if name == "Encoder" else getattr(module, "encoder", None)
    if encoder is None or not is_torchvision(encoder, "Encoder") or not isinstance(encoder.dropout, nn.Module):
        return None
    return encoder


def token_gradients(attr: str, dh: torch.Tensor) -> torch.Tensor:
    """Per-example gradients [B, numel] of ``pos_embedding`` (dh itself) or ``class_token`` (dh at token 0) from
    dh [B, T, D] (float32)."""
    return (dh if attr == "pos_embedding" else dh[:, 0]).flatten(1)


def check_tokens(encoder: nn.Module, h: torch.Tensor) -> None:
    """The encoder's summed tokens h [B, T, D] line up with its pos_embedding [1, T, D] (no broadcasting over
    tokens, which would make dh_i's sum over tokens the gradient instead), else ``UnsupportedModelError``."""
    pos = encoder.pos_embedding
    if h.dim() != 3 or pos.shape[0] != 1 or h.shape[1:] != pos.shape[1:]:
        raise UnsupportedModelError(f"manual per-sample gradients: ViT tokens {tuple(h.shape)} do not match "
                                    f"pos_embedding {tuple(pos.shape)}")
