"""Fault audit of the data layer (issue 11, item 6 and the named errors): malformed records and
files fail with the file, record and field named; an oversized image is a counted skip."""

from __future__ import annotations

import json

import pytest

from fgpo import data
from fgpo.pairs.synthetic import make_preference_set

pytestmark = pytest.mark.usefixtures("train_env")


@pytest.fixture(scope="module")
def proc(llava):
    return llava[1]


@pytest.fixture(scope="module")
def recs(tmp_path_factory):
    path = make_preference_set(str(tmp_path_factory.mktemp("prefs")), n=4, seed=1)
    with open(path) as f:
        return json.load(f)


def _write(tmp_path, recs, name="bad.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(recs))
    return str(path)


@pytest.mark.parametrize(
    "field, value",
    [
        ("prompt", None),
        ("prompt", 5),
        ("prompt", float("nan")),
        ("chosen", 5),
        ("rejected", ["a"]),
        ("image_path", ["x.png"]),
        ("image_path", None),
        ("rejected_image_path", 3),
    ],
)
def test_a_field_of_the_wrong_type_names_file_record_and_field(tmp_path, recs, proc, field, value):
    """A null/number/NaN prompt used to be trained on as the text "None"/"5"/"nan"; the other
    fields crashed mid-run without naming the record. Both ``on_bad_tags`` policies refuse:
    the file is not in the record format."""
    bad = [dict(r) for r in recs]
    bad[2][field] = value
    path = _write(tmp_path, bad)
    for policy in ("error", "skip"):
        with pytest.raises(data.DatasetError, match=rf"bad\.json: record 2 \(id='tiny-1-2'\) "
                                                     rf"field '{field}'"):  # fmt: skip
            data.PreferenceDataset(path, proc, on_bad_tags=policy)
    with pytest.raises(data.DatasetError, match=f"record 2 .*'{field}'"):
        data.PreferenceDataset(bad, proc)  # records given as a list are checked the same way


@pytest.mark.parametrize("field", ["prompt", "chosen"])
def test_the_image_token_inside_text_follows_the_bad_tags_policy(tmp_path, recs, proc, field):
    """``<image>`` in a prompt crashed the scan with an error naming no record, even with
    ``on_bad_tags: skip``. Now: an error naming the record and field, or a counted skip."""
    bad = [dict(r) for r in recs]
    bad[1][field] = "is there a <image> lesion ?" if field == "prompt" else "<mask><image></mask>"
    path = _write(tmp_path, bad)
    want = rf"record 1 \(id='tiny-1-1'\) field '{field}'.*<image>"
    with pytest.raises(data.DatasetError, match=want):
        data.PreferenceDataset(path, proc)
    ds = data.PreferenceDataset(path, proc, on_bad_tags="skip")
    assert [ds[k] is None for k in range(len(ds))] == [False, True, False, False]
    assert ds.skipped == {"image_token_in_text": 1}


def test_record_files_that_are_not_json_name_the_path_and_line(tmp_path, recs):
    latin = tmp_path / "latin1.json"
    latin.write_bytes(json.dumps(recs[:1]).encode().replace(b"lesion", b"l\xe9sion"))
    with pytest.raises(data.DatasetError, match=r"latin1\.json.*UTF-8"):
        data.load_records(str(latin))
    lines = tmp_path / "broken.jsonl"
    rows = [json.dumps(r) for r in recs[:3]]
    rows[2] = rows[2][:40]  # line 3 is cut off
    lines.write_text("\n".join(rows) + "\n")
    with pytest.raises(data.DatasetError, match=r"broken\.jsonl: line 3 is not valid JSON"):
        data.load_records(str(lines))
    listing = tmp_path / "broken.json"
    listing.write_text(json.dumps(recs[:3], indent=1)[:-30])
    with pytest.raises(data.DatasetError, match=r"broken\.json: not valid JSON .*line \d+"):
        data.load_records(str(listing))
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": recs}, indent=1))
    want = r"wrapped\.json: .*a JSON object with keys \['data'\]"
    with pytest.raises(data.DatasetError, match=want):
        data.load_records(str(wrapped))
    one = tmp_path / "one.jsonl"  # a JSON-lines file of one record is still fine
    one.write_text(json.dumps(recs[0]) + "\n")
    assert data.load_records(str(one)) == recs[:1]


def test_an_oversized_image_is_a_counted_skip(tmp_path, recs, proc, monkeypatch):
    """PIL's decompression-bomb guard used to abort the whole run."""
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # the 32x32 scans are now "bombs"
    with pytest.raises(data.ImageError, match=r"tiny-1-0\.png.*too large") as e:
        data.open_image(recs[0]["image_path"])
    assert e.value.reason == "image_too_large"
    ds = data.PreferenceDataset(recs, proc)
    assert ds[0] is None and ds.skipped == {"image_too_large": 1}
