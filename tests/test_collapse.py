"""Tests of the feature cosine distance and the feature hooks on real timm ConvNeXt encoders."""

import pytest
import torch

from fcmae.collapse import (DEAD_CHANNEL_RTOL, FeatureError, cosine_distance, cosine_distance_and_dead_fraction,
                            cosine_distance_reference, extract_features, find_feature_layers, layer_distances)
from fcmae.registry import create_encoder

# The fast form runs in float32 and the reference in float64; on the cases below their
# largest difference was about 1e-8, so 1e-6 leaves room without hiding a wrong formula.
TOLERANCE = 1e-6


def random_features(seed: int, B=4, C=96, H=7, W=5) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(B, C, H, W, generator=generator)
    return torch.nn.functional.gelu(features) * 10.0 ** (seed % 5 - 2)


def one_hot_channels(C: int, H=4, W=4) -> torch.Tensor:
    features = torch.zeros(1, C, H, W)
    for i in range(C):
        features[0, i].view(-1)[i] = 1.0
    return features


@pytest.mark.parametrize("seed", range(6))
def test_distance_matches_float64_reference(seed):
    features = random_features(seed)
    features[0, :40] = 0.0  # dead channels in one image
    features[1, 3] *= 1e-9  # a channel far below the dead threshold
    features[2] = 0.0  # an image whose channels are all dead

    fast = cosine_distance(features)
    reference = cosine_distance_reference(features)

    assert fast.shape == (4,)
    assert torch.allclose(fast, reference, rtol=0, atol=TOLERANCE), (fast, reference)


def test_reference_equals_pairwise_definition():
    features = random_features(1, B=1, C=6, H=3, W=3)
    x = features[0].double().reshape(6, -1)

    total = 0.0
    for i in range(6):
        for j in range(6):
            cos = torch.dot(x[i], x[j]) / (x[i].norm() * x[j].norm())
            total += (1 - cos) / 2
    expected = total / 36

    assert abs(cosine_distance_reference(features).item() - expected.item()) < 1e-12


def test_identical_channels_distance_zero():
    base = torch.rand(2, 1, 6, 6) + 0.1
    features = base.expand(2, 32, 6, 6) * torch.linspace(0.5, 3.0, 32).view(1, 32, 1, 1)

    distance = cosine_distance(features)

    assert torch.allclose(distance, torch.zeros(2, dtype=torch.float64), atol=TOLERANCE)


@pytest.mark.parametrize("C", [2, 8, 16])
def test_orthogonal_one_hot_channels(C):
    distance = cosine_distance(one_hot_channels(C))

    assert abs(distance.item() - 0.5 * (1 - 1 / C)) < TOLERANCE


def test_dead_channels_left_out_of_count():
    live = one_hot_channels(8)
    features = torch.cat([live, torch.zeros(1, 8, 4, 4)], dim=1)  # 8 live, 8 dead

    distance, dead_fraction = cosine_distance_and_dead_fraction(features)

    assert abs(distance.item() - 0.5 * (1 - 1 / 8)) < TOLERANCE
    assert dead_fraction.item() == 0.5


def test_dead_threshold_is_relative_to_largest_norm():
    features = one_hot_channels(4)
    features[0, 0] *= 1000.0
    features[0, 1] *= 1000.0 * DEAD_CHANNEL_RTOL * 0.5  # below the threshold: dead
    features[0, 2] *= 1000.0 * DEAD_CHANNEL_RTOL * 2.0  # above the threshold: live

    distance, dead_fraction = cosine_distance_and_dead_fraction(features)

    assert dead_fraction.item() == 0.25
    assert abs(distance.item() - 0.5 * (1 - 1 / 3)) < TOLERANCE


def test_all_dead_image_is_fully_collapsed():
    features = torch.cat([torch.zeros(1, 8, 4, 4), one_hot_channels(8)])

    distance, dead_fraction = cosine_distance_and_dead_fraction(features)

    assert distance[0].item() == 0.0
    assert dead_fraction[0].item() == 1.0
    assert abs(distance[1].item() - 0.4375) < TOLERANCE
    assert dead_fraction[1].item() == 0.0


def test_distance_is_per_image_not_pooled():
    # Each image has identical channels, but the two images point in different directions.
    first = one_hot_channels(2)[:, :1].expand(1, 16, 4, 4)
    second = one_hot_channels(2)[:, 1:].expand(1, 16, 4, 4)
    features = torch.cat([first, second])

    distance = cosine_distance(features)

    assert distance.tolist() == pytest.approx([0.0, 0.0], abs=TOLERANCE)


