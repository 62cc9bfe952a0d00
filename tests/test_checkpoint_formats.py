"""Loading of official ConvNeXt / ConvNeXt-V2 checkpoint layouts, built here from timm models.

Each test builds a timm model with random weights, rewrites its state dict into an official
layout with the helpers below (written from the official model definitions: downsample_layers,
stages.S.B.{dwconv,norm,pwconv1,grn,pwconv2}, norm, head), saves it with torch.save and
loads it back through the analysis loader or `python -m analysis cosine FILE`.
"""

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from analysis.loading import LoadError, load_encoder

REPO_ROOT = Path(__file__).resolve().parents[1]
DECODER_DIM = 16


def random_timm_model(model_name: str, seed: int, num_classes: int = 10) -> torch.nn.Module:
    """A timm model with a classifier and weights away from the initialization (GRN included)."""
    torch.manual_seed(seed)
    model = timm.create_model(model_name, num_classes=num_classes)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model


def encoder_reference(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The timm encoder state dict (num_classes=0) that loading the model's weights must give."""
    return {key: value for key, value in model.state_dict().items() if not key.startswith("head.fc.")}


def timm_to_official(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rewrite a timm ConvNeXt state dict in the dense official layout (Linear pwconv, 4-D GRN)."""
    official = {}
    for key, value in state_dict.items():
        if key.startswith("stem."):
            official[key.replace("stem.", "downsample_layers.0.")] = value
            continue
        if match := re.match(r"stages\.(\d+)\.downsample\.(\d)\.(\w+)$", key):
            stage, index, name = match.groups()
            official[f"downsample_layers.{stage}.{index}.{name}"] = value
            continue
        if match := re.match(r"stages\.(\d+)\.blocks\.(\d+)\.(.+)$", key):
            stage, block, rest = match.groups()
            name, value = official_block_entry(rest, value)
            official[f"stages.{stage}.{block}.{name}"] = value
            continue
        if key.startswith("head.norm."):
            official[key.replace("head.norm.", "norm.")] = value
        elif key.startswith("head.fc."):
            official[key.replace("head.fc.", "head.")] = value
        else:
            raise AssertionError(f"unexpected timm key {key}")
    return official


def official_block_entry(rest: str, value: torch.Tensor) -> tuple[str, torch.Tensor]:
    renames = {"conv_dw": "dwconv", "norm": "norm", "mlp.fc1": "pwconv1", "mlp.fc2": "pwconv2"}
    grn_names = {"weight": "gamma", "bias": "beta"}
    module, _, parameter = rest.rpartition(".")
    if rest == "gamma":
        return "gamma", value
    if module == "mlp.grn":
        return "grn." + grn_names[parameter], value.reshape(1, 1, 1, -1)
    if module in ("mlp.fc1", "mlp.fc2") and parameter == "weight":
        value = value.reshape(value.shape[0], value.shape[1])  # 1x1 conv or Linear -> Linear
    return f"{renames[module]}.{parameter}", value


def decoder_entries(prefix: str = "") -> dict[str, torch.Tensor]:
    """Decoder keys of an FCMAE checkpoint, which the loader must drop."""
    return {f"{prefix}proj.weight": torch.randn(DECODER_DIM, 320, 1, 1),
            f"{prefix}proj.bias": torch.randn(DECODER_DIM),
            f"{prefix}decoder.0.dwconv.weight": torch.randn(DECODER_DIM, 1, 7, 7),
            f"{prefix}decoder.0.grn.gamma": torch.randn(1, 1, 1, 4 * DECODER_DIM),
            f"{prefix}pred.weight": torch.randn(32 * 32 * 3, DECODER_DIM, 1, 1),
            f"{prefix}mask_token": torch.randn(1, DECODER_DIM, 1, 1)}


def fcmae_encoder_only(official: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The released FCMAE layout: the encoder without norm and head."""
    return {key: value for key, value in official.items() if not key.startswith(("norm.", "head."))}


def dense_to_sparse(official: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rewrite the dense official encoder in the MinkowskiEngine layout of convnextv2_sparse.py.

    The stem stays dense. LayerNorms and Linears get `.ln` / `.linear`, convolutions become
    `kernel` tensors indexed by w * k + h, biases and GRN parameters become (1, C).
    """
    sparse = {}
    for key, value in official.items():
        if key.startswith("downsample_layers.0."):
            sparse[key] = value
        elif re.match(r"downsample_layers\.\d\.0\.", key) or re.search(r"\.norm\.(weight|bias)$", key):
            sparse[re.sub(r"\.(weight|bias)$", r".ln.\1", key)] = value
        elif re.search(r"\.pwconv\d\.weight$", key):
            sparse[key.replace(".weight", ".linear.weight")] = value
        elif re.search(r"\.pwconv\d\.bias$", key):
            sparse[key.replace(".bias", ".linear.bias")] = value
        elif key.endswith(".weight") and value.ndim == 4:
            sparse[key.replace(".weight", ".kernel")] = conv_to_kernel(value)
        elif key.endswith(".bias") or ".grn." in key:
            sparse[key] = value.reshape(1, -1)
        else:
            sparse[key] = value
    return sparse


def conv_to_kernel(weight: torch.Tensor) -> torch.Tensor:
    out_channels, in_channels, k, _ = weight.shape
    if in_channels == 1:  # depthwise (C, 1, k, k) -> (k*k, C)
        return weight[:, 0].permute(2, 1, 0).reshape(k * k, out_channels)
    return weight.permute(3, 2, 1, 0).reshape(k * k, in_channels, out_channels)


def assert_same_weights(loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(loaded) == sorted(expected)
    for key, value in expected.items():
        assert loaded[key].shape == value.shape, key
        assert torch.equal(loaded[key], value), key


def save(tmp_path: Path, name: str, content: dict) -> Path:
    path = tmp_path / name
    torch.save(content, path)
    return path


# Conversion of each layout, small (1x1 conv MLP) and large (Linear MLP) sizes.

@pytest.mark.parametrize("model_name", ["convnextv2_atto", "convnext_atto", "convnextv2_tiny", "convnext_tiny"])
def test_official_dense_checkpoint_loads_exactly(tmp_path, model_name):
    model = random_timm_model(model_name, seed=1)
    path = save(tmp_path, "official.pt", {"model": timm_to_official(model.state_dict())})

    loaded = load_encoder(path)

    assert loaded.model_name == model_name
    assert_same_weights(loaded.encoder.state_dict(), encoder_reference(model))


def test_official_dense_state_dict_without_wrapper(tmp_path):
    model = random_timm_model("convnextv2_femto", seed=2)
    path = save(tmp_path, "bare.pth", timm_to_official(model.state_dict()))

    loaded = load_encoder(path)

    assert loaded.model_name == "convnextv2_femto"
    assert_same_weights(loaded.encoder.state_dict(), encoder_reference(model))


def test_official_v1_layer_scale_maps_to_gamma(tmp_path):
    model = random_timm_model("convnext_atto", seed=3)
    official = timm_to_official(model.state_dict())
    assert official["stages.2.4.gamma"].shape == (160,)
    path = save(tmp_path, "v1.pt", {"model": official})

    loaded = load_encoder(path)

    assert torch.equal(loaded.encoder.stages[2].blocks[4].gamma, official["stages.2.4.gamma"])


@pytest.mark.parametrize("encoder_prefix", ["", "encoder."])
def test_fcmae_encoder_only_checkpoint(tmp_path, caplog, encoder_prefix):
    model = random_timm_model("convnextv2_atto", seed=4)
    encoder_state = fcmae_encoder_only(timm_to_official(model.state_dict()))
    content = {f"{encoder_prefix}{key}": value for key, value in encoder_state.items()}
    content.update(decoder_entries(encoder_prefix))
    path = save(tmp_path, "fcmae.pt", {"model": content, "epoch": 799})

    with caplog.at_level("INFO"):
        loaded = load_encoder(path)

    expected = encoder_reference(model)
    expected["head.norm.weight"] = torch.ones(320)
    expected["head.norm.bias"] = torch.zeros(320)
    assert loaded.model_name == "convnextv2_atto"
    assert_same_weights(loaded.encoder.state_dict(), expected)
    assert "no final norm" in caplog.text


@pytest.mark.parametrize("model_name", ["convnextv2_atto", "convnextv2_tiny"])
def test_fcmae_sparse_layout_checkpoint(tmp_path, model_name):
    model = random_timm_model(model_name, seed=5)
    sparse = dense_to_sparse(fcmae_encoder_only(timm_to_official(model.state_dict())))
    assert sparse["stages.0.0.dwconv.kernel"].ndim == 2
    content = {f"encoder.{key}": value for key, value in sparse.items()}
    content.update(decoder_entries())
    path = save(tmp_path, "fcmae_sparse.pt", {"model": content})

    loaded = load_encoder(path)

    expected = encoder_reference(model)
    loaded_state = loaded.encoder.state_dict()
    del expected["head.norm.weight"], expected["head.norm.bias"]
    del loaded_state["head.norm.weight"], loaded_state["head.norm.bias"]
    assert_same_weights(loaded_state, expected)


def test_sparse_kernel_offset_order(tmp_path):
    model = random_timm_model("convnextv2_atto", seed=6)
    official = fcmae_encoder_only(timm_to_official(model.state_dict()))
    sparse = dense_to_sparse(official)
    kernel = torch.zeros_like(sparse["stages.0.0.dwconv.kernel"])  # (49, 40)
    kernel[1 * 7 + 0, 3] = 1.0  # column w = 1, row h = 0 of channel 3
    sparse["stages.0.0.dwconv.kernel"] = kernel
    path = save(tmp_path, "offset.pt", {"model": sparse})

    weight = load_encoder(path).encoder.stages[0].blocks[0].conv_dw.weight  # (40, 1, 7, 7)

    assert weight[3, 0, 0, 1] == 1.0
    assert weight.abs().sum() == 1.0


# Rejected inputs.

def test_official_layout_with_unknown_keys_names_them(tmp_path):
    official = timm_to_official(random_timm_model("convnextv2_atto", seed=7).state_dict())
    official["stages.0.0.attn.qkv.weight"] = torch.zeros(3, 3)
    official["extra_scale"] = torch.zeros(1)
    path = save(tmp_path, "unknown_keys.pt", {"model": official})

    with pytest.raises(LoadError) as error:
        load_encoder(path)

    message = str(error.value)
    assert "2 keys" in message
    assert "stages.0.0.attn.qkv.weight" in message
    assert "extra_scale" in message


def test_unknown_layout_names_both_stem_keys(tmp_path):
    path = save(tmp_path, "vit.pt", {"model": {"patch_embed.proj.weight": torch.zeros(8, 3, 16, 16),
                                               "blocks.0.attn.qkv.weight": torch.zeros(24, 8)}})

    with pytest.raises(LoadError) as error:
        load_encoder(path)

    message = str(error.value)
    assert "stem.0.weight" in message
    assert "downsample_layers.0.0.weight" in message
    assert "patch_embed.proj.weight" in message


def test_official_layout_of_wrong_depth_fails_clearly(tmp_path):
    official = timm_to_official(random_timm_model("convnextv2_atto", seed=8).state_dict())
    official = {key: value for key, value in official.items() if not key.startswith("stages.2.5.")}
    path = save(tmp_path, "five_blocks.pt", official)

    with pytest.raises(LoadError, match="cannot infer the model.*blocks per stage \\[2, 2, 5, 2\\]"):
        load_encoder(path)


# Command line: the same weights in every layout give the same distances.

def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="2")
    return subprocess.run([sys.executable, "-m", "analysis", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=180)


def test_cli_cosine_reads_every_layout(tmp_path):
    model = random_timm_model("convnextv2_atto", seed=9)
    official = timm_to_official(model.state_dict())
    encoder_only = fcmae_encoder_only(official)
    fcmae = {**{f"encoder.{key}": value for key, value in dense_to_sparse(encoder_only).items()},
             **decoder_entries()}
    paths = [save(tmp_path, "timm.pth", model.state_dict()),
             save(tmp_path, "finetuned.pt", {"model": official}),
             save(tmp_path, "pt_only.pt", {"model": {**encoder_only, **decoder_entries()}}),
             save(tmp_path, "sparse.pt", {"model": fcmae})]

    result = run_cli("cosine", ",".join(str(path) for path in paths), "--input_size", "64",
                     "--max_images", "2", "--output_dir", str(tmp_path / "out"))

    assert result.returncode == 0, result.stderr
    with (tmp_path / "out" / "cosine_distance.csv").open(newline="") as file:
        rows = list(csv.DictReader(file))
    by_run = {}
    for row in rows:
        by_run.setdefault(row["run"], []).append(float(row["distance"]))
    assert sorted(by_run) == ["finetuned", "pt_only", "sparse", "timm"]
    assert {row["model"] for row in rows} == {"convnextv2_atto"}
    for run in ("finetuned", "pt_only", "sparse"):
        assert by_run[run] == pytest.approx(by_run["timm"], abs=1e-6), run
