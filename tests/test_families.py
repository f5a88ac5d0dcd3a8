"""The model families medical users fine-tune beyond LLaVA and Qwen-VL: MedGemma (Gemma 3, tied
embeddings) and LLaVA-Med (LLaVA with a Mistral language model). For each: hidden states from
the backbone equal the Hub model's logits through the head (no hidden transform), the LoRA
reference is the model with its adapters off, training resumes bit for bit, and a family that
transforms its logits before the softmax is refused at start-up with the setting named."""

from __future__ import annotations

import copy

import pytest
import torch
from train_helpers import make_cfg

from fgpo import models
from fgpo.models import tiny
from fgpo.pairs.synthetic import make_preference_set
from fgpo.train import TrainConfig, Trainer

FAMILIES = ("tiny-medgemma", "tiny-llava-med")


pytestmark = pytest.mark.usefixtures("train_env")


@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
    return make_preference_set(str(tmp_path_factory.mktemp("prefs")), n=8, seed=4)


def _cfg(tmp_path, prefs, name, **kw) -> TrainConfig:
    """4 steps of 4 examples (micro-batches of 2) with LoRA dropout, a checkpoint every 2."""
    run = dict(model=name, lora_dropout=0.3, global_batch_size=4, micro_batch_size=2,
               max_steps=4, save_steps=2)  # fmt: skip
    return make_cfg(tmp_path, prefs, **{**run, **kw})


def test_medgemma_head_is_the_embedding_matrix():
    model, proc = tiny.build_tiny("tiny-medgemma")
    assert proc.family == "gemma3"
    assert models.lm_head_weight(model) is model.get_input_embeddings().weight
    pm = models.apply_lora(copy.deepcopy(model), TrainConfig(lora_r=4, lora_alpha=8))
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert trainable and all("language_model" in n and "lora_" in n for n in trainable)
    assert not models.lm_head_weight(pm).requires_grad  # the tied head stays frozen under LoRA


@pytest.mark.parametrize("name", FAMILIES)
def test_lora_reference_is_the_model_with_adapters_off(name):
    from PIL import Image

    base, proc = tiny.build_tiny(name)
    pm = models.apply_lora(copy.deepcopy(base), TrainConfig(lora_r=4, lora_alpha=8))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_()
    ids, img = proc.encode_prompt(Image.new("RGB", (30, 30), (40, 90, 10)), "which side ?")
    x = torch.tensor([ids])
    inputs = dict(input_ids=x, attention_mask=torch.ones_like(x), **img)
    inputs.update(proc.extra_model_inputs(x))
    want = models.backbone_hidden_states(base, **dict(inputs))
    with models.reference_context(pm) as ref:
        got = models.backbone_hidden_states(ref, **dict(inputs))
    torch.testing.assert_close(got, want)
    assert not torch.allclose(models.backbone_hidden_states(pm, **dict(inputs)), want)


@pytest.mark.parametrize("name", FAMILIES)
def test_exact_resume(tmp_path, prefs, name):
    tiny.ensure_tiny_model(name)  # built before either run: the runs differ only by the resume
    full = Trainer(_cfg(tmp_path / "a", prefs, name))
    full.train()
    first = Trainer(_cfg(tmp_path / "b", prefs, name))
    first.train(stop_after=2)
    torch.manual_seed(1234)
    second = Trainer(_cfg(tmp_path / "b", prefs, name))
    assert second.train(resume=True)["start_step"] == 2
    for k, v in full.trainable.items():
        assert torch.equal(v, second.trainable[k]), k


@pytest.mark.parametrize("key, value", [("final_logit_softcapping", 30.0), ("logit_scale", 0.0625)])
def test_a_logit_transform_is_refused_at_start_up(tmp_path, prefs, key, value):
    model, proc = tiny.build_tiny("tiny-medgemma")
    setattr(model.config.text_config, key, value)
    tr = Trainer(_cfg(tmp_path, prefs, "tiny-medgemma"), model=model, processor=proc)
    with pytest.raises(
        ValueError, match=rf"gemma3_text: {key}={value} applies .* before the softmax"
    ):
        tr.load()


@pytest.mark.parametrize("name", FAMILIES)
def test_no_logits_tensor_the_head_never_runs(tmp_path, prefs, name):
    tr = Trainer(_cfg(tmp_path, prefs, name, max_steps=1))
    tr.load()
    tr.load_data()
    calls = []
    head = models.unwrap(tr.model).get_output_embeddings()
    hook = head.register_forward_hook(lambda *a: calls.append(1))
    row = tr.train_step(0)
    hook.remove()
    assert calls == [] and row["grad_norm"] > 0


class _AutoNeedsTorchvision:
    """transformers 5.17 without torchvision: ``AutoImageProcessor`` itself refuses to load."""

    @staticmethod
    def from_pretrained(*a, **kw):
        raise ImportError("AutoImageProcessor requires the Torchvision library")


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-medgemma", "tiny-qwen2.5-vl"])
def test_processor_loads_where_auto_needs_torchvision(tmp_path, monkeypatch, name):
    """A saved processor loads back through the class its config names (its PIL twin) when
    ``AutoImageProcessor`` needs torchvision, and preprocesses an image exactly as before; a
    config that names no class is refused with the directory named."""
    import transformers
    from PIL import Image

    from fgpo.models.processor import VLProcessor

    _, proc = tiny.build_tiny(name)
    proc.save_pretrained(str(tmp_path))
    monkeypatch.setattr(transformers, "AutoImageProcessor", _AutoNeedsTorchvision)
    back = VLProcessor.from_pretrained(str(tmp_path))
    assert type(back.image_processor) is type(proc.image_processor)
    img = Image.fromarray((torch.arange(24 * 20 * 3) % 251).reshape(24, 20, 3).byte().numpy())
    want, got = (p.image_processor(images=[img], return_tensors="pt") for p in (proc, back))
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    cfg = tmp_path / "preprocessor_config.json"
    cfg.write_text(cfg.read_text().replace('"image_processor_type"', '"was_type"'))
    with pytest.raises(ImportError, match=f"{tmp_path}: cannot load its image processor"):
        VLProcessor.from_pretrained(str(tmp_path))
