"""The memory simulator (benchmarks/memory_model.py, benchmarks/memsim/): a tiny step simulated
on meta tensors has the peak of the same step run for real, the fake Triton / CUDA host code
allocates what the real host code does, the known-value rules, the straightforward way computes
the FiRe-MPO objective, and the command line on a user's config."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.memsim import step  # noqa: E402
from benchmarks.memsim.values import KnownValues  # noqa: E402

# Stated tolerance of the simulation against a real CPU step (tensor bytes at the peak): the
# simulated step makes a few extra 0-d/small copies (constants built on the CPU and moved).
TOLERANCE = 0.01


@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
    from fgpo.pairs.synthetic import make_preference_set

    os.environ.setdefault("FGPO_CACHE", str(tmp_path_factory.mktemp("cache")))
    return make_preference_set(str(tmp_path_factory.mktemp("prefs")), n=8, seed=0)


@pytest.mark.parametrize(
    "tiny,checkpointing,way,shared",
    [
        ("tiny-qwen2.5-vl", True, "ours", True),  # packing, M-RoPE, windows, checkpointing
        ("tiny-qwen2.5-vl", True, "ours", False),
        ("tiny-llava", False, "ours", True),
        ("tiny-llava", True, "materialized", False),
    ],
)
def test_simulated_peak_equals_real_cpu_peak(prefs, tmp_path, tiny, checkpointing, way, shared):
    torch.set_num_threads(1)
    real, simulated, assumed = step.real_vs_simulated(
        tiny, checkpointing=checkpointing, way=way, train_file=prefs, out_dir=str(tmp_path),
        options={"shared_prefix": shared},
    )  # fmt: skip
    assert real > 0
    assert abs(simulated - real) <= TOLERANCE * real, (real, simulated)
    # What the simulation could not know is only ever a gradient's or a metric's value.
    for what in assumed:
        assert "read as" in what and ("fgpo_kernels/" in what or "train/" in what), what


def _logged_allocations(fn) -> list[tuple]:
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten
    factories = {aten.empty.memory_format, aten.zeros.default, aten.empty_like.default,
                 aten.new_zeros.default, aten.stack.default, aten.cat.default}  # fmt: skip

    class Log(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.allocs = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in factories and out.numel():
                self.allocs.append((func.__name__.split(".")[0], tuple(out.shape), out.dtype))
            return out

    with Log() as log:
        fn()
    return log.allocs


@pytest.mark.parametrize("mode", ["gblock", "atomic"])
def test_fake_triton_allocates_what_the_host_code_allocates(monkeypatch, mode):
    """The real host code runs on the CPU in Triton's interpreter; the fake on meta tensors
    takes its sizes from the same functions (under the interpreter: the interpreter's)."""
    from fgpo_kernels import _fake, triton_kl
    from fgpo_kernels._backend import Needs, RowGrads

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("FGPO_TRITON_BWD", mode)
    if not triton_kl.probe()["available"]:
        pytest.skip(triton_kl.probe()["reason"])
    n, d, v = 37, 48, 1003
    gen = torch.Generator().manual_seed(0)
    h, hr, w = (torch.randn(*s, generator=gen) for s in ((n, d), (n, d), (v, d)))
    grads = RowGrads(*(torch.randn(n, generator=gen) for _ in range(4)))
    need = Needs(True, False, True, False)

    def run(backend, h, hr, w, grads):
        stats = backend.forward(h, hr, w, None, 1.0)
        backend.backward(h, hr, w, None, 1.0, stats, grads, need)

    real = _logged_allocations(lambda: run(triton_kl, h, hr, w, grads))
    meta = [x.to("meta") for x in (h, hr, w, *grads)]
    with _fake.simulate_gpu():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        fake = _logged_allocations(lambda: run(_fake.TritonFake(), *meta[:3], RowGrads(*meta[3:])))
    assert fake == real
    assert ("empty", (6, n, 2), torch.float32) in real  # the split partials are in the log


def test_fake_cuda_sizes_come_from_cuda_kl(monkeypatch):
    from fgpo_kernels import _fake, cuda_kl
    from fgpo_kernels._backend import Needs, RowGrads, RowStats

    if cuda_kl._ext() is None:
        pytest.skip("fgpo_kernels._C is not built")
    n, d, v = 300, 60, 5000  # D = 60: not a multiple of 8, so the inputs are padded to 64
    h, hr, w = (torch.empty(*s, dtype=torch.bfloat16, device="meta")
                for s in ((n, d), (n, d), (v, d)))  # fmt: skip
    with _fake.simulate_gpu(sm_count=132):
        plan = cuda_kl._plan(n, v, d, d, True, _fake.SIM_DEVICE)
        splits = plan.splits
        allocs = _logged_allocations(lambda: _fake.CudaFake().forward(h, hr, w, None, 1.0))
        assert ("empty", (splits * 6 * n,), torch.float32) in allocs
        assert ("new_zeros", (v, 64), torch.bfloat16) in allocs  # the padded copy of W
        g = RowGrads(*(torch.empty(n, device="meta") for _ in range(4)))
        need = Needs(True, True, True, False)
        monkeypatch.setenv("FGPO_CUDA_BWD", "cuda")  # the CUDA kernel's buffers (padded)
        allocs = _logged_allocations(
            lambda: _fake.CudaFake().backward(h, hr, w, None, 1.0, None, g, need)
        )
        assert ("zeros", (v, 64), torch.float32) in allocs
        out = _fake.CudaFake().backward(h, hr, w, None, 1.0, None, g, need)
        # The default backward is triton's gblock (cuda_kl.bwd_choice): its G buffer instead.
        monkeypatch.delenv("FGPO_CUDA_BWD")
        stats = RowStats(*(torch.empty(n, device="meta") for _ in range(4)))
        allocs = _logged_allocations(
            lambda: _fake.CudaFake().backward(h, hr, w, None, 1.0, stats, g, need)
        )
        assert ("zeros", (v, 64), torch.float32) not in allocs
        assert any(a[0] == "empty" and a[1][0] == 2 * n and a[2] == torch.bfloat16 for a in allocs)
    assert out.dh.shape == (n, d) and out.dw.shape == (v, d) and out.dwr is None
    # The launch plan's choice for 132 SMs (_launch.plan): within the L2 budget, whole waves
    # where the tiles allow (3 row blocks x 40 tiles cannot fill 132 SMs: one tile per split).
    assert plan.per_wave == 132 and plan.fits and splits == plan.n_tiles == 40, plan


def test_known_values_answer_data_dependent_ops():
    with KnownValues() as known:
        mask = torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]]).to("meta")
        rows = (mask != 0).nonzero()
        assert rows.shape == (3, 2)  # the real count
        hidden = torch.empty(2, 3, 8, device="meta")
        assert hidden[mask != 0].shape == (3, 8)  # boolean gather of unknown rows
        grid = torch.tensor([[1, 4, 6]]).to("meta")
        assert grid.tolist() == [[1, 4, 6]] and int(grid.prod()) == 24
        grad = torch.empty(5, device="meta")
        assert bool((grad != 0).all())  # unknown floats are finite and nonzero
        assert not bool(torch.isnan(grad).any())
        with pytest.raises(RuntimeError, match=r"unknown torch\.int64"):
            int(torch.empty(3, dtype=torch.long, device="meta").sum())
    assert any("ne.Scalar read as True" in k for k in known.assumed)


