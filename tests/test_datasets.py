"""Dataset loaders on small generated folders in the official layouts, and DICOM reading."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fgpo.data import (
    DatasetError,
    VQAExample,
    examples_from_json,
    load_dataset,
    load_iu_xray,
    load_pathvqa,
    load_slake,
    load_vqa_rad,
    open_image,
)
from fgpo.data.dicom import DicomError, apply_window, read_dicom
from fgpo.data.loaders import REPORT_QUESTION

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402


def _img(path: Path, size=(37, 29), seed=0, mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.random.default_rng(seed).integers(0, 256, (size[1], size[0]), dtype=np.uint8)
    Image.fromarray(a, "L").convert(mode).save(path)


def make_slake(root: Path) -> Path:
    """SLAKE 1.0 layout: imgs/xmlab<N>/{source.jpg, mask.png, detection.json} + split JSONs."""
    for n in (1, 2, 3):
        d = root / "imgs" / f"xmlab{n}"
        _img(d / "source.jpg", (64, 48), seed=n, mode="RGB")
        m = np.zeros((48, 64), np.uint8)
        m[10:20, 30:50] = 3
        Image.fromarray(m).save(d / "mask.png")
    det = [{"Liver": [10, 8, 20, 15]}, {"Liver Cancer": [14, 10, 6, 5]}, {"Spleen": [40, 20, 8, 8]}]
    (root / "imgs" / "xmlab1" / "detection.json").write_text(json.dumps(det))
    (root / "imgs" / "xmlab2" / "detection.json").write_text(json.dumps([{"Heart": [1, 1, 9, 9]}]))
    (root / "imgs" / "xmlab3" / "detection.json").write_text("{not json")

    def q(qid, img, question, answer, atype, lang="en", **kw):
        return dict(
            img_id=int(img[5:].split("/")[0]),
            img_name=img,
            question=question,
            answer=answer,
            answer_type=atype,
            q_lang=lang,
            qid=qid,
            modality="CT",
            location="Abdomen",
            content_type="Organ",
            base_type="vqa",
            **kw,
        )

    train = [
        q(0, "xmlab1/source.jpg", "Is the spleen visible?", "Yes", "CLOSED"),
        q(1, "xmlab1/source.jpg", "Where is the abnormality?", "Liver", "OPEN"),
        q(2, "xmlab1/source.jpg", "图中有肝脏吗?", "是", "CLOSED", lang="zh"),
        q(3, "xmlab2/source.jpg", "Which is bigger, the heart or the lung?", "Heart", "CLOSED"),
        q(4, "xmlab3/source.jpg", "What modality is used?", "CT", "OPEN"),
        q(5, "xmlab9/source.jpg", "Is this missing?", "No", "CLOSED"),  # image missing
    ]
    (root / "train.json").write_text(json.dumps(train, ensure_ascii=False))
    (root / "test.json").write_text(json.dumps(train[:2]))
    return root


def make_vqa_rad(root: Path) -> Path:
    img_dir = root / "VQA_RAD Image Folder"
    _img(img_dir / "synpic100.jpg", seed=1)
    _img(img_dir / "synpic200.jpg", seed=2)
    (img_dir / "synpic300.jpg").write_bytes(b"\xff\xd8\xff garbage, not a jpeg")
    rows = [
        dict(
            qid=1,
            image_name="synpic100.jpg",
            question="Is there a pneumothorax?",
            answer="no",
            answer_type="CLOSED",
            phrase_type="freeform",
            image_organ="CHEST",
            question_type="PRES",
        ),
        dict(
            qid=2,
            image_name="synpic100.jpg",
            question="What organ is shown?",
            answer="lung",
            answer_type="OPEN",
            phrase_type="test_freeform",
            image_organ="CHEST",
        ),
        dict(
            qid=3,
            image_name="synpic200.jpg",
            question="How many lesions?",
            answer=2,
            answer_type="OPEN",
            phrase_type="para",
            image_organ="HEAD",
        ),
        dict(
            qid=4,
            image_name="synpic300.jpg",
            question="Is it normal?",
            answer="yes",
            answer_type="CLOSED",
            phrase_type="test_para",
            image_organ="ABD",
        ),
    ]
    (root / "VQA_RAD Dataset Public.json").write_text(json.dumps(rows))
    return root


def make_pathvqa(root: Path, fmt="pkl") -> Path:
    for split in ("train", "test"):
        for k in range(2):
            _img(root / "images" / split / f"{split}_{k:04d}.jpg", seed=k, mode="RGB")
    rows = [
        {"image": "train_0000", "question": "Is this a carcinoma?", "answer": "yes"},
        {"image": "train_0001", "question": "What is present?", "answer": "fibrosis"},
        {"image": "train_0007", "question": "Where is it?", "answer": "liver"},  # missing
        {"image": "train_0001", "question": "no answer here"},  # malformed
    ]
    qa = root / "qas" / "train"
    qa.mkdir(parents=True, exist_ok=True)
    if fmt == "pkl":
        (qa / "train_qa.pkl").write_bytes(pickle.dumps(rows))
    else:
        (qa / "train_qa.json").write_text(json.dumps(rows))
    return root


def make_iu_annotation(root: Path) -> Path:
    for rid in ("CXR1_1_IM-0001", "CXR2_1_IM-0652", "CXR3_1_IM-1384"):
        _img(root / "images" / rid / "0.png", seed=len(rid))
        _img(root / "images" / rid / "1.png", seed=len(rid) + 1)
    ann = {
        "train": [
            {
                "id": "CXR1_1_IM-0001",
                "report": "The heart is normal. No effusion XXXX.",
                "image_path": ["CXR1_1_IM-0001/0.png", "CXR1_1_IM-0001/1.png"],
                "split": "train",
            },
            {
                "id": "CXR2_1_IM-0652",
                "report": "Mild cardiomegaly.",
                "image_path": ["CXR2_1_IM-0652/9.png"],
                "split": "train",
            },  # missing view
        ],
        "test": [
            {
                "id": "CXR3_1_IM-1384",
                "report": "Clear lungs.",
                "image_path": ["CXR3_1_IM-1384/0.png"],
                "split": "test",
            },
        ],
    }
    (root / "annotation.json").write_text(json.dumps(ann))
    return root


_XML = """<?xml version="1.0" encoding="utf-8"?>
<eCitation><MedlineCitation><Article><Abstract>
<AbstractText Label="COMPARISON">None.</AbstractText>
<AbstractText Label="FINDINGS">{findings}</AbstractText>
<AbstractText Label="IMPRESSION">{impression}</AbstractText>
</Abstract></Article></MedlineCitation>
{images}</eCitation>"""


def make_iu_xml(root: Path) -> Path:
    d = root / "ecgen-radiology"
    d.mkdir(parents=True)
    png = root / "NLMCXR_png"
    for k in range(1, 13):
        img = f"CXR{k}_1_IM-00{k:02d}-1001"
        _img(png / f"{img}.png", seed=k)
        findings = f"The lungs are clear. Finding {k}." if k != 5 else ""
        xml = _XML.format(
            findings=findings,
            impression="No acute disease." if k != 5 else "",
            images=f'<parentImage id="{img}"><url>/x.jpg</url></parentImage>',
        )
        (d / f"{k}.xml").write_text(xml)
    (d / "99.xml").write_text("<eCitation><unclosed>")
    return root


# ----------------------------------------------------------------------------- SLAKE


def test_slake_layout_regions_and_counted_skips(tmp_path):
    root = make_slake(tmp_path / "Slake1.0")
    exs, rep = load_slake(root, "train")
    assert [e.qid for e in exs] == ["0", "1", "3", "4"]  # zh dropped, missing image skipped
    assert rep.loaded == 4 and rep.skipped["missing_image"] == 1
    assert rep.skipped["corrupt_detection_file(boxes_ignored)"] == 1
    assert "xmlab9" in " ".join(rep.details)
    e0, e1, e3, e4 = exs
    assert isinstance(e0, VQAExample) and e0.id == "1" and e0.dataset == "slake"
    assert e0.answer_type == "closed" and e1.answer_type == "open"
    assert e0.modality == "CT" and e0.meta["location"] == "Abdomen"
    assert Path(e0.image_path).is_file()
    # the box whose label the question names; (x, y, w, h) -> (x0, y0, x1, y1)
    assert e0.lesion_boxes == [(40.0, 20.0, 48.0, 28.0)]
    # "Where is the abnormality?" -> "Liver" names Liver and "Liver Cancer"? Only the whole
    # label matches: "liver" appears, "liver cancer" does not.
    assert e1.lesion_boxes == [(10.0, 8.0, 30.0, 23.0)]
    assert e3.options == ["heart", "lung"] and e3.lesion_boxes == [(1.0, 1.0, 10.0, 10.0)]
    # no usable boxes -> the mask image
    assert e4.lesion_boxes == [] and e4.lesion_mask_path.endswith("xmlab3/mask.png")
    all_langs, _ = load_slake(root, "train", lang=None)
    assert len(all_langs) == 5


def test_slake_abnormal_box_chosen_when_no_label_named(tmp_path):
    root = make_slake(tmp_path / "s")
    rows = json.loads((root / "train.json").read_text())
    rows = [dict(rows[0], question="Does the picture contain a tumor?", answer="Yes", qid=10)]
    (root / "train.json").write_text(json.dumps(rows))
    (e,), _ = load_slake(root, "train")
    assert e.lesion_boxes == [(14.0, 10.0, 20.0, 15.0)]  # "Liver Cancer" is a finding


def test_slake_strict_and_missing_annotation(tmp_path):
    root = make_slake(tmp_path / "s")
    with pytest.raises(DatasetError, match=r"xmlab3/detection\.json"):
        load_slake(root, "train", strict=True)
    (root / "imgs" / "xmlab3" / "detection.json").write_text("[]")
    with pytest.raises(DatasetError, match=r"missing image: .*xmlab9"):
        load_slake(root, "train", strict=True)
    with pytest.raises(FileNotFoundError, match=r"validate\.json"):
        load_slake(root, "validate")
    (root / "test.json").write_text("[{broken")
    with pytest.raises(DatasetError, match="not valid JSON"):
        load_slake(root, "test")


# ----------------------------------------------------------------------------- VQA-RAD


def test_vqa_rad_splits_and_corrupt_image(tmp_path):
    root = make_vqa_rad(tmp_path / "rad")
    exs, rep = load_vqa_rad(root)
    assert [e.qid for e in exs] == ["1", "2", "3"]
    assert rep.skipped["corrupt_image"] == 1 and "synpic300" in rep.details[0]
    train, _ = load_vqa_rad(root, "train")
    test, rep_t = load_vqa_rad(root, "test")
    assert [e.qid for e in train] == ["1", "3"] and [e.qid for e in test] == ["2"]
    assert rep_t.skipped["corrupt_image"] == 1  # qid 4 is test_para
    e1, _, e3 = exs
    assert e1.answer_type == "closed" and e1.id == "synpic100" and e1.modality == "X-Ray"
    assert e3.answer == "2" and e3.answer_type == "open"  # numeric answers become text
    with pytest.raises(DatasetError, match="corrupt image"):
        load_vqa_rad(root, strict=True)
    with pytest.raises(ValueError, match="split"):
        load_vqa_rad(root, "validate")


# ----------------------------------------------------------------------------- PathVQA


@pytest.mark.parametrize("fmt", ["pkl", "json"])
def test_pathvqa_official_pickles(tmp_path, fmt):
    root = make_pathvqa(tmp_path / "pvqa", fmt)
    exs, rep = load_pathvqa(root, "train")
    assert [(e.id, e.answer_type) for e in exs] == [
        ("train_0000", "closed"),
        ("train_0001", "open"),
    ]
    assert exs[0].image_path.endswith("images/train/train_0000.jpg")
    assert rep.skipped == {"missing_image": 1, "malformed_record": 1}
    with pytest.raises(FileNotFoundError, match=r"test_qa\.pkl"):
        load_pathvqa(root, "test")


def test_pathvqa_lxmert_style_pickle(tmp_path):
    root = make_pathvqa(tmp_path / "pvqa")
    qa = root / "qas" / "train"
    (qa / "train_qa.pkl").unlink()
    rows = [
        {
            "img_id": "train_0000",
            "sent": "Is this benign?",
            "label": {"no": 1.0},
            "question_id": 17,
        },
        {"img_id": "train_0001", "sent": "What is shown?", "label": {"a": 0.3, "gland": 0.9}},
        {"img_id": "train_0001", "sent": "Unanswered?", "label": {}},
    ]
    (qa / "train_vqa.pkl").write_bytes(pickle.dumps(rows))
    exs, rep = load_pathvqa(root, "train")
    assert [(e.qid, e.answer, e.answer_type) for e in exs] == [
        ("17", "no", "closed"),
        ("1", "gland", "open"),
    ]
    assert rep.skipped == {"malformed_record": 1}


def test_pathvqa_refuses_pickles_with_code(tmp_path):
    root = make_pathvqa(tmp_path / "pvqa")
    evil = pickle.dumps([{"image": Path("x"), "question": "q", "answer": "a"}])
    (root / "qas" / "train" / "train_qa.pkl").write_bytes(evil)
    with pytest.raises(DatasetError, match="refusing to load"):
        load_pathvqa(root, "train")


# ----------------------------------------------------------------------------- IU-Xray


def test_iu_xray_annotation_json(tmp_path):
    root = make_iu_annotation(tmp_path / "iu")
    exs, rep = load_iu_xray(root, "train")
    assert len(exs) == 1 and rep.skipped["missing_image"] == 1
    (e,) = exs
    assert e.answer_type == "report" and e.question == REPORT_QUESTION
    assert e.answer == "The heart is normal. No effusion ."  # XXXX (anonymized) removed
    assert e.image_path.endswith("CXR1_1_IM-0001/0.png") and len(e.meta["views"]) == 2
    everything, _ = load_iu_xray(root, None)
    assert len(everything) == 2
    with pytest.raises(DatasetError, match="no split 'val'"):
        load_iu_xray(root, "val")


def test_iu_xray_openi_xml(tmp_path):
    root = make_iu_xml(tmp_path / "iu")
    exs, rep = load_iu_xray(root, None)
    assert len(exs) == 11  # 12 reports, one empty
    assert rep.skipped["empty_report"] == 1 and rep.skipped["corrupt_report"] == 1
    assert all(e.answer.startswith("The lungs are clear.") for e in exs)
    parts = [load_iu_xray(root, s)[0] for s in ("train", "val", "test")]
    ids = [e.id for p in parts for e in p]
    assert sorted(ids) == sorted(e.id for e in exs)  # the splits partition the reports
    assert ids == [
        e.id for p in (load_iu_xray(root, s)[0] for s in ("train", "val", "test")) for e in p
    ]  # and are deterministic
    with pytest.raises(FileNotFoundError, match=r"annotation\.json"):
        load_iu_xray(tmp_path / "empty")


def test_load_dataset_dispatch_and_json_roundtrip(tmp_path):
    root = make_vqa_rad(tmp_path / "rad")
    exs, _ = load_dataset("vqa_rad", root, "train")
    assert len(exs) == 2
    with pytest.raises(ValueError, match="dataset must be one of"):
        load_dataset("mimic", root)
    exs[0].lesion_boxes = [(1, 2, 3, 4)]
    p = tmp_path / "ex.json"
    p.write_text(json.dumps([e.to_dict() for e in exs]))
    back = examples_from_json(p)
    assert back == exs
    with pytest.raises(ValueError, match="answer_type"):
        VQAExample(id=1, qid=1, image_path="", question="", answer="", answer_type="yesno")


# ----------------------------------------------------------------------------- DICOM


def test_dicom_ct_uses_hounsfield_units_and_the_soft_tissue_preset():
    path = get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array.astype(float) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    im = read_dicom(path)  # CT_small has no window in the file -> ct_soft_tissue (40, 400)
    assert im.mode == "L" and im.size == (ds.Columns, ds.Rows)
    a = np.asarray(im).astype(int)
    assert (a[hu <= 40 - 0.5 - 399 / 2] == 0).all()
    assert (a[hu > 40 - 0.5 + 399 / 2] == 255).all()
    mid = (hu > -150) & (hu < 230)
    expect = np.rint(((hu - 39.5) / 399 + 0.5) * 255)
    assert mid.any() and np.abs(a[mid] - expect[mid]).max() <= 1
    lung = np.asarray(read_dicom(path, window="ct_lung")).astype(int)
    assert not (lung == a).all()
    explicit = np.asarray(read_dicom(path, window=(40, 400))).astype(int)
    assert (explicit == a).all()


def test_dicom_mr_uses_the_files_window():
    path = get_testdata_file("MR_small.dcm")
    ds = pydicom.dcmread(path)
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    a = np.asarray(read_dicom(path))
    assert (a == apply_window(ds.pixel_array.astype(float), c, w)).all()
    mm = np.asarray(read_dicom(path, window="minmax"))
    assert mm.min() == 0 and mm.max() == 255
    # open_image dispatches to DICOM by the preamble even without the extension
    assert (np.asarray(open_image(path)) == a).all()


def test_dicom_errors(tmp_path):
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"\x00" * 10)
    with pytest.raises(DicomError, match=r"bad\.dcm"):
        read_dicom(bad)
    with pytest.raises(DicomError, match="not found"):
        read_dicom(tmp_path / "none.dcm")
    with pytest.raises(ValueError, match="window must be"):
        read_dicom(get_testdata_file("CT_small.dcm"), window="ct_kidney")
    with pytest.raises(ValueError, match="width"):
        apply_window(np.zeros(3), 0, 0)


def test_dicom_images_in_a_dataset(tmp_path):
    root = make_vqa_rad(tmp_path / "rad")
    img_dir = root / "VQA_RAD Image Folder"
    (img_dir / "ct.dcm").write_bytes(Path(get_testdata_file("CT_small.dcm")).read_bytes())
    (img_dir / "broken.dcm").write_bytes(b"DICM broken")
    rows = json.loads((root / "VQA_RAD Dataset Public.json").read_text())
    rows += [
        dict(rows[0], qid=10, image_name="ct.dcm"),
        dict(rows[0], qid=11, image_name="broken.dcm"),
    ]
    (root / "VQA_RAD Dataset Public.json").write_text(json.dumps(rows))
    exs, rep = load_vqa_rad(root, "train")
    assert [e.qid for e in exs] == ["1", "3", "10"] and rep.skipped["corrupt_image"] == 1
    im = open_image(exs[-1].image_path)
    assert im.mode == "L" and im.size == (128, 128)
    with pytest.raises(DatasetError, match="not found"):
        open_image(tmp_path / "nothing.png")


def test_truncated_jpeg_is_a_counted_skip(tmp_path):
    root = make_vqa_rad(tmp_path / "rad")
    img = root / "VQA_RAD Image Folder" / "synpic200.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8)).save(img)
    img.write_bytes(img.read_bytes()[:300])  # header intact, data cut
    exs, rep = load_vqa_rad(root, "train")
    assert [e.qid for e in exs] == ["1"] and rep.skipped["corrupt_image"] == 1
