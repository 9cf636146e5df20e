"""A tiny OpenAI-compatible chat server for tests: real HTTP on 127.0.0.1, no model.

    with fake_openai_server(lambda request: "Paris") as base_url:
        OpenAITeacher(base_url, "any-model").complete(...)

The `answer` function sees each request's JSON body and returns what to send back:

- a str: a well-formed chat completion whose message content is that string;
- an int: that HTTP status, with an OpenAI-style JSON error body;
- bytes: sent as-is with status 200, to imitate a broken server;
- a (status, bytes) pair: that status with that body.

Pass a list as `received` to have every request recorded in it, headers included.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

Reply = str | int | bytes | tuple[int, bytes]


@dataclass
class ReceivedRequest:
    path: str
    headers: dict[str, str]
    body: dict


def chat_completion(content: str, model: str = "fake-model") -> dict:
    """The JSON an OpenAI-compatible server answers a chat completion with."""
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


@contextmanager
def fake_openai_server(
    answer: Callable[[dict], Reply], received: list[ReceivedRequest] | None = None
) -> Iterator[str]:
    """Serve /v1/chat/completions in a background thread; yield its base_url, e.g. http://127.0.0.1:PORT/v1."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", 0))
            body = json.loads(self.rfile.read(length) or b"{}")
            if received is not None:
                received.append(ReceivedRequest(self.path, dict(self.headers), body))
            if self.path != "/v1/chat/completions":
                self._send(404, json.dumps({"error": {"message": f"no route {self.path}"}}).encode())
                return
            reply = answer(body)
            if isinstance(reply, tuple):
                self._send(*reply)
            elif isinstance(reply, bytes):
                self._send(200, reply)
            elif isinstance(reply, int):
                self._send(reply, json.dumps({"error": {"message": f"fake error {reply}"}}).encode())
            else:
                self._send(200, json.dumps(chat_completion(reply, body.get("model", "fake-model"))).encode())

        def _send(self, status: int, payload: bytes) -> None:
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client stopped waiting, as timeout tests make it do

        def log_message(self, format: str, *args: object) -> None:
            pass  # keep pytest output clean

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
