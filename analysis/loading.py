"""Load a pretrained ConvNeXt encoder from a run folder, a timm state dict or a checkpoint.

Accepted paths:
- a run folder: RUN/encoder.pth when it exists, else RUN/checkpoints/last.pt;
- an encoder state dict in timm key format (`stem.0.weight`, `stages.0.blocks.0...`);
- a training checkpoint: a dict with "model" (the FCMAE state dict, encoder keys prefixed
  "encoder.") and "config";
- an official ConvNeXt or ConvNeXt-V2 checkpoint (fine-tuned, or FCMAE encoder-only), a
  state dict or a dict with "model", converted to timm's keys by analysis.formats.

The model name comes from the checkpoint's "config", else from config.json in the run
folder, else it is inferred from the state dict's shapes. Every file is read with
`torch.load(..., weights_only=True)`, so files that need arbitrary pickled objects are
rejected.
"""

from __future__ import annotations

import functools
import json
import logging
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from analysis import AnalysisError
from analysis.formats import TIMM_LAYOUT, UnknownLayoutError, detect_layout, official_to_timm
from fcmae.registry import MODEL_NAMES, check_model_name, create_encoder, model_version

logger = logging.getLogger(__name__)

ENCODER_FILE = "encoder.pth"
CHECKPOINT_FILE = Path("checkpoints") / "last.pt"
CONFIG_FILE = "config.json"
ENCODER_PREFIX = "encoder."
# Classifier keys of a timm model built with a head; the encoder (num_classes=0) has none.
CLASSIFIER_PREFIX = "head.fc."
# The LayerNorm that timm applies after global pooling. FCMAE encoder-only checkpoints lack it.
HEAD_NORM_KEYS = ("head.norm.weight", "head.norm.bias")
# Top-level checkpoint entries that may contain the state dict, in the order they are tried.
WRAPPER_KEYS = ("model", "state_dict")

_BLOCK_KEY = re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.")


class LoadError(AnalysisError):
    """Raised when a path cannot be turned into an encoder."""


@dataclass
class LoadedEncoder:
    """An encoder with the facts the analysis reports about it."""

    encoder: nn.Module
    model_name: str
    version: str
    path: Path
    weights_file: Path
    config: dict | None

    @property
    def input_size(self) -> int | None:
        """The training input size from the run's config, when known."""
        if self.config and "input_size" in self.config:
            return int(self.config["input_size"])
        return None


def load_encoder(path: str | Path) -> LoadedEncoder:
    """Build the encoder stored at `path` and load its weights strictly, in eval mode on the CPU."""
    path = Path(path)
    if not path.exists():
        raise LoadError(f"path {str(path)!r} does not exist; pass a run folder, an encoder state dict "
                        f"or a checkpoint file")

    weights_file = find_weights_file(path)
    state_dict, checkpoint_config = read_encoder_state_dict(weights_file)
    config = checkpoint_config if checkpoint_config is not None else read_run_config(weights_file)
    model_name = resolve_model_name(state_dict, config, weights_file)

    encoder = build_and_load(model_name, state_dict, weights_file)
    logger.info("loaded %s from %s", model_name, weights_file)
    return LoadedEncoder(encoder=encoder, model_name=model_name, version=model_version(model_name),
                         path=path, weights_file=weights_file, config=config)


def find_weights_file(path: Path) -> Path:
    """Return the weights file for `path`: the file itself, or the preferred file of a run folder."""
    if path.is_file():
        return path

    for candidate in (path / ENCODER_FILE, path / CHECKPOINT_FILE):
        if candidate.is_file():
            return candidate
    raise LoadError(f"run folder {str(path)!r} contains neither {ENCODER_FILE} nor {CHECKPOINT_FILE}; "
                    f"pass a finished run folder or the weights file itself")


def read_weights(path: Path) -> object:
    """Load a file with torch.load(weights_only=True) on the CPU, turning failures into LoadError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise LoadError(f"{path} cannot be loaded with weights_only=True: {_unpickler_reason(error)}; "
                        f"re-save it as a dict of tensors and plain Python values (no argparse.Namespace "
                        f"or other objects)") from error
    except (RuntimeError, EOFError, OSError, KeyError, ValueError) as error:
        raise LoadError(f"{path} is not a readable PyTorch file ({type(error).__name__}: {error}); the file "
                        f"may be truncated or not written by torch.save") from error


def _unpickler_reason(error: pickle.UnpicklingError) -> str:
    # torch wraps the reason in advice about weights_only=False; keep only the reason line.
    for line in str(error).splitlines():
        if "WeightsUnpickler error:" in line:
            reason = line.split("WeightsUnpickler error:", 1)[1].strip()
            if reason:
                return reason.split(". Please use")[0]
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def read_encoder_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Return (encoder state dict in timm key format, checkpoint config or None) from a weights file."""
    content = read_weights(path)
    if not isinstance(content, dict):
        raise LoadError(f"{path} contains a {type(content).__name__}; expected a state dict or a checkpoint dict")

    state_dict, config = unwrap_checkpoint(content, path)
    return to_timm_layout(state_dict, path), config


