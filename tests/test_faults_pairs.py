"""Fault audit of ``fgpo prepare`` (issue 11, items 3 and 10): paid edits survive a failing
endpoint or a missing answer, ``--resume`` continues where it stopped, a hostile endpoint
never gets the API key onto the screen or into a file, and ``--segmenter`` says it runs code."""

from __future__ import annotations

import json
import logging

import pytest
from llm_endpoint import LocalEndpoint, chat_reply
from test_datasets import _img

from fgpo.cli import main

KEY = "sk-test-SECRET-0123456789abcdef"
N = 8


@pytest.fixture
def rad(tmp_path):
    """A VQA-RAD layout with N closed questions on two images."""
    root = tmp_path / "VQA_RAD"
    for name, seed in (("a.jpg", 1), ("b.jpg", 2)):
        _img(root / "VQA_RAD Image Folder" / name, seed=seed)
    rows = [
        dict(qid=q, image_name="ab"[q % 2] + ".jpg", question=f"Is there a lesion {q}?",
             answer="no", answer_type="CLOSED", phrase_type="freeform", image_organ="CHEST")
        for q in range(1, N + 1)
    ]  # fmt: skip
    (root / "VQA_RAD Dataset Public.json").write_text(json.dumps(rows))
    answers = tmp_path / "answers.json"
    answers.write_text(json.dumps([{"id": "a" if q % 2 == 0 else "b", "qid": str(q),
                                    "answer": "yes"} for q in range(1, N + 1)]))  # fmt: skip
    return root, answers


def _endpoint(behave) -> LocalEndpoint:
    """An endpoint whose ``behave(n, headers)`` decides the n-th reply."""
    ep = LocalEndpoint(lambda req: behave(len(ep.requests), req["headers"]))
    return ep


def _reply(content: str) -> tuple[int, str]:
    return 200, chat_reply(content)


EDIT = json.dumps({"is_correct": False, "edited": "no"})


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv("FGPO_TEST_KEY", KEY)
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(var, raising=False)


def _prepare(rad, out, *extra):
    root, answers = rad
    argv = ["prepare", "--dataset", "vqa_rad", "--root", str(root), "--answers", str(answers),
            "--out", str(out), "--corrupt-mode", "none", *extra]  # fmt: skip
    return main(argv)


def _llm(endpoint, retries="0"):
    return ["--editor", "llm", "--llm-base-url", endpoint.url, "--llm-model", "m",
            "--llm-api-key-env", "FGPO_TEST_KEY", "--llm-retries", retries]  # fmt: skip


def test_an_endpoint_failing_after_4_edits_keeps_them_and_resume_continues(rad, tmp_path):
    """Before: every record was held in memory; the failure left no pairs.json and no report,
    and the 4 paid edits were lost."""
    down = _endpoint(lambda n, h: _reply(EDIT) if n <= 4 else (401, '{"error": "expired"}'))
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=r"4 pairs .* saved in .*pairs\.json.*--resume"):
        _prepare(rad, out, *_llm(down))
    down.close()
    assert len(json.loads((out / "pairs.json").read_text())) == 4
    report = json.loads((out / "prepare_report.json").read_text())
    assert report["complete"] is False and "401" in report["error"]
    assert report["prepare"]["pairs"] == 4
    with pytest.raises(SystemExit, match="--resume"):  # no silent overwrite of that work
        _prepare(rad, out, *_llm(down))
    up = _endpoint(lambda n, h: _reply(EDIT))
    assert _prepare(rad, out, *_llm(up), "--resume") == 0
    up.close()
    assert len(up.requests) == N - 4  # the done examples are not sent (nor paid for) again
    recs = json.loads((out / "pairs.json").read_text())
    assert sorted(int(r["qid"]) for r in recs) == list(range(1, N + 1))
    report = json.loads((out / "prepare_report.json").read_text())
    assert report["complete"] is True and report["prepare"]["pairs"] == N
    assert report["prepare"]["examples"] == N


def test_a_missing_answer_keeps_the_done_pairs(rad, tmp_path):
    answers = rad[1]
    rows = json.loads(answers.read_text())
    answers.write_text(json.dumps(rows[:2] + rows[3:]))  # qid 3 has no answer
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=r"no answer for id=b qid=3.*2 pairs .* saved"):
        _prepare(rad, out)
    assert len(json.loads((out / "pairs.json").read_text())) == 2
    answers.write_text(json.dumps(rows))
    assert _prepare(rad, out, "--resume") == 0
    assert len(json.loads((out / "pairs.json").read_text())) == N


def test_a_line_cut_short_by_a_kill_is_redone(rad, tmp_path):
    out = tmp_path / "out"
    assert _prepare(rad, out) == 0
    journal = out / "prepare_progress.jsonl"
    lines = journal.read_text().splitlines(keepends=True)
    journal.write_text("".join(lines[:5]) + lines[5][:30])  # killed while writing line 6
    assert _prepare(rad, out, "--resume") == 0
    recs = json.loads((out / "pairs.json").read_text())
    assert sorted(int(r["qid"]) for r in recs) == list(range(1, N + 1))


def _echo_headers(n, headers):
    return json.dumps({"echo": headers})  # what a proxy that echoes requests sends back


@pytest.mark.parametrize(
    "behave",
    [
        lambda n, h: (500, _echo_headers(n, h)),  # retried, then the error quotes the body
        lambda n, h: (400, _echo_headers(n, h)),  # not retried
        lambda n, h: _reply(_echo_headers(n, h)),  # a reply without the fields
        lambda n, h: _reply("not json " + _echo_headers(n, h)),  # unparseable
        lambda n, h: _reply(json.dumps({"is_correct": False, "edited": json.dumps(h)})),
    ],
    ids=["500", "400", "fields", "unparseable", "edit"],
)
def test_a_hostile_endpoint_never_gets_the_key_out(rad, tmp_path, capsys, caplog, behave):
    """Before: errors quoted up to 300 bytes of the reply, and a proxy echoing the request
    headers put ``Bearer <key>`` on stderr."""
    hostile = _endpoint(behave)
    out = tmp_path / "out"
    with caplog.at_level(logging.DEBUG):
        try:
            _prepare(rad, out, *_llm(hostile, retries="1"))
            message = ""
        except SystemExit as e:
            message = str(e.code)
    hostile.close()
    assert hostile.requests
    captured = capsys.readouterr()
    seen = [message, captured.out, captured.err, caplog.text]
    seen += [p.read_text(errors="replace") for p in out.rglob("*") if p.is_file()]
    for text in seen:
        assert KEY not in text and KEY[:12] not in text
        assert "Bearer sk" not in text


def test_segmenter_help_says_it_runs_the_named_code(capsys):
    with pytest.raises(SystemExit):
        main(["prepare", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "imports" in help_text and "runs" in help_text and "trust" in help_text
