"""Editors: minimal-diff tagging, the reference editor, and the LLM editor against a local
OpenAI-compatible HTTP server (127.0.0.1, started by the test, bounded requests)."""

from __future__ import annotations

import json

import pytest
from llm_endpoint import LocalEndpoint, chat_reply

from fgpo.data import SkipExample, VQAExample, parse_mask_tags, strip_tags
from fgpo.pairs.editors import Editor, ReferenceEditor
from fgpo.pairs.llm import LLMEditor, LLMEditorError
from fgpo.pairs.text import change_ratio, polarity, tag_diff


def ex(question, answer, atype="open", options=(), id="7", qid="3"):
    return VQAExample(
        id=id,
        qid=qid,
        image_path="x.png",
        question=question,
        answer=answer,
        answer_type=atype,
        options=list(options),
    )


def spans_text(tagged):
    clean, spans = parse_mask_tags(tagged)  # the trainer's parser must accept our tags
    return clean, [clean[s:e] for s, e in spans]


# ----------------------------------------------------------------------------- tagging


@pytest.mark.parametrize(
    "a, b, sa, sb",
    [
        ("Yes, there is a mass.", "No, there is no mass.", ["Yes", "a"], ["No", "no"]),
        (
            "The lesion is in the left lung.",
            "The lesion is in the right lung.",
            ["left"],
            ["right"],
        ),
        ("A 3.5 cm nodule.", "A 4.5 cm nodule.", ["3.5"], ["4.5"]),
        ("Yes.", "No", ["Yes"], ["No"]),
        ("The liver is abnormal.", "The left kidney is abnormal.", ["liver"], ["left kidney"]),
        # pure insertion/deletion: the next word joins the span, so no side is empty
        ("The heart is not enlarged.", "The heart is enlarged.", ["not enlarged"], ["enlarged"]),
        ("Clear lungs", "Clear lungs bilaterally", ["lungs"], ["lungs bilaterally"]),
        ("same words.", "Same words", [], []),  # case and punctuation are not differences
    ],
)
def test_tag_diff_marks_only_the_differing_words(a, b, sa, sb):
    ta, tb = tag_diff(a, b)
    ca, got_a = spans_text(ta)
    cb, got_b = spans_text(tb)
    assert (ca, cb) == (a, b), "tagging must not change the text"
    assert got_a == sa and got_b == sb


def test_change_ratio():
    assert change_ratio("a b c d", "a b c d") == 0.0
    assert change_ratio("a b c d", "a x c d") == pytest.approx(0.25)
    assert change_ratio("a b", "x y z w") == 1.0


def test_polarity():
    assert polarity("Yes, it is.") == "yes"
    assert polarity("The heart is not enlarged") == "no"
    assert polarity("Absent.") == "no"
    assert polarity("The liver") is None


# ----------------------------------------------------------------------------- reference editor


def check_pair(edit, chosen_spans, rejected_spans, correct):
    assert edit.was_correct is correct
    assert spans_text(edit.chosen)[1] == chosen_spans
    assert spans_text(edit.rejected)[1] == rejected_spans


def test_reference_yes_no():
    e = ReferenceEditor()
    assert isinstance(e, Editor)
    q = "Is there a nodule?"
    wrong = e.edit(ex(q, "Yes", "closed"), "No, there is no nodule in the lung.")
    assert strip_tags(wrong.rejected) == "No, there is no nodule in the lung."  # y- untouched
    assert strip_tags(wrong.chosen) == "Yes, there is a nodule in the lung."
    check_pair(wrong, ["Yes", "a"], ["No", "no"], False)
    right = e.edit(ex(q, "No", "closed"), "No, there is no nodule in the lung.")
    assert strip_tags(right.chosen) == "No, there is no nodule in the lung."
    check_pair(right, ["No", "no"], ["Yes", "a"], True)
    neg = e.edit(ex("Is the heart enlarged?", "yes", "closed"), "The heart is not enlarged.")
    assert strip_tags(neg.chosen) == "The heart is enlarged." and not neg.was_correct
    as_open = e.edit(ex(q, "Yes", "open"), "No, there is no nodule in the lung.")
    assert as_open.chosen == wrong.chosen  # yes/no answers labelled OPEN (VQA-RAD) alike
    short = e.edit(ex(q, "yes", "closed"), "Nodule")
    assert strip_tags(short.chosen) == "Yes" and strip_tags(short.rejected) == "Nodule"
    with pytest.raises(SkipExample) as s:
        e.edit(ex(q, "yes", "closed"), "The image shows the chest of a patient in a scanner")
    assert s.value.reason == "cannot_locate_answer"