def test_materialized_way_computes_the_fire_mpo_objective(prefs, tmp_path):
    """Same model, same micro-batch: the straightforward way's loss and LoRA gradients equal
    the trainer's (FiReMPOLoss from hidden states)."""
    from fgpo.models import tiny
    from fgpo.train import TrainConfig, Trainer

    torch.set_num_threads(1)
    cfg = TrainConfig(model="tiny-llava", dtype="float32", train_file=prefs, lambda_=0.3,
                      output_dir=str(tmp_path), lora_r=4, lora_alpha=8, lora_dropout=0.0,
                      global_batch_size=4, micro_batch_size=4, gradient_checkpointing=False,
                      impl="torch", progress_bar=False, tensorboard=False, prefetch=False,
                      device="cpu")  # fmt: skip
    results = []
    for cls in (Trainer, step.MaterializedTrainer):
        torch.manual_seed(0)
        model, proc = tiny.build_tiny("tiny-llava")
        tr = cls(cfg, model=model, processor=proc)
        tr.load()
        tr.load_data()
        for p in tr.trainable.values():  # LoRA B starts at zero: give the policy a difference
            torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(p.numel()))
        b = tr.encode(0)[0]
        out = tr.compute_loss(b, *tr.forward(b))
        out.loss.backward()
        results.append((out.loss.detach(), [p.grad.clone() for p in tr.trainable.values()]))
    (l1, g1), (l2, g2) = results
    torch.testing.assert_close(l2, l1, rtol=1e-4, atol=1e-6)
    for a, b in zip(g2, g1):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)


def test_bad_model_config_is_named(tmp_path):
    missing = tmp_path / "none.json"
    with pytest.raises(ValueError, match=r"none\.json"):
        step.load_model_config(str(missing))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ValueError, match="model_type"):
        step.load_model_config(str(bad))
    text_only = tmp_path / "llama.json"
    text_only.write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="not a vision-language"):
        step.load_model_config(str(text_only))


def test_command_line_on_a_users_config(tmp_path):
    """``--model-config`` on a config.json (a tiny LLaVA's): a labelled CSV row, the table."""
    from fgpo.models import tiny

    model, _ = tiny.build_tiny("tiny-llava")
    cfg = tmp_path / "my_vlm.json"
    cfg.write_text(model.config.to_json_string())
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "benchmarks.memory_model", "--models", "--model-config",
           str(cfg), "--micro-batch", "2", "--checkpointing", "on", "--impls", "torch",
           "--image-size", "64", "--out", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    with open(out / "simulated_memory.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["way"] for r in rows} == {"ours", "materialized"}, rows
    for r in rows:
        assert r["status"] == "ok", r
        assert r["note"] == "simulated with fake tensors, not measured on a GPU"
        assert float(r["simulated_peak_gib"]) > 0 and r["model"] == "my_vlm"
    (mat,) = [r for r in rows if r["way"] == "materialized"]
    ours = [r for r in rows if r["way"] == "ours"]
    # The trainer's shared_prefix is swept for ours (both settings); the straightforward way
    # runs every sequence on its own.
    assert sorted(json.loads(r["options"])["shared_prefix"] for r in ours) == [False, True]
    assert json.loads(mat["options"]) == {"shared_prefix": False}
    for r in ours:
        assert float(mat["simulated_peak_gib"]) > float(r["simulated_peak_gib"]), (mat, r)
    text = (out / "simulated_memory.md").read_text()
    assert "simulated with fake tensors, not measured on a GPU" in text
