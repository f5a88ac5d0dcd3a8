"""Trainer: alignment end to end, no logits, accumulation = large batch, exact resume, full FT,
bad data, the CLI on the shipped tiny config."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from train_helpers import make_cfg, make_trainer, read_rows, trainable

from fgpo import models
from fgpo.train import TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("train_env")


def test_lora_language_model_only_and_reference_context(llava):
    base, proc = llava
    pm = models.apply_lora(copy.deepcopy(base), TrainConfig(lora_r=4, lora_alpha=8))
    names = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert names and all("language_model" in n and "lora_" in n for n in names)
    assert pm.peft_config["default"].use_rslora and pm.peft_config["default"].r == 4
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_()  # make the adapters matter
    from PIL import Image

    ids, img = proc.encode_prompt(Image.new("RGB", (28, 28)), "which side ?")
    x = torch.tensor([ids])
    inputs = dict(input_ids=x, attention_mask=torch.ones_like(x), **img)
    want = models.backbone_hidden_states(base, **inputs)
    with models.reference_context(pm) as ref:
        got = models.backbone_hidden_states(ref, **inputs)
        assert not got.requires_grad
    torch.testing.assert_close(got, want)
    assert not torch.allclose(models.backbone_hidden_states(pm, **inputs), want)
    assert models.lm_head_weight(pm) is models.lm_head_weight(pm.get_base_model())


def test_trainer_rejects_a_hub_processor(tmp_path, prefs, llava):
    with pytest.raises(TypeError, match="VLProcessor"):
        Trainer(make_cfg(tmp_path, prefs), model=llava[0], processor=llava[1].tokenizer)


def test_first_step_matches_materialized_logits(tmp_path, prefs, llava):
    """At LoRA init policy == reference: rank loss = log 2, KL = 0, and the logged log-probs
    equal Σ_span log softmax(model(...).logits) at the shifted targets (alignment end to end)."""
    tr = make_trainer(
        make_cfg(tmp_path, prefs, gamma=0.0, global_batch_size=8, micro_batch_size=8), llava
    )
    tr.load()
    tr.load_data()
    head = models.lm_head_weight(tr.model)
    calls = []
    hook = models.unwrap(tr.model).lm_head.register_forward_hook(lambda *a: calls.append(1))
    (b,) = tr.encode(0)
    row = tr.train_step(0)
    hook.remove()
    assert not calls, "the trainer must never run lm_head (full logits)"
    assert row["loss/rank"] == pytest.approx(0.693147, abs=1e-5)
    assert abs(row["kl/mixed"]) < 1e-6
    # Recompute the chosen log-probs from the Hub forward at the parameters of step 0.
    tr2 = make_trainer(make_cfg(tmp_path, prefs, gamma=0.0), llava)
    tr2.load()
    with torch.no_grad():
        logits = tr2.model(**tr2._model_inputs(b)).logits
    n = b["batch_size"]
    lp = torch.log_softmax(logits[:n].double(), -1)
    t = b["targets"][:n]
    m = b["span_mask"][:n].double()
    tok = lp.gather(-1, t.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    want = (tok * m).sum(-1).mean().item()
    assert row["logps/chosen"] == pytest.approx(want, rel=1e-5)
    assert head.shape[0] == logits.shape[-1]


def test_grad_accumulation_equals_large_batch(tmp_path, prefs, llava):
    # A large Adam eps keeps the first update proportional to the gradient (not its sign), so
    # float-rounding differences in near-zero gradients stay small.
    rows, params = [], []
    for mb in (8, 2):
        cfg = make_cfg(tmp_path / f"mb{mb}", prefs, micro_batch_size=mb, max_steps=1, adam_eps=1e-2)
        tr = make_trainer(cfg, llava)
        tr.load()
        tr.load_data()
        assert tr.accum == 8 // mb
        before = trainable(tr)
        rows.append(tr.train_step(0))
        params.append({k: v - before[k] for k, v in trainable(tr).items()})
    assert rows[0]["loss"] == pytest.approx(rows[1]["loss"], rel=1e-6)
    assert rows[0]["grad_norm"] == pytest.approx(rows[1]["grad_norm"], rel=1e-5)
    moved = sum(float(d.abs().sum()) for d in params[0].values())
    assert moved > 0
    for k in params[0]:
        torch.testing.assert_close(params[1][k], params[0][k], rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("shared_prefix", [True, False])
def test_exact_resume(tmp_path, prefs, llava, shared_prefix):
    """4 steps straight == 2 steps, a fresh process state, resume, 2 more (bitwise), with LoRA
    dropout on so the RNG state matters; in each forward mode (shared prefix and plain)."""
    kw = dict(max_steps=4, save_steps=2, lora_dropout=0.3, micro_batch_size=4)
    kw["shared_prefix"] = shared_prefix
    full = make_trainer(make_cfg(tmp_path / "a", prefs, **kw), llava)
    full.train()
    first = make_trainer(make_cfg(tmp_path / "b", prefs, **kw), llava)
    first.train(stop_after=2)
    torch.manual_seed(1234)  # anything the resumed run depends on must come from the checkpoint
    second = make_trainer(make_cfg(tmp_path / "b", prefs, **kw), llava)
    summary = second.train(resume=True)
    assert summary["start_step"] == 2 and summary["steps"] == 4
    a, b = trainable(full), trainable(second)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sa, sb = full.optimizer.state_dict()["state"], second.optimizer.state_dict()["state"]
    for i in sa:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(sa[i][key], sb[i][key])
    assert read_rows(tmp_path / "a" / "run") == read_rows(tmp_path / "b" / "run")
    assert full.scheduler.state_dict()["last_epoch"] == second.scheduler.state_dict()["last_epoch"]


def test_failure_mid_run_checkpoints_completed_steps(tmp_path, prefs, llava):
    kw = dict(max_steps=2, save_steps=0, lora_dropout=0.3)
    full = make_trainer(make_cfg(tmp_path / "a", prefs, **kw), llava)
    full.train()
    tr = make_trainer(make_cfg(tmp_path / "b", prefs, **kw), llava)
    tr.load()
    tr.load_data()
    encode = tr.encode

    def failing(step):
        if step == 1:
            raise RuntimeError("image vanished")
        return encode(step)

    tr.encode = failing
    with pytest.raises(RuntimeError, match="vanished"):
        tr.train()
    assert (tmp_path / "b" / "run" / "latest").read_text() == "checkpoint-1"
    again = make_trainer(make_cfg(tmp_path / "b", prefs, **kw), llava)
    assert again.train(resume=True)["start_step"] == 1
    a, b = trainable(full), trainable(again)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_checkpoint_is_atomic_and_pruned(tmp_path, prefs, llava):
    tr = make_trainer(
        make_cfg(tmp_path, prefs, max_steps=3, save_steps=1, save_total_limit=2), llava
    )
    tr.train()
    out = tmp_path / "run"
    names = sorted(os.listdir(out))
    assert [n for n in names if n.startswith("checkpoint-")] == ["checkpoint-2", "checkpoint-3"]
    assert not [n for n in names if n.startswith(".tmp")]
    assert (out / "latest").read_text() == "checkpoint-3"
    assert (out / "checkpoint-3" / "adapter" / "adapter_config.json").exists()
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["position_in_epoch"] == 8  # 16 examples, batch 8


def test_full_finetune_frozen_reference(tmp_path, prefs, llava):
    tr = make_trainer(make_cfg(tmp_path, prefs, lora=False, max_steps=1, lr=1e-3), llava)
    tr.load()
    tr.load_data()
    ref0 = {k: v.clone() for k, v in tr.reference.state_dict().items()}
    vision0 = {k: v.clone() for k, v in models.backbone(tr.model).vision_tower.state_dict().items()}
    head0 = models.lm_head_weight(tr.model).detach().clone()
    row = tr.train_step(0)
    assert row["loss/rank"] == pytest.approx(0.693147, abs=1e-5)
    for k, v in tr.reference.state_dict().items():
        assert torch.equal(v, ref0[k]), k
    for k, v in models.backbone(tr.model).vision_tower.state_dict().items():
        assert torch.equal(v, vision0[k]), f"vision tower must stay frozen: {k}"
    assert not torch.equal(models.lm_head_weight(tr.model), head0)
    row2 = tr.train_step(1)  # now the policy differs from the reference
    assert row2["kl/mixed"] > 0


def test_bad_data_is_counted_not_fatal(tmp_path, prefs, llava):
    with open(prefs) as f:
        recs = json.load(f)
    root = os.path.dirname(prefs)
    for r in recs:
        r["image_path"] = os.path.join(root, r["image_path"])
        if "rejected_image_path" in r:
            r["rejected_image_path"] = os.path.join(root, r["rejected_image_path"])
    recs[0]["image_path"] = "/nonexistent.png"
    recs[1]["chosen"] = recs[1]["rejected"] = "no tags at all"
    recs += copy.deepcopy(recs[2:4])
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(recs))
    cfg = make_cfg(tmp_path, str(path), max_steps=1, on_bad_tags="skip")
    summary = make_trainer(cfg, llava).train()
    assert summary["skipped"] == {"missing_image": 1, "empty_mask": 1}
    assert summary["usable_examples"] == 16
    recs[5]["rejected"] = "the <mask>left lung"
    path.write_text(json.dumps(recs))
    with pytest.raises(ValueError, match=r"record 5 .*unclosed"):
        make_trainer(make_cfg(tmp_path / "tags", str(path)), llava).train()


@pytest.mark.parametrize(
    "name", ["tiny-qwen2-vl", "tiny-qwen2.5-vl", "tiny-qwen3-vl", "tiny-medgemma", "tiny-llava-med"]
)
def test_other_families_train(tmp_path, prefs, name):
    import transformers

    if name == "tiny-qwen3-vl" and not hasattr(transformers, "Qwen3VLConfig"):
        pytest.skip("no Qwen3-VL in this transformers")
    cfg = make_cfg(tmp_path, prefs, model=name, max_steps=1, gradient_checkpointing=True)
    summary = Trainer(cfg).train()
    row = summary["last_metrics"]
    assert row["loss/rank"] == pytest.approx(0.693147, abs=1e-5) and row["grad_norm"] > 0


def test_dpo_preset_uses_response_mask_and_no_corrupt_passes(tmp_path, prefs, llava):
    tr = make_trainer(
        make_cfg(tmp_path, prefs, preset="dpo", micro_batch_size=8, max_steps=1), llava
    )
    tr.load()
    tr.load_data()
    assert (tr.loss_fn.gamma, tr.loss_fn.alpha) == (0.0, 0.0)
    (b,) = tr.encode(0)
    assert b["n_seq"] == 2 and b["input_ids"].shape[0] == 16  # (v', ·) never encoded
    row = tr.train_step(0)
    assert "visual/loss" not in row
    # logps/chosen sums over every response token (eos included), not just the span.
    n = b["batch_size"]
    with torch.no_grad():
        tr2 = make_trainer(make_cfg(tmp_path, prefs, preset="dpo"), llava)
        tr2.load()
        logits = tr2.model(**tr2._model_inputs(b)).logits[:n].double()
    t, m = b["targets"][:n], b["response_mask"][:n].double()
    lp = torch.log_softmax(logits, -1).gather(-1, t.clamp(min=0)[..., None])[..., 0]
    assert row["logps/chosen"] == pytest.approx(float((lp * m).sum(-1).mean()), rel=1e-5)


def test_sft_preset_is_the_chosen_answers_likelihood(tmp_path, prefs, llava):
    """preset sft: no reference and no rejected pass; the loss is the per-example mean of
    -log p(y+) over the response tokens (eos included), checked against full logits."""
    cfg = make_cfg(tmp_path, prefs, preset="sft", lora=False, micro_batch_size=8, max_steps=1)
    tr = make_trainer(cfg, llava)
    tr.load()
    tr.load_data()
    assert tr.reference is None and tr.ref_policy is None
    (b,) = tr.encode(0)
    assert b["n_seq"] == 1 and b["input_ids"].shape[0] == 8
    with torch.no_grad():
        logits = tr.model(**tr._model_inputs(b)).logits.double()
    t, m = b["targets"], b["response_mask"].double()
    lp = torch.log_softmax(logits, -1).gather(-1, t.clamp(min=0)[..., None])[..., 0]
    want = float((-(lp * m).sum(-1) / m.sum(-1)).mean())
    row = tr.train_step(0)
    assert row["loss"] == pytest.approx(want, rel=1e-5)
    assert row["loss/sft"] == pytest.approx(want, rel=1e-5)
    assert "rewards/margins" not in row


def test_eval_hook_is_logged_and_leaves_training_unchanged(tmp_path, prefs, llava):
    calls = []

    def eval_fn(model):
        calls.append(model.training)
        torch.rand(3)  # consumes the RNG: the trainer must put it back
        return {"score": len(calls)}

    # dropout draws from the RNG in every step after an evaluation
    plain = make_trainer(make_cfg(tmp_path / "a", prefs, max_steps=3, lora_dropout=0.2), llava)
    plain.train()
    cfg = make_cfg(tmp_path / "b", prefs, max_steps=3, eval_steps=2, lora_dropout=0.2)
    model, proc = llava
    hooked = Trainer(cfg, model=copy.deepcopy(model), processor=proc, eval_fn=eval_fn)
    hooked.train()
    assert calls == [False, False]  # after step 2 and after the last step, in eval mode
    rows = read_rows(tmp_path / "b" / "run")
    assert [r.get("eval/score") for r in rows] == [None, 1.0, 2.0]
    for k, v in plain.trainable.items():
        assert torch.equal(v, hooked.trainable[k]), k


def test_cli_tiny_config(tmp_path):
    from fgpo.cli import main

    out = tmp_path / "cli"
    argv = ["train", "--config", "tiny", "--output-dir", str(out), "--max-steps", "2"]
    assert main([*argv, "--set", "progress_bar=false"]) == 0
    # generate_tiny_data: the records live under the cache directory, not beside any path
    data = os.path.join(os.environ["FGPO_CACHE"], "data", "tiny-prefs-v1-n64-seed0")
    assert os.path.isfile(os.path.join(data, "preferences.json"))
    rows = read_rows(out)
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("loss", "loss/rank", "kl/mixed", "rewards/margins", "visual/loss", "lr"):
        assert key in rows[0]
    assert (out / "checkpoint-2" / "trainer_state.json").exists()


def test_config_yaml_and_overrides(tmp_path):
    cfg = TrainConfig.from_yaml("tiny", ["lr=2e-5", "lora=false"])
    assert cfg.lr == 2e-5 and cfg.lora is False and cfg.model == "tiny-llava"
    d = TrainConfig()
    assert (d.beta, d.alpha, d.gamma, d.lambda_) == (0.1, 0.01, 0.1, 0.5)
    assert (d.lr, d.lr_scheduler, d.warmup_ratio, d.num_epochs, d.global_batch_size) == (
        1e-6, "cosine", 0.0, 1, 8)  # fmt: skip
    assert (d.lora_r, d.lora_alpha, d.lora_dropout, d.use_rslora) == (128, 256, 0.05, True)
    assert TrainConfig(preset="dpo").resolved_mask() == "response"
    assert TrainConfig(preset="dpo").loss_kwargs()["gamma"] == 0.0
    assert TrainConfig(preset="rrpo").loss_kwargs()["lambda_"] == 1.0
    with pytest.raises(ValueError, match="unknown config keys"):
        TrainConfig.from_dict({"learning_rate": 1.0})
    with pytest.raises(ValueError, match="global_batch_size"):
        TrainConfig(global_batch_size=6, micro_batch_size=4)
