"""Fault audit of the training loop (issue 11, items 1, 2, 5, 8): Ctrl-C at any phase resumes
bit for bit, a NaN loss stops the run keeping the last good checkpoint, a reused output
directory is refused (or moved aside), ``--resume`` refuses a changed config, and the model
cache never changes a result."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from train_helpers import make_cfg, make_trainer, read_rows, trainable

from fgpo.cli import main
from fgpo.train import Trainer
from fgpo.train.logs import MetricsLog

pytestmark = pytest.mark.usefixtures("train_env")

# 4 steps of 2 micro-batches, LoRA dropout (so the RNG state matters), a checkpoint every 2
# steps, and an evaluation after every step that consumes the RNG (the trainer puts it back).
RUN = dict(max_steps=4, save_steps=2, lora_dropout=0.3, micro_batch_size=4, eval_steps=1)


def _eval_fn(model):
    return {"noise": float(torch.rand(()))}


def _run_dir(tmp_path, name):
    return tmp_path / name / "run"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, prefs, llava):
    """The uninterrupted run: its metrics rows, trainable tensors and optimizer state."""
    base = tmp_path_factory.mktemp("reference")
    tr = make_trainer(make_cfg(base, prefs, **RUN), llava, eval_fn=_eval_fn)
    tr.train()
    return read_rows(base / "run"), trainable(tr), tr.optimizer.state_dict()["state"]


def _assert_same_as(reference, tr, out_dir):
    rows, params, opt = reference
    assert read_rows(out_dir) == rows
    for k, v in trainable(tr).items():
        assert torch.equal(v, params[k]), k
    for i, st in tr.optimizer.state_dict()["state"].items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(st[key], opt[i][key]), (i, key)


def _sigint() -> None:
    os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C: raised where Python next checks


@pytest.fixture
def ctrl_c_raises():
    """Python's own Ctrl-C handler for the test: a pytest started in the background by a
    non-interactive shell inherits SIGINT ignored, and no Ctrl-C would ever arrive."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _arm(tr: Trainer, phase: str, monkeypatch, at: int = 1) -> None:
    """Send one SIGINT during ``phase`` of step ``at`` (0-based; the second step: no
    checkpoint exists yet, so the failure handler must write the right one)."""
    now = {"step": -1, "fired": False, "calls": 0}

    def fire(cond: bool = True) -> None:
        if now["step"] == at and cond and not now["fired"]:
            now["fired"] = True
            _sigint()

    step = tr.train_step

    def train_step(s, micro=None):
        now["step"], now["calls"] = s, 0
        return step(s, micro)

    tr.train_step = train_step
    if phase == "forward":
        fwd = tr.forward
        tr.forward = lambda b: (fire(), fwd(b))[1]
    elif phase == "backward":
        next(iter(tr.trainable.values())).register_hook(lambda g: fire())
    elif phase == "between_micro_batches":
        loss = tr.compute_loss

        def compute_loss(*a):
            now["calls"] += 1
            fire(now["calls"] == 2)
            return loss(*a)

        tr.compute_loss = compute_loss
    elif phase == "after_optimizer_step":  # lands between the optimizer and the scheduler
        orig = tr.optimizer.step
        tr.optimizer.step = lambda *a, **k: (orig(*a, **k), fire())[0]
    elif phase == "scheduler_step":  # on the class: its state_dict pickles the instance's dict
        orig_s = type(tr.scheduler).step
        monkeypatch.setattr(type(tr.scheduler), "step", lambda *a: (orig_s(*a), fire())[0])
    elif phase == "prefetch":  # encoding of the next step, in the prefetch thread
        enc = tr.encode
        tr.encode = lambda s: (fire(s == at + 1), enc(s))[1]
    elif phase == "eval":
        tr.eval_fn = lambda m: (fire(), _eval_fn(m))[1]
    elif phase == "log":
        write = MetricsLog.write
        monkeypatch.setattr(MetricsLog, "write", lambda self, row: (write(self, row), fire()))
    elif phase == "save":  # inside the checkpoint write after step 2 (the second file)
        save = torch.save

        def saving(*a, **k):
            now["calls"] += 1
            fire(now["calls"] == 2)
            return save(*a, **k)

        monkeypatch.setattr(torch, "save", saving)
    else:
        raise AssertionError(phase)


