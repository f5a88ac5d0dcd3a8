"""Benchmark shapes: LM heads of real models, and the presets the runner can run.

A *case* is one (op, N, D, V, dtype) point; every impl is timed on every case of a preset.
``N`` is the number of rows (positions) that reach the head, ``D`` the hidden size, ``V`` the
vocabulary. Presets that end in a CPU run use scaled-down heads (the matmul work of a 7B head at
N=1024 takes a minute per step on two cores); the GPU presets use the real ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# (hidden_size, vocab_size) from each model's config.json; the head is (V, D), untied.
MODELS: dict[str, tuple[int, int, str]] = {
    "qwen2.5-vl-7b": (3584, 152064, "Qwen2.5-VL-7B / HuatuoGPT-Vision-7B"),
    "qwen3-vl-4b": (2560, 151936, "Qwen3-VL-4B"),
    "llava-med-7b": (4096, 32000, "LLaVA-Med-7B (Mistral/LLaMA vocabulary)"),
}

N_SWEEP = (256, 512, 1024, 2048, 4096, 8192, 16384)

OPS = ("token_kl", "token_logprobs", "fire_mpo_step")


@dataclass(frozen=True)
class Case:
    op: str
    n: int
    d: int
    v: int
    dtype: str  # "float32" | "bfloat16" | "float16"
    shape: str  # a label: model name, "spec", "scaled:<model>", "tiny"
    # fire_mpo_step only: batch size, sequence length, response and span lengths.
    seq: tuple[int, int, int, int] | None = None
    note: str = ""

    def key(self) -> tuple:
        return (self.op, self.n, self.d, self.v, self.dtype, self.shape, self.seq)


@dataclass
class Preset:
    name: str
    help: str
    cases: list[Case] = field(default_factory=list)
    modes: tuple[str, ...] = ("forward", "backward", "full")
    repeats: int = 10
    # impls run only at this preset (e.g. the Triton interpreter on CPU at tiny shapes)
    interpreter_ok: bool = False


def _kernel_cases(ops, shapes, dtype, label) -> list[Case]:
    return [Case(op, n, d, v, dtype, label) for op in ops for (n, d, v) in shapes]


def _scaled(model: str, f: int) -> tuple[int, int]:
    d, v, _ = MODELS[model]
    return d // f, v // f


def e2e_case(model: str, dtype: str, b: int, seq_len: int, resp: int, span: int, f: int = 1):
    """One FiRe-MPO step: B examples x 4 sequences of L positions, ``resp`` response tokens,
    ``span`` span-masked tokens each; the head of ``model`` scaled down by ``f``."""
    d, v = _scaled(model, f)
    label = model if f == 1 else f"scaled1/{f}:{model}"
    # N reported for an e2e case: rows a materialized trainer projects (8 passes x B x L).
    return Case("fire_mpo_step", 8 * b * seq_len, d, v, dtype, label, (b, seq_len, resp, span))


def presets() -> dict[str, Preset]:
    p: dict[str, Preset] = {}
    kernel_ops = ("token_kl", "token_logprobs")

    # --quick: CPU, a few minutes on two idle cores. Heads scaled down (D=256; V up to 32768):
    # an N sweep at V=8192 and a V sweep at N=512, the Triton interpreter at a tiny shape, and
    # the end-to-end step at Qwen2.5-VL-7B's head scaled down 1/8.
    qs = [(128, 256, 8192), (512, 256, 8192), (2048, 256, 8192)]
    qs += [(512, 256, 2048), (512, 256, 32768)]
    quick = _kernel_cases(kernel_ops, qs, "float32", "scaled")
    quick += [Case(op, 64, 64, 1000, "float32", "tiny", note="interpreter") for op in kernel_ops]
    quick.append(e2e_case("qwen2.5-vl-7b", "float32", 2, 256, 64, 16, f=8))
    p["quick"] = Preset("quick", "CPU smoke run at scaled-down shapes (minutes)", quick,
                        modes=("forward", "full"), repeats=3, interpreter_ok=True)  # fmt: skip

    # The committed CPU results: the design §4 shape family (D=512) over N at V=32000 (N=4096 is the
    # design §4 CPU criterion), a V sweep at N=256 up to a real vocabulary, the Triton interpreter
    # at the tiny shape, and the end-to-end step at Qwen2.5-VL-7B's head scaled down 1/8.
    cs = [(n, 512, 32000) for n in (256, 1024, 4096)]
    cs += [(256, 512, v) for v in (8000, 152064)]
    cpu = _kernel_cases(kernel_ops, cs, "float32", "cpu-sweep")
    cpu += [Case(op, 64, 64, 1000, "float32", "tiny", note="interpreter") for op in kernel_ops]
    cpu.append(e2e_case("qwen2.5-vl-7b", "float32", 2, 512, 128, 32, f=8))
    p["cpu"] = Preset("cpu", "the committed CPU suite (about half an hour on two cores)", cpu,
                      modes=("forward", "full"), repeats=5, interpreter_ok=True)  # fmt: skip

    # docs/design.md §4 / issue 2: token_kl forward+backward, N=4096, D=512, V=32000, fp32, CPU.
    p["spec"] = Preset("spec", "design §4 CPU criterion: token_kl N=4096 D=512 V=32000 fp32 full",
                       [Case("token_kl", 4096, 512, 32000, "float32", "spec")],
                       modes=("full",), repeats=5)  # fmt: skip

    # Tiny shapes: the smoke test, and the Triton interpreter on CPU.
    tiny = [Case(op, 64, 64, 1000, "float32", "tiny", note="interpreter") for op in kernel_ops]
    tiny.append(e2e_case("qwen2.5-vl-7b", "float32", 1, 32, 16, 4, f=56))
    p["tiny"] = Preset("tiny", "seconds: smoke test", tiny, modes=("forward", "full"),
                       repeats=2, interpreter_ok=True)  # fmt: skip

    # GPU: docs/design.md §4 shape (bf16, N=8192, Qwen2.5-VL-7B head) plus the few-rows case,
    # the other heads at N=1024, and the end-to-end step at real size.
    d7, v7, _ = MODELS["qwen2.5-vl-7b"]
    gs = [(n, d7, v7) for n in (8192, 256, 512, 1024)]
    gs += [(1024, MODELS[m][0], MODELS[m][1]) for m in ("qwen3-vl-4b", "llava-med-7b")]
    gpu = []
    for n, d, v in gs:
        label = next(k for k, (dd, vv, _) in MODELS.items() if (dd, vv) == (d, v))
        gpu += [Case(op, n, d, v, "bfloat16", label) for op in kernel_ops]
    gpu.append(e2e_case("qwen2.5-vl-7b", "bfloat16", 2, 1024, 256, 64))
    p["gpu"] = Preset("gpu", "GPU suite (design §4 shapes; a few minutes on an H100)", gpu,
                      modes=("forward", "backward", "full"), repeats=10)  # fmt: skip

    # One GPU session (benchmarks/gpu_session.sh, ~2.5 minutes of its 9): the design §4 shape
    # and the few-rows case, the Qwen2.5-VL-7B head only, forward and forward+backward.
    session = [Case(op, n, d7, v7, "bfloat16", "qwen2.5-vl-7b") for op in kernel_ops
               for n in (8192, 256, 1024)]  # fmt: skip
    p["session"] = Preset("session", "GPU session: design §4 shape + few rows (bf16)", session,
                          modes=("forward", "full"), repeats=5)  # fmt: skip

    # Every model head over the whole N sweep (GPU; long).
    models = []
    for m, (d, v, _) in MODELS.items():
        models += [Case(op, n, d, v, "bfloat16", m) for op in kernel_ops for n in N_SWEEP]
    p["models"] = Preset("models", "all model heads, N=256..16384, bf16 (GPU, long)", models,
                         modes=("forward", "backward", "full"), repeats=10)  # fmt: skip
    return p


def default_preset(device: str, quick: bool) -> str:
    if quick:
        return "quick"
    return "gpu" if device == "cuda" else "cpu"
