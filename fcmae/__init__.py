"""FCMAE pretraining of ConvNeXt V1/V2 and the feature-collapse metric (no cluster code)."""

from .config import ConfigError, PretrainConfig
from .models import FCMAE, build_fcmae
from .registry import MODEL_NAMES, create_encoder, model_version

__all__ = ["ConfigError", "FCMAE", "MODEL_NAMES", "PretrainConfig", "build_fcmae", "create_encoder",
           "model_version"]
