"""Metrics, grounding score, ``prepare_pairs`` with callables, and both CLIs end to end
(``fgpo prepare`` / ``fgpo eval`` with a tiny random model, loaded offline)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fgpo.data import PreferenceDataset, SkipExample, VQAExample, load_records, parse_mask_tags
from fgpo.eval import (
    ModelFns,
    answer_recall,
    closed_correct,
    evaluate,
    exact_match,
    grounding_score,
    score_answers,
    token_f1,
)
from fgpo.pairs import CorruptConfig, ReferenceEditor, prepare_pairs

BOX = (12, 9, 27, 22)


def write_scan(path: Path, seed: int, bright: bool = True) -> str:
    rng = np.random.default_rng(seed)
    a = 70 + 6 * rng.standard_normal((33, 41))
    if bright:
        x0, y0, x1, y1 = BOX
        a[y0:y1, x0:x1] = 230
    Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "L").save(path)
    return str(path)


def examples(tmp_path: Path) -> list[VQAExample]:
    out = []
    specs = [
        ("Is there a mass?", "Yes", "closed", [BOX]),
        ("Is there a mass?", "No", "closed", []),
        ("Which organ is abnormal?", "Liver", "open", [BOX]),
        ("Which organ is abnormal?", "Spleen", "open", [BOX]),
        ("Describe the findings.", "Mass in the liver.", "report", []),
    ]
    for k, (q, a, t, boxes) in enumerate(specs):
        p = write_scan(tmp_path / f"img{k}.png", k, bright=bool(boxes))
        out.append(VQAExample(str(k), "0", p, q, a, t, lesion_boxes=list(boxes)))
    return out


# ----------------------------------------------------------------------------- metrics


def test_closed_accuracy_normalizes_yes_no_and_options():
    assert closed_correct("Yes, there is.", "yes")
    assert closed_correct("yes", "Yes")
    assert closed_correct("The heart is not enlarged.", "No")
    assert not closed_correct("No.", "yes")
    assert not closed_correct("The heart", "yes")  # no answer is not a right answer
    opts = ["liver", "spleen"]
    assert closed_correct("The liver is bigger.", "Liver", opts)
    assert not closed_correct("The spleen is bigger.", "Liver", opts)
    assert not closed_correct("The liver and the spleen.", "Liver", opts)  # both named
    assert closed_correct("It is a CT scan", "CT")
    assert not closed_correct("It is an MRI", "CT")


def test_open_metrics_and_token_f1():
    assert exact_match("The Liver.", "liver")
    assert not exact_match("left liver", "liver")
    assert answer_recall("in the left lung", "left lung") == 1.0
    assert answer_recall("the right lung", "left lung") == 0.5
    assert answer_recall("anything", "") == 0.0
    assert token_f1("mass in the liver", "mass in the liver") == 1.0
    # p = {a, b, c}, g = {a, b, d, e}: common 2, P = 2/3, R = 2/4
    assert token_f1("x1 x2 x3", "x1 x2 x4 x5") == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    assert token_f1("", "") == 1.0 and token_f1("a", "") == 0.0


def test_score_answers_by_type(tmp_path):
    exs = examples(tmp_path)
    preds = ["Yes.", "Yes.", "The liver.", "kidney", "There is a mass in the liver."]
    s = score_answers(exs, preds)
    assert s["closed_accuracy"] == 0.5 and s["n_closed"] == 2
    assert s["open_exact_match"] == 0.5 and s["open_recall"] == 0.5 and s["n_open"] == 2
    assert s["report_token_f1"] == pytest.approx(token_f1(preds[4], exs[4].answer))
    with pytest.raises(ValueError, match="predictions"):
        score_answers(exs, preds[:2])


# ----------------------------------------------------------------------------- grounding


def lesion_reader(image, question, answer):
    """A 'model' whose confidence in the answer is the lesion's brightness."""
    a = np.asarray(image.convert("L"), dtype=float)
    x0, y0, x1, y1 = BOX
    return a[y0:y1, x0:x1].mean() / 10.0