def test_distance_rejects_non_finite_features():
    features = random_features(0)
    features[0, 0, 0, 0] = float("nan")

    with pytest.raises(FeatureError, match="NaN or infinite"):
        cosine_distance(features)


@pytest.mark.parametrize("model_name, input_size, num_layers, hooked", [
    ("convnext_atto", 64, 12, "act"),
    ("convnextv2_atto", 64, 12, "grn"),
    ("convnext_tiny", 32, 18, "act"),
])
def test_hooks_cover_every_block(model_name, input_size, num_layers, hooked):
    encoder = create_encoder(model_name)
    images = torch.randn(2, 3, input_size, input_size)

    layers = find_feature_layers(encoder)
    features = extract_features(encoder, images)

    assert len(layers) == num_layers
    assert sorted(features) == list(range(num_layers))
    assert layers[0].normalized_layer == 0.0
    assert layers[-1].normalized_layer == 1.0
    for layer in layers:
        assert layer.module_name.endswith(f".mlp.{hooked}")
        dim = encoder.stages[layer.stage].blocks[layer.block].conv_dw.in_channels
        side = input_size // 4 // 2 ** layer.stage
        assert features[layer.layer].shape == (2, 4 * dim, side, side)
        assert features[layer.layer].dtype == torch.float32


def test_linear_mlp_features_are_channels_first():
    torch.manual_seed(0)
    encoder = create_encoder("convnext_tiny").eval()
    images = torch.randn(2, 3, 32, 32)
    block = encoder.stages[0].blocks[0]

    features = extract_features(encoder, images, [0])[0]
    with torch.no_grad():
        x = block.conv_dw(encoder.stem(images)).permute(0, 2, 3, 1)  # (B, H, W, C)
        expected = block.mlp.act(block.mlp.fc1(block.norm(x))).permute(0, 3, 1, 2)

    assert not layers_are_channels_first(encoder)
    assert torch.allclose(features, expected, atol=1e-6)


def layers_are_channels_first(encoder) -> bool:
    return not any(layer.channels_last for layer in find_feature_layers(encoder))


def test_v2_features_come_after_grn():
    torch.manual_seed(0)
    encoder = create_encoder("convnextv2_atto").eval()
    block = encoder.stages[0].blocks[0]
    with torch.no_grad():
        block.mlp.grn.weight.fill_(0.5)
        block.mlp.grn.bias.fill_(0.25)
    images = torch.randn(2, 3, 64, 64)

    features = extract_features(encoder, images, [0])[0]
    with torch.no_grad():
        hidden = block.mlp.act(block.mlp.fc1(block.norm(block.conv_dw(encoder.stem(images)))))
        expected = block.mlp.grn(hidden)

    assert layers_are_channels_first(encoder)
    assert torch.allclose(features, expected, atol=1e-6)
    assert not torch.allclose(features, hidden, atol=1e-3)


def test_layer_distances_independent_of_batch_size():
    torch.manual_seed(0)
    encoder = create_encoder("convnextv2_atto").train()
    images = torch.randn(5, 3, 64, 64)

    in_batches_of_two = layer_distances(encoder, images, batch_size=2)
    in_one_batch = layer_distances(encoder, images, batch_size=5)

    assert len(in_batches_of_two) == 12
    assert [r.layer for r in in_batches_of_two] == list(range(12))
    assert in_batches_of_two[0].num_images == 5
    # The encoder runs in float32, and oneDNN may pick other convolution kernels for another
    # batch size (seen: 1e-9 apart on an AMD EPYC). Pooling images across a batch would move
    # the distance by far more than 1e-6.
    for a, b in zip(in_batches_of_two, in_one_batch):
        assert a.distance == pytest.approx(b.distance, abs=1e-6)
        assert 0.0 <= a.distance <= 1.0
    assert encoder.training, "layer_distances must restore the training flag"


def test_layer_distances_average_per_image():
    torch.manual_seed(0)
    encoder = create_encoder("convnext_atto")
    images = torch.randn(3, 3, 64, 64)

    records = layer_distances(encoder, images, batch_size=3)
    features = extract_features(encoder, images, [4])[4]

    expected = cosine_distance_reference(features).mean().item()
    assert records[4].distance == pytest.approx(expected, abs=TOLERANCE)


def test_extract_features_rejects_unknown_layer():
    encoder = create_encoder("convnext_atto")

    with pytest.raises(FeatureError, match="layers 0..11"):
        extract_features(encoder, torch.randn(1, 3, 64, 64), [12])
