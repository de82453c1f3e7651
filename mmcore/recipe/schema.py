"""The recipe schema: frozen attrs classes, one per table, with their defaults and checks."""

from __future__ import annotations

import re
from typing import Any

import attrs

from mmcore.data.images import DEFAULT_FORMATS, DEFAULT_MAX_IMAGE_BYTES
from mmcore.model.trainability import LoraConfig
from mmcore.plugins.kinds import KIND_TABLE
from mmcore.validators import FieldError, at_least, at_most, in_range, one_of, positive

MODALITIES = ("multimodal", "vision_only", "text_only")
ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
#: counts (epochs, batch sizes, steps, dimensions) reach torch and C code as 32-bit ints
MAX_COUNT = 2**31 - 1
#: numpy's seed (and the sampler's) takes 0..2**32-1
MAX_SEED = 2**32 - 1


def _count(*checks):
    """Validators of an integer count: ``checks`` plus the 32-bit bound its consumers accept."""
    return [*checks, at_most(MAX_COUNT)]


def _image_formats(instance, attribute, value):
    from mmcore.data.images import FORBIDDEN_FORMATS

    if not value:
        raise FieldError(attribute.name, "must name at least one format (e.g. [\"JPEG\", \"PNG\"])")
    known = _pillow_formats()
    for name in value:
        if name.upper() in FORBIDDEN_FORMATS:
            raise FieldError(attribute.name, f"{name} is never allowed: Pillow decodes it by starting an external program")
        if name.upper() not in known:
            readable = ", ".join(sorted(known - FORBIDDEN_FORMATS))
            raise FieldError(attribute.name, f"unknown image format {name!r} (Pillow reads: {readable})")


def _pillow_formats():
    from PIL import Image

    Image.init()
    return set(Image.OPEN)


@attrs.frozen(kw_only=True)
class Component:
    """A registered component by name, with its params (structured against its params class)."""

    name: str
    params: Any = attrs.field(factory=dict)


@attrs.frozen(kw_only=True)
class OcrConfig:
    """Fill empty ``text_info`` on the fly with an OCR engine (cached by image content)."""

    engine: str = "tesseract"
    lang: str = "kor+eng"


@attrs.frozen(kw_only=True)
class DataConfig:
    """Where the CSVs and images are, and how the loader reads them."""

    base_dir: str = "${DATA_DIR}"
    #: "csv": train/val/test are CSVs; "webdataset": they are tar shard URLs (brace patterns, pipe:, fsspec)
    format: str = attrs.field(default="csv", validator=one_of("csv", "webdataset"))
    train: str = "train.csv"
    val: str = "val.csv"
    test: str = "test.csv"
    #: loader worker processes; -1 = one per CPU core
    num_workers: int = attrs.field(default=-1, validator=_count(at_least(0, allow=(-1,))))
    on_bad_image: str = attrs.field(default="error", validator=one_of("error", "skip"))
    #: images with more pixels are refused (decompression-bomb guard)
    max_image_pixels: int = attrs.field(default=89_478_485, validator=[positive, at_most(2**62)])
    #: image files (and shard members) with more bytes are refused before they are read
    max_image_bytes: int = attrs.field(default=DEFAULT_MAX_IMAGE_BYTES, validator=[positive, at_most(2**62)])
    #: the image formats handed to Pillow; anything else is a bad image (EPS is never allowed)
    image_formats: tuple[str, ...] = attrs.field(
        default=DEFAULT_FORMATS, converter=lambda names: tuple(str(n).upper() for n in names), validator=_image_formats
    )
    ocr: OcrConfig | None = None


@attrs.frozen(kw_only=True)
class EarlyStopping:
    """Stop when ``metric`` has not improved for ``patience`` epochs (0 = never stop early)."""

    patience: int = attrs.field(default=3, validator=_count(at_least(0)))
    metric: str = "val_auroc"


def _compile_backend(attribute, value):
    if isinstance(value, str) and not value.strip():
        raise FieldError(attribute.name, "must be true, false or a torch.compile backend name (e.g. \"inductor\")")


@attrs.frozen(kw_only=True)
class EmaConfig:
    """``train.ema``: an exponential moving average of the trainable weights, validated beside them."""

    #: per optimizer step: ema = decay * ema + (1 - decay) * weights
    decay: float = attrs.field(default=0.999, validator=in_range(0.0, 1.0))


def _finite_positive(instance, attribute, value):
    import math

    if not (math.isfinite(value) and value > 0):
        raise FieldError(attribute.name, f"must be a finite number > 0 (got {value!r})")


