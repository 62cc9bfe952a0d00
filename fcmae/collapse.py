"""Feature cosine distance per block of a ConvNeXt encoder: the feature-collapse metric.

The features of a block are the output of its expansion MLP's activation: after GELU in
ConvNeXt V1 (`block.mlp.act`) and after Global Response Normalization in V2
(`block.mlp.grn`). They have 4C channels at the block's resolution. Every block is one
layer, numbered 0..K-1 through the stages, and placed at k / (K - 1) on a 0..1 axis.

For one image with channels X_1..X_C, each flattened to H*W values, the distance is

    d = (1 / C^2) * sum_ij (1 - cos(X_i, X_j)) / 2

over all ordered pairs, diagonal included, with nothing centred. A value near 0 means
the channels point the same way (collapse). Because sum_ij cos(X_i, X_j) equals
||sum_i X_i / ||X_i|| ||^2, the distance costs O(C * H * W) instead of O(C^2 * H * W).
The distance is computed per image and then averaged over images, never pooled over a
batch.

Dead channels: a channel has no direction when it is all zero, so it is left out. In one
image and layer, channel i is dead when ||X_i|| <= DEAD_CHANNEL_RTOL * max_j ||X_j||, or
when every channel of that image is zero. C above counts only the live channels of that
image. When every channel is dead, the distance is 0 (fully collapsed). The fraction of
dead channels is reported next to the distance.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

logger = logging.getLogger(__name__)

# A channel whose L2 norm is at most this fraction of the largest channel norm of the same
# image and layer counts as dead. float32 activations carry about 7 significant digits, so
# a norm this far below the largest one is rounding noise rather than a direction.
DEAD_CHANNEL_RTOL = 1e-6


class FeatureError(ValueError):
    """Raised when an encoder's features cannot be hooked or measured."""


@dataclass(frozen=True)
class FeatureLayer:
    """One block of a ConvNeXt encoder whose MLP features are measured.

    `layer` counts blocks through all stages from 0, and `normalized_layer` is
    layer / (K - 1) for K blocks in the encoder. `channels_last` is True when the hooked
    module returns (B, H, W, C) tensors (timm's nn.Linear MLP) instead of (B, C, H, W).
    """

    stage: int
    block: int
    layer: int
    normalized_layer: float
    module_name: str
    channels_last: bool
    module: nn.Module = field(repr=False, compare=False)


@dataclass(frozen=True)
class LayerDistance:
    """Feature cosine distance of one layer, averaged over images.

    `dead_fraction` is the fraction of channels that are dead, averaged over images.
    """

    stage: int
    block: int
    layer: int
    normalized_layer: float
    distance: float
    dead_fraction: float
    num_images: int

    def as_dict(self) -> dict:
        return asdict(self)


def find_feature_layers(encoder: nn.Module) -> list[FeatureLayer]:
    """List every block of a timm ConvNeXt encoder with the module whose output is measured.

    The hooked module is `block.mlp.grn` where the block has GRN (V2), else `block.mlp.act`.
    """
    stages = getattr(encoder, "stages", None)
    if stages is None:
        raise FeatureError(f"{type(encoder).__name__} has no 'stages'; pass a timm ConvNeXt encoder "
                           f"such as fcmae.registry.create_encoder('convnextv2_atto')")

    blocks = []
    for stage_index, stage in enumerate(stages):
        for block_index, block in enumerate(stage.blocks):
            blocks.append((stage_index, block_index, block))

    num_layers = len(blocks)
    layers = []
    for layer_index, (stage_index, block_index, block) in enumerate(blocks):
        module_name, module = _feature_module(block, stage_index, block_index)
        layers.append(FeatureLayer(
            stage=stage_index,
            block=block_index,
            layer=layer_index,
            normalized_layer=layer_index / (num_layers - 1) if num_layers > 1 else 0.0,
            module_name=module_name,
            channels_last=not isinstance(block.mlp.fc1, nn.Conv2d),
            module=module,
        ))
    return layers


