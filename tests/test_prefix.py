"""Shared-prefix packing (``fgpo.models.prefix``): the packed step equals the plain step.

Every supported family, fp32, gradient checkpointing on, a micro-batch of 4 with padding,
answers of uneven length, answers that share leading words, and ``has_corrupt`` mixed (two
examples with v', two without): the loss, every logged metric and the gradient of every
trainable parameter agree with the plain path within 1e-5 relative; the vision tower runs once
per distinct image (LoRA: once for both models). Plus the packed layout itself, the three mask
forms, the plan's fallbacks and bad batches.
"""

from __future__ import annotations

import copy
import json
import logging
from types import SimpleNamespace

import pytest
import torch
from helpers import rel_err
from torch import nn
from train_helpers import make_cfg, make_trainer

from fgpo import models as M
from fgpo.data import PreferenceCollator, PreferenceDataset
from fgpo.models import prefix, tiny
from fgpo.pairs.synthetic import make_preference_set
from fgpo.train import Trainer

QWEN3 = hasattr(__import__("transformers"), "Qwen3VLConfig")
FAMILIES = [
    "tiny-llava",
    "tiny-llava-med",
    "tiny-medgemma",
    "tiny-qwen2-vl",
    "tiny-qwen2.5-vl",
    pytest.param("tiny-qwen3-vl", marks=pytest.mark.skipif(not QWEN3, reason="no Qwen3-VL")),
]
# Windows of 6 tokens cut through the image, the prompt and the answers: LLaVA-Med's Mistral
# then windows every layer, MedGemma (Gemma 3) its sliding layers (the others attend fully).
WINDOW = {"tiny-llava-med": 6, "tiny-medgemma": 6}


pytestmark = pytest.mark.usefixtures("train_env")


@pytest.fixture(scope="module")
def pairs4(tmp_path_factory):
    """4 records, the 1st and 3rd with v' (has_corrupt mixed); uneven answers."""
    path = make_preference_set(str(tmp_path_factory.mktemp("prefs")), n=4, seed=3)
    recs = json.load(open(path))
    recs[0]["chosen"] = "the <mask>left</mask> lung shows a small round nodule ."
    recs[1]["rejected"] = "<mask>no</mask> ."
    recs[2]["chosen"] = "a small nodule in the <mask>upper</mask> lobe ."
    recs[2]["rejected"] = "a small nodule in the <mask>lower left</mask> lobe of the lung ."
    with open(path, "w") as f:
        json.dump(recs, f)
    assert [bool(r.get("rejected_image_path")) for r in recs] == [True, False, True, False]
    return path


@pytest.fixture(scope="module")
def built():
    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            model, proc = tiny.build_tiny(name)
            if name in WINDOW:  # the masks read it at every forward, the plain path's too
                model.config.get_text_config().sliding_window = WINDOW[name]
            cache[name] = model, proc
        return cache[name]

    return get


def _trainer(built, name, pairs, tmp_path, shared, **kw) -> Trainer:
    """One step of all 4 examples in one micro-batch, gradient checkpointing on."""
    kw = dict(global_batch_size=4, micro_batch_size=4, max_steps=1, lr=1e-3, **kw)
    cfg = make_cfg(
        tmp_path, pairs, model=name, gradient_checkpointing=True, shared_prefix=shared, **kw
    )
    tr = make_trainer(cfg, built(name))
    tr.load()
    tr.load_data()
    return tr


def _count_images(tr: Trainer) -> list[int]:
    """Records the number of images of every vision-tower call (policy and reference)."""
    calls: list[int] = []
    models = [tr.model] + ([tr.reference] if tr.reference is not None else [])
    for m in models:
        inner = M.backbone(m)
        orig = inner.get_image_features

        def counted(*a, _orig=orig, **kw):
            grid = kw.get("image_grid_thw", a[1] if len(a) > 1 else None)
            pix = kw.get("pixel_values", a[0] if a else None)
            calls.append(int(grid.shape[0]) if grid is not None else int(pix.shape[0]))
            return _orig(*a, **kw)

        inner.get_image_features = counted
    return calls