def test_reference_options():
    e = ReferenceEditor()
    q = "Which is bigger, the liver or the spleen?"
    x = ex(q, "Liver", "closed", options=["liver", "spleen"])
    wrong = e.edit(x, "The spleen is bigger.")
    assert strip_tags(wrong.chosen) == "The liver is bigger."
    check_pair(wrong, ["liver"], ["spleen"], False)
    right = e.edit(x, "The liver is bigger.")
    check_pair(right, ["liver"], ["spleen"], True)
    with pytest.raises(SkipExample, match="cannot_locate_answer"):
        e.edit(x, "Both the liver and the spleen are large organs of the abdomen.")


def test_reference_open_answers_and_counterfactuals():
    pool = [ex("q", a) for a in ("Liver", "Spleen", "Kidney", "Heart", "Liver")]
    e = ReferenceEditor.from_examples(pool)
    assert sorted(e.distractors) == ["Heart", "Kidney", "Liver", "Spleen"]
    x = ex("Which organ is abnormal?", "Liver")
    wrong = e.edit(x, "The kidney is abnormal.")
    assert strip_tags(wrong.chosen) == "The liver is abnormal."
    check_pair(wrong, ["liver"], ["kidney"], False)
    right = e.edit(x, "The liver is abnormal.")
    assert right.was_correct and strip_tags(right.chosen) == "The liver is abnormal."
    cf = spans_text(right.rejected)[1]
    assert len(cf) == 1 and cf[0].lower() in ("spleen", "kidney", "heart")
    again = e.edit(x, "The liver is abnormal.")
    assert again.rejected == right.rejected  # the counterfactual is seeded by the id
    short = e.edit(ex("What modality is used?", "CT"), "MRI")
    assert (short.chosen, short.rejected) == ("<mask>CT</mask>", "<mask>MRI</mask>")
    with pytest.raises(SkipExample, match="no_distractor"):
        ReferenceEditor().edit(x, "The liver is abnormal.")
    with pytest.raises(SkipExample, match="report_needs_llm_editor"):
        e.edit(ex("Describe", "Clear lungs.", "report"), "Clear lungs.")
    with pytest.raises(SkipExample, match="empty_answer"):
        e.edit(x, "   ")


# ----------------------------------------------------------------------------- LLM editor


class _Server(LocalEndpoint):
    """Answers queued replies (500 when none is queued), records requests."""

    def __init__(self):
        self.replies: list[tuple[int, str]] = []
        pop = lambda req: self.replies.pop(0) if self.replies else (500, "no reply queued")
        super().__init__(pop)

    def reply(self, content=None, status=200, raw=None):
        self.replies.append((status, chat_reply(content) if raw is None else raw))


@pytest.fixture
def server():
    s = _Server()
    yield s
    s.close()


@pytest.fixture(autouse=True)
def _unreachable_proxy(monkeypatch):
    # Requests to the loopback server must not go through a proxy from the environment.
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.setenv(var, "http://10.255.255.1:9")
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv("FGPO_TEST_LLM_KEY", "sk-test-123")
    return "FGPO_TEST_LLM_KEY"


def llm(server, key, **kw):
    kw.setdefault("backoff", 0.0)
    kw.setdefault("timeout", 10.0)
    return LLMEditor(server.url, "med-editor-1", api_key_env=key, **kw)


