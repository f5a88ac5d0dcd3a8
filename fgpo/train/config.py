"""Training configuration: one documented dataclass, loaded from YAML with CLI overrides.

Defaults are the method's (docs/design.md §1 and the FiRe-MPO recipe): β 0.1, α 0.01, γ 0.1,
λ 0.5; AdamW at lr 1e-6 with a cosine schedule and no warmup, one epoch, global batch 8;
LoRA r 128 / alpha 256 / dropout 0.05 with rsLoRA on the language model only (vision tower and
projector frozen); bf16 weights, gradient checkpointing, flash-attn 2 when importable.

    cfg = TrainConfig.from_yaml("tiny", overrides=["lr=1e-4", "lora=false"])  # a shipped config
    cfg = TrainConfig.from_yaml("my.yaml")                                      # or any file

Shipped example configs live in ``fgpo/configs/`` (``config_names()`` lists them).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from fgpo_kernels import LOSS_PRESETS, FiReMPOLoss

from .config_checks import at_least, check_type, fraction, one_of

_CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"

# The loss presets are the loss's own table (``fgpo_kernels.LOSS_PRESETS``: the coefficients
# each one fixes); the trainer adds only what belongs to it: which mask a preset trains on (DPO:
# every response token), which mask its KL term reads (RRPO: every response token of y+, while
# its reward reads the spans) and ``sft``, supervised fine-tuning on the chosen answers (every
# response token), the control a preference method must beat.
_TRAINER_PRESETS: dict[str, dict[str, Any]] = {
    "dpo": {"mask": "response"},
    "rrpo": {"kl_mask": "response"},
    "sft": {"gamma": 0.0, "alpha": 0.0, "mask": "response"},
}
PRESETS: dict[str, dict[str, Any]] = {
    name: {**LOSS_PRESETS.get(name, {}), **_TRAINER_PRESETS.get(name, {})}
    for name in (*LOSS_PRESETS, *_TRAINER_PRESETS)
}
_LOSS_FIELDS = ("beta", "alpha", "gamma", "lambda_", "alpha_v1", "alpha_v2", "label_smoothing")

# Fields that do not change what is trained (where and how often to save and log, progress,
# threads, prefetching, caching): they may differ when a run is resumed. Every other field
# changes the result, and ``--resume`` refuses a checkpoint written with another value.
OPERATIONAL_FIELDS = frozenset(
    {"output_dir", "save_steps", "save_total_limit", "log_steps", "eval_steps", "run_name",
     "tensorboard", "progress_bar", "device", "cpu_threads", "prefetch", "cache_examples",
     "extra"}
)  # fmt: skip


@dataclass
class TrainConfig:
    """Everything ``fgpo train`` reads. Every field can be set in YAML or as ``--set key=value``."""

    # --- model -----------------------------------------------------------------------------
    model: str = "tiny-llava"
    """Hub id, local directory, or a tiny offline model (``tiny-llava``, ``tiny-qwen2-vl``,
    ``tiny-qwen2.5-vl``, ``tiny-qwen3-vl``; see ``fgpo.tiny``)."""
    dtype: str = "bfloat16"
    """Weight dtype: ``bfloat16`` | ``float32`` | ``float16``."""
    attn_implementation: str | None = None
    """None = sdpa when ``shared_prefix`` is on (its packed mask needs sdpa, eager or
    flex_attention), else flash_attention_2 when importable on a GPU, else sdpa."""
    gradient_checkpointing: bool = True
    shared_prefix: bool = True
    """Run y+ and y- as one packed row per example and image, so the image and the prompt go
    through each model once (``fgpo.models.prefix``); with LoRA and a frozen vision tower the
    vision features of each image also serve both models. Same loss and gradients as the plain
    path (within fp32 rounding). Start-up names the family and the reason whenever it falls back:
    to the plain path (no adapter for the family, attention without custom masks, ``preset:
    sft``) or to per-pass vision (trainable vision, full fine-tuning's separate reference)."""

    # --- LoRA (language model only) ----------------------------------------------------------
    lora: bool = True
    """False = full fine-tuning of the language model with a frozen copy as the reference."""
    lora_r: int = 128
    lora_alpha: int = 256
    lora_dropout: float = 0.05
    use_rslora: bool = True
    train_vision: bool = False
    """Full fine-tuning only: also train the vision tower and projector (default frozen)."""
    fsdp: bool = True
    """Full fine-tuning under torchrun: shard policy and reference with FSDP2 (each decoder
    layer a unit). LoRA runs always use DDP (the adapters are small)."""

    # --- loss --------------------------------------------------------------------------------
    preset: str = "fire_mpo"
    """``fire_mpo`` | ``dpo`` | ``rrpo`` | ``mask_dpo``: fixes the terms the method drops;
    ``sft``: supervised fine-tuning on the chosen answers (no reference, no rejected pass)."""
    beta: float = 0.1
    alpha: float = 0.01
    gamma: float = 0.1
    lambda_: float = 0.5
    alpha_v1: float = 0.0
    alpha_v2: float = 0.0
    loss_type: str = "sigmoid"
    """The pairwise loss of the rank and visual terms: ``sigmoid`` (DPO) | ``hinge`` | ``ipo`` |
    ``robust`` | ``label_smoothing`` (conservative DPO) | ``exo_pair`` | ``nca_pair``, each
    TRL's DPO loss of that name (``fgpo_kernels.LOSS_TYPES``; docs/design.md §1.4). Any preset
    runs with any of them."""
    label_smoothing: float = 0.0
    """ε in [0, 0.5) of ``robust``, ``label_smoothing`` and ``exo_pair`` (which needs ε > 0)."""
    mask: str | None = None
    """``span`` (tagged tokens) | ``response`` (all response tokens); None = the preset's.
    The reward reads it; so does the KL, except under ``rrpo``, whose KL reads every response
    token of y+ (RRPO's objective)."""
    impl: str | None = None
    """``fgpo_kernels`` implementation (None = best available)."""

    # --- data --------------------------------------------------------------------------------
    train_file: str = ""
    """Preference records in the reference JSON format."""
    image_root: str | None = None
    """Directory for relative image paths (default: the JSON file's directory)."""
    max_length: int = 2048
    """Longer sequences (image tokens included) are skipped and counted."""
    on_bad_tags: str = "error"
    """``error``: malformed ``<mask>`` tags (and the image token inside the text) stop before
    training, naming the record; ``skip``: count and skip those records. A record of the wrong
    shape (a missing field, a null or numeric prompt) stops the run under both."""
    cache_examples: bool = False
    """Keep encoded examples in memory (small sets, many epochs)."""
    prefetch: bool = True
    """Encode the next step's batch in a background thread while the current one computes."""
    generate_tiny_data: int = 0
    """If > 0, train on that many generated records (``fgpo.pairs.synthetic``, seeded by
    ``seed``) instead of a ``train_file`` (which must then be empty). They are written once
    under the cache directory (``$FGPO_CACHE/data/``) and reused."""

    # --- optimisation ------------------------------------------------------------------------
    lr: float = 1e-6
    lr_scheduler: str = "cosine"
    """``cosine`` | ``linear`` | ``constant``."""
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    """0 disables clipping."""
    num_epochs: int = 1
    global_batch_size: int = 8
    """Examples per optimizer step over all processes and accumulation steps."""
    micro_batch_size: int = 1
    """Examples per forward pass per process; accumulation = global / (micro * world)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (None = ``num_epochs`` of data)."""
    seed: int = 42

    # --- output ------------------------------------------------------------------------------
    output_dir: str = "runs/fgpo"
    save_steps: int = 100
    """Checkpoint every this many steps (and at the end); 0 = only at the end."""
    save_total_limit: int = 2
    """Keep at most this many checkpoints (0 = all)."""
    log_steps: int = 1
    eval_steps: int = 0
    """Call the trainer's ``eval_fn`` every this many steps and at the end (0 = never); its
    numbers are logged as ``eval/<name>``."""
    run_name: str | None = None
    """A label for logs and the progress bar (default: the output directory's name)."""
    tensorboard: bool = True
    """Also log to TensorBoard when ``torch.utils.tensorboard`` is importable."""
    progress_bar: bool = True
    device: str = "auto"
    """``auto`` (cuda when available, one device per process) | ``cpu`` | ``cuda`` (an error
    when no CUDA device is available)."""
    cpu_threads: int | None = None
    """``torch.set_num_threads`` for CPU runs (1 is fastest for tiny models on busy machines)."""

    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form values for tools built on the trainer (ignored by it)."""

    # -----------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        for f in fields(self):
            setattr(self, f.name, check_type(f.name, f.type, getattr(self, f.name)))
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field for values out of range or inconsistent."""
        if self.preset.replace("-", "_") not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        one_of(self, "mask", (None, "span", "response"))
        one_of(self, "lr_scheduler", ("cosine", "linear", "constant"))
        one_of(self, "on_bad_tags", ("error", "skip"))
        one_of(self, "dtype", ("bfloat16", "float32", "float16"))
        one_of(self, "device", ("auto", "cpu", "cuda"))
        for name in ("model", "output_dir"):
            if not getattr(self, name):
                raise ValueError(f"{name} must be a non-empty string")
        for name in ("global_batch_size", "micro_batch_size", "num_epochs", "lora_r",
                     "max_length", "log_steps", "cpu_threads"):  # fmt: skip
            at_least(self, name, 1)
        for name in ("max_steps", "save_steps", "save_total_limit", "eval_steps", "seed",
                     "generate_tiny_data", "weight_decay", "max_grad_norm"):  # fmt: skip
            at_least(self, name, 0)
        for name in ("lr", "adam_eps", "lora_alpha"):
            at_least(self, name, 0, strict=True)
        fraction(self, "warmup_ratio")
        for name in ("lora_dropout", "adam_beta1", "adam_beta2"):
            fraction(self, name, upper_open=True)
        # The loss checks its own coefficients and impl name; its argument names are the
        # fields' (the preset's fixed values are applied later and are valid by construction).
        FiReMPOLoss(
            **{k: getattr(self, k) for k in _LOSS_FIELDS}, impl=self.impl, loss_type=self.loss_type
        )
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"global_batch_size={self.global_batch_size} is not a multiple of "
                f"micro_batch_size={self.micro_batch_size}"
            )
        if self.generate_tiny_data and self.train_file:
            raise ValueError(
                f"generate_tiny_data={self.generate_tiny_data} trains on generated records "
                f"(kept under the cache directory); it cannot be combined with train_file="
                f"{self.train_file!r}: remove one of them"
            )

    @property
    def preset_key(self) -> str:
        """The preset's table key (``fire-mpo`` -> ``fire_mpo``)."""
        return self.preset.replace("-", "_")

    def loss_kwargs(self) -> dict[str, Any]:
        """Arguments of ``FiReMPOLoss`` after the preset is applied."""
        fixed = PRESETS[self.preset_key]
        kw = {k: float(fixed.get(k, getattr(self, k))) for k in _LOSS_FIELDS}
        kw["impl"], kw["loss_type"] = self.impl, self.loss_type
        return kw

    def resolved_mask(self) -> str:
        """``span`` or ``response``: the explicit ``mask``, else the preset's, else span."""
        if self.mask is not None:
            return self.mask
        return PRESETS[self.preset_key].get("mask", "span")

    def resolved_kl_mask(self) -> str | None:
        """The mask the KL term reads when it is not ``resolved_mask()``: ``response`` for
        ``rrpo`` (passed to the loss as the chosen sequence's ``kl_mask``), else None."""
        kl = PRESETS[self.preset_key].get("kl_mask")
        return None if kl == self.resolved_mask() else kl

    def needs_corrupt(self) -> bool:
        """Whether any visual term is on (then the corrupted sequences are encoded)."""
        kw = self.loss_kwargs()
        return kw["gamma"] > 0 or kw["alpha_v1"] > 0 or kw["alpha_v2"] > 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # -----------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; known: {sorted(names)}")
        return cls(**d)

    @classmethod
    def from_yaml(cls, path: str, overrides: list[str] | dict[str, Any] | None = None):
        """Load ``path`` (a YAML file, or the name of a shipped config such as ``tiny``) and
        apply ``overrides`` (``key=value`` strings, values parsed as YAML, or a dict). Relative
        paths are relative to the working directory."""
        path = resolve_config(path)
        with open(path, encoding="utf-8") as f:
            d = yaml.safe_load(f) or {}
        if not isinstance(d, dict):
            raise ValueError(f"{path}: expected a YAML mapping, got {type(d).__name__}")
        d.update(parse_overrides(overrides))
        return cls.from_dict(d)