def _step(tr: Trainer):
    """One train_step: the logged row, the per-example metrics, and the gradients the optimizer
    would apply."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # move off the LoRA init so that policy != reference and every
        for _, p in sorted(tr.trainable.items()):  # parameter has a gradient
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    grads, metrics = {}, {}
    compute_loss = tr.compute_loss

    def keep(*args):
        out = compute_loss(*args)
        metrics.update(out.metrics, loss=out.loss.detach()[None])
        return out

    def capture():
        grads.update({n: p.grad.detach().clone() for n, p in tr.trainable.items()
                      if p.grad is not None})  # fmt: skip

    tr.compute_loss, tr.optimizer.step = keep, capture
    row = tr.train_step(0)
    return row, metrics, grads


def _assert_same_step(plain, shared) -> None:
    """Loss, per-example metrics (norm-relative over the batch) and each parameter's gradient
    within 1e-5; the logged batch means within 1e-5 of their examples' scale (a mean of values
    of both signs can be ~0, and relative to itself it would measure the cancellation)."""
    (row_p, m_p, g_p), (row_s, m_s, g_s) = plain, shared
    assert set(row_p) == set(row_s) and set(m_p) == set(m_s)
    for k, v in m_p.items():
        ok = ~torch.isnan(v)
        assert torch.equal(ok, ~torch.isnan(m_s[k])), k
        assert rel_err(m_s[k][ok], v[ok]) <= 1e-5, (k, m_s[k], v)
    for k, v in row_p.items():
        if k in ("lr", "step", "epoch", "tokens"):
            assert row_s[k] == v, k
        elif k != "time_s":
            scale = m_p[k].nan_to_num().pow(2).mean().sqrt().item() if k in m_p else abs(v)
            assert abs(row_s[k] - v) <= 1e-5 * scale + 1e-12, (k, row_s[k], v)
    assert set(g_p) == set(g_s) and g_p
    total = torch.cat([g.reshape(-1) for g in g_p.values()]).norm().item()
    for k, g in g_p.items():
        # Gradients that vanish in exact arithmetic (a key's bias: softmax ignores a constant
        # shift) are pure rounding; they are held to the whole gradient's norm instead.
        err = (g_s[k] - g).norm().item()
        assert err <= 1e-5 * max(g.norm().item(), 1e-3 * total), (k, err, g.norm().item())


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("preset", ["fire_mpo", "dpo"])
def test_shared_prefix_step_equals_plain(built, pairs4, tmp_path, name, preset):
    plain = _trainer(built, name, pairs4, tmp_path / "p", False, preset=preset)
    shared = _trainer(built, name, pairs4, tmp_path / "s", True, preset=preset)
    assert not plain.prefix.enabled
    once = prefix.takes_vision_features(M.backbone(shared.model))  # else per pass, and says so
    assert shared.prefix.enabled and shared.prefix.share_vision == once, shared.prefix.describe()
    (b,) = shared.encode(0)
    if preset == "fire_mpo":
        assert b["n_seq"] == 4 and sorted(b["has_corrupt"].tolist()) == [0.0, 0.0, 1.0, 1.0]
    pk = prefix.pack(b, shared.prefix.family, M.backbone(shared.model), 0)
    assert pk.input_ids.shape[0] == (6 if b["n_seq"] == 4 else 4)  # one row per distinct image
    assert pk.tokens < pk.plain_tokens - 4 * pk.input_ids.shape[0], (pk.tokens, pk.plain_tokens)
    calls_p, calls_s = _count_images(plain), _count_images(shared)
    _assert_same_step(_step(plain), _step(shared))
    n_seq = b["n_seq"]
    assert calls_p == [4 * n_seq, 4 * n_seq]  # every sequence, in both passes
    rows = 6 if n_seq == 4 else 4
    assert calls_s == ([rows] if once else [rows, rows])  # each distinct image once (per pass)


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-qwen2.5-vl"])
def test_trainable_vision_uses_per_pass_vision(built, pairs4, tmp_path, name, caplog):
    """Full fine-tuning with the vision tower trained (the demo's setting): packed rows, the
    vision tower once per distinct image in each model's pass, and start-up says why."""
    kw = dict(lora=False, train_vision=True)
    plain = _trainer(built, name, pairs4, tmp_path / "p", False, **kw)
    with caplog.at_level(logging.INFO, logger="fgpo"):
        shared = _trainer(built, name, pairs4, tmp_path / "s", True, **kw)
    plan = shared.prefix
    assert plan.enabled and not plan.share_vision
    assert "per-pass vision" in caplog.text and "reference is its own model" in caplog.text
    calls_s = _count_images(shared)
    step_p, step_s = _step(plain), _step(shared)
    assert any(".vision" in k or ".visual" in k for k in step_s[2])  # the tower is trained
    _assert_same_step(step_p, step_s)
    assert calls_s == [6, 6]  # reference pass, then policy pass


def test_packed_layout(built, pairs4):
    """Each plain token maps to a packed token with the same id and position; y- starts where
    y+ starts; a query of one tail never sees the other; examples without v' are packed once."""
    for name in ("tiny-llava", "tiny-qwen2.5-vl"):
        model, proc = built(name)
        ds = PreferenceDataset(pairs4, proc)
        b = PreferenceCollator(proc.pad_token_id)([ds[i] for i in range(4)])
        inner = M.backbone(model)
        fam = prefix.FAMILIES[model.config.model_type](model.config, M.language_model(model).config)
        pk = prefix.pack(b, fam, inner, proc.pad_token_id)
        assert pk.input_ids.shape[0] == 6  # 4 clean + 2 corrupted; the repeats are not packed
        real = b["attention_mask"].bool()
        ids = pk.unpack(pk.input_ids[..., None].double())[..., 0]
        assert torch.equal(ids[real].long(), b["input_ids"][real])
        assert (ids[~real] == 0).all()
        pos = fam.plain_positions(inner, b)
        if pos.ndim == 2:
            pos, got = pos[None], pk.positions[None]
        else:
            got = pk.positions
        for k in range(pos.shape[0]):
            back = pk.unpack(got[k][..., None].double())[..., 0]
            assert torch.equal(back[real].long(), pos[k][real])
        allowed = fam.attend(pk)
        for r in range(pk.segments.shape[0]):
            seg = pk.segments[r]
            first, second = (seg == 1).nonzero()[:, 0], (seg == 2).nonzero()[:, 0]
            assert len(first) and len(second)
            assert not allowed[r][second][:, first].any()  # y- never sees y+
            assert allowed[r][second][:, seg == 0].all()  # ... and sees the whole prefix
            assert torch.equal(pk.positions[..., r, second[0]], pk.positions[..., r, first[0]])


def test_mask_forms_agree():
    """sdpa's bool mask, eager's additive mask and flex_attention's BlockMask give the same
    attention on a packed pattern (flex runs uncompiled on CPU, forward only)."""
    import torch.nn.functional as F

    seg = torch.tensor([
        [0, 0, 0, 1, 1, 2, 2, 2, -1],
        [0, 0, 1, 2, -1, -1, -1, -1, -1],
        [1, 1, 2, 2, 2, -1, -1, -1, -1],  # nothing shared: a padding query sees only itself
    ])  # fmt: skip
    pk = SimpleNamespace(segments=seg)
    allowed = prefix.Family().attend(pk)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, 9, 16, generator=g) for _ in range(3))
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None])
    add = prefix.attention_mask(allowed, "eager", torch.float32)
    got = torch.softmax(q @ k.transpose(-1, -2) / 4.0 + add, -1) @ v
    torch.testing.assert_close(got, want)
    assert prefix.attention_mask(allowed, "sdpa", torch.float32).dtype == torch.bool
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError:
        pytest.skip("no flex_attention in this torch")
    block = prefix.attention_mask(allowed, "flex_attention", torch.float32)
    torch.testing.assert_close(flex_attention(q, k, v, block_mask=block), want)
    with pytest.raises(ValueError, match=r"flash_attention_2.*takes no custom mask"):
        prefix.attention_mask(allowed, "flash_attention_2", torch.float32)


