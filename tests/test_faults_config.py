"""Fault audit of the training config (issue 11, item 5): every field's type and range is
checked when the config is built, and the error names the field."""

from __future__ import annotations

import pytest
import torch

from fgpo.train import TrainConfig, Trainer

# (YAML line, the field the error must name). Each line was accepted before, most silently
# doing something else: a quoted "false" is a true string, a negative max_grad_norm turned
# clipping off, `device: tpu` ran on the CPU, `lr: .inf` gave NaN losses and exit 0.
BAD = [
    ('lora: "false"', "lora"),
    ('gradient_checkpointing: "false"', "gradient_checkpointing"),
    ("tensorboard: 1", "tensorboard"),
    ('progress_bar: "no"', "progress_bar"),
    ("warmup_ratio: -0.1", "warmup_ratio"),
    ("warmup_ratio: 1.5", "warmup_ratio"),
    ("weight_decay: -0.01", "weight_decay"),
    ("max_grad_norm: -1", "max_grad_norm"),
    ("save_steps: -1", "save_steps"),
    ("save_total_limit: -1", "save_total_limit"),
    ("device: tpu", "device"),
    ("lr: .inf", "lr"),
    ("lr: .nan", "lr"),
    ("lr: 0", "lr"),
    ("lr: -1.0e-3", "lr"),
    ("lr: [1, 2]", "lr"),
    ('lr: "fast"', "lr"),
    ("seed: 1.5", "seed"),
    ("seed: -1", "seed"),
    ("cpu_threads: -2", "cpu_threads"),
    ("cpu_threads: 0", "cpu_threads"),
    ("lora_dropout: 1.0", "lora_dropout"),
    ("lora_alpha: 0", "lora_alpha"),
    ("adam_beta1: 1.0", "adam_beta1"),
    ("adam_beta2: -0.5", "adam_beta2"),
    ("adam_eps: 0", "adam_eps"),
    ("beta: 0", "beta"),
    ("alpha: -1", "alpha"),
    ("gamma: .inf", "gamma"),
    ("lambda_: 2", "lambda_"),
    ("alpha_v1: -0.5", "alpha_v1"),
    ("impl: garbage", "impl"),
    ("dtype: float8", "dtype"),
    ("max_length: 0", "max_length"),
    ("log_steps: 0", "log_steps"),
    ("eval_steps: -1", "eval_steps"),
    ("num_epochs: 0", "num_epochs"),
    ("max_steps: 2.5", "max_steps"),
    ("generate_tiny_data: -5", "generate_tiny_data"),
    ("train_file: 5", "train_file"),
    ("output_dir: ''", "output_dir"),
    ("model: null", "model"),
    ("extra: [1]", "extra"),
    ("run_name: 7", "run_name"),
    ("on_bad_tags: warn", "on_bad_tags"),
    ("preset: ppo", "preset"),
]


@pytest.mark.parametrize("line, field", BAD, ids=[b[0] for b in BAD])
def test_a_bad_value_names_its_field(tmp_path, line, field):
    path = tmp_path / "c.yaml"
    path.write_text(f"train_file: p.json\n{line}\n" if "train_file" not in line else line + "\n")
    with pytest.raises(ValueError, match=rf"^{field} "):
        TrainConfig.from_yaml(str(path))
    key, _, value = line.partition(": ")
    with pytest.raises(ValueError, match=rf"^{field} "):  # the same through --set
        TrainConfig.from_yaml(str(tmp_path / "ok.yaml"), [f"{key}={value}"])


@pytest.fixture(autouse=True)
def _ok_yaml(tmp_path):
    (tmp_path / "ok.yaml").write_text("train_file: p.json\n")


def test_good_values_still_load(tmp_path):
    path = tmp_path / "c.yaml"
    # YAML 1.1 reads 1e-6 (no dot) as a string: numbers written that way are still numbers.
    path.write_text(
        "train_file: p.json\nlr: 1e-6\nwarmup_ratio: 0\nmax_grad_norm: 0\nmax_steps: null\n"
        "cpu_threads: 2\nlora: false\ndevice: cpu\nimpl: torch\nextra: {a: 1}\n"
    )
    cfg = TrainConfig.from_yaml(str(path))
    assert cfg.lr == 1e-6 and isinstance(cfg.lr, float) and cfg.lora is False
    assert cfg.warmup_ratio == 0.0 and isinstance(cfg.warmup_ratio, float)


def test_generated_data_and_a_train_file_are_exclusive(tmp_path):
    """A mistyped train_file with generate_tiny_data > 0 used to train on synthetic data and
    write it next to that path (in the audit, into the filesystem root)."""
    with pytest.raises(ValueError, match="generate_tiny_data"):
        TrainConfig(train_file="/prefs/typo.json", generate_tiny_data=8)
    assert TrainConfig(generate_tiny_data=8).train_file == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda_is_an_error(tmp_path):
    cfg = TrainConfig(train_file="p.json", device="cuda", output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="device"):
        Trainer(cfg)