def config_names() -> list[str]:
    """Names of the example configs shipped in the package (``fgpo/configs/*.yaml``)."""
    return sorted(p.name[: -len(".yaml")] for p in _CONFIG_DIR.iterdir() if p.suffix == ".yaml")


def resolve_config(name_or_path: str) -> str:
    """An existing file as given, else a shipped config by name (``tiny`` or ``tiny.yaml``);
    anything else is a ``FileNotFoundError`` naming it and the shipped names."""
    if os.path.isfile(name_or_path):
        return name_or_path
    name = os.path.basename(name_or_path)
    name = name[: -len(".yaml")] if name.endswith(".yaml") else name
    shipped = _CONFIG_DIR / f"{name}.yaml"
    if os.sep not in name_or_path.strip("./") and shipped.is_file():
        return str(shipped)
    raise FileNotFoundError(
        f"config {name_or_path!r} not found: no such file, and no shipped config of that name "
        f"(shipped: {', '.join(config_names())})"
    )


def parse_overrides(overrides: list[str] | dict[str, Any] | None) -> dict[str, Any]:
    """``["lr=1e-4", "lora=false"]`` → ``{"lr": 1e-4, "lora": False}`` (values parsed as YAML)."""
    if overrides is None:
        return {}
    if isinstance(overrides, dict):
        return dict(overrides)
    out = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r} is not key=value")
        out[key.strip()] = yaml.safe_load(value)
    return out