def _fake(model_type="llava", **lm_config):
    inner, lm = nn.Module(), nn.Module()
    inner.config = SimpleNamespace(model_type=model_type)
    lm.config = SimpleNamespace(**{"_attn_implementation": "sdpa", **lm_config})
    return inner, lm


def test_plan_names_every_fallback(built):
    model, _ = built("tiny-llava")
    inner, lm = M.backbone(model), M.language_model(model)
    plan = prefix.plan_shared_prefix

    def why(*args, **kw) -> str:
        p = plan(*args, **{"requested": True, "reference": "adapters", **kw})
        assert not p.enabled
        return p.describe()

    assert "shared_prefix: false" in why(inner, lm, requested=False)
    assert "preset sft" in why(inner, lm, reference="none")
    assert "'idefics3' has no packing adapter" in why(*_fake("idefics3"))
    flash = _fake(_attn_implementation="flash_attention_2")
    assert "'flash_attention_2' takes no custom mask" in why(*flash)
    assert "['chunked_attention'] have no packed mask" in why(
        *_fake(layer_types=["chunked_attention", "full_attention"])
    )
    # Packed, but per-pass vision, and why: a vision tower that trains, or one with dropout.
    ft = copy.deepcopy(model)

    older = () if prefix.takes_vision_features(inner) else ("takes no mm_encoder_outputs",)

    def vision(*notes: str) -> None:
        args = (M.backbone(ft), M.language_model(ft))
        p = plan(*args, requested=True, reference="adapters")
        notes += older
        assert p.enabled and p.share_vision == (not notes), p.describe()
        assert all(n in p.describe() for n in notes), p.describe()

    vision("vision path trainable")
    M.freeze_vision(ft)
    vision()
    ft.config.vision_config.attention_dropout = 0.1
    ft.train()
    vision("vision path has dropout (attention_dropout)")
    ft.eval()  # no dropout in eval mode
    vision()


def test_pack_rejects_bad_batches(built, pairs4):
    model, proc = built("tiny-llava")
    ds = PreferenceDataset(pairs4, proc)
    items = [ds[i] for i in range(2)]
    fam, inner = prefix.LlavaFamily(), M.backbone(model)
    sft = PreferenceCollator(proc.pad_token_id, with_rejected=False)(items)
    with pytest.raises(ValueError, match=r"needs \(chosen, rejected\) groups: n_seq=1"):
        prefix.pack(sft, fam, inner, 0)
    b = PreferenceCollator(proc.pad_token_id, with_corrupt=False)(items)
    left = dict(b, attention_mask=b["attention_mask"].flip(-1))
    with pytest.raises(ValueError, match="right-padded"):
        prefix.pack(left, fam, inner, 0)
    other = dict(b, pixel_values=b["pixel_values"].clone())
    other["pixel_values"][2] += 1.0  # the rejected sequence of example 0 gets another image
    with pytest.raises(ValueError, match="sequences 0 and 2 of a pair have different images"):
        prefix.pack(other, fam, inner, 0)
