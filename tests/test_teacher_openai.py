"""OpenAITeacher against a real HTTP server on 127.0.0.1 (tests/fake_openai_server.py)."""

import socket
import time

import pytest
from fake_openai_server import ReceivedRequest, fake_openai_server

from rlhf.data_builders.teacher import OpenAITeacher
from rlhf.errors import UserError

SECRET = "sk-test-do-not-leak-123456"
HELLO = [{"role": "user", "content": "Say hello."}]
SAMPLING = {"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 64}


@pytest.fixture
def api_key(monkeypatch) -> str:
    monkeypatch.setenv("TEST_TEACHER_KEY", SECRET)
    return "TEST_TEACHER_KEY"


def teacher(base_url: str, **options) -> OpenAITeacher:
    options = {"backoff_s": 0.001, "timeout_s": 5, **options}
    return OpenAITeacher(base_url, "teacher-model", **options)


def complete_error(client: OpenAITeacher) -> str:
    with pytest.raises(UserError) as caught:
        client.complete([HELLO], **SAMPLING)
    message = str(caught.value)
    assert "\n" not in message
    assert SECRET not in message
    return message


def unused_port() -> int:
    """A port nothing listens on: bind to an ephemeral port, then release it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_sends_openai_request_and_returns_content(api_key):
    received: list[ReceivedRequest] = []
    conversations = [HELLO, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]]
    with fake_openai_server(lambda request: "reply to " + request["messages"][-1]["content"], received) as base_url:
        replies = teacher(base_url + "/", api_key_env=api_key).complete(conversations, seed=7, **SAMPLING)

    assert replies == ["reply to Say hello.", "reply to 2+2?"]
    assert [request.path for request in received] == ["/v1/chat/completions"] * 2
    assert received[1].body == {
        "model": "teacher-model",
        "messages": conversations[1],
        "temperature": 0.7,
        "top_p": 0.9,
        "max_tokens": 64,
        "seed": 7,
    }
    assert received[0].headers["Authorization"] == f"Bearer {SECRET}"
    assert received[0].headers["Content-Type"] == "application/json"


def test_no_key_no_authorization_header_and_no_seed():
    received: list[ReceivedRequest] = []
    with fake_openai_server(lambda request: "ok", received) as base_url:
        assert teacher(base_url).complete([HELLO], **SAMPLING) == ["ok"]
    assert "Authorization" not in received[0].headers
    assert "seed" not in received[0].body


def test_empty_list_makes_no_requests():
    assert teacher(f"http://127.0.0.1:{unused_port()}/v1").complete([], **SAMPLING) == []


@pytest.mark.parametrize("status", [503, 429])
def test_retries_transient_errors_then_succeeds(status, monkeypatch):
    statuses = [status, status]
    received: list[ReceivedRequest] = []
    sleeps: list[float] = []
    monkeypatch.setattr(time, "sleep", sleeps.append)
    with fake_openai_server(lambda request: statuses.pop(0) if statuses else "finally", received) as base_url:
        assert teacher(base_url, backoff_s=0.5).complete([HELLO], **SAMPLING) == ["finally"]
    assert len(received) == 3
    assert sleeps == [0.5, 1.0]  # exponential backoff


def test_gives_up_on_persistent_5xx():
    received: list[ReceivedRequest] = []
    with fake_openai_server(lambda request: 500, received) as base_url:
        message = complete_error(teacher(base_url, max_retries=2))
    assert len(received) == 3
    assert message == f"teacher endpoint {base_url} returned HTTP 500 after 3 attempts: " + '{"error": {"message": "fake error 500"}}'


@pytest.mark.parametrize(
    "garbage",
    [
        b"<html>Bad gateway</html>",
        b'{"choices": []}',
        b'{"choices": [{"message": {"content": null}}]}',
        b'{"choices": [{"text": "completion-style answer"}]}',
        b'["not", "an", "object"]',
        b"\xff\xfe",
    ],
)
def test_garbage_answers_are_retried_then_reported(garbage):
    received: list[ReceivedRequest] = []
    with fake_openai_server(lambda request: garbage, received) as base_url:
        message = complete_error(teacher(base_url, max_retries=3))
    assert len(received) == 4
    assert message == (
        f"teacher endpoint {base_url} returned an invalid response after 4 attempts: "
        "expected JSON with choices[0].message.content"
    )


def test_unreachable_endpoint_fails_fast_in_one_line():
    base_url = f"http://127.0.0.1:{unused_port()}/v1"
    started = time.monotonic()
    message = complete_error(teacher(base_url, max_retries=3))
    assert time.monotonic() - started < 2
    assert message == f"teacher endpoint {base_url} unreachable after 4 attempts: Connection refused"


def test_slow_server_times_out():
    def slow(request: dict) -> str:
        time.sleep(0.5)
        return "too late"

    with fake_openai_server(slow) as base_url:
        message = complete_error(teacher(base_url, timeout_s=0.1, max_retries=1))
    assert message.startswith(f"teacher endpoint {base_url} unreachable after 2 attempts: ")
    assert "0.1s" in message or "timed out" in message


@pytest.mark.parametrize("status", [400, 401, 404])
def test_client_errors_are_not_retried(status, api_key):
    received: list[ReceivedRequest] = []
    with fake_openai_server(lambda request: status, received) as base_url:
        message = complete_error(teacher(base_url, api_key_env=api_key))
    assert len(received) == 1
    assert message == f"teacher endpoint {base_url} returned HTTP {status}: " + f'{{"error": {{"message": "fake error {status}"}}}}'


def test_wrong_path_is_a_client_error():
    with fake_openai_server(lambda request: "ok") as base_url:
        message = complete_error(teacher(base_url.removesuffix("/v1")))
    assert "returned HTTP 404" in message


def test_error_body_excerpt_is_short_and_one_line():
    long_body = ("line one\nline two " * 100).encode()
    with fake_openai_server(lambda request: (422, long_body)) as base_url:
        message = complete_error(teacher(base_url))
    excerpt = message.split("returned HTTP 422: ", 1)[1]
    assert len(excerpt) <= 200
    assert excerpt.startswith("line one line two line one")


def test_key_echoed_by_server_is_redacted(api_key):
    # Some servers repeat the rejected key in their error body.
    echo = (401, f'{{"error": "Incorrect API key provided: {SECRET}"}}'.encode())
    with fake_openai_server(lambda request: echo) as base_url:
        message = complete_error(teacher(base_url, api_key_env=api_key))
    assert message.endswith('Incorrect API key provided: ***"}')


def test_missing_key_variable_is_named_without_a_key(monkeypatch):
    monkeypatch.delenv("TEST_TEACHER_KEY", raising=False)
    with pytest.raises(UserError, match="TEST_TEACHER_KEY is not set"):
        OpenAITeacher("http://127.0.0.1:1/v1", "m", api_key_env="TEST_TEACHER_KEY")


def test_bad_base_url():
    with pytest.raises(UserError, match="http:// or https://"):
        OpenAITeacher("127.0.0.1:8000/v1", "m")


def test_repr_shows_url_and_model_only(api_key):
    client = OpenAITeacher("http://127.0.0.1:8000/v1", "teacher-model", api_key_env=api_key)
    assert repr(client) == "OpenAITeacher(base_url='http://127.0.0.1:8000/v1', model='teacher-model')"
    assert SECRET not in repr(client) and SECRET not in str(client)
