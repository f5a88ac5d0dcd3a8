"""The embedded demo: the generated data, the grounding score against ``fgpo.eval``, the
verdict, the README table, and ``fgpo demo --quick`` end to end through the product's Trainer
(structure only: quick mode is far too small to say whether the method wins)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fgpo.cli import main
from fgpo.data import open_image
from fgpo.data import synthetic as demo_data
from fgpo.demo import report as demo_report
from fgpo.demo import run as demo
from fgpo.demo.evaluation import EvalSet, evaluate_model


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
            assert e.image[e.mask].mean() > np.median(e.image[e.image > 50])
        else:
            assert not e.mask.any() and e.label == "no"
    labels = {e.label for e in demo_data.make_dataset(200, 1)}
    assert labels == {"yes", "no", "left", "right"}
    with pytest.raises(ValueError, match="n must be"):
        demo_data.make_dataset(-1, 0)


def test_written_examples_round_trip(tmp_path):
    raw = demo_data.make_dataset(6, 3)
    exs = demo_data.write_examples(raw, tmp_path)
    for e, r in zip(exs, raw):
        assert np.array_equal(np.asarray(open_image(e.image_path)), r.image)
        assert e.has_lesion == r.has_lesion and e.answer == r.label
        assert e.meta["template"] == r.answer and e.qid == r.qtype
        if r.has_lesion:
            assert np.array_equal(np.asarray(open_image(e.lesion_mask_path)) > 0, r.mask)
        assert demo_data.wrong_label(r.qtype, r.label) != r.label


def test_grounding_matches_fgpo_eval(tmp_path):
    from fgpo.eval import grounding_score
    from fgpo.models.inference import answer_logprob_fn
    from fgpo.models.tiny import build_tiny
    from fgpo.pairs import CorruptConfig

    raw = demo_data.make_dataset(12, 4)
    vqa = demo_data.write_examples(raw, tmp_path)
    model, proc = build_tiny("tiny-llava", seed=1)
    cfg = CorruptConfig(mode="inpaint", fallback="skip")
    es = EvalSet.build(vqa, cfg)
    ours = evaluate_model(model, proc, es)
    assert ours["n_grounding"] == sum(e.has_lesion for e in raw) > 0
    # the product's grounding score, with the ground truth in the model's answer format
    for ex in vqa:
        ex.answer = ex.meta["template"]
    ref = grounding_score(answer_logprob_fn(model, proc, "cpu"), vqa, cfg)
    assert ref["n_grounding"] == ours["n_grounding"]
    assert ours["grounding_score"] == pytest.approx(ref["grounding_score"], rel=1e-4, abs=1e-5)


def _fake_report(after_acc, dpo_acc):
    def r(acc, g):
        return {"closed_accuracy": acc, "grounding_score": g, "closed_accuracy_std": 0.01,
                "grounding_score_std": 0.1}  # fmt: skip

    return {"before": r(0.80, 1.0), "after": r(after_acc, 2.0), "dpo": r(dpo_acc, 1.5),
            "sft_continue": r(0.82, 1.2), "fire_mpo_no_visual": r(0.83, 1.4)}  # fmt: skip


def test_verdict_is_computed_from_the_numbers():
    win = demo_report.verdict(_fake_report(0.90, 0.85))
    assert "every baseline" in win["summary"]
    lose_dpo = demo_report.verdict(_fake_report(0.84, 0.86))
    assert "not above DPO on at least one metric" in lose_dpo["summary"]
    assert any("below DPO on closed accuracy by 2.00 points" in s for s in lose_dpo["details"])
    worse = demo_report.verdict(_fake_report(0.79, 0.86))
    assert "does NOT improve on the SFT start" in worse["summary"]


def test_demo_quick_trains_through_the_trainer_and_writes_report_plots_and_readme(tmp_path):
    out = tmp_path / "demo"
    readme = tmp_path / "README.md"
    readme.write_text(
        f"# title\n\nbefore\n{demo.README_START}\nold table\n{demo.README_END}\nafter\n"
    )
    publish = tmp_path / "docs"
    args = ["demo", "--quick", "--out", str(out), "--seeds", "2"]
    assert main([*args, "--publish", str(publish), "--readme", str(readme)]) == 0
    report = json.loads((out / "report.json").read_text())
    for key in ("before", "after", "dpo", "sft_continue", "fire_mpo_no_visual"):
        r = report[key]
        for metric in ("closed_accuracy", "grounding_score"):
            assert np.isfinite(r[metric]), (key, metric)
            assert f"{metric}_std" in r
            assert len(r[f"{metric}_per_seed"]) == len(r["seeds"])
        if key != "before":
            assert r["seeds"] == [1, 2]
            assert 0.0 <= r["closed_accuracy"] <= 1.0
            assert r["closed_accuracy"] == pytest.approx(np.mean(r["closed_accuracy_per_seed"]))
    assert isinstance(report["summary"], str) and report["summary"]
    assert report["verdict"]["details"]
    assert report["setup"]["pairs"] > 0
    for name in report["plots"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (publish / name).read_bytes() == (out / name).read_bytes()
    assert set(report["plots"]) == {"training_curves.png", "results_bars.png", "examples.png"}
    pairs = json.loads((out / "pairs" / "pairs.json").read_text())
    assert all("<mask>" in p["chosen"] and "<mask>" in p["rejected"] for p in pairs)
    assert any("rejected_image_path" in p for p in pairs)
    # every run is a Trainer run with its own metrics log and an eval at the end
    for run in ("sft_warmup", "fire_mpo-seed1", "dpo-seed2", "sft_continue-seed1"):
        rows = [
            json.loads(x) for x in (out / "runs" / run / "metrics.jsonl").read_text().splitlines()
        ]
        assert "eval/closed_accuracy" in rows[-1] and "loss" in rows[-1], run
    text = readme.read_text()
    assert "old table" not in text and "| FiRe-MPO |" in text
    assert text.startswith("# title\n\nbefore\n") and text.endswith("after\n")


def test_demo_rejects_bad_seed_count(tmp_path):
    with pytest.raises(SystemExit, match="--seeds"):
        main(["demo", "--quick", "--out", str(tmp_path), "--seeds", "0"])
