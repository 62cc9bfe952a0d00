"""Model contracts: timm compatibility, mask semantics, GRN statistics and the loss."""

from __future__ import annotations

import pytest
import timm
import torch

from fcmae.models import FCMAE, MaskedConvNeXtEncoder, build_fcmae, masked_grn, upsample_mask
from fcmae.registry import MODEL_NAMES, UnknownModelError, create_encoder

ATTO = ("convnext_atto", "convnextv2_atto")


# Every registered size fits: the largest, convnextv2_huge, needs about 5 GB for both copies.
@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_encoder_loads_strictly_into_timm(model_name):
    encoder = MaskedConvNeXtEncoder(model_name)
    state = encoder.timm_state_dict()
    reference = timm.create_model(model_name, pretrained=False, num_classes=0)
    result = reference.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    key = next(k for k in state if k.endswith("conv_dw.weight"))
    assert torch.equal(reference.state_dict()[key], state[key])


def test_unknown_model_lists_valid_names():
    with pytest.raises(UnknownModelError, match="convnextv2_atto"):
        create_encoder("convnextv3_atto")


@pytest.mark.parametrize("model_name", ATTO)
def test_init_is_truncated_normal_002(model_name):
    model = build_fcmae(model_name, input_size=64)
    for name, param in model.named_parameters():
        if param.ndim == 4 and param.shape[-1] > 1:
            assert param.std().item() < 0.05, f"{name} has std {param.std().item()}"


def test_v1_has_layerscale_and_no_grn():
    encoder = MaskedConvNeXtEncoder("convnext_atto")
    block = encoder.stages[0].blocks[0]
    assert torch.allclose(block.gamma, torch.full_like(block.gamma, 1e-6))
    assert not hasattr(block.mlp, "grn")


def test_v2_has_grn_and_no_layerscale():
    encoder = MaskedConvNeXtEncoder("convnextv2_atto")
    block = encoder.stages[0].blocks[0]
    assert block.gamma is None
    assert block.mlp.grn.weight.shape == (4 * 40,)


@pytest.mark.parametrize("impl", ["dense", "sparse"])
@pytest.mark.parametrize("model_name", ATTO + ("convnextv2_tiny",))
def test_removed_positions_exactly_zero_after_every_layer(model_name, impl):
    torch.manual_seed(0)
    model = build_fcmae(model_name, input_size=128, mask_ratio=0.6, encoder_impl=impl)
    with torch.no_grad():
        _perturb(model)
    images = torch.randn(2, 3, 128, 128)
    mask = model.random_mask(2, images.device)
    trace = []
    with torch.no_grad():
        model.encoder(images, mask, trace=trace)

    stages = model.encoder.stages
    assert len(trace) == 1 + 3 + sum(len(s.blocks) for s in stages)
    for name, x, visible in trace:
        removed_values = x * (1 - visible)
        assert torch.count_nonzero(removed_values) == 0, f"{name} leaks into removed positions"
        assert torch.count_nonzero(x * visible) > 0, f"{name} is zero at visible positions"


def _perturb(model: torch.nn.Module) -> None:
    """Give every bias, norm, GRN and LayerScale parameter non-trivial values."""
    generator = torch.Generator().manual_seed(1)
    for name, param in model.named_parameters():
        if param.ndim == 1:
            param.add_(torch.randn(param.shape, generator=generator) * 0.5)


@pytest.mark.parametrize("impl", ["dense", "sparse"])
@pytest.mark.parametrize("model_name", ATTO)
def test_encoder_ignores_removed_pixels(model_name, impl):
    model = build_fcmae(model_name, input_size=128, encoder_impl=impl).eval()
    with torch.no_grad():
        _perturb(model)
    images = torch.randn(2, 3, 128, 128)
    mask = model.random_mask(2, images.device)
    removed = 1 - upsample_mask(mask, 4, 128)
    changed = images + removed * torch.randn_like(images) * 5

    with torch.no_grad():
        a = model.encoder(images, mask)
        b = model.encoder(changed, mask)
    assert torch.equal(a, b)


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5, 0.6, 0.75, 0.9])
def test_random_mask_keeps_exact_count(ratio):
    model = build_fcmae("convnextv2_atto", input_size=224, mask_ratio=ratio)
    mask = model.random_mask(16, torch.device("cpu"))
    len_keep = int(49 * (1 - ratio))
    assert mask.shape == (16, 49)
    assert torch.all((1 - mask).sum(dim=1) == len_keep)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}


