"""Teacher models that write instructions and answers for self-instruct data generation.

LocalTeacher runs a Hugging Face causal LM in this process. OpenAITeacher talks to any server with an
OpenAI-compatible ``/chat/completions`` endpoint: vLLM, Ollama, the llama.cpp server, or OpenAI itself.
Both answer `complete(conversations, temperature=, top_p=, max_new_tokens=, seed=)` with one reply each.
"""

from __future__ import annotations

import http.client
import json
import os
import time
import urllib.error
import urllib.request

from rlhf.config import GenerationConfig, ModelConfig, TeacherConfig
from rlhf.errors import UserError

# Chat messages in the OpenAI shape: [{"role": "user", "content": "..."}, ...].
Conversation = list[dict[str, str]]

_BODY_EXCERPT_CHARS = 200


def build_teacher(teacher: TeacherConfig, base_model: ModelConfig, generation: GenerationConfig | None = None, seed: int = 0):
    """The teacher a config asks for: an OpenAI-compatible endpoint, or a local model (default: the
    pipeline's base model), loaded unquantized since it only generates; with `generation` engine vllm, a
    local model is served by a vLLM engine (rlhf.vllm_engine)."""
    if teacher.kind == "openai":
        for key in ("base_url", "model"):
            if not getattr(teacher, key):
                raise UserError(f"teacher.{key}: required when the teacher's kind is openai")
        return OpenAITeacher(
            base_url=teacher.base_url,
            model=teacher.model,
            api_key_env=teacher.api_key_env,
            timeout_s=teacher.timeout_s,
            max_retries=teacher.max_retries,
        )
    model_config = base_model.model_copy(
        update={"name_or_path": teacher.model or base_model.name_or_path, "quantization": "none"}
    )
    if generation is not None and generation.engine == "vllm":
        return VllmTeacher.load(model_config, generation, seed)
    return LocalTeacher.load(model_config, batch_size=teacher.batch_size)


class LocalTeacher:
    """A local model (hub id, directory or reserved name), generating in batches, seeded."""

    def __init__(self, model, tokenizer, batch_size: int = 8) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size

    @classmethod
    def load(cls, model_config, batch_size: int = 8) -> LocalTeacher:
        from rlhf.models import load_causal_lm, load_tokenizer, resolve_model

        path = resolve_model(model_config.name_or_path)
        model = load_causal_lm(path, model_config, quantize=False).eval()
        return cls(model, load_tokenizer(path, model_config.trust_remote_code), batch_size)

    def complete(
        self,
        conversations: list[Conversation],
        *,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        seed: int | None = None,
    ) -> list[str]:
        from rlhf.generation import generate_chat

        replies = generate_chat(
            self.model,
            self.tokenizer,
            conversations,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            batch_size=self.batch_size,
            seed=seed or 0,
            description="teacher",
        )
        return [reply.text for reply in replies]


class VllmTeacher:
    """A local model served by a vLLM engine; answers as LocalTeacher does (each reply seeded by its row)."""

    def __init__(self, engine) -> None:
        self.engine = engine

    @classmethod
    def load(cls, model_config, generation: GenerationConfig, seed: int = 0) -> VllmTeacher:
        from rlhf.models import resolve_model
        from rlhf.vllm_engine import VllmEngine

        return cls(VllmEngine(resolve_model(model_config.name_or_path), model_config, generation, seed=seed))

    def complete(self, conversations: list[Conversation], *, temperature: float, top_p: float, max_new_tokens: int,
                 seed: int | None = None) -> list[str]:
        replies = self.engine.generate_chat(conversations, max_new_tokens=max_new_tokens, temperature=temperature,
                                            top_p=top_p, seed=seed or 0, description="teacher")
        return [reply.text for reply in replies]


class _RetryableFailure(Exception):
    """One failed attempt that may succeed if tried again.

    `summary` completes "teacher endpoint URL ..." and `detail` says why, so the final
    message reads "teacher endpoint URL unreachable after 4 attempts: Connection refused".
    """

    def __init__(self, summary: str, detail: str) -> None:
        super().__init__(f"{summary}: {detail}")
        self.summary = summary
        self.detail = detail


