"""The embedded demo: generated data, the tiny model's calls, the pair encoding, the grounding
score against ``fgpo.evaluate``, the verdict, and ``fgpo demo --quick`` end to end (structure
only: quick mode is far too small to say whether the method wins)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fgpo.cli import main
from fgpo.data import synthetic as demo_data
from fgpo.demo import model as demo_model
from fgpo.demo import run as demo


def test_dataset_is_deterministic_and_labels_match_the_images():
    a = demo_data.make_dataset(40, 7, contrast=(40.0, 90.0))
    b = demo_data.make_dataset(40, 7, contrast=(40.0, 90.0))
    c = demo_data.make_dataset(40, 8, contrast=(40.0, 90.0))
    assert all(np.array_equal(x.image, y.image) and x.answer == y.answer for x, y in zip(a, b))
    assert any(not np.array_equal(x.image, y.image) for x, y in zip(a, c))
    for e in a:
        assert e.image.shape == (32, 32) and e.image.dtype == np.uint8
        assert demo_data.closed_label(e.qtype, e.answer) == e.label
        if e.has_lesion:
            _ys, xs = np.nonzero(e.mask)
            assert xs.size > 0
            assert (xs.mean() < 15.5) == (e.side == "left"), (e.id, xs.mean(), e.side)
            # the lesion is brighter than the tissue right around it
            ring = demo_model.images_to_pixels([e.image])  # exercise the pixel path too
            assert ring.shape == (1, 1, 32, 32)
            assert e.image[e.mask].mean() > np.median(e.image[e.image > 50])
        else:
            assert not e.mask.any() and e.label == "no"
    labels = {e.label for e in demo_data.make_dataset(200, 1)}
    assert labels == {"yes", "no", "left", "right"}
    with pytest.raises(ValueError, match="n must be"):
        demo_data.make_dataset(-1, 0)


def test_tokenizer_round_trip_and_batch_alignment():
    tok = demo_model.WordTokenizer(demo_data.vocabulary())
    text = "lesion on the left ."
    assert tok.decode([*tok.encode(text), tok.eos_token_id, 7]) == text
    assert tok.encode("zebra") == [tok.unk_token_id]
    imgs = [np.zeros((32, 32), np.uint8)] * 2
    q = [demo_data.QUESTIONS["side"], demo_data.QUESTIONS["presence"]]
    a = [tok.encode(text), tok.encode("lesion absent .")]
    b = demo_model.make_batch(tok, 16, q, a, imgs, weights=[[0, 0, 0, 1, 0], [1] * 3])
    for row in range(2):
        tg = b.targets[row]
        sel = tg != demo_model.IGNORE
        # hidden row t predicts input token t + 1: targets are the inputs shifted by one
        assert torch.equal(tg[sel], b.input_ids[row, 1:][sel])
        assert tg[sel].tolist() == [*a[row], tok.eos_token_id]
    assert b.weights[0][b.targets[0] != demo_model.IGNORE].tolist() == [0, 0, 0, 1, 0, 0]


def test_word_weights_follow_the_mask_tags():
    from fgpo.data import parse_mask_tags

    text, spans = parse_mask_tags("<mask>a b</mask> lesion on <mask>the</mask> left .")
    assert demo._word_weights(text, spans) == [1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0]
    text, spans = parse_mask_tags("lesion on the <mask>left</mask> .")
    assert demo._word_weights(text, spans) == [0.0, 0.0, 0.0, 1.0, 0.0]


@torch.no_grad()
def test_greedy_answers_match_step_by_step_full_logits():
    tok = demo_model.WordTokenizer(demo_data.vocabulary())
    model = demo_model.build_tiny_llava(len(tok), tok.image_token_id, seed=3).eval()
    for p in model.parameters():  # a random model that does not stop at once
        p.mul_(4.0)
    ex = demo_data.make_dataset(5, 2)
    got = demo_model.greedy_answers(
        model, tok, [e.question for e in ex], [e.image for e in ex], max_new_tokens=6
    )
    for e, g in zip(ex, got):
        ids = torch.tensor([demo_model.prompt_ids(tok, e.question, model.n_image_tokens)])
        pix = demo_model.images_to_pixels([e.image])
        n0 = ids.shape[1]
        for _ in range(6):
            logits = model(input_ids=ids, pixel_values=pix).logits[0, -1]
            logits[[0, 1, 3, tok.image_token_id]] = float("-inf")  # pad, bos, unk, image
            nxt = logits.argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], 1)
            if nxt == tok.eos_token_id:
                break
        assert g == tok.decode(ids[0, n0:]), (g, ids)


def test_grounding_matches_fgpo_evaluate(tmp_path):
    from fgpo.data import open_image
    from fgpo.eval import grounding_score
    from fgpo.pairs.corrupt import CorruptConfig

    raw = demo_data.make_dataset(12, 4)
    vqa = demo_data.write_examples(raw, tmp_path)
    tok = demo_model.WordTokenizer(demo_data.vocabulary())
    model = demo_model.build_tiny_llava(len(tok), tok.image_token_id, seed=1)
    run = demo.Runner(tok, model.n_image_tokens)
    cfg = CorruptConfig(mode="inpaint", fallback="skip")
    es = demo.make_eval_set(vqa, raw, cfg)
    ours = demo.evaluate_model(run, model, es)
    assert ours["n_grounding"] == sum(e.has_lesion for e in raw) > 0
    template = {e.id: e.answer for e in raw}
    by_q = {}

    def logprob(image, question, answer):  # the answer in the model's answer format
        ex = by_q[(question, answer, np.asarray(image.convert("L")).tobytes())]
        arr = np.asarray(image.convert("L"))
        return float(run.answer_logps(model, [question], [template[ex.id]], [arr])[0])

    for ex in vqa:
        if ex.has_lesion:
            by_q[(ex.question, ex.answer, np.asarray(open_image(ex.image_path)).tobytes())] = ex
            from fgpo.pairs.corrupt import corrupt_image

            bad = corrupt_image(open_image(ex.image_path), ex, cfg).image
            by_q[(ex.question, ex.answer, np.asarray(bad.convert("L")).tobytes())] = ex
    ref = grounding_score(logprob, vqa, cfg)
    assert ref["n_grounding"] == ours["n_grounding"]
    assert ours["grounding_score"] == pytest.approx(ref["grounding_score"], rel=1e-4, abs=1e-5)


def _fake_report(after_acc, dpo_acc):
    def r(acc, g):
        return {"closed_accuracy": acc, "grounding_score": g, "closed_accuracy_std": 0.01,
                "grounding_score_std": 0.1}  # fmt: skip

    return {"before": r(0.80, 1.0), "after": r(after_acc, 2.0), "dpo": r(dpo_acc, 1.5),
            "sft_continue": r(0.82, 1.2), "fire_mpo_no_visual": r(0.83, 1.4)}  # fmt: skip


def test_verdict_is_computed_from_the_numbers():
    win = demo.verdict(_fake_report(0.90, 0.85))
    assert "every baseline" in win["summary"]
    lose_dpo = demo.verdict(_fake_report(0.84, 0.86))
    assert "not above DPO on at least one metric" in lose_dpo["summary"]
    assert any("below DPO on closed accuracy by 2.00 points" in s for s in lose_dpo["details"])
    worse = demo.verdict(_fake_report(0.79, 0.86))
    assert "does NOT improve on the SFT start" in worse["summary"]


def test_demo_quick_writes_report_and_plots(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--seeds", "3"]) == 0
    report = json.loads((out / "report.json").read_text())
    for key in ("before", "after", "dpo", "sft_continue", "fire_mpo_no_visual"):
        r = report[key]
        for metric in ("closed_accuracy", "grounding_score"):
            assert np.isfinite(r[metric]), (key, metric)
            assert f"{metric}_std" in r
            assert len(r[f"{metric}_per_seed"]) == len(r["seeds"])
        if key != "before":
            assert r["seeds"] == [1, 2, 3]
            assert 0.0 <= r["closed_accuracy"] <= 1.0
            vals = r["closed_accuracy_per_seed"]
            assert r["closed_accuracy"] == pytest.approx(np.mean(vals))
    assert isinstance(report["summary"], str) and report["summary"]
    assert report["verdict"]["details"]
    assert report["setup"]["pairs"] > 0
    for name in report["plots"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(report["plots"]) == {"training_curves.png", "results_bars.png", "examples.png"}
    pairs = json.loads((out / "pairs" / "pairs.json").read_text())
    assert all("<mask>" in p["chosen"] and "<mask>" in p["rejected"] for p in pairs)
    assert any("rejected_image_path" in p for p in pairs)


def test_demo_rejects_bad_seed_count(tmp_path):
    with pytest.raises(SystemExit, match="--seeds"):
        main(["demo", "--quick", "--out", str(tmp_path), "--seeds", "0"])
