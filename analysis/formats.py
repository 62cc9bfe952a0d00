"""Convert ConvNeXt state dicts in the official layouts to timm's key names and shapes.

The official code (facebookresearch/ConvNeXt, facebookresearch/ConvNeXt-V2, January 2023)
names the encoder's parameters differently from timm:

| official | timm |
|---|---|
| downsample_layers.0.0 (stem conv), downsample_layers.0.1 (LayerNorm) | stem.0, stem.1 |
| downsample_layers.i.0 (LayerNorm), downsample_layers.i.1 (2x2 conv), i = 1..3 | stages.i.downsample.0, .1 |
| stages.S.B.dwconv, .norm, .pwconv1, .pwconv2 | stages.S.blocks.B.conv_dw, .norm, .mlp.fc1, .mlp.fc2 |
| stages.S.B.grn.gamma, .grn.beta, shape (1, 1, 1, 4C) (V2) | stages.S.blocks.B.mlp.grn.weight, .bias, shape (4C,) |
| stages.S.B.gamma, shape (C,) (V1 LayerScale) | stages.S.blocks.B.gamma |
| norm (LayerNorm after pooling) | head.norm |
| head (classifier) | head.fc (dropped here: the encoder has no classifier) |

Official pwconv weights are nn.Linear weights, (4C, C) and (C, 4C). The loader reshapes them
to the (4C, C, 1, 1) 1x1-convolution weights of timm's small sizes (atto..nano, conv_mlp=True)
and keeps them 2-D for the larger sizes.

The FCMAE pretraining checkpoints of ConvNeXt-V2 may also contain the decoder (`decoder.*`,
`proj.*`, `pred.*`, `mask_token`), which is dropped. They may also store the encoder in the
MinkowskiEngine layout of convnextv2_sparse.py. That layout inserts `.ln` and `.linear` before
`weight`/`bias` and stores convolution weights as `kernel` tensors with the kernel volume
first: (k*k, C_in, C_out), or (k*k, C) for depthwise ones. Its biases and GRN parameters
have shape (1, C).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

TIMM_LAYOUT = "timm"
OFFICIAL_LAYOUT = "official"
OFFICIAL_SPARSE_LAYOUT = "official-sparse"

# The key that identifies each layout: the stem convolution's weight.
TIMM_STEM_KEY = "stem.0.weight"
OFFICIAL_STEM_KEY = "downsample_layers.0.0.weight"

# Official names (after removing the sparse `.ln` / `.linear` infixes) and their timm names.
_BLOCK = r"^stages\.(\d+)\.(\d+)\."
_TIMM_BLOCK = r"stages.\1.blocks.\2."
_KEY_RULES = tuple((re.compile(pattern), replacement) for pattern, replacement in (
    (r"^downsample_layers\.0\.0\.(weight|bias)$", r"stem.0.\1"),
    (r"^downsample_layers\.0\.1\.(weight|bias)$", r"stem.1.\1"),
    (r"^downsample_layers\.([1-9]\d*)\.0\.(weight|bias)$", r"stages.\1.downsample.0.\2"),
    (r"^downsample_layers\.([1-9]\d*)\.1\.(weight|bias)$", r"stages.\1.downsample.1.\2"),
    (_BLOCK + r"dwconv\.(weight|bias)$", _TIMM_BLOCK + r"conv_dw.\3"),
    (_BLOCK + r"norm\.(weight|bias)$", _TIMM_BLOCK + r"norm.\3"),
    (_BLOCK + r"pwconv1\.(weight|bias)$", _TIMM_BLOCK + r"mlp.fc1.\3"),
    (_BLOCK + r"pwconv2\.(weight|bias)$", _TIMM_BLOCK + r"mlp.fc2.\3"),
    (_BLOCK + r"grn\.gamma$", _TIMM_BLOCK + r"mlp.grn.weight"),
    (_BLOCK + r"grn\.beta$", _TIMM_BLOCK + r"mlp.grn.bias"),
    (_BLOCK + r"gamma$", _TIMM_BLOCK + r"gamma"),
    (r"^norm\.(weight|bias)$", r"head.norm.\1"),
))
# Official keys that the encoder does not use: the classifier and the FCMAE decoder.
_CLASSIFIER_KEY = re.compile(r"^head\.(weight|bias)$")
_DECODER_KEY = re.compile(r"^(decoder|proj|pred)\.|^mask_token$")
# MinkowskiLayerNorm and MinkowskiLinear keep their torch module as `.ln` / `.linear`.
_SPARSE_INFIX = re.compile(r"\.(ln|linear)\.(weight|bias)$")
_SPARSE_KERNEL = re.compile(r"\.kernel$")


class UnknownLayoutError(ValueError):
    """Raised when a state dict is in neither the timm nor the official ConvNeXt layout."""


@dataclass
class Conversion:
    """A state dict in timm's layout and what was dropped to get it."""

    state_dict: dict[str, torch.Tensor]
    layout: str
    dropped_classifier: list[str]
    dropped_decoder: list[str]


