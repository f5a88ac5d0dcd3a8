"""Data pipeline: mask tags, encoding alignment, skips and errors, the collator, tiny models."""

from __future__ import annotations

import json

import pytest
import torch

from fgpo import data, models
from fgpo.models import tiny
from fgpo.pairs.synthetic import make_preference_set

pytestmark = pytest.mark.usefixtures("train_env")


@pytest.mark.parametrize(
    "text, clean, spans",
    [
        ("the <mask>left</mask> lung", "the left lung", [(4, 8)]),
        ("<mask>a</mask><mask>b</mask>", "ab", [(0, 1), (1, 2)]),
        ("no tags", "no tags", []),
        ("x <mask></mask> y", "x  y", [(2, 2)]),
        ("<mask>all of it</mask>", "all of it", [(0, 9)]),
    ],
)
def test_parse_mask_tags(text, clean, spans):
    assert data.parse_mask_tags(text) == (clean, spans)


@pytest.mark.parametrize(
    "text, match",
    [
        ("a <mask>b", "unclosed"),
        ("a </mask> b", "without"),
        ("<mask>a <mask>b</mask></mask>", "nested"),
        ("a <mask>b</mask> c</mask>", "without"),
    ],
)
def test_parse_mask_tags_errors(text, match):
    with pytest.raises(data.MaskTagError, match=match):
        data.parse_mask_tags(text)


def test_encode_alignment_and_masks(llava):
    _, proc = llava
    from PIL import Image

    img = Image.new("RGB", (30, 40), (90, 10, 200))
    enc = data.encode_example(proc, img, "which side ?", "the nodule is <mask>left</mask> .")
    ids, tgt = enc["input_ids"], enc["targets"]
    tok = proc.tokenizer
    resp = tok("the nodule is left .", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    # The tag tokens are gone and the response sits at the end.
    assert ids[-len(resp) :].tolist() == resp
    assert tok.convert_tokens_to_ids("<mask>") not in ids.tolist()
    # Row t predicts token t+1: targets are the ids shifted by one, only over the response.
    p = ids.numel() - len(resp)
    assert (tgt[: p - 1] == -100).all() and tgt[-1] == -100
    assert tgt[p - 1 : -1].tolist() == ids[p:].tolist()
    assert enc["response_mask"].sum() == len(resp)
    span_rows = enc["span_mask"].nonzero().flatten().tolist()
    assert [tok.convert_ids_to_tokens(int(tgt[r])) for r in span_rows] == ["left"]
    # The image expands to the model's number of image tokens.
    assert (ids == proc.image_token_id).sum() == proc.num_image_tokens_fixed


def _records(tmp_path, n=6):
    path = make_preference_set(str(tmp_path), n=n, seed=1)
    with open(path) as f:
        return path, json.load(f)


def test_dataset_skips_and_errors(tmp_path, llava):
    _, proc = llava
    path, recs = _records(tmp_path)
    recs[1]["image_path"] = "images/does_not_exist.png"
    (tmp_path / "bad.png").write_bytes(b"not an image")
    recs[2]["image_path"] = str(tmp_path / "bad.png")
    recs[3]["chosen"] = recs[3]["chosen"].replace("<mask>", "").replace("</mask>", "")
    recs[3]["rejected"] = recs[3]["rejected"].replace("<mask>", "").replace("</mask>", "")
    recs[4]["chosen"] = "a <mask>b"
    with pytest.raises(data.MaskTagError, match=r"record 4 \(id='tiny-1-4'\) field 'chosen'"):
        data.PreferenceDataset(recs, proc, image_root=str(tmp_path))
    ds = data.PreferenceDataset(recs, proc, image_root=str(tmp_path), on_bad_tags="skip")
    items = [ds[k] for k in range(len(ds))]
    assert [it is None for it in items] == [False, True, True, True, True, False]
    assert ds.skipped == {"missing_image": 1, "unreadable_image": 1, "empty_mask": 1, "bad_tags": 1}
    ds_short = data.PreferenceDataset(path, proc, max_length=10)
    assert ds_short[0] is None and ds_short.skipped["too_long"] == 1


def test_collator_layout(tmp_path, llava):
    _, proc = llava
    path, _ = _records(tmp_path, n=4)
    ds = data.PreferenceDataset(path, proc)
    items = [ds[k] for k in range(4)]
    coll = data.PreferenceCollator(proc.pad_token_id)
    b = coll([items[0], None, items[1], items[2]])
    assert b["batch_size"] == 3 and b["n_seq"] == 4
    assert b["has_corrupt"].tolist() == [1.0, 0.0, 1.0]  # every other record has v'
    s = b["input_ids"].shape[0]
    assert s == 12 and b["pixel_values"].shape[0] == 12
    # Example 1 has no v': its corrupt sequences reuse v.
    assert torch.equal(b["pixel_values"][7], b["pixel_values"][1])
    assert not torch.equal(b["pixel_values"][6], b["pixel_values"][0])
    for i in range(s):
        n = int(b["attention_mask"][i].sum())
        assert (b["input_ids"][i, n:] == proc.pad_token_id).all()
        assert (b["targets"][i, n - 1 :] == -100).all() and b["span_mask"][i, n:].sum() == 0
    b2 = data.PreferenceCollator(proc.pad_token_id, with_corrupt=False)([items[0]])
    assert b2["n_seq"] == 2 and b2["has_corrupt"].sum() == 0
    assert coll([None]) is None


@pytest.mark.parametrize("name", tiny.TINY_NAMES)
def test_tiny_models_hidden_states(name, tmp_path):
    import transformers

    if name == "tiny-qwen3-vl" and not hasattr(transformers, "Qwen3VLConfig"):
        pytest.skip("no Qwen3-VL in this transformers")
    model, proc = models.load_model(name, dtype="float32")
    path, _ = _records(tmp_path, n=2)
    ds = data.PreferenceDataset(path, proc)
    b = data.PreferenceCollator(proc.pad_token_id)([ds[0], ds[1]])
    inputs = {k: b[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    if "image_grid_thw" in b:
        inputs["image_grid_thw"] = b["image_grid_thw"]
    inputs.update(proc.extra_model_inputs(b["input_ids"]))
    h = models.backbone_hidden_states(model, **inputs)
    w = models.lm_head_weight(model)
    assert h.shape == (*b["input_ids"].shape, w.shape[1])
    # Same as the Hub forward's logits at the response rows (no logits built by us).
    with torch.no_grad():
        logits = model(**inputs).logits
    rows = b["response_mask"].bool()
    torch.testing.assert_close(h[rows] @ w.T, logits[rows], atol=1e-4, rtol=1e-4)
