"""The run specification: what a distillation (or plain training) run is.

One spec describes a run whether it comes from ``python -m pcd_core distill --spec`` or from
``POST /jobs`` (``jobs.spec.JobSpec`` extends :class:`RunSpec` with service-only fields), so a
job and a CLI run are the same thing and are validated by the same code.

This module is torch-free on purpose: the API process imports it to answer 422s without
loading torch. Every PCD design choice is a field here so that ablations need no code.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Annotated, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pcd_core.models.catalog import model_names, split_arch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

PositiveInt = Annotated[int, Field(gt=0)]
ClassWeightChoice = Literal["none", "median_frequency"]
CLASS_WEIGHT_CHOICES: tuple[str, ...] = get_args(ClassWeightChoice)


class _Strict(BaseModel):
    """Unknown keys are errors: a misspelt ``rematch_evry`` must not silently use a default."""

    model_config = ConfigDict(extra="forbid")


class DatasetSpec(_Strict):
    """Where the data is and how to read it."""

    uri: str = Field(description="Local path, file://, s3:// or upload:<id> (service only).")
    format: Literal["folder", "cityscapes", "voc", "synthetic"] = "folder"
    num_classes: int = Field(ge=2, le=1024)
    ignore_index: int = Field(default=255, ge=0, le=65535)
    class_names: list[str] | None = None
    train_split: str = "train"
    val_split: str = "val"
    # Frames are first resized to ``resize`` (H, W) if given (e.g. half resolution for the CPU
    # benchmark), then randomly scaled by ``scale_range`` and cropped to ``crop`` (H, W).
    resize: tuple[PositiveInt, PositiveInt] | None = None
    crop: tuple[PositiveInt, PositiveInt] = (360, 480)
    scale_range: tuple[float, float] = (0.5, 2.0)
    hflip: bool = True
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @model_validator(mode="after")
    def _check(self) -> DatasetSpec:
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError(
                f"class_names has {len(self.class_names)} names but num_classes is "
                f"{self.num_classes}"
            )
        lo, hi = self.scale_range
        if not 0 < lo <= hi:
            raise ValueError("scale_range must satisfy 0 < low <= high")
        if 0 <= self.ignore_index < self.num_classes:
            raise ValueError("ignore_index must not be a valid class index")
        return self


class ModelSpec(_Strict):
    """A network: its architecture and, for a teacher, the checkpoint to load."""

    arch: str = Field(description="{head}_{backbone}, e.g. deeplabv3_resnet18")
    checkpoint: str | None = Field(
        default=None, description="safetensors or weights-only torch checkpoint (path or URI)"
    )
    output_stride: Literal[8, 16, 32] = 8
    # Width of the head's last hidden layer (the PCD tap). None = the architecture's default:
    # 256 for ResNet-50/101 heads (torchvision's), 128 for small backbones (CIRKD's students).
    head_channels: PositiveInt | None = None
    aux: bool = False

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, v: str) -> str:
        split_arch(v)  # raises ValueError naming the valid choices
        return v


# The loss choices a method gets when the spec leaves them out: each baseline at its published
# recipe, so that "PCD vs KD" compares against KD as its authors tuned it. kd: pixel-wise KD
# as CIRKD's train_kd.py runs it (temperature 1, lambda_kd 1); cwd: Shu et al., ICCV 2021, on
# logits (temperature 4, loss weight 3). pcd: our own, chosen by bench/ablate.py (see
# bench/README.md, "PCD's default since 2026-12-01"): the feature term at weight 1, constant,
# plus pixel KD at the KD baseline's recipe (weight 1, temperature 1, constant) was ahead of
# the previous default (weight 3 decaying linearly, no KD) on 6 of the 8 (student, seed)
# pairs measured. ``none`` uses none of them and keeps the field defaults, so plain-training
# specs (teachers) hash as they did before this table existed.
METHOD_DEFAULTS: dict[str, dict[str, float | str]] = {
    "kd": {"weight": 1.0, "tau": 1.0},
    "cwd": {"weight": 3.0, "tau": 4.0},
    "pcd": {"weight": 1.0, "tau": 4.0, "weight_schedule": "constant",
            "logit_kd_weight": 1.0, "logit_kd_tau": 1.0},
}


class MethodSpec(_Strict):
    """The distillation method and every one of its choices (see DESIGN.md, PCD)."""

    name: Literal["none", "kd", "cwd", "pcd"] = "pcd"
    weight: float = Field(default=3.0, ge=0,
                          description="weight of the method's main loss; left out: the "
                          "method's default (kd 1, cwd 3, pcd 1)")
    tau: float = Field(default=4.0, gt=0,
                       description="softmax temperature; left out: the method's default "
                       "(kd 1, cwd 4, pcd 4)")
    # PCD
    score: Literal["class_gap", "fisher", "l1", "random"] = "class_gap"
    keep: PositiveInt | None = Field(
        default=None, description="K teacher channels kept after pruning; None = student width. "
        "Below the student's width, each kept channel is matched to its own student channel "
        "and the other student channels are not distilled"
    )
    prune: Literal["top_k", "class_balanced"] = Field(
        default="top_k", description="top_k: the K best scores; class_balanced: the K best "
        "taken in turns over the classes the channels respond to most")
    match: Literal["hungarian", "identity"] = "hungarian"
    rematch_every: PositiveInt = 500
    score_batches: PositiveInt = Field(default=8, description="batches in the scoring pass")
    score_weighting: bool = False
    # Added later: "head_preact" is the head tap before its ReLU (normalised, signed).
    tap: Literal["head", "head_preact", "backbone"] = Field(
        default="head", description="the feature the feature methods read: the head's last "
        "hidden activation (head), the same before its ReLU (head_preact), or the backbone's "
        "last stage (backbone)")
    # Added later: the KL of spatial softmaxes passes each matched channel's peaks (where the
    # map is largest, sharpened by tau); "pearson" passes the whole map up to scale and offset;
    # "class_profile" passes how the channel's mean response differs between classes (what
    # the class_gap score kept it for) and nothing of where in the image it fires.
    feature_loss: Literal["spatial_kl", "pearson", "class_profile"] = Field(
        default="spatial_kl", description="PCD: per matched pair, KL of spatial softmaxes at "
        "tau (spatial_kl), 1 - Pearson correlation over spatial locations (pearson), or 1 - "
        "Pearson correlation of the per-class mean responses over the batch's classes "
        "(class_profile); tau is used by spatial_kl only")
    logit_kd_weight: float = Field(default=0.0, ge=0, description="PCD: pixel-wise logit KD on "
                                   "top of the feature loss; left out: 1")
    # Added later: the feature loss wants a soft temperature (4) while pixel-wise logit KD is
    # best near 1 (the KD baseline's recipe), so the two need not share ``tau``.
    logit_kd_tau: float | None = Field(
        default=None, gt=0, description="PCD: temperature of the logit KD; left out: 1 "
        "(set to null: tau, the feature loss's temperature)")
    # Added later: the decay that helps PCD's feature term (bench, AMD kind) costs the KD
    # baseline about 2.8 points (bench, Xeon kind), so the logit term may keep its own.
    logit_kd_schedule: Literal["constant", "linear_decay"] | None = Field(
        default=None, description="schedule of the optional logit KD; left out: "
        "weight_schedule, the feature loss's schedule")
    adapter: bool = Field(
        default=False, description="PCD: distil the kept teacher channels through a 1x1 conv "
        "adapter on the student (dropped at export) instead of one student channel per "
        "matched teacher channel; matching is then unused and keep may be any K <= teacher "
        "channels")
    # Every method: the distillation losses are multiplied by a factor that is 1 throughout
    # ("constant") or falls linearly from 1 at the first iteration to 0 at the last
    # ("linear_decay"), so that cross-entropy alone shapes the final weights.
    weight_schedule: Literal["constant", "linear_decay"] = Field(
        default="constant", description="left out: constant (every method's default; "
        "PCD's was linear_decay until 2026-12-01)")
    # CWD
    cwd_on: Literal["logits", "features"] = "logits"

    @model_validator(mode="after")
    def _pcd_only(self) -> MethodSpec:
        if self.feature_loss != "spatial_kl" and self.name != "pcd":
            raise ValueError(f"feature_loss applies to method 'pcd' only, not {self.name!r}")
        if self.adapter and self.name != "pcd":
            raise ValueError(f"adapter applies to method 'pcd' only, not {self.name!r} "
                             f"(cwd on features always has one: cwd_on='features')")
        return self

    @model_validator(mode="before")
    @classmethod
    def _method_defaults(cls, data: object) -> object:
        """Fill the loss choices the spec left out with the named method's defaults.

        A spec that turns PCD's logit KD off does not get its default temperature either:
        the temperature of an absent term is moot, and leaving it unset keeps such a spec
        (the default before 2026-12-01, spelled out) at the hash it always had.
        """
        if isinstance(data, dict):
            defaults = dict(METHOD_DEFAULTS.get(str(data.get("name", "pcd")), {}))
            if _is_zero(data.get("logit_kd_weight")):
                defaults.pop("logit_kd_tau", None)
            data = {**defaults, **data}
        return data


def _is_zero(value: object) -> bool:
    try:
        return value is not None and float(value) == 0.0  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False  # not a number: the field's own validation reports it


class TrainSpec(_Strict):
    """Optimisation budget and schedule."""

    iterations: PositiveInt = 40000
    batch_size: PositiveInt = 8
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(default=0.01, gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=1e-4, ge=0)
    poly_power: float = Field(default=0.9, ge=0)
    warmup_iterations: int = Field(default=0, ge=0)
    grad_clip: float | None = Field(default=None, gt=0)
    aux_weight: float = Field(default=0.4, ge=0)
    # Added later: rare classes (pole, sign_symbol) get no gradient worth the name under plain
    # CE on a short budget, and a teacher that never predicts them has nothing to distil.
    class_weights: ClassWeightChoice | list[float] = Field(
        default="none", description="weights of the cross-entropy terms per class: none, "
        "median_frequency (counted over the train split at run start), or one positive "
        "number per class; the distillation terms are never weighted")
    amp: bool = True  # only takes effect on CUDA
    amp_dtype: Literal["bf16", "fp16"] = "bf16"
    eval_every: PositiveInt = 2000
    checkpoint_every: PositiveInt = 1000
    log_every: PositiveInt = 10
    seed: int = 0
    deterministic: bool = False
    num_workers: int = Field(default=2, ge=0)
    eval_batch_size: PositiveInt = 4
    max_eval_images: PositiveInt | None = None

    @field_validator("class_weights", mode="before")
    @classmethod
    def _class_weights(cls, v: object) -> object:
        """One message at ``train.class_weights`` (a union would report one per member)."""
        if isinstance(v, str) and v not in CLASS_WEIGHT_CHOICES:
            raise ValueError(f"must be one of {', '.join(CLASS_WEIGHT_CHOICES)} or a list "
                             f"of positive numbers, one per class; got {v!r}")
        if isinstance(v, list | tuple):
            for i, w in enumerate(v):
                ok = isinstance(w, int | float) and not isinstance(w, bool)
                if not ok or not math.isfinite(w) or w <= 0:  # type: ignore[arg-type]
                    raise ValueError(f"weight {i} is {w!r}; every weight must be a positive "
                                     f"finite number")
        return v


class RunSpec(_Strict):
    """A whole run: data, teacher (absent for plain training), student, method, budget."""

    name: str = Field(default="run", min_length=1, max_length=200)
    dataset: DatasetSpec
    teacher: ModelSpec | None = None
    student: ModelSpec
    method: MethodSpec = MethodSpec()
    train: TrainSpec = TrainSpec()

    @model_validator(mode="after")
    def _teacher_needed(self) -> RunSpec:
        if self.method.name != "none" and self.teacher is None:
            raise ValueError(f"method {self.method.name!r} needs a teacher")
        return self

    @model_validator(mode="after")
    def _one_weight_per_class(self) -> RunSpec:
        weights = self.train.class_weights
        if isinstance(weights, list) and len(weights) != self.dataset.num_classes:
            raise ValueError(f"train.class_weights has {len(weights)} weights but "
                             f"dataset.num_classes is {self.dataset.num_classes}")
        return self

    def spec_hash(self) -> str:
        """sha256 of the canonical JSON: two runs with the same hash are the same experiment.

        Fields added after the first release (:data:`HASH_SINCE_ADDED`) enter the hash only
        when set to something other than their default, so adding an option does not
        orphan every finished run and resumable checkpoint (a teacher can be an hour of
        training); a spec that uses the new option hashes differently, as it should.
        """
        data = self.model_dump(mode="json")
        for section, key, default in HASH_SINCE_ADDED:
            if data[section].get(key) == default:
                del data[section][key]
        canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


# (section, field, value) of fields added after specs were first hashed, each with the value
# that gives the behaviour from before the field existed (its default when added); see spec_hash.
HASH_SINCE_ADDED: tuple[tuple[str, str, object], ...] = (
    ("method", "prune", "top_k"),
    ("method", "adapter", False),
    ("method", "weight_schedule", "constant"),
    ("method", "logit_kd_tau", None),
    ("method", "logit_kd_schedule", None),
    ("method", "feature_loss", "spatial_kl"),
    ("train", "class_weights", "none"),
)


def load_spec(text: str, *, yaml_ok: bool = True) -> RunSpec:
    """Parse a JSON or YAML run spec (YAML is a superset of JSON)."""
    if yaml_ok:
        import yaml

        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    return RunSpec.model_validate(data)


__all__ = [
    "METHOD_DEFAULTS",
    "DatasetSpec",
    "MethodSpec",
    "ModelSpec",
    "RunSpec",
    "TrainSpec",
    "load_spec",
    "model_names",
]