def test_grounding_score_sees_the_lesion_removed(tmp_path):
    exs = examples(tmp_path)
    g = grounding_score(lesion_reader, exs, CorruptConfig(mode="inpaint"))
    assert g["n_grounding"] == 3 and g["n_no_lesion_region"] == 2
    # 230 -> ~70 inside the box: a drop of ~16 nats for this reader
    assert 12.0 < g["grounding_score"] < 18.0
    assert all(p["drop"] > 10 for p in g["per_example"])
    blind = grounding_score(lambda im, q, a: -3.0, exs, CorruptConfig(mode="inpaint"))
    assert blind["grounding_score"] == 0.0  # a model that ignores the image
    # the paper's noise keeps the bright lesion mostly visible: a smaller drop than inpaint
    noise = grounding_score(lesion_reader, exs, CorruptConfig(mode="noise"))
    assert 0.0 < noise["grounding_score"] < g["grounding_score"]
    all_ = grounding_score(lesion_reader, exs, CorruptConfig(), include_fallback=True)
    assert all_["n_grounding"] == 5
    with pytest.raises(ValueError, match="non-finite"):
        grounding_score(lambda im, q, a: float("nan"), exs)


def test_evaluate_combines_answers_and_grounding(tmp_path):
    exs = examples(tmp_path)
    answers = {e.id: e.answer for e in exs}
    out = evaluate(
        {"answer": lambda e: answers[e.id], "logprob": lesion_reader},
        exs,
        corrupt_cfg=CorruptConfig(mode="inpaint"),
    )
    assert out["closed_accuracy"] == 1.0 and out["open_exact_match"] == 1.0
    assert out["report_token_f1"] == 1.0 and out["grounding_score"] > 10
    assert len(out["predictions"]) == 5
    only = evaluate(ModelFns(answer=lambda e: "no"), exs)
    assert "grounding_score" not in only and only["closed_accuracy"] == 0.5
    with pytest.raises(ValueError, match="answer function"):
        evaluate(ModelFns(), exs)
    with pytest.raises(ValueError, match="keys"):
        evaluate({"generate": print}, exs)


# ----------------------------------------------------------------------------- prepare_pairs


def test_prepare_pairs_records_images_and_counted_skips(tmp_path):
    exs = examples(tmp_path)
    answers = {
        "0": "No, there is no mass.",
        "1": "No.",
        "2": "The kidney is abnormal.",
        "3": "The spleen is abnormal.",
        "4": "Normal chest.",
    }
    editor = ReferenceEditor.from_examples(exs)
    stats = Counter()
    recs = prepare_pairs(
        exs,
        lambda e: answers[e.id],
        editor,
        CorruptConfig(mode="inpaint"),
        tmp_path / "out",
        stats=stats,
    )
    assert [r["id"] for r in recs] == ["0", "1", "2", "3"]
    assert stats["pairs"] == 4 and stats["skip:report_needs_llm_editor"] == 1
    assert stats["corrupt:annotation"] == 3 and stats["corrupt:fallback"] == 1
    r0, r1, r2, _ = recs
    assert r0["prompt"] == "Is there a mass?" and not r0["was_correct"]
    assert parse_mask_tags(r0["rejected"])[0] == "No, there is no mass."  # y- = the model's
    assert parse_mask_tags(r0["chosen"])[0] == "Yes, there is a mass."
    assert r1["was_correct"] and parse_mask_tags(r1["chosen"])[0] == "No."
    assert parse_mask_tags(r2["chosen"])[0] == "The liver is abnormal."
    for r in recs:
        assert {"prompt", "chosen", "rejected", "image_path", "id", "qid"} <= set(r)
        assert Path(r["rejected_image_path"]).is_file()
        assert Path(r["image_path"]).is_absolute() and Path(r["rejected_image_path"]).is_absolute()
        for key in ("chosen", "rejected"):
            assert parse_mask_tags(r[key])[1], f"{key} of {r['id']} has no tagged span"
    assert r1["corrupt_source"] == "fallback"  # no lesion annotation: whole-image noise
    # v' of a lesion example: the bright box is gone
    a = np.asarray(Image.open(r0["rejected_image_path"]), dtype=float)
    x0, y0, x1, y1 = BOX
    assert a[y0:y1, x0:x1].mean() < 100
    # the trainer reads the file as written
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(recs))
    assert load_records(str(path)) == recs
    # no corruption config: no rejected_image_path
    plain = prepare_pairs(exs[:1], lambda e: answers[e.id], editor, None, tmp_path / "o2")
    assert "rejected_image_path" not in plain[0]


def test_prepare_pairs_counts_editor_skips_and_duplicates(tmp_path):
    exs = examples(tmp_path)[:2]

    class Picky:
        name = "picky"

        def edit(self, example, answer):
            raise SkipExample("nope", answer)

    stats = Counter()
    assert prepare_pairs(exs, lambda e: "yes", Picky(), None, tmp_path, stats=stats) == []
    assert stats["skip:nope"] == 2 and stats["examples"] == 2
    stats = Counter()
    recs = prepare_pairs(
        exs[:1] * 2, lambda e: "No.", ReferenceEditor(), None, tmp_path, stats=stats
    )
    assert len(recs) == 1 and stats["skip:duplicate"] == 1


