"""A masked ConvNeXt encoder that computes pointwise layers on visible positions only.

Every image keeps the same number K of patches, so the visible positions of a stage form
a dense (B, K, r, r, C) token tensor, where r x r is the size of one patch at that stage
(8 after the stem at patch size 32, then 4, 2, 1). The stem and the downsampling layers
are non-overlapping convolutions whose windows never cross a patch border, so they become
reshapes plus one matrix product on these tokens. LayerNorm, the MLP and GRN act on tokens
only. Only the 7x7 depthwise convolution runs on a dense map: tokens are scattered into a
zero-filled (B, C, H, W) map, convolved, and gathered back.

The weights are the timm modules of `MaskedConvNeXtEncoder`, so the state dict and the
results match the dense reference path (up to float rounding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .models import MaskedConvNeXtEncoder, _record


def kept_indices(mask: torch.Tensor) -> torch.Tensor:
    """(B, L) mask with the same kept count per row -> (B, K) sorted indices of kept patches."""
    B = mask.shape[0]
    return torch.nonzero(mask == 0, as_tuple=False)[:, 1].reshape(B, -1)


def _matrix(weight: torch.Tensor) -> torch.Tensor:
    """Conv weight (out, in, kh, kw) -> (out, kh * kw * in), matching tokens ordered (kh, kw, in)."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


def _layer_norm(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, norm.eps)


class SparseConvNeXtEncoder(MaskedConvNeXtEncoder):
    """Same parameters and results as `MaskedConvNeXtEncoder`, with visible-only pointwise work."""

    def forward(self, images: torch.Tensor, mask: torch.Tensor, trace: list | None = None) -> torch.Tensor:
        B, C_in, H, W = images.shape
        grid = int(mask.shape[1] ** 0.5)
        p = H // grid
        ids = kept_indices(mask)
        batch = torch.arange(B, device=images.device)[:, None]
        stem_stride = self.stem[0].stride[0]

        # Stem: gather the kept patches, split each into stride x stride pixel windows.
        patches = images.reshape(B, C_in, grid, p, grid, p).permute(0, 2, 4, 3, 5, 1)
        patches = patches.reshape(B, grid * grid, p, p, C_in)[batch, ids]               # (B, K, p, p, C_in)
        r = p // stem_stride
        x = self._windows(patches, stem_stride)                                         # (B, K, r, r, s*s*C_in)
        x = F.linear(x, _matrix(self.stem[0].weight), self.stem[0].bias)
        x = _layer_norm(self.stem[1], x)
        self._trace(trace, "stem", x, ids, grid, mask)

        for s, stage in enumerate(self.stages):
            if s > 0:
                norm, conv = stage.downsample[0], stage.downsample[1]
                x = self._windows(_layer_norm(norm, x), conv.stride[0])
                x = F.linear(x, _matrix(conv.weight), conv.bias)
                self._trace(trace, f"stages.{s}.downsample", x, ids, grid, mask)
            for b, block in enumerate(stage.blocks):
                x = self._block_tokens(block, x, ids, grid)
                self._trace(trace, f"stages.{s}.blocks.{b}", x, ids, grid, mask)
        return self.to_dense(x, ids, grid)

    @staticmethod
    def _windows(x: torch.Tensor, stride: int) -> torch.Tensor:
        """(B, K, r, r, C) -> (B, K, r/s, r/s, s*s*C), each window's values ordered (dy, dx, c)."""
        B, K, r, _, C = x.shape
        x = x.reshape(B, K, r // stride, stride, r // stride, stride, C).permute(0, 1, 2, 4, 3, 5, 6)
        return x.reshape(B, K, r // stride, r // stride, stride * stride * C)

    def _block_tokens(self, block, x: torch.Tensor, ids: torch.Tensor, grid: int) -> torch.Tensor:
        B, K, r, _, C = x.shape
        dense = self.to_dense(x, ids, grid)
        y = self.from_dense(block.conv_dw(dense), ids, grid, r)                         # (B, K, r, r, C)
        y = _layer_norm(block.norm, y).reshape(B, K * r * r, C)

        mlp = block.mlp
        y = mlp.act(F.linear(y, mlp.fc1.weight.reshape(mlp.fc1.weight.shape[0], -1), mlp.fc1.bias))
        if self.use_grn:
            y = self._grn(mlp.grn, y)
        y = F.linear(y, mlp.fc2.weight.reshape(mlp.fc2.weight.shape[0], -1), mlp.fc2.bias)
        if block.gamma is not None:
            y = y * block.gamma
        return x + y.reshape(B, K, r, r, C)

    @staticmethod
    def _grn(grn, x: torch.Tensor) -> torch.Tensor:
        """GRN on (B, T, C) tokens: one norm over each image's T visible positions."""
        gx = torch.linalg.vector_norm(x, ord=2, dim=1, keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + grn.eps)
        # x + gamma * (x * Nx) + beta, folded into one full-size pass: x * (1 + gamma * Nx) + beta.
        return torch.addcmul(grn.bias, x, torch.addcmul(torch.ones_like(nx), grn.weight, nx))

    @staticmethod
    def to_dense(x: torch.Tensor, ids: torch.Tensor, grid: int) -> torch.Tensor:
        """Scatter (B, K, r, r, C) tokens into a zero (B, C, grid*r, grid*r) map (channels_last memory)."""
        B, K, r, _, C = x.shape
        dense = x.new_zeros(B, grid * grid, r, r, C)
        dense[torch.arange(B, device=x.device)[:, None], ids] = x
        dense = dense.reshape(B, grid, grid, r, r, C).permute(0, 1, 3, 2, 4, 5).reshape(B, grid * r, grid * r, C)
        return dense.permute(0, 3, 1, 2)

    @staticmethod
    def from_dense(dense: torch.Tensor, ids: torch.Tensor, grid: int, r: int) -> torch.Tensor:
        """Gather the (B, K, r, r, C) tokens of kept patches from a (B, C, grid*r, grid*r) map."""
        B, C = dense.shape[:2]
        x = dense.permute(0, 2, 3, 1).reshape(B, grid, r, grid, r, C).permute(0, 1, 3, 2, 4, 5)
        x = x.reshape(B, grid * grid, r, r, C)
        return x[torch.arange(B, device=dense.device)[:, None], ids]

    def _trace(self, trace, name, x, ids, grid, mask) -> None:
        if trace is None:
            return
        from .models import upsample_mask

        dense = self.to_dense(x, ids, grid)
        _record(trace, name, dense, upsample_mask(mask, grid, dense.shape[-1]).to(dense.dtype))