def test_masked_grn_uses_visible_positions_of_each_image():
    torch.manual_seed(0)
    B, C, H, W = 3, 8, 8, 8
    grn = timm.layers.mlp.GlobalResponseNormMlp(4, C, use_conv=True).grn
    with torch.no_grad():
        grn.weight.normal_()
        grn.bias.normal_()
    mask = (torch.rand(B, 4) > 0.5).float()
    mask[:, 0] = 0.0
    visible = upsample_mask(mask, 2, H)
    x = torch.randn(B, C, H, W) * visible
    out = masked_grn(grn, x, visible, channels_last=False)

    for b in range(B):
        keep = visible[b, 0].bool()
        values = x[b][:, keep].double()                       # (C, N_visible)
        gx = values.norm(dim=1)
        nx = gx / (gx.mean() + grn.eps)
        expected = values + grn.bias.double()[:, None] + grn.weight.double()[:, None] * values * nx[:, None]
        torch.testing.assert_close(out[b][:, keep].double(), expected, rtol=1e-5, atol=1e-6)
        assert torch.count_nonzero(out[b][:, ~keep]) == 0


def _loss_inputs():
    torch.manual_seed(0)
    model = build_fcmae("convnextv2_atto", input_size=64, mask_ratio=0.5)
    images = torch.randn(2, 3, 64, 64)
    mask = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]])
    prediction = torch.randn(2, 4, 32 * 32 * 3)
    return model, images, mask, prediction


def test_loss_ignores_visible_patch_targets():
    model, images, mask, prediction = _loss_inputs()
    base = model.loss(images, prediction, mask)
    changed = images.clone()
    changed[0, :, 0:32, 32:64] += 3.0        # patch 1 of image 0 is visible
    assert torch.equal(model.loss(changed, prediction, mask), base)


def test_loss_uses_removed_patch_targets():
    model, images, mask, prediction = _loss_inputs()
    base = model.loss(images, prediction, mask)
    changed = images.clone()
    changed[0, :, 0:32, 0:32] = torch.randn(3, 32, 32)    # patch 0 of image 0 is removed
    assert not torch.equal(model.loss(changed, prediction, mask), base)


def test_loss_matches_float64_reference():
    model, images, mask, prediction = _loss_inputs()
    target = model.patchify(images.double())
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    per_patch = ((prediction.double() - target) ** 2).mean(-1)
    expected = (per_patch * mask).sum() / mask.sum()
    torch.testing.assert_close(model.loss(images, prediction, mask).double(), expected, rtol=1e-5, atol=1e-6)


def test_patchify_round_trip():
    model = build_fcmae("convnext_atto", input_size=96)
    images = torch.randn(2, 3, 96, 96)
    assert torch.equal(model.unpatchify(model.patchify(images)), images)


@pytest.mark.parametrize("model_name", ATTO)
def test_forward_contract_and_gradients(model_name):
    torch.manual_seed(0)
    model = build_fcmae(model_name, input_size=64, mask_ratio=0.6)
    images = torch.randn(2, 3, 64, 64)
    loss, prediction, mask = model(images)
    loss.backward()

    assert torch.isfinite(loss)
    assert prediction.shape == (2, 4, 32 * 32 * 3)
    assert mask.shape == (2, 4)
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None, f"{name} received no gradient"
    assert not model.encoder.head.norm.weight.requires_grad


def test_in_chans_comes_from_config():
    model = FCMAE("convnextv2_atto", input_size=64, in_chans=1)
    loss, prediction, _ = model(torch.randn(2, 1, 64, 64))
    assert prediction.shape[-1] == 32 * 32 * 1
    assert torch.isfinite(loss)


@pytest.mark.parametrize("kwargs, message", [
    ({"input_size": 100}, "multiple of the patch size"),
    ({"mask_ratio": 1.0}, r"\(0, 1\)"),
    ({"mask_ratio": 0.0}, r"\(0, 1\)"),
    ({"patch_size": 16}, "must be 32"),
    ({"encoder_impl": "fast"}, "dense, sparse"),
])
def test_build_rejects_bad_geometry(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_fcmae("convnextv2_atto", **kwargs)


@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
@pytest.mark.parametrize("model_name", ATTO)
def test_sparse_encoder_matches_dense_reference(model_name, ratio):
    torch.manual_seed(0)
    dense = build_fcmae(model_name, input_size=224, mask_ratio=ratio, encoder_impl="dense")
    with torch.no_grad():
        _perturb(dense)
    sparse = build_fcmae(model_name, input_size=224, mask_ratio=ratio, encoder_impl="sparse")
    sparse.load_state_dict(dense.state_dict())
    images = torch.randn(2, 3, 224, 224)
    mask = dense.random_mask(2, images.device)

    loss_dense, _, _ = dense(images, mask)
    loss_sparse, _, _ = sparse(images, mask)
    loss_dense.backward()
    loss_sparse.backward()

    # float32 with a different summation order: 1e-5 relative on the loss and on each gradient.
    torch.testing.assert_close(loss_sparse, loss_dense, rtol=1e-5, atol=0)
    sparse_grads = dict(sparse.named_parameters())
    for name, param in dense.named_parameters():
        if param.grad is None:
            continue
        error = (sparse_grads[name].grad - param.grad).norm() / param.grad.norm().clamp_min(1e-30)
        assert error < 1e-5, f"{name}: relative gradient error {error:.2e}"