# ----------------------------------------------------------------------------- CLIs, tiny model


@pytest.fixture(scope="module")
def rad_root(tmp_path_factory):
    from test_datasets import make_vqa_rad

    return make_vqa_rad(tmp_path_factory.mktemp("rad") / "VQA_RAD")


def test_cli_prepare_and_eval_from_files(rad_root, tmp_path):
    from fgpo.cli import main

    answers = [
        {"id": "synpic100", "qid": "1", "answer": "Yes, there is a pneumothorax."},
        {"id": "synpic100", "qid": "2", "answer": "The liver."},
        {"id": "synpic200", "qid": "3", "answer": "3"},
    ]
    ans = tmp_path / "answers.json"
    ans.write_text(json.dumps(answers))
    out = tmp_path / "out"
    rc = main(
        [
            "prepare",
            "--dataset",
            "vqa_rad",
            "--root",
            str(rad_root),
            "--answers",
            str(ans),
            "--out",
            str(out),
            "--corrupt-mode",
            "blur",
            "--segmenter",
            "test_corrupt:centre_segmenter",
        ]
    )
    assert rc == 0
    recs = json.loads((out / "pairs.json").read_text())
    assert [r["qid"] for r in recs] == ["1", "2", "3"]
    assert all(r["corrupt_source"] == "segmenter" for r in recs)  # VQA-RAD has no masks
    assert parse_mask_tags(recs[0]["chosen"])[0] == "No, there is no pneumothorax."
    report = json.loads((out / "prepare_report.json").read_text())
    assert report["dataset"]["skipped"] == {"corrupt_image": 1}
    assert report["prepare"]["pairs"] == 3
    metrics = tmp_path / "m.json"
    rc = main(
        [
            "eval",
            "--dataset",
            "vqa_rad",
            "--root",
            str(rad_root),
            "--split",
            "train",
            "--predictions",
            str(ans),
            "--out",
            str(metrics),
        ]
    )
    assert rc == 0
    m = json.loads(metrics.read_text())
    assert m["closed_accuracy"] == 0.0 and m["open_exact_match"] == 0.0 and m["n_open"] == 1
    with pytest.raises(SystemExit, match="exactly one of --model or --answers"):
        main(["prepare", "--dataset", "vqa_rad", "--root", str(rad_root), "--out", str(out)])


@pytest.mark.slow
def test_cli_with_a_tiny_model_end_to_end(rad_root, tmp_path):
    """Greedy answers from a tiny random LLaVA -> pairs the trainer's dataset encodes ->
    eval with log-probs from hidden states + lm_head weight (fgpo_kernels.token_logprobs)."""
    from fgpo.cli import main
    from fgpo.models import load_model

    out = tmp_path / "out"
    rc = main(
        [
            "prepare",
            "--dataset",
            "vqa_rad",
            "--root",
            str(rad_root),
            "--model",
            "tiny-llava",
            "--max-new-tokens",
            "6",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    report = json.loads((out / "prepare_report.json").read_text())["prepare"]
    assert report["examples"] == 3
    recs = load_records(str(out / "pairs.json"))
    assert report["pairs"] == len(recs)
    assert sum(v for k, v in report.items() if k.startswith("skip:")) + len(recs) == 3
    _, proc = load_model("tiny-llava", dtype="float32")
    # the pairs (from the model's random answers, and from fixed answers) encode in the
    # trainer's dataset with non-empty span masks on both sides, v' included
    ans = tmp_path / "answers.json"
    ans.write_text(
        json.dumps(
            [
                {"id": "synpic100", "qid": "1", "answer": "yes there is a nodule ."},
                {"id": "synpic200", "qid": "3", "answer": "there is a large opacity"},
            ]
        )
    )
    fixed = tmp_path / "fixed"
    assert (
        main(
            [
                "prepare",
                "--dataset",
                "vqa_rad",
                "--root",
                str(rad_root),
                "--split",
                "train",
                "--answers",
                str(ans),
                "--out",
                str(fixed),
            ]
        )
        == 0
    )
    for pairs in (out / "pairs.json", fixed / "pairs.json"):
        ds = PreferenceDataset(str(pairs), proc)
        items = [ds[k] for k in range(len(ds))]
        assert all(it is not None for it in items), ds.skipped
        for it in items:
            assert it.chosen["span_mask"].sum() > 0 and it.rejected["span_mask"].sum() > 0
            assert it.corrupt_image is not None
    assert len(ds) == 2
    metrics = tmp_path / "m.json"
    rc = main(
        [
            "eval",
            "--dataset",
            "vqa_rad",
            "--root",
            str(rad_root),
            "--split",
            "train",
            "--model",
            "tiny-llava",
            "--max-new-tokens",
            "4",
            "--corrupt-mode",
            "inpaint",
            "--include-fallback",
            "--out",
            str(metrics),
        ]
    )
    assert rc == 0
    m = json.loads(metrics.read_text())
    assert m["n_examples"] == 2 and m["n_grounding"] == 2
    for p in m["per_example"]:
        assert p["logp"] < 0 and p["logp_corrupt"] < 0
        assert p["drop"] == pytest.approx(p["logp"] - p["logp_corrupt"])


def test_answer_logprob_matches_materialized_logits():
    """The CLI's log-prob (hidden states + token_logprobs) equals log_softmax of full logits."""
    import torch

    from fgpo.models.inference import answer_logprob_fn
    from fgpo.models.tiny import build_tiny

    model, proc = build_tiny("tiny-llava")
    model.eval()
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 30), dtype=np.uint8))
    q, a = "is there a nodule ?", "yes there is a nodule"
    got = answer_logprob_fn(model, proc, "cpu")(img, q, a)
    ids, pix = proc.encode_prompt(img, q)
    ans = proc.tokenizer(a, add_special_tokens=False)["input_ids"] + [proc.eos_token_id]
    x = torch.tensor([ids + ans])
    with torch.no_grad():
        logits = model(input_ids=x, attention_mask=torch.ones_like(x), **pix).logits[0].double()
    lp = torch.log_softmax(logits, -1)
    n = len(ids)
    want = sum(lp[n - 1 + k, t].item() for k, t in enumerate(ans))
    assert got == pytest.approx(want, rel=1e-4, abs=1e-4)


