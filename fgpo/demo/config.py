"""Sizes and hyper-parameters of one demo run, and the product configs they turn into."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..train import TrainConfig

# The runs every seed makes from the SFT start: name -> (trainer preset, overrides).
METHODS = ("fire_mpo", "dpo", "fire_mpo_no_visual", "sft_continue")
REPORT_KEYS = {  # report.json object per method ("before" is the SFT start)
    "fire_mpo": "after",
    "dpo": "dpo",
    "fire_mpo_no_visual": "fire_mpo_no_visual",
    "sft_continue": "sft_continue",
}
LABELS = {
    "before": "SFT start",
    "after": "FiRe-MPO",
    "dpo": "DPO",
    "fire_mpo_no_visual": "FiRe-MPO, no visual term",
    "sft_continue": "continued SFT",
}


@dataclass
class DemoConfig:
    """One demo run (``full()`` and ``quick()`` below)."""

    n_warm: int = 1000  # clear-lesion scans for the SFT warm-up
    n_pref: int = 1500  # the preference examples (continued SFT uses the same ones)
    n_test: int = 1000
    contrast: tuple[float, float] = (40.0, 100.0)  # lesion brightness above the tissue
    # SFT on clearly visible lesions only: with faint ones a tiny model sits at the answer
    # prior for thousands of steps before it looks at the image. The SFT start is stopped
    # early and has never seen a faint lesion (room to improve for every later run).
    warm_contrast: float = 150.0
    data_seed: int = 0
    sft_steps: int = 300
    sft_batch: int = 64
    sft_lr: float = 1e-3
    pref_steps: int = 150
    pref_batch: int = 32
    pref_lr: float = 2e-4  # 5e-4 already broke the answer format of this tiny model
    weight_decay: float = 0.01
    beta: float = 0.1
    alpha: float = 0.01
    gamma: float = 0.1
    lambda_: float = 0.5
    corrupt_mode: str = "inpaint"
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    eval_every: int = 50
    max_new_tokens: int = 8  # the longest answer template has 5 words (+ eos)

    @classmethod
    def full(cls) -> DemoConfig:
        return cls()

    @classmethod
    def quick(cls) -> DemoConfig:
        return cls(
            n_warm=128,
            n_pref=96,
            n_test=96,
            sft_steps=40,
            sft_batch=32,
            pref_steps=4,
            pref_batch=16,
            eval_every=20,
        )

    def train_config(self, method: str, seed: int, train_file: Path, out: Path) -> TrainConfig:
        """The product's ``TrainConfig`` of one run: full fine-tuning of the whole tiny model
        (vision tower included) in fp32 on the CPU, constant learning rate, no clipping."""
        sft = method in ("sft_warmup", "sft_continue")
        preset = {"fire_mpo": "fire_mpo", "fire_mpo_no_visual": "fire_mpo", "dpo": "dpo"}
        warm = method == "sft_warmup"
        return TrainConfig(
            model="tiny-llava",
            dtype="float32",
            gradient_checkpointing=False,
            lora=False,
            train_vision=True,
            preset="sft" if sft else preset[method],
            beta=self.beta,
            alpha=self.alpha,
            gamma=0.0 if method == "fire_mpo_no_visual" else self.gamma,
            lambda_=self.lambda_,
            train_file=str(train_file),
            max_length=256,
            cache_examples=True,
            prefetch=False,
            lr=self.sft_lr if sft else self.pref_lr,
            lr_scheduler="constant",
            weight_decay=self.weight_decay,
            max_grad_norm=0.0,
            global_batch_size=self.sft_batch if warm else self.pref_batch,
            micro_batch_size=self.sft_batch if warm else self.pref_batch,
            max_steps=self.sft_steps if warm else self.pref_steps,
            num_epochs=1,
            seed=seed,
            output_dir=str(out),
            save_steps=0,
            save_total_limit=1,
            tensorboard=False,
            device="cpu",
            eval_steps=self.eval_every,
            run_name=method if warm else f"{method} seed {seed}",
        )
