"""Fault audit of checkpoints (issue 11, items 4 and 9 and the named errors): damaged files
are caught by their digests with the file named, nothing in a checkpoint runs code, a full disk
says so and where, leftovers of killed saves are cleaned, and kill -9 at random moments around
saves resumes bit for bit."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import time

import pytest
import torch
import yaml
from train_helpers import make_cfg, make_trainer, read_rows, trainable

from fgpo.train import Trainer
from fgpo.train import checkpoint as ckpt

pytestmark = pytest.mark.usefixtures("train_env")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = ("trainable.pt", "optimizer.pt", "scheduler.pt", "rng-0.pt", "trainer_state.json")
RUN = dict(max_steps=2, save_steps=1, save_total_limit=0, lora_dropout=0.3)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, prefs, llava):
    """A run of 2 steps with checkpoints 1 and 2, and its final trainable tensors."""
    base = tmp_path_factory.mktemp("saved")
    tr = make_trainer(make_cfg(base, prefs, **RUN), llava)
    tr.train()
    return base / "run", trainable(tr)


def _copy_run(saved, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(saved[0], out)
    return out


def _damage(path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "flip":  # one bit in the middle: the file still parses
        data[len(data) // 2] ^= 0x10
    elif how == "truncate":
        data = data[: len(data) // 2]
    else:
        data = bytearray()
    path.write_bytes(bytes(data))


def _names(out):
    return set(torch.load(out / "checkpoint-2" / "trainable.pt", weights_only=True))


@pytest.mark.parametrize("how", ["flip", "truncate", "empty"])
@pytest.mark.parametrize("name", FILES)
def test_a_damaged_file_is_named(tmp_path, saved, name, how):
    """Before: a flipped bit in optimizer.pt resumed into another state with exit 0; a
    truncated or empty file failed with a bare EOFError / 'OSError: Invalid argument'."""
    out = _copy_run(saved, tmp_path)
    names = _names(out)
    _damage(out / "checkpoint-2" / name, how)
    with pytest.raises(ckpt.CheckpointError, match=rf"checkpoint-2/{name}.*damaged"):
        ckpt.load_checkpoint(str(out / "checkpoint-2"), rank=0, names=names)


@pytest.mark.parametrize("how", ["missing", "invalid"])
def test_a_missing_or_invalid_digest_list_is_named(tmp_path, saved, how):
    out = _copy_run(saved, tmp_path)
    digests = out / "checkpoint-2" / "digests.json"
    digests.unlink() if how == "missing" else digests.write_text("{not json")
    with pytest.raises(ckpt.CheckpointError, match=r"checkpoint-2/digests\.json"):
        ckpt.load_checkpoint(str(out / "checkpoint-2"), rank=0, names=_names(out))


def _redigest(ckpt_dir, name) -> None:
    """What an attacker who can write the checkpoint does: record the planted file's digest."""
    path = ckpt_dir / "digests.json"
    table = json.loads(path.read_text())
    data = (ckpt_dir / name).read_bytes()
    table[name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    path.write_text(json.dumps(table))


class _Payload:
    """Unpickling this calls ``marker.touch()``: code run from a checkpoint file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (type(self.marker).touch, (self.marker,))


def test_a_planted_object_never_runs(tmp_path, saved, prefs, llava):
    """Before: optimizer.pt, scheduler.pt and rng-*.pt were loaded with weights_only=False and
    a planted object ran on --resume."""
    out = _copy_run(saved, tmp_path)
    marker = tmp_path / "payload-ran"
    for name in ("optimizer.pt", "scheduler.pt", "rng-0.pt"):
        path = out / "checkpoint-2" / name
        good = path.read_bytes()
        torch.save({"state": _Payload(marker), "param_groups": []}, path)
        _redigest(out / "checkpoint-2", name)
        with pytest.raises(ckpt.CheckpointError, match=rf"{name}.*weights_only"):
            make_trainer(make_cfg(tmp_path, prefs, **RUN), llava).train(resume=True)
        assert not marker.exists(), f"the object planted in {name} ran"
        path.write_bytes(good)
        _redigest(out / "checkpoint-2", name)


def test_fallback_to_the_previous_checkpoint_only_when_asked(tmp_path, saved, prefs, llava,
                                                             caplog):  # fmt: skip
    out = _copy_run(saved, tmp_path)
    _damage(out / "checkpoint-2" / "optimizer.pt", "flip")
    cfg = make_cfg(tmp_path, prefs, **RUN)
    with pytest.raises(ckpt.CheckpointError, match=r"optimizer\.pt.*--resume-fallback"):
        make_trainer(cfg, llava).train(resume=True)
    tr = make_trainer(cfg, llava)
    with caplog.at_level(logging.WARNING, logger="fgpo"):
        summary = tr.train(resume=True, resume_fallback=True)
    assert summary["start_step"] == 1
    assert "checkpoint-2" in caplog.text and "resuming from" in caplog.text
    for k, v in trainable(tr).items():  # step 2 redone from checkpoint 1: the same weights
        assert torch.equal(v, saved[1][k]), k


def _full_disk(monkeypatch, module, suffix: str, after: int = 0):
    """Writes to files ending in ``suffix`` (after ``after`` of them) go to /dev/full."""
    import builtins

    seen = {"n": 0}

    def fake_open(path, mode="r", *a, **k):
        if "w" in mode or "a" in mode:
            if os.fspath(path).endswith(suffix):
                seen["n"] += 1
                if seen["n"] > after:
                    return builtins.open("/dev/full", mode.replace("a", "w"), *a, **k)
        return builtins.open(path, mode, *a, **k)

    monkeypatch.setattr(module, "open", fake_open, raising=False)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_disk_says_no_space_left_and_where(tmp_path, prefs, llava, monkeypatch):
    """Before: torch.save failed with 'basic_ios::clear: iostream error' (no path, no cause)."""
    from fgpo.data import files
    from fgpo.train import logs

    cfg = make_cfg(tmp_path, prefs, max_steps=3, save_steps=1)
    _full_disk(monkeypatch, ckpt, "optimizer.pt", after=1)  # checkpoint 1 fits, 2 does not
    with pytest.raises(OSError, match=r"no space left.*checkpoint-2/optimizer\.pt"):
        make_trainer(cfg, llava).train()
    out = tmp_path / "run"
    assert (out / "latest").read_text() == "checkpoint-1"
    assert not [p for p in os.listdir(out) if ".tmp" in p]  # the partial save is removed
    monkeypatch.undo()
    _full_disk(monkeypatch, logs, "metrics.jsonl")
    _full_disk(monkeypatch, files, "metrics.jsonl")
    with pytest.raises(OSError, match=r"no space left.*metrics\.jsonl"):
        make_trainer(cfg, llava).train(resume=True)


def test_leftovers_of_killed_saves_are_cleaned_on_start(tmp_path, saved, prefs, llava):
    out = _copy_run(saved, tmp_path)
    (out / "latest.tmp-99999").write_text("checkpoint-9")
    (out / ".tmp-checkpoint-3").mkdir()
    (out / ".tmp-checkpoint-3" / "trainable.pt").write_bytes(b"partial")
    make_trainer(make_cfg(tmp_path, prefs, **RUN), llava).train(resume=True)
    assert sorted(p for p in os.listdir(out) if "tmp" in p) == []


# ----------------------------------------------------------------- kill -9 in a loop


def _train_cmd(cfg_path, out, resume: bool) -> list[str]:
    cmd = [sys.executable, "-m", "fgpo.cli", "train", "--config", str(cfg_path)]
    return cmd + ["--output-dir", str(out)] + (["--resume"] if resume else [])


def _latest_step(out) -> int:
    try:
        return int((out / "latest").read_text().strip().split("-")[-1])
    except (OSError, ValueError):
        return 0


def _wait_for_training(proc, out, during_save: bool, min_step: int) -> bool:
    """Poll until checkpoint ``min_step`` exists and then the process trains
    (``metrics.jsonl`` changes) or, with ``during_save``, writes a checkpoint; False when it
    ended first."""
    metrics = out / "metrics.jsonl"
    seen = None
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if _latest_step(out) >= min_step:
            if during_save:
                if out.exists() and any(n.startswith(".tmp-ch") for n in os.listdir(out)):
                    return True
            else:
                mtime = metrics.stat().st_mtime_ns if metrics.exists() else 0
                if seen is not None and mtime != seen:
                    return True
                seen = mtime
        time.sleep(0.002)
    return proc.poll() is None


def test_kill_9_at_random_moments_resumes_bit_exactly(tmp_path, prefs):
    """SIGKILL (no handler runs) at random moments of a run that checkpoints every step:
    every restart with --resume continues, and the end equals an uninterrupted run."""
    from fgpo.models import tiny

    tiny.ensure_tiny_model("tiny-llava")  # built once, outside the killed processes
    cfg = make_cfg(tmp_path / "ref", prefs, lora_dropout=0.3, max_steps=6, save_steps=1,
                   save_total_limit=2, cpu_threads=1, device="cpu")  # fmt: skip
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.to_dict()))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = dict(env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    Trainer(cfg).train()  # the uninterrupted run, in tmp_path/ref/run
    out, rng, kills, first = tmp_path / "killed", random.Random(11), [], True
    # Kill k waits for checkpoint k (so the run progresses), then lands while a checkpoint is
    # being written (a .tmp-checkpoint-* exists; even k) or at a random moment of a step (odd).
    while True:
        proc = subprocess.Popen(_train_cmd(cfg_path, out, not first), **run)
        first = False
        k = len(kills)
        if k < 4 and _wait_for_training(proc, out, during_save=k % 2 == 0, min_step=k):
            time.sleep(rng.uniform(0.0, 0.3) if k % 2 else 0.0)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
                kills.append(sorted(os.listdir(out)))
                continue
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        break
    assert any(".tmp-checkpoint" in " ".join(k) for k in kills), kills  # one during a save
    assert read_rows(out) == read_rows(tmp_path / "ref" / "run")
    want = torch.load(tmp_path / "ref" / "run" / "checkpoint-6" / "trainable.pt", weights_only=True)
    got = torch.load(out / "checkpoint-6" / "trainable.pt", weights_only=True)
    for k in want:
        assert torch.equal(got[k], want[k]), k