def _teacher_path(instance, attribute, value):
    if not value.strip():
        raise FieldError(attribute.name, "must name a run directory, an ensemble directory or an export bundle")


def _not_blank_path(instance, attribute, value):
    if value is not None and not value.strip():
        raise FieldError(attribute.name, "must name a CSV file (or leave the key out)")


@attrs.frozen(kw_only=True)
class DistillConfig:
    """``train.distill``: the student learns from a teacher's temperature-softened logits and the labels
    (:mod:`mmcore.engine.distill`, docs/ensembles.md "Distillation")."""

    #: a run directory, an ensemble directory or an export bundle (anything ``mmcore eval`` scores);
    #: relative to the working directory
    teacher: str = attrs.field(validator=_teacher_path)
    #: T of the soft term: both logits are divided by it before the KL divergence
    temperature: float = attrs.field(default=2.0, validator=_finite_positive)
    #: of the soft term; ``1 - weight`` goes to the recipe's loss on the labels
    weight: float = attrs.field(default=0.7, validator=in_range(0.0, 1.0, high_inclusive=True))
    #: a CSV of unlabelled rows (``local_image_path``, ``text_info``; absolute or relative to ``data.base_dir``)
    #: the teacher scores and the student learns from through the soft term only
    transfer: str | None = attrs.field(default=None, validator=_not_blank_path)
    #: true: the teacher scores every training batch as augmented (nothing stored); false: the rows as they are, once
    online: bool = False


@attrs.frozen(kw_only=True)
class TrainConfig:
    """Training keys; the defaults are the original system's."""

    modality: str = attrs.field(default="multimodal", validator=one_of(*MODALITIES))
    freeze_backbone: bool = True
    #: 0 = all frozen, N = top N blocks trainable, -1 = all
    finetune_layers: int = attrs.field(default=0, validator=_count(at_least(0, allow=(-1,))))
    lora: LoraConfig = attrs.field(factory=LoraConfig)
    epochs: int = attrs.field(default=10, validator=_count(positive))
    #: the global batch: split across the processes under torchrun (docs/distributed.md)
    batch_size: int = attrs.field(default=32, validator=_count(positive))
    #: training leaves out an epoch's last, partial global batch (one shape for torch.compile, equal
    #: batches on every rank); validation and test never drop anything
    drop_last: bool = True
    learning_rate: float = attrs.field(default=1e-4, validator=positive)
    backbone_lr: float = attrs.field(default=1e-5, validator=positive)
    lora_lr: float = attrs.field(default=1e-4, validator=positive)
    weight_decay: float = attrs.field(default=0.01, validator=at_least(0))
    grad_accum_steps: int = attrs.field(default=1, validator=_count(positive))
    #: max gradient norm; 0 disables clipping
    grad_clip: float = attrs.field(default=1.0, validator=at_least(0))
    #: "auto": bf16 on GPUs that compute it natively (compute capability >= 8.0), else fp16 with a
    #: gradient scaler; fp32 on the CPU
    precision: str = attrs.field(default="auto", validator=one_of("auto", "bf16", "fp16", "fp32"))
    device: str = "auto"
    deterministic: bool = False
    #: process-group timeout under torchrun: a collective waiting longer fails instead of hanging
    dist_timeout_s: int = attrs.field(default=1800, validator=_count(positive))
    #: linear projection before the head in vision_only / text_only (0 = none)
    projection_dim: int = attrs.field(default=0, validator=_count(at_least(0)))
    #: probability of dropping one modality per sample during training (multimodal)
    modality_dropout: float = attrs.field(default=0.0, validator=in_range(0.0, 1.0))
    balanced_sampler: bool = False
    on_nan: str = attrs.field(default="stop", validator=one_of("stop", "skip"))
    #: also write last.ckpt every N optimizer steps (0 = only at epoch ends)
    checkpoint_every_steps: int = attrs.field(default=0, validator=_count(at_least(0)))
    early_stopping: EarlyStopping = attrs.field(factory=EarlyStopping)
    #: an EMA of the trainable weights (off when absent)
    ema: EmaConfig | None = None
    #: "none" | "uniform" | "greedy": checkpoint_best.ckpt holds a soup of the top ``soup_k`` epochs
    soup: str = attrs.field(default="none", validator=one_of("none", "uniform", "greedy"))
    soup_k: int = attrs.field(default=3, validator=_count(positive))
    #: layer-wise lr decay of the vision blocks: top block backbone_lr, each one below x decay (1 = off)
    layer_decay: float = attrs.field(default=1.0, validator=[positive, at_most(1.0)])
    #: torch.compile the model for training: true (inductor) or a backend name (one warning and eager on failure)
    compile: bool | str = attrs.field(default=False, validator=lambda _i, a, v: _compile_backend(a, v))
    #: recompute the vision encoder's activations in backward (full fine-tuning of big encoders)
    gradient_checkpointing: bool = False
    #: TF32 matmuls and convolutions on Ampere+ GPUs (no effect on the CPU)
    tf32: bool = True
    #: cudnn autotuning for fixed input shapes (off when ``deterministic``)
    cudnn_benchmark: bool = True
    #: learn from a teacher's logits as well as the labels (off when absent)
    distill: DistillConfig | None = None