def _feature_module(block: nn.Module, stage_index: int, block_index: int) -> tuple[str, nn.Module]:
    block_name = f"stages.{stage_index}.blocks.{block_index}"
    prefix = f"{block_name}.mlp"
    mlp = getattr(block, "mlp", None)
    if mlp is None or not hasattr(mlp, "act") or not hasattr(mlp, "fc1"):
        raise FeatureError(f"block {block_name} has no timm ConvNeXt MLP with fc1 and act; "
                           f"only timm ConvNeXt V1 and V2 encoders are supported")

    grn = getattr(mlp, "grn", None)
    if grn is not None and not isinstance(grn, nn.Identity):
        return f"{prefix}.grn", grn
    return f"{prefix}.act", mlp.act


def to_channels_first(output: torch.Tensor, layer: FeatureLayer) -> torch.Tensor:
    """Return a hooked output as a float32 (B, C, H, W) tensor."""
    if output.ndim != 4:
        raise FeatureError(f"{layer.module_name} returned a tensor of shape {tuple(output.shape)}; "
                           f"expected 4 dimensions (B, C, H, W) or (B, H, W, C)")
    if layer.channels_last:
        output = output.permute(0, 3, 1, 2)
    return output.float()


def cosine_distance_and_dead_fraction(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Compute the feature cosine distance and the dead-channel fraction of every image.

    features: (B, C, H, W). Returns two float64 tensors of shape (B,): the distance, which
    uses only the live channels of each image (see the module docstring for the dead-channel
    rule), and the fraction of the C channels that are dead.
    """
    if features.ndim != 4:
        raise FeatureError(f"features must have shape (B, C, H, W); got {tuple(features.shape)}")
    if not torch.isfinite(features).all():
        raise FeatureError("features contain NaN or infinite values; the encoder weights or inputs are broken")

    B, C, H, W = features.shape
    x = features.float().reshape(B, C, H * W)

    # Dead channels: norm at most DEAD_CHANNEL_RTOL of the image's largest channel norm.
    norms = torch.linalg.vector_norm(x, dim=2)  # (B, C)
    max_norm = norms.amax(dim=1, keepdim=True)  # (B, 1)
    live = (norms > DEAD_CHANNEL_RTOL * max_norm) & (max_norm > 0)  # (B, C)
    num_live = live.sum(dim=1).double()  # (B,)

    # sum_ij cos(X_i, X_j) = ||sum_i X_i / ||X_i|| ||^2 over live channels only.
    scale = torch.where(live, 1.0 / norms.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(norms))
    direction_sum = torch.einsum("bcn,bc->bn", x, scale).double()  # (B, H*W)
    cosine_sum = direction_sum.square().sum(dim=1)  # (B,)

    distance = 0.5 * (1.0 - cosine_sum / num_live.clamp_min(1).square())
    distance = torch.where(num_live > 0, distance, torch.zeros_like(distance))
    dead_fraction = 1.0 - num_live / C
    return distance, dead_fraction


def cosine_distance(features: torch.Tensor) -> torch.Tensor:
    """Return the feature cosine distance of every image: features (B, C, H, W) -> (B,) float64."""
    distance, _ = cosine_distance_and_dead_fraction(features)
    return distance


def cosine_distance_reference(features: torch.Tensor) -> torch.Tensor:
    """Compute the distance from the explicit C x C cosine matrix in float64: (B, C, H, W) -> (B,).

    Slow, O(C^2 * H * W); tests compare `cosine_distance` against it. It applies the same
    dead-channel rule as `cosine_distance`.
    """
    B, C, H, W = features.shape
    distances = torch.zeros(B, dtype=torch.float64)
    for b in range(B):
        x = features[b].double().reshape(C, H * W)
        norms = torch.linalg.vector_norm(x, dim=1)
        live = (norms > DEAD_CHANNEL_RTOL * norms.max()) & (norms.max() > 0)
        if not live.any():
            continue

        x = x[live]
        unit = x / torch.linalg.vector_norm(x, dim=1, keepdim=True)
        cosine = unit @ unit.T  # (C_live, C_live)
        distances[b] = ((1.0 - cosine) / 2.0).mean()
    return distances


def extract_features(encoder: nn.Module, images: torch.Tensor,
                     layers: Iterable[int] | None = None) -> dict[int, torch.Tensor]:
    """Run one forward pass and return the MLP features of the requested layers.

    images: (B, 3, S, S) normalized images. Returns {layer index: (B, C, H, W) float32 on the
    CPU}, for every layer when `layers` is None. The encoder runs in eval mode without
    gradients or masking, and its training flag is restored afterwards.
    """
    all_layers = find_feature_layers(encoder)
    requested = _select_layers(all_layers, layers)
    captured: dict[int, torch.Tensor] = {}

    def make_hook(layer: FeatureLayer):
        def hook(module, inputs, output):
            captured[layer.layer] = to_channels_first(output.detach(), layer).cpu()
        return hook

    with _hooks(requested, make_hook), _eval_mode(encoder), torch.no_grad():
        encoder(images.to(_device_of(encoder)))
    return captured


def layer_distances(encoder: nn.Module, images: torch.Tensor | Iterable[torch.Tensor],
                    batch_size: int = 32) -> list[LayerDistance]:
    """Measure the feature cosine distance of every layer, averaged over images.

    images: one (N, 3, S, S) tensor, which is split into batches of `batch_size`, or an
    iterable of (B, 3, S, S) batches used as they come, for example one that loads files
    lazily. Each layer's features are reduced to per-image numbers inside the forward hook,
    so memory contains the features of one batch in one layer at a time. The encoder runs
    in eval mode without gradients or masking.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1; got {batch_size}")

    layers = find_feature_layers(encoder)
    distance_sums = torch.zeros(len(layers), dtype=torch.float64)
    dead_sums = torch.zeros(len(layers), dtype=torch.float64)

    def make_hook(layer: FeatureLayer):
        def hook(module, inputs, output):
            features = to_channels_first(output.detach(), layer)
            try:
                distance, dead_fraction = cosine_distance_and_dead_fraction(features)
            except FeatureError as error:
                raise FeatureError(f"layer {layer.layer} ({layer.module_name}): {error}") from error
            distance_sums[layer.layer] += distance.sum().cpu()
            dead_sums[layer.layer] += dead_fraction.sum().cpu()
        return hook

    num_images = 0
    device = _device_of(encoder)
    with _hooks(layers, make_hook), _eval_mode(encoder), torch.no_grad():
        for batch in _batches(images, batch_size):
            encoder(batch.to(device))
            num_images += batch.shape[0]
            logger.debug("measured %d images", num_images)

    if num_images == 0:
        raise ValueError("no images were given; pass at least one image")
    return [_layer_record(layer, distance_sums, dead_sums, num_images) for layer in layers]


def _layer_record(layer: FeatureLayer, distance_sums: torch.Tensor, dead_sums: torch.Tensor,
                  num_images: int) -> LayerDistance:
    return LayerDistance(
        stage=layer.stage,
        block=layer.block,
        layer=layer.layer,
        normalized_layer=layer.normalized_layer,
        distance=float(distance_sums[layer.layer]) / num_images,
        dead_fraction=float(dead_sums[layer.layer]) / num_images,
        num_images=num_images,
    )


def _select_layers(all_layers: list[FeatureLayer], layers: Iterable[int] | None) -> list[FeatureLayer]:
    if layers is None:
        return all_layers

    selected = []
    for index in layers:
        if not 0 <= index < len(all_layers):
            raise FeatureError(f"layer {index} does not exist; this encoder has layers 0..{len(all_layers) - 1}")
        selected.append(all_layers[index])
    return selected


def _batches(images: torch.Tensor | Iterable[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    if isinstance(images, torch.Tensor):
        if images.ndim != 4:
            raise ValueError(f"images must have shape (N, 3, S, S); got {tuple(images.shape)}")
        yield from images.split(batch_size)
    else:
        yield from images


def _device_of(encoder: nn.Module) -> torch.device:
    parameter = next(encoder.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


@contextmanager
def _hooks(layers: list[FeatureLayer], make_hook) -> Iterator[None]:
    handles = [layer.module.register_forward_hook(make_hook(layer)) for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)
