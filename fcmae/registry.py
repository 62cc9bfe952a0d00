"""The ConvNeXt encoders this project pretrains, and how to build them with timm."""

from __future__ import annotations

import timm
import torch.nn as nn

V1_SIZES = ("atto", "femto", "pico", "nano", "tiny", "small", "base", "large", "xlarge")
V2_SIZES = ("atto", "femto", "pico", "nano", "tiny", "small", "base", "large", "huge")
MODEL_NAMES = tuple(f"convnext_{s}" for s in V1_SIZES) + tuple(f"convnextv2_{s}" for s in V2_SIZES)

# Total stride of every ConvNeXt encoder: a 4x4 stem, then three 2x2 downsampling layers.
ENCODER_STRIDE = 32


class UnknownModelError(ValueError):
    """Raised for a model name outside MODEL_NAMES."""


def check_model_name(model_name: str) -> None:
    if model_name not in MODEL_NAMES:
        raise UnknownModelError(f"unknown model {model_name!r}; valid models: {', '.join(MODEL_NAMES)}")


def model_version(model_name: str) -> str:
    """Return 'v1' or 'v2' for a model name."""
    check_model_name(model_name)
    return "v2" if model_name.startswith("convnextv2_") else "v1"


def model_size(model_name: str) -> str:
    check_model_name(model_name)
    return model_name.split("_", 1)[1]


def create_encoder(model_name: str, in_chans: int = 3) -> nn.Module:
    """Build the timm ConvNeXt encoder (no classifier) with timm's initialization.

    V1 models keep timm's LayerScale init of 1e-6 and have no GRN; V2 models use GRN
    and no LayerScale. The state dict loads strictly into
    `timm.create_model(model_name, num_classes=0)`.
    """
    check_model_name(model_name)
    return timm.create_model(model_name, pretrained=False, num_classes=0, in_chans=in_chans)