class OpenAITeacher:
    """A client for an OpenAI-compatible chat completions endpoint, e.g. ``http://127.0.0.1:8000/v1``."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None = None,
        timeout_s: float = 60,
        max_retries: int = 3,
        backoff_s: float = 1.0,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise UserError(f"teacher base_url {base_url!r}: expected a URL starting with http:// or https://")
        if max_retries < 0:
            raise UserError(f"teacher max_retries: expected 0 or more, got {max_retries}")
        self.base_url = base_url
        self.model = model
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        # The key is named, not given, so that it never sits in a config file or a log.
        self._api_key: str | None = None
        if api_key_env is not None:
            self._api_key = os.environ.get(api_key_env) or None
            if self._api_key is None:
                raise UserError(f"teacher api_key_env: environment variable {api_key_env} is not set")

    def __repr__(self) -> str:
        return f"OpenAITeacher(base_url={self.base_url!r}, model={self.model!r})"

    def complete(
        self,
        conversations: list[Conversation],
        *,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        seed: int | None = None,
    ) -> list[str]:
        """The assistant's reply to each conversation, one request per conversation."""
        replies = []
        for messages in conversations:
            body: dict[str, object] = {
                "model": self.model,
                "messages": messages,
                "temperature": temperature,
                "top_p": top_p,
                "max_tokens": max_new_tokens,
            }
            if seed is not None:
                body["seed"] = seed
            replies.append(self._post_with_retries(body))
        return replies

    def _post_with_retries(self, body: dict[str, object]) -> str:
        attempts = self.max_retries + 1
        for attempt in range(attempts):
            if attempt > 0:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                return self._post_once(body)
            except _RetryableFailure as failure:
                last_failure = failure
        attempts_text = f"{attempts} attempt" + ("s" if attempts != 1 else "")
        raise UserError(
            self._redact(
                f"teacher endpoint {self.base_url} {last_failure.summary} after {attempts_text}: {last_failure.detail}"
            )
        )

    def _post_once(self, body: dict[str, object]) -> str:
        headers = {"Content-Type": "application/json"}
        if self._api_key is not None:
            headers["Authorization"] = f"Bearer {self._api_key}"
        request = urllib.request.Request(
            f"{self.base_url.rstrip('/')}/chat/completions",
            data=json.dumps(body).encode("utf-8"),
            headers=headers,
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as err:
            excerpt = _excerpt(err.read())
            if err.code == 429 or err.code >= 500:
                raise _RetryableFailure(f"returned HTTP {err.code}", excerpt) from None
            # Other 4xx answers (unknown model, bad key) will not change on a retry.
            raise UserError(
                self._redact(f"teacher endpoint {self.base_url} returned HTTP {err.code}: {excerpt}")
            ) from None
        except urllib.error.URLError as err:
            raise _RetryableFailure("unreachable", _describe(err.reason)) from None
        except TimeoutError:
            raise _RetryableFailure("unreachable", f"no answer within {self.timeout_s}s") from None
        except (OSError, http.client.HTTPException) as err:
            # The server dropped the connection mid-answer, e.g. while restarting.
            raise _RetryableFailure("unreachable", _describe(err)) from None
        return _content_of(raw)

    def _redact(self, message: str) -> str:
        # Some servers echo the rejected key in their error body; it must not reach a log.
        if self._api_key:
            message = message.replace(self._api_key, "***")
        return message


def _content_of(raw: bytes) -> str:
    invalid = _RetryableFailure("returned an invalid response", "expected JSON with choices[0].message.content")
    try:
        answer = json.loads(raw)
        content = answer["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise invalid from None
    if not isinstance(content, str):
        raise invalid
    return content


def _excerpt(body: bytes) -> str:
    """The start of an error body on one line, short enough for a log."""
    text = " ".join(body.decode("utf-8", errors="replace").split())
    if len(text) > _BODY_EXCERPT_CHARS:
        text = text[: _BODY_EXCERPT_CHARS - 3] + "..."
    return text or "(empty body)"


def _describe(reason: object) -> str:
    """'Connection refused' rather than '[Errno 111] Connection refused'."""
    if isinstance(reason, TimeoutError):
        return "timed out"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return " ".join(str(reason).split()) or type(reason).__name__