def unwrap_checkpoint(content: dict, path: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Return (state dict, config or None): the dict itself, or its "model" (or "state_dict") entry."""
    if _is_state_dict(content):
        return content, None

    for entry in WRAPPER_KEYS:
        model = content.get(entry)
        if isinstance(model, dict) and _is_state_dict(model):
            config = content.get("config")
            if config is not None and not isinstance(config, dict):
                raise LoadError(f"{path}: checkpoint 'config' is a {type(config).__name__}; expected a plain dict")
            return model, config

    raise LoadError(f"{path} is neither an encoder state dict nor a checkpoint with a 'model' state dict; "
                    f"its top-level keys are {_preview_keys(content)}")


def to_timm_layout(state_dict: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Keep the encoder part of a state dict and convert it to timm's key names.

    Accepts timm keys and the official ConvNeXt / ConvNeXt-V2 layouts (see analysis.formats),
    each optionally prefixed "encoder." as in FCMAE checkpoints, whose other keys (decoder,
    mask token) are dropped. The classifier is dropped in every layout.
    """
    if _has_encoder_prefix(state_dict):
        state_dict = _strip_encoder_prefix(state_dict, path)

    try:
        layout = detect_layout(state_dict)
        if layout == TIMM_LAYOUT:
            return _without_classifier(state_dict, path)
        conversion = official_to_timm(state_dict)
    except UnknownLayoutError as error:
        raise LoadError(f"{path}: {error}") from error

    logger.info("converted %d keys of %s from the %s layout to timm's", len(conversion.state_dict), path, layout)
    if conversion.dropped_classifier:
        logger.info("ignoring the classifier weights %s in %s", ", ".join(conversion.dropped_classifier), path)
    if conversion.dropped_decoder:
        logger.info("ignoring %d FCMAE decoder keys in %s", len(conversion.dropped_decoder), path)
    return conversion.state_dict


def read_run_config(weights_file: Path) -> dict | None:
    """Return config.json of the run folder that contains `weights_file`, or None if there is none.

    The run folder is the file's folder, or its parent for a file inside RUN/checkpoints.
    """
    folders = [weights_file.parent]
    if weights_file.parent.name == CHECKPOINT_FILE.parent.name:
        folders.append(weights_file.parent.parent)

    for folder in folders:
        config_path = folder / CONFIG_FILE
        if config_path.is_file():
            try:
                return json.loads(config_path.read_text())
            except json.JSONDecodeError as error:
                raise LoadError(f"{config_path} is not valid JSON ({error}); fix or delete it") from error
    return None


def resolve_model_name(state_dict: dict[str, torch.Tensor], config: dict | None, source: Path) -> str:
    """Return the model name from the config, else inferred from the state dict's shapes."""
    if config and config.get("model"):
        model_name = str(config["model"])
        try:
            check_model_name(model_name)
        except ValueError as error:
            raise LoadError(f"config of {source} names an unknown model: {error}") from error
        return model_name

    model_name = infer_model_name(state_dict)
    logger.info("inferred model %s from the shapes in %s", model_name, source)
    return model_name


def infer_model_name(state_dict: dict[str, torch.Tensor]) -> str:
    """Infer the model name from the stem width, the blocks per stage and the presence of GRN."""
    signature = state_dict_signature(state_dict)
    stem_width, depths, has_grn = signature
    version = "v2" if has_grn else "v1"
    matches = [name for name in MODEL_NAMES if model_version(name) == version and model_signature(name) == signature]
    if len(matches) == 1:
        return matches[0]

    raise LoadError(f"cannot infer the model from the state dict (stem width {stem_width}, blocks per stage "
                    f"{list(depths)}, GRN {'present' if has_grn else 'absent'}): "
                    f"{'no' if not matches else 'more than one'} model of {', '.join(MODEL_NAMES)} matches; "
                    f"add a config.json with a 'model' entry next to the weights")


def state_dict_signature(state_dict: dict[str, torch.Tensor]) -> tuple[int, tuple[int, ...], bool]:
    """Return (stem width, blocks per stage, has GRN) of a timm ConvNeXt state dict."""
    stem = state_dict.get("stem.0.weight")
    if stem is None:
        raise LoadError(f"state dict has no 'stem.0.weight', so it is not a timm ConvNeXt encoder; "
                        f"its keys start with {_preview_keys(state_dict)}")

    blocks_per_stage: dict[int, set[int]] = {}
    for key in state_dict:
        match = _BLOCK_KEY.match(key)
        if match:
            blocks_per_stage.setdefault(int(match.group(1)), set()).add(int(match.group(2)))
    depths = tuple(len(blocks_per_stage.get(stage, ())) for stage in range(max(blocks_per_stage, default=-1) + 1))
    has_grn = any(".mlp.grn." in key for key in state_dict)
    return int(stem.shape[0]), depths, has_grn


@functools.lru_cache(maxsize=None)
def model_signature(model_name: str) -> tuple[int, tuple[int, ...], bool]:
    """Return the signature of a model in MODEL_NAMES, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = create_encoder(model_name)
    return state_dict_signature(model.state_dict())


def build_and_load(model_name: str, state_dict: dict[str, torch.Tensor], source: Path) -> nn.Module:
    """Build the encoder on the meta device and load `state_dict` into it strictly, in eval mode.

    Building on the meta device skips timm's random initialization, which the loaded
    weights replace anyway. Floating-point tensors are loaded as float32.
    """
    with torch.device("meta"):
        encoder = create_encoder(model_name)
    state_dict = {key: value.float() if value.is_floating_point() else value for key, value in state_dict.items()}
    state_dict = _with_identity_head_norm(encoder, state_dict, source)
    load_strict(encoder, state_dict, model_name, source)

    left_on_meta = [name for name, tensor in [*encoder.named_parameters(), *encoder.named_buffers()] if tensor.is_meta]
    if left_on_meta:
        raise LoadError(f"{model_name} has tensors that the state dict does not set: {_preview(left_on_meta)}")
    return encoder.eval()


def load_strict(encoder: nn.Module, state_dict: dict[str, torch.Tensor], model_name: str, source: Path) -> None:
    """Load `state_dict` with strict=True, raising LoadError that names missing and unexpected keys."""
    state_dict = _match_singleton_shapes(encoder, state_dict)
    expected = encoder.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise LoadError(f"{source} does not match {model_name}: missing keys {_preview(missing)}, "
                        f"unexpected keys {_preview(unexpected)}; check the model name in the run's config")

    wrong_shapes = [f"{key} {tuple(state_dict[key].shape)} vs {tuple(value.shape)}"
                    for key, value in expected.items() if state_dict[key].shape != value.shape]
    if wrong_shapes:
        raise LoadError(f"{source} does not match {model_name}: shape mismatches (file vs model) "
                        f"{_preview(wrong_shapes)}; check the model name in the run's config")

    encoder.load_state_dict(state_dict, strict=True, assign=True)


def _with_identity_head_norm(encoder: nn.Module, state_dict: dict[str, torch.Tensor],
                             source: Path) -> dict[str, torch.Tensor]:
    # FCMAE encoder-only checkpoints have no norm after pooling. No block feature passes through
    # it, so an identity LayerNorm (weight 1, bias 0) is loaded in its place and the load stays strict.
    if any(key in state_dict for key in HEAD_NORM_KEYS):
        return state_dict
    expected = encoder.state_dict()
    if not all(key in expected for key in HEAD_NORM_KEYS):
        return state_dict

    width = expected[HEAD_NORM_KEYS[0]].shape
    logger.info("%s has no final norm (an encoder-only checkpoint); head.norm is set to the identity, which "
                "the per-block features do not pass through", source)
    return {**state_dict, HEAD_NORM_KEYS[0]: torch.ones(width), HEAD_NORM_KEYS[1]: torch.zeros(width)}


def _match_singleton_shapes(encoder: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # A Linear weight (4C, C) and a 1x1 conv weight (4C, C, 1, 1) contain the same values,
    # and so do GRN parameters stored as (1, 1, 1, 4C) and (4C,). Such tensors are reshaped
    # to the model's layout, so weights saved from either MLP form load into both.
    expected = encoder.state_dict()
    reshaped = dict(state_dict)
    for key, value in state_dict.items():
        target = expected.get(key)
        if target is None or value.shape == target.shape or value.numel() != target.numel():
            continue
        if _squeeze_shape(value.shape) == _squeeze_shape(target.shape):
            reshaped[key] = value.reshape(target.shape)
    return reshaped


def _squeeze_shape(shape: torch.Size) -> tuple[int, ...]:
    return tuple(size for size in shape if size != 1)


def _is_state_dict(content: dict) -> bool:
    return bool(content) and all(isinstance(key, str) for key in content) and \
        all(isinstance(value, torch.Tensor) for value in content.values())


def _has_encoder_prefix(state_dict: dict) -> bool:
    return any(key.startswith(ENCODER_PREFIX) for key in state_dict)


def _strip_encoder_prefix(state_dict: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    # The FCMAE state dict also contains decoder keys and the mask token, which are dropped.
    encoder_state = {key[len(ENCODER_PREFIX):]: value for key, value in state_dict.items()
                     if key.startswith(ENCODER_PREFIX)}
    logger.debug("kept %d encoder keys of %d in %s", len(encoder_state), len(state_dict), path)
    return encoder_state


def _without_classifier(state_dict: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    dropped = [key for key in state_dict if key.startswith(CLASSIFIER_PREFIX)]
    if dropped:
        logger.info("ignoring the classifier weights %s in %s", ", ".join(dropped), path)
    return {key: value for key, value in state_dict.items() if not key.startswith(CLASSIFIER_PREFIX)}


def _preview(keys: list[str], limit: int = 8) -> str:
    if not keys:
        return "none"
    listed = ", ".join(keys[:limit])
    return f"[{listed}{', ...' if len(keys) > limit else ''}] ({len(keys)} in all)"


def _preview_keys(content: dict) -> str:
    return _preview([str(key) for key in content])