def _threshold_rule(instance, attribute, value):
    from mmcore.evaluation.threshold import parse_threshold_rule

    try:
        parse_threshold_rule(value)
    except (ValueError, TypeError) as exc:
        raise FieldError(attribute.name, str(exc)) from None


@attrs.frozen(kw_only=True)
class EvalConfig:
    """Decision threshold (tuned on validation) and calibration."""

    #: "f1" | "youden" | {precision = 0.95} | {recall = 0.9} | a number in (0, 1)
    threshold: Any = attrs.field(default="f1", validator=_threshold_rule)
    calibrate: bool = True
    batch_size: int = attrs.field(default=0, validator=_count(at_least(0)))


@attrs.frozen(kw_only=True)
class CacheConfig:
    """Feature cache for frozen encoders with deterministic input."""

    enabled: bool = True
    #: "" = the user's cache directory (~/.cache/mmcore or $MMCORE_CACHE_DIR)
    dir: str = ""
    #: false: a cache that cannot be written (full, read-only, missing disk) is a warning and
    #: the run continues without it; true: the run stops with that line
    required: bool = False
    #: how token sequences (attention pooling) are stored: "fp16", "int8" (per-token scale) or
    #: "pooled" (2x2-pooled token grid, ~4x smaller); part of the cache identity
    token_storage: str = attrs.field(default="fp16", validator=one_of("fp16", "int8", "pooled"))
    #: decoded-image cache for runs that train the vision encoder: "auto" (on when the vision
    #: encoder trains and its preprocessing and augmentation allow it), true, false
    decoded_images: Any = attrs.field(default="auto", validator=one_of("auto", True, False))


def _not_blank(instance, attribute, value):
    if value is not None and not value.strip():
        raise FieldError(attribute.name, "must not be empty")


@attrs.frozen(kw_only=True)
class MlflowConfig:
    """``logging.mlflow``: the run logged to an MLflow tracking store (``pip install 'mmcore[mlflow]'``)."""

    #: a server (``http://host:5000``), a database (``sqlite:///mlflow.db``) or a local folder (``file:./mlruns``, a path)
    tracking_uri: str = attrs.field(validator=_not_blank)
    #: the MLflow experiment; absent: the recipe's ``experiment``
    experiment: str | None = attrs.field(default=None, validator=_not_blank)
    #: absent: ``<experiment>/<run directory name>``
    run_name: str | None = attrs.field(default=None, validator=_not_blank)


@attrs.frozen(kw_only=True)
class LoggingConfig:
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "mmcore"
    #: MLflow beside TensorBoard (off when absent)
    mlflow: MlflowConfig | None = None
    progress: bool = True


def _component(name, **params):
    return attrs.field(factory=lambda: Component(name=name, params=dict(params)))


@attrs.frozen(kw_only=True)
class Recipe:
    """A whole experiment: data, components, training, evaluation, outputs."""

    experiment: str = "default"
    description: str = ""
    seed: int = attrs.field(default=42, validator=in_range(0, MAX_SEED, high_inclusive=True))
    output_dir: str = "runs"
    data: DataConfig = attrs.field(factory=DataConfig)
    vision: Component = _component("siglip2_so400m")
    text: Component = _component("labse")
    pooling: Component = _component("attention")
    fusion: Component = _component("gated")
    head: Component = _component("mlp")
    loss: Component = _component("focal")
    scheduler: Component = _component("cosine_warmup")
    augmentation: Component = _component("none")
    train: TrainConfig = attrs.field(factory=TrainConfig)
    eval: EvalConfig = attrs.field(factory=EvalConfig)
    cache: CacheConfig = attrs.field(factory=CacheConfig)
    logging: LoggingConfig = attrs.field(factory=LoggingConfig)


#: recipe key -> registry kind, for every component table (from the one list of kinds)
COMPONENT_KINDS = {kind.name: kind.name for kind in KIND_TABLE if kind.in_recipe}
