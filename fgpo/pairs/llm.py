"""``LLMEditor``: minimal edits from any OpenAI-compatible ``/chat/completions`` endpoint.

urllib only: base URL, model name, API key from an environment variable, our own prompt,
bounded retries on 429/5xx and on unparseable replies. The tags are computed by
:func:`fgpo.pairs.text.tag_diff`, never taken from the model's reply. The key never leaves in a
message, log, report or record: every text that quotes the endpoint's reply is redacted (the
key's value and any ``Bearer <token>``), and a reply is read up to 8 MiB.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

from ..data.errors import SkipExample
from ..data.records import strip_tags
from .editors import Edit
from .text import change_ratio, normalize, tag_diff, tokens


class LLMEditorError(RuntimeError):
    """The LLM endpoint failed (after the retries) or answered something unusable."""


# A reply is a small JSON object; anything far larger is not one (and is not read whole).
_MAX_REPLY = 8 << 20
_BEARER = re.compile(r"(?i)\bbearer\s+(?!\[redacted\])[^\s\"',;}\]]+")


SYSTEM_PROMPT = (
    "You edit answers of a medical vision-language model to build preference pairs. You never "
    "rewrite style: you change as few words as possible. Reply with one JSON object only."
)

USER_PROMPT = """Question: {question}
Ground-truth answer: {answer}
Model answer: {model_answer}

1. Decide whether the model answer is medically correct given the ground truth ("is_correct").
2. If it is wrong: copy the model answer and replace only the wrong words by the correct ones
   ("edited"). Keep every other word, the order and the punctuation.
3. If it is right: copy the model answer and change only the key words so that it becomes a
   plausible but wrong answer ("edited"), e.g. yes <-> no, left <-> right, one organ for another.
4. For a report, edit only the sentences that contradict the ground truth (or, if it is right,
   make one finding wrong); leave every other sentence exactly as it is.

Reply with JSON only: {{"is_correct": true or false, "edited": "..."}}"""


def _extract_json(content: str) -> dict:
    text = content.strip()
    if text.startswith("```"):
        text = re.sub(r"^```(?:json)?\s*", "", text)
        text = re.sub(r"\s*```$", "", text)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        m = re.search(r"\{.*\}", text, re.S)
        if not m:
            raise
        obj = json.loads(m.group())
    if not isinstance(obj, dict):
        raise json.JSONDecodeError("expected a JSON object", text, 0)
    return obj


@dataclass
class LLMEditor:
    """Editor over an OpenAI-compatible chat endpoint (``POST {base_url}/chat/completions``).

    ``base_url`` e.g. ``https://api.openai.com/v1`` or ``http://127.0.0.1:8000/v1``; the API key
    is read from the environment variable ``api_key_env`` (None or "" sends no key: local
    servers). Transient failures (connection errors, HTTP 429/5xx, unparseable replies) are
    retried ``max_retries`` times with exponential backoff; other HTTP errors (401, 404, ...)
    raise :class:`LLMEditorError` at once. An edit that changes more than ``max_change_ratio``
    of the words is not minimal: :class:`SkipExample`.
    """

    base_url: str
    model: str
    api_key_env: str | None = "OPENAI_API_KEY"
    timeout: float = 60.0
    max_retries: int = 2
    backoff: float = 1.0
    temperature: float = 0.0
    max_tokens: int = 512
    max_change_ratio: float = 0.5
    name: str = "llm"

    def __post_init__(self) -> None:
        if not re.match(r"^https?://", self.base_url or ""):
            raise ValueError(f"base_url must start with http:// or https://, got {self.base_url!r}")
        if not self.model:
            raise ValueError("model must be a non-empty model name")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
        self._key = None
        if self.api_key_env:
            self._key = os.environ.get(self.api_key_env)
            if not self._key:
                raise ValueError(
                    f"the API key environment variable {self.api_key_env} is not set "
                    "(pass api_key_env=None for a server without authentication)"
                )

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + "/chat/completions"

    def _post(self, payload: dict) -> dict:
        data = json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
        host = urllib.parse.urlsplit(self.url).hostname or ""
        if host in ("localhost", "::1") or host.startswith("127."):
            # a local server is never reached through an http_proxy from the environment
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        else:
            opener = urllib.request.build_opener()
        with opener.open(req, timeout=self.timeout) as resp:
            raw = resp.read(_MAX_REPLY + 1)
        if len(raw) > _MAX_REPLY:
            raise ValueError(f"the reply is larger than {_MAX_REPLY >> 20} MiB")
        return json.loads(raw.decode("utf-8"))

    def redact(self, text: str) -> str:
        """``text`` without the API key: its exact value and any ``Bearer <token>`` (a server or
        proxy may echo the request's headers into a reply that ends up in a message)."""
        if self._key:
            text = text.replace(self._key, "[redacted]")
        return _BEARER.sub("Bearer [redacted]", text)

    def complete(self, messages: list[dict]) -> dict:
        """One chat completion, parsed as a JSON object, with the retry policy above."""
        payload = {
            "model": self.model,
            "messages": messages,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }
        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                body = self._post(payload)
                content = body["choices"][0]["message"]["content"]
                return _extract_json(content or "")
            except urllib.error.HTTPError as e:
                # Redacted before it is cut to 300 characters: a cut must not leave half a key.
                body = e.read(1 << 16).decode("utf-8", "replace") if e.fp else ""
                last = f"HTTP {e.code} {e.reason}: {self.redact(body)[:300]}"
                if e.code != 429 and e.code < 500:
                    raise LLMEditorError(self.redact(f"{self.url}: {last}")) from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                last = f"connection failed: {e}"
            except (ValueError, KeyError, IndexError, TypeError) as e:  # JSON, UTF-8, shape
                last = f"malformed reply ({type(e).__name__}: {e})"
        raise LLMEditorError(
            self.redact(f"{self.url}: {self.max_retries + 1} attempts failed; last: {last}")
        )

    def messages(self, example: Any, model_answer: str) -> list[dict]:
        user = USER_PROMPT.format(
            question=example.question, answer=example.answer, model_answer=model_answer
        )
        return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]

    def edit(self, example: Any, model_answer: str) -> Edit:
        y = model_answer.strip()
        if not y:
            raise SkipExample("empty_answer", str(example.id))
        obj = self.complete(self.messages(example, y))
        correct = obj.get("is_correct")
        if isinstance(correct, str):
            correct = correct.strip().lower() in ("true", "yes", "1")
        edited = obj.get("edited")
        if not isinstance(correct, bool) or not isinstance(edited, str):
            raise SkipExample("llm_reply_missing_fields", self.redact(json.dumps(obj))[:200])
        # The edit becomes a record: a key echoed into it must not reach pairs.json.
        edited = self.redact(strip_tags(edited)).strip()
        if normalize(edited) == normalize(y):
            raise SkipExample("no_difference", y[:80])
        ratio = change_ratio(y, edited)
        if len(tokens(y)) > 3 and ratio > self.max_change_ratio:
            raise SkipExample("edit_not_minimal", f"{ratio:.2f} of the words changed")
        chosen, rejected = (y, edited) if correct else (edited, y)
        c, r = tag_diff(chosen, rejected)
        return Edit(c, r, correct, {"edit": "llm", "change_ratio": round(ratio, 3)})
