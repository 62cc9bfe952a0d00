"""FCMAE: a ConvNeXt encoder pretrained as a fully convolutional masked autoencoder.

Masked positions follow sparse-convolution semantics without a sparse library: the mask
is applied at the stem output and every later layer leaves removed positions exactly
zero, so biases, LayerNorm and GRN never put values there. Depthwise convolutions read
zeros from removed neighbours, as a sparse convolution reads no neighbour at all.

Mask convention everywhere: a (B, L) float tensor over the patch grid, 1 = removed,
0 = visible, L = (input_size / patch_size) ** 2.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.convnext import ConvNeXtBlock

from .registry import ENCODER_STRIDE, check_model_name, create_encoder, model_version

ENCODER_IMPLS = ("dense", "sparse")


def upsample_mask(mask: torch.Tensor, grid: int, size: int) -> torch.Tensor:
    """Turn a (B, L) removal mask into a (B, 1, size, size) visibility map (1 = visible)."""
    B = mask.shape[0]
    visible = 1.0 - mask.reshape(B, 1, grid, grid)
    scale = size // grid
    return visible.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)


def masked_grn(grn: nn.Module, x: torch.Tensor, visible: torch.Tensor | None, channels_last: bool) -> torch.Tensor:
    """GRN whose statistics cover the visible positions of each image only.

    `x` must already be zero at removed positions, so the spatial L2 norm over the whole
    map equals the norm over visible positions; the output is re-masked because GRN's
    bias would otherwise fill removed positions.
    """
    spatial = (1, 2) if channels_last else (2, 3)
    channel = -1 if channels_last else 1
    shape = (1, 1, 1, -1) if channels_last else (1, -1, 1, 1)

    gx = torch.linalg.vector_norm(x, ord=2, dim=spatial, keepdim=True)
    nx = gx / (gx.mean(dim=channel, keepdim=True) + grn.eps)
    out = x + torch.addcmul(grn.bias.view(shape), grn.weight.view(shape), x * nx)
    return out if visible is None else out * visible


class MaskedConvNeXtEncoder(nn.Module):
    """Run a timm ConvNeXt on masked inputs with sparse-convolution semantics.

    Holds the submodules of an unmodified timm ConvNeXt under their timm names, so its
    state dict is the timm encoder state dict. The classifier-head norm is kept for that
    reason only: FCMAE pretraining does not use or train it.
    """

    def __init__(self, model_name: str, in_chans: int = 3):
        super().__init__()
        timm_model = create_encoder(model_name, in_chans=in_chans)
        self.stem = timm_model.stem
        self.stages = timm_model.stages
        self.norm_pre = timm_model.norm_pre
        self.head = timm_model.head
        self.use_grn = model_version(model_name) == "v2"
        self.dims = [stage.blocks[0].conv_dw.out_channels for stage in self.stages]

    @property
    def out_channels(self) -> int:
        return self.dims[-1]

    def forward(self, images: torch.Tensor, mask: torch.Tensor, trace: list | None = None) -> torch.Tensor:
        """Encode (B, C, H, W) images with a (B, L) mask; returns (B, C_last, H/32, W/32).

        When `trace` is a list, (layer name, output, visibility map) is appended to it for
        the stem, every downsampling layer and every block.
        """
        grid = int(mask.shape[1] ** 0.5)
        x = self.stem[0](images)
        visible = upsample_mask(mask, grid, x.shape[-1]).to(x.dtype)
        x = self.stem[1](x * visible) * visible
        _record(trace, "stem", x, visible)

        for s, stage in enumerate(self.stages):
            if not isinstance(stage.downsample, nn.Identity):
                x = stage.downsample(x)
                visible = upsample_mask(mask, grid, x.shape[-1]).to(x.dtype)
                x = x * visible
                _record(trace, f"stages.{s}.downsample", x, visible)
            for b, block in enumerate(stage.blocks):
                x = self._block(block, x, visible)
                _record(trace, f"stages.{s}.blocks.{b}", x, visible)
        return x

    def _block(self, block: nn.Module, x: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = block.conv_dw(x)
        if block.use_conv_mlp:
            x = self._mlp(block, block.norm(x), visible, channels_last=False)
        else:
            x = x.permute(0, 2, 3, 1)
            x = self._mlp(block, block.norm(x), visible.permute(0, 2, 3, 1), channels_last=True)
            x = x.permute(0, 3, 1, 2)
        if block.gamma is not None:
            x = x * block.gamma.reshape(1, -1, 1, 1)
        return shortcut + x * visible

    def _mlp(self, block: nn.Module, x: torch.Tensor, visible: torch.Tensor, channels_last: bool) -> torch.Tensor:
        mlp = block.mlp
        x = mlp.act(mlp.fc1(x))
        if self.use_grn:
            x = masked_grn(mlp.grn, x * visible, visible, channels_last)
        return mlp.fc2(x)

    def timm_state_dict(self) -> dict[str, torch.Tensor]:
        """Return the encoder weights with timm keys, detached and on the CPU."""
        return {k: v.detach().cpu().clone() for k, v in self.state_dict().items()}


def _record(trace: list | None, name: str, x: torch.Tensor, visible: torch.Tensor) -> None:
    if trace is not None:
        trace.append((name, x, visible))


class FCMAE(nn.Module):
    """ConvNeXt FCMAE: masked encoder, one-block ConvNeXt V2 decoder, normalized-pixel loss.

    forward(images, mask=None) returns (loss, prediction, mask):
    - images: (B, C, H, W), ImageNet-normalized;
    - prediction: (B, L, p * p * C), the predicted normalized pixels of every patch;
    - mask: (B, L), 1 = removed. The loss is the per-patch MSE averaged over removed patches.
    """

    def __init__(self, model_name: str, input_size: int = 224, mask_ratio: float = 0.6,
                 patch_size: int = ENCODER_STRIDE, in_chans: int = 3, decoder_dim: int = 512,
                 decoder_depth: int = 1, encoder_impl: str = "sparse", norm_pix_loss: bool = True):
        super().__init__()
        check_model_name(model_name)
        check_geometry(input_size, patch_size, mask_ratio)
        if encoder_impl not in ENCODER_IMPLS:
            raise ValueError(f"invalid encoder_impl {encoder_impl!r}; valid values: {', '.join(ENCODER_IMPLS)}")

        self.model_name = model_name
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.num_patches = (input_size // patch_size) ** 2
        self.encoder = make_encoder(model_name, in_chans, encoder_impl)
        # The classifier-head norm exists only for timm compatibility; pretraining never uses it.
        self.encoder.head.requires_grad_(False)

        self.proj = nn.Conv2d(self.encoder.out_channels, decoder_dim, kernel_size=1)
        # Kept 2-D so channels_last conversion never changes its strides (DDP buckets expect them).
        self.mask_token = nn.Parameter(torch.zeros(1, decoder_dim))
        self.decoder = nn.Sequential(*[
            ConvNeXtBlock(decoder_dim, use_grn=True, ls_init_value=None, conv_mlp=False)
            for _ in range(decoder_depth)
        ])
        self.pred = nn.Conv2d(decoder_dim, patch_size * patch_size * in_chans, kernel_size=1)
        self._init_decoder()

    def _init_decoder(self) -> None:
        trunc_normal_(self.mask_token, std=0.02)
        for module in (self.proj, self.decoder, self.pred):
            for m in module.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    trunc_normal_(m.weight, std=0.02)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)

    def random_mask(self, batch_size: int, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw a (B, L) mask with the same number of removed patches in every row."""
        len_keep = int(self.num_patches * (1 - self.mask_ratio))
        noise = torch.rand(batch_size, self.num_patches, device=device, generator=generator)
        ids_shuffle = torch.argsort(noise, dim=1)
        mask = torch.ones(batch_size, self.num_patches, device=device)
        mask.scatter_(1, ids_shuffle[:, :len_keep], 0.0)
        return mask

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None):
        if mask is None:
            mask = self.random_mask(images.shape[0], images.device)
        mask = mask.to(device=images.device, dtype=torch.float32)

        latent = self.encoder(images, mask)
        prediction = self.decode(latent, mask)
        loss = self.loss(images, prediction, mask)
        return loss, prediction, mask

    def decode(self, latent: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Predict every patch from the (B, C_last, h, w) latent; returns (B, L, p * p * C)."""
        x = self.proj(latent)
        B, _, h, w = x.shape
        removed = mask.reshape(B, 1, h, w).to(x.dtype)
        x = x * (1.0 - removed) + self.mask_token.to(x.dtype).reshape(1, -1, 1, 1) * removed
        x = self.pred(self.decoder(x))
        return x.flatten(2).transpose(1, 2)

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, L, p * p * C), patches in row-major grid order."""
        B, C, H, W = images.shape
        p = self.patch_size
        h, w = H // p, W // p
        x = images.reshape(B, C, h, p, w, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(B, h * w, p * p * C)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, L, p * p * C) -> (B, C, H, W)."""
        B, L, _ = patches.shape
        p, C = self.patch_size, self.in_chans
        h = w = int(L ** 0.5)
        x = patches.reshape(B, h, w, p, p, C).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(B, C, h * p, w * p)

    def patch_targets(self, images: torch.Tensor) -> torch.Tensor:
        """Pixel targets per patch, standardized by each patch's mean and unbiased variance."""
        target = self.patchify(images.float())
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        return target

    def loss(self, images: torch.Tensor, prediction: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        target = self.patch_targets(images)
        per_patch = ((prediction.float() - target) ** 2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum()

    def reconstruct(self, images: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
        """Map normalized-pixel predictions back to image space with each patch's statistics."""
        patches = prediction.float()
        if self.norm_pix_loss:
            target = self.patchify(images.float())
            mean = target.mean(dim=-1, keepdim=True)
            std = (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5
            patches = patches * std + mean
        return self.unpatchify(patches)


def make_encoder(model_name: str, in_chans: int, encoder_impl: str) -> nn.Module:
    if encoder_impl == "sparse":
        from .sparse import SparseConvNeXtEncoder

        return SparseConvNeXtEncoder(model_name, in_chans=in_chans)
    return MaskedConvNeXtEncoder(model_name, in_chans=in_chans)


def check_geometry(input_size: int, patch_size: int, mask_ratio: float) -> None:
    """Raise ValueError unless the input size, patch size and mask ratio fit together."""
    if patch_size != ENCODER_STRIDE:
        raise ValueError(f"invalid patch size {patch_size}: the ConvNeXt encoder's total stride is "
                         f"{ENCODER_STRIDE}, so the FCMAE patch size must be {ENCODER_STRIDE}")
    if input_size <= 0 or input_size % patch_size:
        raise ValueError(f"invalid input size {input_size}: it must be a positive multiple of the patch size "
                         f"{patch_size}, e.g. {max(patch_size, round(input_size / patch_size) * patch_size)}")
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"invalid mask ratio {mask_ratio}: it must lie in (0, 1), e.g. 0.6")

    num_patches = (input_size // patch_size) ** 2
    len_keep = int(num_patches * (1 - mask_ratio))
    if len_keep < 1 or len_keep >= num_patches:
        raise ValueError(f"mask ratio {mask_ratio} at input size {input_size} keeps {len_keep} of {num_patches} "
                         f"patches; choose a ratio that keeps at least one patch and removes at least one")


def build_fcmae(model_name: str, input_size: int = 224, mask_ratio: float = 0.6,
                encoder_impl: str = "sparse", **kwargs) -> FCMAE:
    """Build an FCMAE whose forward(images) returns (loss, prediction, mask)."""
    return FCMAE(model_name, input_size=input_size, mask_ratio=mask_ratio, encoder_impl=encoder_impl, **kwargs)