def detect_layout(state_dict: dict[str, torch.Tensor]) -> str:
    """Return TIMM_LAYOUT, OFFICIAL_LAYOUT or OFFICIAL_SPARSE_LAYOUT from the keys of a state dict."""
    if TIMM_STEM_KEY in state_dict:
        return TIMM_LAYOUT
    if OFFICIAL_STEM_KEY in state_dict:
        sparse = any(_SPARSE_KERNEL.search(key) or _SPARSE_INFIX.search(key) for key in state_dict)
        return OFFICIAL_SPARSE_LAYOUT if sparse else OFFICIAL_LAYOUT
    raise UnknownLayoutError(
        f"the state dict is neither a timm ConvNeXt (no '{TIMM_STEM_KEY}') nor an official ConvNeXt / "
        f"ConvNeXt-V2 state dict (no '{OFFICIAL_STEM_KEY}'); its keys start with {preview(list(state_dict))}")


def official_to_timm(state_dict: dict[str, torch.Tensor]) -> Conversion:
    """Rename and reshape an official (dense or sparse) ConvNeXt state dict to timm's layout.

    Raises UnknownLayoutError naming every key that matches no rule, so a state dict of
    another network is never loaded partially.
    """
    layout = detect_layout(state_dict)
    if layout == TIMM_LAYOUT:
        raise UnknownLayoutError(f"the state dict is already in timm's layout ('{TIMM_STEM_KEY}' is present)")

    converted: dict[str, torch.Tensor] = {}
    dropped_classifier, dropped_decoder, unmatched = [], [], []
    for key, value in state_dict.items():
        if _CLASSIFIER_KEY.match(key):
            dropped_classifier.append(key)
            continue
        if _DECODER_KEY.search(key):
            dropped_decoder.append(key)
            continue

        dense_key, dense_value = _sparse_to_dense(key, value)
        timm_key = _rename(dense_key)
        if timm_key is None:
            unmatched.append(key)
            continue
        converted[timm_key] = _timm_shape(timm_key, dense_value)

    if unmatched:
        raise UnknownLayoutError(f"{len(unmatched)} keys of this official-layout state dict match no known "
                                 f"ConvNeXt parameter: {preview(unmatched)}; only ConvNeXt V1 and V2 "
                                 f"encoders (with an optional classifier or FCMAE decoder) are supported")
    return Conversion(converted, layout, dropped_classifier, dropped_decoder)


def _rename(key: str) -> str | None:
    for pattern, replacement in _KEY_RULES:
        if pattern.match(key):
            return pattern.sub(replacement, key)
    return None


def _sparse_to_dense(key: str, value: torch.Tensor) -> tuple[str, torch.Tensor]:
    """Turn one MinkowskiEngine-layout entry into the dense official key and tensor; others pass through."""
    key = _SPARSE_INFIX.sub(r".\2", key)
    if not _SPARSE_KERNEL.search(key):
        return key, value

    key = _SPARSE_KERNEL.sub(".weight", key)
    kernel_volume = value.shape[0]
    k = math.isqrt(kernel_volume)
    if k * k != kernel_volume or value.ndim not in (2, 3):
        raise UnknownLayoutError(f"sparse kernel {key} has shape {tuple(value.shape)}; expected "
                                 f"(k*k, C) for a depthwise or (k*k, C_in, C_out) for a full convolution")

    # NOTE: the kernel-volume index is taken as w * k + h (column-major offsets), the order that
    # ConvNeXt-V2's utils.remap_checkpoint_keys assumes when it converts these checkpoints.
    if value.ndim == 2:  # depthwise: (k*k, C) -> (C, 1, k, k)
        return key, value.reshape(k, k, -1).permute(2, 1, 0).unsqueeze(1).contiguous()
    return key, value.reshape(k, k, value.shape[1], value.shape[2]).permute(3, 2, 1, 0).contiguous()


def _timm_shape(timm_key: str, value: torch.Tensor) -> torch.Tensor:
    # timm stores GRN parameters and biases as (C,); the official code as (1, 1, 1, C) or (1, C).
    if ".mlp.grn." in timm_key or timm_key.endswith(".bias"):
        return value.reshape(-1)
    return value


def preview(keys: list[str], limit: int = 8) -> str:
    """Format up to `limit` keys and the total count for an error message."""
    if not keys:
        return "none"
    listed = ", ".join(keys[:limit])
    return f"[{listed}{', ...' if len(keys) > limit else ''}] ({len(keys)} in all)"
