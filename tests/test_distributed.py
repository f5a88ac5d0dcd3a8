"""Two CPU processes (torchrun, gloo) give the same loss and parameter update as one process
on the same global batch, and resume exactly."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
import yaml
from train_helpers import make_cfg

from fgpo.pairs.synthetic import make_preference_set

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("dist")
    env = dict(os.environ, FGPO_CACHE=str(base / "cache"), OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    prefs = make_preference_set(str(base / "data"), n=16, seed=5)
    cfg = make_cfg(
        base,
        prefs,
        adam_eps=1e-2,  # first Adam step ∝ gradient, not its sign (see test_trainer)
        micro_batch_size=2,
        save_steps=1,
        save_total_limit=0,
        gradient_checkpointing=True,
        cpu_threads=1,
        device="cpu",
    ).to_dict()
    path = base / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    # Build the tiny model once so the processes do not race on the cache.
    subprocess.run(
        [sys.executable, "-c", "import fgpo.models.tiny as t; t.ensure_tiny_model('tiny-llava')"],
        env=env,
        check=True,
    )
    return base, path, env


def _run(setup, out: str, nproc: int, *extra: str) -> str:
    """Run ``fgpo train``; returns its stderr (the start-up notes)."""
    _, cfg, env = setup
    cmd = [sys.executable, "-m", "fgpo.cli", "train", "--config", str(cfg), "--output-dir", out]
    cmd += [*extra]
    if nproc > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            f"--master_port={_free_port()}",
            "-m",
            "fgpo.cli",
            *cmd[3:],
        ]
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stderr


def _rows(out: str):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(r) for r in f]


def _params(out: str, step: int):
    return torch.load(os.path.join(out, f"checkpoint-{step}", "trainable.pt"), weights_only=True)


@pytest.mark.parametrize("mode", ["lora-ddp", "full-fsdp2"])
def test_two_processes_match_one(setup, mode):
    """Same loss, metrics and parameters after each of 2 steps; then resume under torchrun."""
    base = setup[0]
    extra = ["--set", "lora=false", "--set", "lr=1e-3"] if mode == "full-fsdp2" else []
    one, two = str(base / f"one-{mode}"), str(base / f"two-{mode}")
    # the default forward: shared prefix (LoRA: vision features shared by both models)
    notes = _run(setup, one, 1, *extra)
    from transformers import LlavaModel

    from fgpo.models.prefix import takes_vision_features

    once = mode == "lora-ddp" and takes_vision_features(LlavaModel)  # else per pass, and why
    vision = "vision features shared" if once else "per-pass vision"
    assert "shared prefix on (llava, sdpa)" in notes and vision in notes, notes[-2000:]
    _run(setup, two, 2, *extra)
    r1, r2 = _rows(one), _rows(two)
    assert [r["step"] for r in r2] == [1, 2]
    for a, b in zip(r1, r2):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
        assert b["rewards/margins"] == pytest.approx(a["rewards/margins"], rel=1e-5, abs=1e-9)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
        assert b["tokens"] == a["tokens"]
    assert r1[1]["rewards/margins"] != 0  # the first update moved the policy
    for step in (1, 2):
        p1, p2 = _params(one, step), _params(two, step)
        assert set(p1) == set(p2)
        for k in p1:
            torch.testing.assert_close(p2[k], p1[k], rtol=1e-5, atol=1e-7)
    state = json.loads(open(os.path.join(two, "checkpoint-2", "trainer_state.json")).read())
    assert state["world_size"] == 2 and state["fsdp"] == (mode == "full-fsdp2")
    if mode == "full-fsdp2":  # the export is a complete Hub model
        assert os.path.exists(os.path.join(two, "checkpoint-2", "model", "config.json"))

    # Resume under torchrun: drop the last checkpoint, continue from step 1.
    shutil.rmtree(os.path.join(two, "checkpoint-2"))
    os.remove(os.path.join(two, "latest"))
    _run(setup, two, 2, *extra, "--resume")
    p_full, p_res = _params(one, 2), _params(two, 2)
    for k in p_full:
        torch.testing.assert_close(p_res[k], p_full[k], rtol=1e-5, atol=1e-7)
    assert [r["step"] for r in _rows(two)] == [1, 2]
