"""A local OpenAI-compatible ``/chat/completions`` endpoint for the LLM editor's tests."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def chat_reply(content: str | None) -> str:
    """The body of a chat completion whose message is ``content``."""
    return json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]})


class LocalEndpoint:
    """Serves on 127.0.0.1; ``behave(request) -> (status, body)`` decides each reply, where
    ``request`` is ``{"path", "auth", "headers", "json"}``; ``requests`` records them all."""

    def __init__(self, behave: Callable[[dict[str, Any]], tuple[int, str]]) -> None:
        self.requests: list[dict[str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                n = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(n) if n < 1_000_000 else b""
                request = {
                    "path": self.path,
                    "auth": self.headers.get("Authorization"),
                    "headers": dict(self.headers),
                    "json": json.loads(body or b"{}"),
                }
                outer.requests.append(request)
                status, text = behave(request)
                data = text.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