def test_prepare_pairs_unreadable_files_are_counted_and_dicom_becomes_png(tmp_path):
    from pydicom.data import get_testdata_file

    from fgpo.data import open_image

    exs = examples(tmp_path)[:3]
    gone = exs[1]
    Path(gone.image_path).unlink()  # vanished after loading
    bad_mask = tmp_path / "mask.png"
    bad_mask.write_bytes(b"not a png")
    exs[2].lesion_mask_path = str(bad_mask)
    dcm = VQAExample(
        "ct",
        "0",
        get_testdata_file("CT_small.dcm"),
        "Is there a mass?",
        "yes",
        "closed",
        lesion_boxes=[(30, 30, 60, 60)],
    )

    def answer(e):
        open_image(e.image_path)  # as a model's answer function does
        return "No, there is no mass." if e.answer_type == "closed" else "The kidney is abnormal."

    stats = Counter()
    recs = prepare_pairs(
        [*exs, dcm], answer, ReferenceEditor(), CorruptConfig(), tmp_path / "o", stats=stats
    )
    assert [r["id"] for r in recs] == ["0", "2", "ct"]
    assert stats["skip:unreadable_image"] == 1 and stats["corrupt_failed"] == 1
    assert "rejected_image_path" not in recs[1]
    ct = recs[2]
    assert ct["image_path"].endswith(".png") and Path(ct["image_path"]).is_file()
    assert open_image(ct["image_path"]).size == (128, 128)
    assert Path(ct["rejected_image_path"]).is_file()
    out = evaluate({"answer": answer, "logprob": lesion_reader}, [*exs, dcm])
    assert out["n_unanswered"] == 1 and out["n_closed"] == 2
    assert out["n_unreadable_image"] == 1 and out["n_corrupt_failed"] == 1
    assert out["n_grounding"] == 2  # example 0 and the DICOM one


def test_cli_prepare_with_a_relative_root_writes_paths_the_trainer_resolves(tmp_path, monkeypatch):
    from test_datasets import make_vqa_rad

    from fgpo.cli import main

    make_vqa_rad(tmp_path / "rad")
    (tmp_path / "a.json").write_text(json.dumps([{"id": "synpic100", "qid": "1", "answer": "Yes"}]))
    monkeypatch.chdir(tmp_path)
    args = ["prepare", "--dataset", "vqa_rad", "--root", "rad", "--split", "train", "--limit", "1"]
    assert main([*args, "--answers", "a.json", "--out", "sub/out"]) == 0
    (rec,) = load_records(str(tmp_path / "sub" / "out" / "pairs.json"))
    for key in ("image_path", "rejected_image_path"):
        assert Path(rec[key]).is_absolute() and Path(rec[key]).is_file()