def test_llm_editor_request_and_parsing(server, key):
    ed = llm(server, key)
    x = ex("Is there a pleural effusion?", "No", "closed")
    server.reply(json.dumps({"is_correct": False, "edited": "No, there is no pleural effusion."}))
    out = ed.edit(x, "Yes, there is a pleural effusion.")
    (req,) = server.requests
    assert req["path"] == "/v1/chat/completions"
    assert req["auth"] == "Bearer sk-test-123"
    body = req["json"]
    assert body["model"] == "med-editor-1" and body["temperature"] == 0.0
    user = body["messages"][-1]["content"]
    assert "Is there a pleural effusion?" in user and "Yes, there is a pleural effusion." in user
    assert "Ground-truth answer: No" in user
    assert not out.was_correct
    check_pair(out, ["No", "no"], ["Yes", "a"], False)
    assert strip_tags(out.rejected) == "Yes, there is a pleural effusion."
    # a right answer: the LLM's edit is the counterfactual (rejected); fenced JSON is accepted
    server.reply('```json\n{"is_correct": true, "edited": "The lesion is in the left lobe."}\n```')
    right = ed.edit(ex("Where?", "right lobe"), "The lesion is in the right lobe.")
    check_pair(right, ["right"], ["left"], True)


def test_llm_editor_retries_500_and_malformed_then_succeeds(server, key):
    ed = llm(server, key, max_retries=2)
    server.reply(status=500, raw='{"error": "overloaded"}')
    server.reply("this is not json at all")
    server.reply(json.dumps({"is_correct": False, "edited": "The left kidney."}))
    out = ed.edit(ex("Which kidney?", "left"), "The right kidney.")
    assert len(server.requests) == 3
    check_pair(out, ["left"], ["right"], False)


def test_llm_editor_gives_up_with_a_clear_error(server, key):
    ed = llm(server, key, max_retries=1)
    server.reply(status=503, raw="busy")
    server.reply(raw='{"choices": []}')  # malformed body
    with pytest.raises(LLMEditorError, match=r"2 attempts failed; last: malformed reply"):
        ed.edit(ex("Which kidney?", "left"), "The right kidney.")
    assert len(server.requests) == 2
    # 401 is not retried: a configuration error
    server.reply(status=401, raw='{"error": "bad key"}')
    with pytest.raises(LLMEditorError, match=r"HTTP 401.*bad key"):
        ed.edit(ex("Which kidney?", "left"), "The right kidney.")
    assert len(server.requests) == 3


def test_llm_editor_rejects_unusable_edits(server, key):
    ed = llm(server, key, max_change_ratio=0.5)
    x = ex("Which kidney is enlarged?", "left")
    server.reply(
        json.dumps({"is_correct": False, "edited": "Everything about this is changed now."})
    )
    with pytest.raises(SkipExample, match="edit_not_minimal"):
        ed.edit(x, "The right kidney is enlarged.")
    server.reply(json.dumps({"is_correct": False, "edited": "The right kidney is enlarged"}))
    with pytest.raises(SkipExample, match="no_difference"):
        ed.edit(x, "The right kidney is enlarged.")
    server.reply(json.dumps({"edited": "The left kidney is enlarged."}))
    with pytest.raises(SkipExample, match="llm_reply_missing_fields"):
        ed.edit(x, "The right kidney is enlarged.")
    # tags the LLM adds are ignored: ours come from the diff
    server.reply(json.dumps({"is_correct": "false", "edited": "The <mask>left</mask> kidney."}))
    out = ed.edit(x, "The right kidney.")
    check_pair(out, ["left"], ["right"], False)


def test_llm_editor_configuration_errors(server, monkeypatch):
    monkeypatch.delenv("FGPO_MISSING_KEY", raising=False)
    with pytest.raises(ValueError, match="FGPO_MISSING_KEY"):
        LLMEditor(server.url, "m", api_key_env="FGPO_MISSING_KEY")
    with pytest.raises(ValueError, match="base_url"):
        LLMEditor("127.0.0.1:8000", "m", api_key_env=None)
    with pytest.raises(ValueError, match="model"):
        LLMEditor(server.url, "", api_key_env=None)
    # no key: no Authorization header (a local server)
    ed = LLMEditor(server.url, "m", api_key_env=None, backoff=0.0)
    server.reply(json.dumps({"is_correct": True, "edited": "No."}))
    ed.edit(ex("Is it?", "yes", "closed"), "Yes.")
    assert server.requests[-1]["auth"] is None


def test_llm_editor_connection_refused_is_retried_then_clear(key):
    s = _Server()
    url = s.url
    s.close()  # nothing listens on the port any more
    ed = LLMEditor(url, "m", api_key_env=key, max_retries=1, backoff=0.0, timeout=2.0)
    with pytest.raises(LLMEditorError, match="connection failed"):
        ed.edit(ex("q", "a"), "b")