PHASES = [
    "forward",
    "backward",
    "between_micro_batches",
    "after_optimizer_step",
    "scheduler_step",
    "prefetch",
    "eval",
    "log",
    "save",
]


@pytest.mark.parametrize("phase", PHASES)
def test_ctrl_c_at_any_phase_resumes_bit_exactly(tmp_path, prefs, llava, reference, phase,
                                                 monkeypatch, ctrl_c_raises):  # fmt: skip
    """Before: Ctrl-C after a completed step (eval, log, save) checkpointed the RNG of the
    step's start, and Ctrl-C after ``optimizer.step()`` saved the updated weights as the
    previous step; both resumed into a different run without a word."""
    cfg = make_cfg(tmp_path, prefs, **RUN)
    tr = make_trainer(cfg, llava, eval_fn=_eval_fn)
    tr.load()
    tr.load_data()
    _arm(tr, phase, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        tr.train()
    monkeypatch.undo()
    assert (tmp_path / "run" / "latest").exists(), "the failure handler saved nothing"
    again = make_trainer(cfg, llava, eval_fn=_eval_fn)
    again.train(resume=True)
    _assert_same_as(reference, again, tmp_path / "run")


def test_nan_loss_stops_keeping_the_last_good_checkpoint(tmp_path, prefs, llava, reference):
    """Before: NaN losses were trained on and the run ended with exit 0."""
    cfg = make_cfg(tmp_path, prefs, **RUN)
    tr = make_trainer(cfg, llava, eval_fn=_eval_fn)
    tr.load()
    tr.load_data()
    fwd = tr.forward
    steps = []
    step = tr.train_step
    tr.train_step = lambda s, micro=None: (steps.append(s), step(s, micro))[1]

    def forward(b):
        h, h_ref, w, w_ref = fwd(b)
        return (h * float("nan"), h_ref, w, w_ref) if steps[-1] == 1 else (h, h_ref, w, w_ref)

    tr.forward = forward
    with pytest.raises(FloatingPointError, match=r"step 2: the loss is nan.*loss/rank=nan"):
        tr.train()
    out = tmp_path / "run"
    assert (out / "latest").read_text() == "checkpoint-1"
    assert [r["step"] for r in read_rows(out)] == [1]  # the NaN step was not logged
    again = make_trainer(cfg, llava, eval_fn=_eval_fn)  # the kept state is the good one
    assert again.train(resume=True, stop_after=1)["start_step"] == 1
    assert read_rows(out) == reference[0][:1]


def test_cli_exits_non_zero_on_a_diverging_run(tmp_path, prefs):
    argv = [
        "train",
        "--config",
        "tiny",
        "--output-dir",
        str(tmp_path / "cli"),
        "--max-steps",
        "4",
        "--set",
        "lr=1e30",
        "--set",
        "save_steps=1",
        "--set",
        "progress_bar=false",
    ]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code not in (0, None) and "the loss is" in str(e.value.code)
    assert (tmp_path / "cli" / "latest").read_text() == "checkpoint-1"


def test_a_new_run_refuses_a_directory_holding_another(tmp_path, prefs, llava):
    """Before: the new run truncated metrics.jsonl, save_total_limit deleted its own new
    checkpoint (the old run's had higher steps) and a later --resume continued the OLD run."""
    old = make_trainer(make_cfg(tmp_path, prefs, max_steps=4, save_steps=2), llava)
    old.train()
    out = tmp_path / "run"
    before = {p: (out / p).read_bytes() for p in ("metrics.jsonl", "latest")}
    new_cfg = make_cfg(tmp_path, prefs, max_steps=2, save_steps=1, lr=1e-3)
    with pytest.raises(FileExistsError, match=r"holds another run.*--resume.*--overwrite"):
        make_trainer(new_cfg, llava).train()
    assert {p: (out / p).read_bytes() for p in before} == before
    # --overwrite moves the old run aside, whole; the new one starts at step 0
    new = make_trainer(new_cfg, llava)
    assert new.train(overwrite=True)["start_step"] == 0
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(aside) == 1
    assert (aside[0] / "metrics.jsonl").read_bytes() == before["metrics.jsonl"]
    assert sorted(p.name for p in aside[0].glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert (out / "latest").read_text() == "checkpoint-2"
    assert [r["step"] for r in read_rows(out)] == [1, 2]


def test_resume_refuses_a_config_that_changes_the_result(tmp_path, prefs, llava):
    """Before: --resume with another lr, schedule or batch continued silently."""
    make_trainer(make_cfg(tmp_path, prefs, max_steps=4, save_steps=2), llava).train(stop_after=2)
    changed = make_cfg(tmp_path, prefs, max_steps=6, save_steps=2, lr=1e-3, gamma=0.0)
    with pytest.raises(ValueError, match=r"lr: 0\.005 -> 0\.001.*max_steps: 4 -> 6") as e:
        make_trainer(changed, llava).train(resume=True)
    assert "gamma" in str(e.value) and "--allow-config-change" in str(e.value)
    # operational fields (checkpoint cadence, logging) may change
    ok = make_cfg(tmp_path, prefs, max_steps=4, save_steps=1, log_steps=2)
    assert make_trainer(ok, llava).train(resume=True, stop_after=3)["start_step"] == 2
    # an explicit allowance continues
    summary = make_trainer(changed, llava).train(resume=True, allow_config_change=True)
    assert summary["start_step"] == 3 and summary["steps"] == 6


def test_resume_refuses_changed_training_data(tmp_path, prefs, llava):
    data = tmp_path / "prefs.json"
    recs = json.loads(open(prefs).read())
    data.write_text(json.dumps(recs))
    cfg = make_cfg(tmp_path, str(data), max_steps=2, save_steps=1)
    make_trainer(cfg, llava).train(stop_after=1)
    recs[0]["chosen"] = recs[0]["rejected"]
    data.write_text(json.dumps(recs))
    with pytest.raises(ValueError, match=r"train_file.*prefs\.json.*changed"):
        make_trainer(cfg, llava).train(resume=True)


def test_a_truncated_last_metrics_line_does_not_block_resume(tmp_path, prefs, llava, reference):
    """A kill during the last write left half a line; --resume failed on it before."""
    cfg = make_cfg(tmp_path, prefs, **RUN)
    make_trainer(cfg, llava, eval_fn=_eval_fn).train(stop_after=2)
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.69')
    again = make_trainer(cfg, llava, eval_fn=_eval_fn)
    again.train(resume=True)
    _assert_same_as(reference, again, tmp_path / "run")


def test_empty_model_cache_equals_filled_cache(tmp_path, prefs, monkeypatch):
    """Before: building the tiny model consumed the RNG, so LoRA started from another state
    than in a later run that loaded the cached model."""
    monkeypatch.setenv("FGPO_CACHE", str(tmp_path / "fresh_cache"))
    runs = []
    for name in ("empty", "filled"):
        cfg = make_cfg(tmp_path / name, prefs, seed=5, lora_dropout=0.3, max_steps=2)
        tr = Trainer(cfg)
        tr.train()
        runs.append((trainable(tr), read_rows(tmp_path / name / "run")))
    (a, rows_a), (b, rows_b) = runs
    assert rows_a == rows_b
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # Building a tiny model into an empty cache leaves the caller's generators alone.
    from fgpo.models import tiny

    monkeypatch.setenv("FGPO_CACHE", str(tmp_path / "another_cache"))
    before = torch.get_rng_state()
    tiny.ensure_tiny_model("tiny-llava")
    assert torch.equal(torch.get_rng_state(), before)
