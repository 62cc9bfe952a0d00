"""The pretraining configuration: one dataclass, validated when it is built."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from .data import SAMPLE_DATA, DataError, resolve_data
from .models import ENCODER_IMPLS, check_geometry
from .registry import ENCODER_STRIDE, MODEL_NAMES, UnknownModelError, check_model_name

CONFIG_FILE = "config.json"

# Options that may differ between an output folder's saved config and a resumed job:
# they change how the run is executed or reported, not what it computes.
RUNTIME_OPTIONS = frozenset({
    "output_dir", "num_workers", "log_every", "save_every_steps", "save_every_minutes", "keep_last",
    "recon_every", "device", "collapse_every", "collapse_data", "collapse_images", "max_bad_fraction",
})


class ConfigError(ValueError):
    """Raised for an invalid option; the message names the option, the value and the fix."""


@dataclass
class PretrainConfig:
    """Every option of an FCMAE pretraining run. Units are stated per field."""

    model: str = "convnextv2_atto"
    data: str = SAMPLE_DATA                  # image folder (flat or class folders) or 'sample'
    output_dir: str = "runs/pretrain"
    epochs: int = 800
    warmup_epochs: int = 40
    batch_size: int = 64                     # images per rank and micro-batch
    update_freq: int = 1                     # micro-batches accumulated per optimizer step
    blr: float = 1.5e-4                      # lr = blr * effective batch / 256
    lr: float | None = None                  # absolute lr; overrides blr when set
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    mask_ratio: float = 0.6
    input_size: int = 224                    # pixels, square crops
    patch_size: int = ENCODER_STRIDE         # pixels
    in_chans: int = 3
    decoder_dim: int = 512
    decoder_depth: int = 1
    encoder_impl: str = "sparse"              # sparse (visible-only) or dense (reference)
    num_workers: int = 4                     # DataLoader workers per rank
    seed: int = 0
    data_repeat: int | None = None           # times each file appears per epoch; None: 32 for sample, else 1
    max_bad_fraction: float = 0.01           # share of the image files that may fail to decode before the run stops
    bf16: bool = False                       # bfloat16 autocast
    channels_last: bool = True
    compile: bool = False                    # torch.compile the model (off: see benchmarks/README.md)
    device: str = "auto"                     # auto, cpu or cuda
    clip_grad: float | None = None
    log_every: int = 10                      # optimizer steps between progress lines
    save_every_steps: int = 0                # 0: no step-based periodic checkpoint
    save_every_minutes: float = 10.0         # wall-clock minutes between periodic checkpoints
    keep_last: int = 2                       # checkpoints kept besides last.pt
    recon_every: int = 1                     # epochs between reconstruction images in TensorBoard
    collapse_every: int = 10                 # epochs between feature cosine distance measurements (0: off)
    collapse_data: str = SAMPLE_DATA         # image folder (or 'sample') for those measurements
    collapse_images: int = 16                # at most this many images, centre-cropped, unmasked
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.betas = tuple(self.betas)

    @property
    def version(self) -> str:
        return "v2" if self.model.startswith("convnextv2_") else "v1"

    def effective_repeat(self) -> int:
        if self.data_repeat is not None:
            return self.data_repeat
        return 32 if self.data == SAMPLE_DATA else 1

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        return out

    @classmethod
    def from_dict(cls, values: dict) -> "PretrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown config option(s) {', '.join(unknown)}; valid options: {', '.join(sorted(known))}")
        return cls(**values)

    def validate(self, check_data: bool = True) -> None:
        """Raise ConfigError for the first invalid option."""
        try:
            check_model_name(self.model)
        except UnknownModelError as error:
            raise ConfigError(f"invalid --model: {error}") from None

        self._check_positive("epochs", "batch_size", "update_freq", "blr", "decoder_dim", "decoder_depth", "in_chans")
        self._check_non_negative("warmup_epochs", "num_workers", "weight_decay", "min_lr", "save_every_steps",
                                 "save_every_minutes", "seed")
        self._check_positive("log_every", "keep_last", "recon_every", "collapse_images")
        self._check_non_negative("collapse_every")
        if self.warmup_epochs > self.epochs:
            raise ConfigError(f"invalid --warmup_epochs {self.warmup_epochs}: it must not exceed --epochs "
                              f"{self.epochs}; lower it or train longer")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"invalid --lr {self.lr}: it must be positive, or left unset to use --blr")
        if self.data_repeat is not None and self.data_repeat < 1:
            raise ConfigError(f"invalid --data_repeat {self.data_repeat}: it must be at least 1")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ConfigError(f"invalid --max_bad_fraction {self.max_bad_fraction}: it must lie in [0, 1], e.g. "
                              f"0.01 to stop when more than 1% of the image files cannot be decoded")
        if self.encoder_impl not in ENCODER_IMPLS:
            raise ConfigError(f"invalid --encoder_impl {self.encoder_impl!r}; valid values: {', '.join(ENCODER_IMPLS)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"invalid --device {self.device!r}; valid values: auto, cpu, cuda")
        self._check_geometry()
        if check_data:
            self.check_data()

    def check_epoch_fills_batch(self, num_files: int, world_size: int) -> None:
        """Raise ConfigError unless an epoch holds at least one effective batch."""
        samples = num_files * self.effective_repeat()
        effective = self.batch_size * self.update_freq * world_size
        if samples < effective:
            raise ConfigError(f"--data {self.data} gives {samples} samples per epoch ({num_files} files x "
                              f"data_repeat {self.effective_repeat()}), fewer than one effective batch of "
                              f"{effective} (batch_size {self.batch_size} x update_freq {self.update_freq} x "
                              f"{world_size} ranks); lower --batch_size or --update_freq, or raise --data_repeat")

    def check_data(self) -> list[Path]:
        """Return the image paths of --data, or raise ConfigError if there are none."""
        try:
            return resolve_data(self.data)
        except DataError as error:
            raise ConfigError(f"invalid --data: {error}") from None

    def _check_geometry(self) -> None:
        if not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError(f"invalid --mask_ratio {self.mask_ratio}: it must lie in (0, 1), e.g. 0.6")
        if self.input_size <= 0 or self.input_size % self.patch_size:
            raise ConfigError(f"invalid --input_size {self.input_size}: it must be a positive multiple of the "
                              f"patch size {self.patch_size} (e.g. 128, 224)")
        try:
            check_geometry(self.input_size, self.patch_size, self.mask_ratio)
        except ValueError as error:
            raise ConfigError(str(error)) from None

    def _check_positive(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            if not value > 0:
                raise ConfigError(f"invalid --{name} {value}: it must be positive")

    def _check_non_negative(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            if value < 0:
                raise ConfigError(f"invalid --{name} {value}: it must not be negative")

    def diff(self, other: "PretrainConfig") -> dict[str, tuple]:
        """Return {option: (self value, other value)} for options that change what the run computes."""
        mine, theirs = self.to_dict(), other.to_dict()
        return {k: (mine[k], theirs.get(k)) for k in mine
                if k not in RUNTIME_OPTIONS and mine[k] != theirs.get(k)}


def save_config(config: PretrainConfig, folder: str | Path) -> Path:
    path = Path(folder) / CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def load_config(folder: str | Path) -> PretrainConfig | None:
    """Return the config saved in `folder`, or None when there is none."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        return None
    return PretrainConfig.from_dict(json.loads(path.read_text()))


def valid_models() -> str:
    return ", ".join(MODEL_NAMES)
