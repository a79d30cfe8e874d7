"""WideResNet-16-4 with GroupNorm, as in De et al. 2022 ("Unlocking high-accuracy differentially
private image classification through scale"), after the WideResNet of DeepMind's ``jax_privacy``.

Layout (depth 16: (16 - 4) / 6 = 2 blocks per stage, widening factor 4):

    stem   conv3x3(C_in -> 16)
    stage1 2 blocks, 64 channels,  stride 1   [B,  64, H,   W  ]
    stage2 2 blocks, 128 channels, stride 2   [B, 128, H/2, W/2]
    stage3 2 blocks, 256 channels, stride 2   [B, 256, H/4, W/4]
    head   act -> GroupNorm -> global average pool -> linear

Each block is pre-activation in the jax_privacy order, ``act -> GroupNorm -> conv`` twice, plus
the shortcut; a stage's first block changes width (and stride), so its shortcut is its own
``act -> GroupNorm -> conv1x1``. Every GroupNorm has 16 groups (the paper's setting). Convolutions
may be weight-standardised (:class:`~dpvision.models.layers.WSConv2d`, the paper's default), without
jax_privacy's extra per-channel gain (the GroupNorm after each conv has one). 2,751,562 parameters
for 3x32x32 inputs and 10 classes (the paper's "2.7M"); the global pool makes any image size work.
No BatchNorm, no dropout, no parameter sharing: every layer is per-example, as DP-SGD needs.

Every ``act -> GroupNorm`` goes through the instance's ``act_norm(x, act, *norms)``: PyTorch's modules here;
the fast engine may replace it on an instance by one kernel each way (:mod:`dpvision.engines.fused`).
"""

from __future__ import annotations

import torch
from torch import nn

from dpvision.models.layers import WSConv2d, make_activation

WRN_GROUPS = 16  # GroupNorm groups everywhere (De et al. 2022)
STEM_CHANNELS = 16


def act_norm(x: torch.Tensor, act: nn.Module, *norms: nn.Module) -> tuple[torch.Tensor, ...]:
    """``norm(act(x))`` for each of ``norms`` (act runs once): the seam a fused kernel replaces (the modules and
    their parameters stay)."""
    a = act(x)
    return tuple(norm(a) for norm in norms)


class WideBlock(nn.Module):
    """``x + conv(norm(act(conv(norm(act(x))))))``, with a projected shortcut when the shape changes."""

    act_norm = staticmethod(act_norm)

    def __init__(self, c_in: int, c_out: int, stride: int, *, conv: type[nn.Conv2d], activation: str,
                 groups: int = WRN_GROUPS) -> None:
        super().__init__()
        self.projection = stride != 1 or c_in != c_out
        self.act1 = make_activation(activation)
        if self.projection:  # the shortcut's own normalisation and 1x1 conv, in jax_privacy's order
            self.skip_norm = nn.GroupNorm(groups, c_in)
            self.skip_conv = conv(c_in, c_out, 1, stride)
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = conv(c_in, c_out, 3, stride, padding=1)
        self.act2 = make_activation(activation)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.conv2 = conv(c_out, c_out, 3, 1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, c_in, H, W] -> [B, c_out, H / stride, W / stride]
        norms = (self.skip_norm, self.norm1) if self.projection else (self.norm1,)
        *skip_in, h = self.act_norm(x, self.act1, *norms)  # act1 runs once for both GroupNorms
        skip = self.skip_conv(*skip_in) if self.projection else x
        (h,) = self.act_norm(self.conv1(h), self.act2, self.norm2)
        return self.conv2(h) + skip


class WideResNet(nn.Module):
    """WideResNet-``depth``-``widen`` with GroupNorm (defaults: WRN-16-4 for 10 classes).

    Example:
        >>> model = WideResNet()
        >>> model(torch.zeros(2, 3, 32, 32)).shape, sum(p.numel() for p in model.parameters())
        (torch.Size([2, 10]), 2751562)
    """

    act_norm = staticmethod(act_norm)

    def __init__(self, *, in_channels: int = 3, num_classes: int = 10, depth: int = 16, widen: int = 4,
                 activation: str = "relu", weight_standardization: bool = False) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n + 4 with n >= 1, got {depth}")
        conv = WSConv2d if weight_standardization else nn.Conv2d
        blocks_per_stage = (depth - 4) // 6
        self.stem = conv(in_channels, STEM_CHANNELS, 3, padding=1)  # [B, 16, H, W]
        blocks, c = [], STEM_CHANNELS
        for width, stride in ((16 * widen, 1), (32 * widen, 2), (64 * widen, 2)):
            for i in range(blocks_per_stage):
                blocks.append(WideBlock(c, width, stride if i == 0 else 1, conv=conv, activation=activation))
                c = width
        self.blocks = nn.Sequential(*blocks)  # [B, 64 widen, H/4, W/4]
        self.final_act = make_activation(activation)
        self.final_norm = nn.GroupNorm(WRN_GROUPS, c)
        self.head = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, C_in, H, W]
        x = self.blocks(self.stem(x))  # [B, 64 widen, H/4, W/4]
        (x,) = self.act_norm(x, self.final_act, self.final_norm)
        x = x.mean(dim=(2, 3))  # [B, 64 widen]
        return self.head(x)  # [B, num_classes]
