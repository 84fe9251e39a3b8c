"""A small client for OpenAI-compatible chat-completions servers, used by the LLM judges.

Judging a few thousand answers with a remote model is slow, costs money and meets flaky
servers, so the client retries what is worth retrying (connection errors, timeouts, HTTP 429
and 5xx, with exponential backoff), fails at once on what is not (other 4xx, a 200 that is not
a chat completion), and can keep every answer in an append-only JSONL cache: a rerun, or a run
killed halfway, never pays twice for the same request. Standard library only, so a judge run
needs nothing beyond the project's own dependencies.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import threading
import time
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAX_SLEEP = 60.0  # seconds; no single backoff or Retry-After wait is longer
BODY_SNIPPET = 200  # characters of an error body quoted in a message


class LLMClientError(RuntimeError):
    """A judge server that cannot be reached or answers wrongly.

    The message says which URL and why, and never contains the API key.
    """


@dataclass(frozen=True)
class Completion:
    """One answer: the assistant's text, the model the server says produced it, and whether it came from the cache."""

    text: str
    model: str
    cached: bool


class _Retryable(Exception):
    """A failed attempt worth repeating; `wait` is the server's Retry-After in seconds, if it gave one."""

    def __init__(self, reason: str, wait: float | None = None) -> None:
        super().__init__(reason)
        self.wait = wait


class ChatClient:
    """Sends chat requests to `{base_url}/chat/completions` for one model and one set of sampling settings.

    `requests` counts the HTTP requests actually made (retries included, cache hits not), which
    is what a server bills for. Safe to share between threads.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        max_retries: int = 5,
        backoff: float = 1.0,
        cache: str | os.PathLike | None = None,
        temperature: float = 0.0,
        max_tokens: int = 256,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise LLMClientError(f"judge base_url must start with http:// or https://, got {base_url!r}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.requests = 0
        self._api_key = api_key or None
        self._lock = threading.Lock()
        self._cache_path = Path(cache) if cache is not None else None
        self._cache: dict[str, tuple[str, str]] = {}
        self._unterminated = False  # the cache file ends mid-line (a killed write): start the next entry on a new line
        if self._cache_path is not None:
            self._load_cache(self._cache_path)

    @classmethod
    def from_env(
        cls, base_url: str | None, model: str | None, api_key_env: str = "OPENAI_API_KEY", **kwargs: Any
    ) -> ChatClient:
        """A client from the judge params: the URL falls back to `OPENAI_BASE_URL`, the key is read from `api_key_env`.

        The key is optional because local servers (vLLM, llama.cpp, Ollama) usually need none.
        """
        base_url = base_url or os.environ.get("OPENAI_BASE_URL")
        if not base_url:
            raise LLMClientError(
                "no judge server: set evaluate.judge.base_url in params or the OPENAI_BASE_URL environment variable"
            )
        if not model:
            raise LLMClientError("no judge model: set evaluate.judge.model in params")
        return cls(base_url, model, os.environ.get(api_key_env) or None, **kwargs)

    def complete(self, messages: list[dict[str, str]]) -> Completion:
        """The answer to `messages`, from the cache when this exact request was answered before."""
        payload = {
            "model": self.model,
            "messages": messages,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }
        key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None:
            return Completion(text=hit[0], model=hit[1], cached=True)
        text, model = self._request(payload)
        if self._cache_path is not None:
            self._store(key, text, model)
        return Completion(text=text, model=model, cached=False)

    def _request(self, payload: dict[str, Any]) -> tuple[str, str]:
        """POST with retries. A malformed 200 is not retried: it means a wrong URL or server, not a hiccup."""
        body = json.dumps(payload).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        reason, wait = "", None  # of the last failed attempt
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self._delay(attempt - 1, wait))
            try:
                return self._attempt(body, headers)
            except _Retryable as err:
                reason, wait = str(err), err.wait
        attempts = self.max_retries + 1
        raise LLMClientError(f"{self.url}: gave up after {attempts} attempt{'s' * (attempts > 1)}; last: {reason}")

    def _delay(self, retry: int, wait: float | None) -> float:
        """Seconds before retry `retry` (0-based): the server's Retry-After if given, else exponential backoff."""
        delay = wait if wait is not None else self.backoff * 2**retry
        return max(0.0, min(delay, MAX_SLEEP))

    def _attempt(self, body: bytes, headers: dict[str, str]) -> tuple[str, str]:
        """One HTTP request: the (text, model) of a good answer, `_Retryable` for a transient failure."""
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        with self._lock:
            self.requests += 1
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as err:
            detail = self._redact(_error_body(err))[:BODY_SNIPPET]
            if err.code == 429 or err.code >= 500:
                raise _Retryable(f"HTTP {err.code}: {detail}", _retry_after(err.headers.get("Retry-After"))) from None
            raise LLMClientError(f"{self.url}: HTTP {err.code}: {detail}") from None
        except (OSError, http.client.HTTPException) as err:
            cause = err.reason if isinstance(err, urllib.error.URLError) else err
            if isinstance(cause, TimeoutError):
                raise _Retryable(f"timed out after {self.timeout} s") from None
            raise _Retryable(f"connection failed: {cause}") from None
        return self._parse(raw, self.model)

    def _parse(self, raw: bytes, requested: str) -> tuple[str, str]:
        """The content of choice 0 and the reported model of a 200 response."""
        try:
            data = json.loads(raw)
            text = data["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            snippet = self._redact(raw.decode("utf-8", "replace"))[:BODY_SNIPPET]
            raise LLMClientError(f"{self.url}: no choices[0].message.content in the answer: {snippet!r}") from None
        if not isinstance(text, str):
            raise LLMClientError(f"{self.url}: choices[0].message.content is {type(text).__name__}, not text")
        model = data.get("model")
        return text, model if isinstance(model, str) and model else requested

    def _redact(self, text: str) -> str:
        """`text` with the API key masked, in case a server echoes it back in an error."""
        return text.replace(self._api_key, "***") if self._api_key else text

    def _load_cache(self, path: Path) -> None:
        """Read every well-formed entry; a bad line (say, half-written by a killed run) is skipped with a warning."""
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            return
        data = path.read_bytes()
        self._unterminated = bool(data) and not data.endswith(b"\n")
        for number, line in enumerate(data.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                key, text, model = entry["key"], entry["text"], entry["model"]
                if not all(isinstance(v, str) for v in (key, text, model)):
                    raise TypeError("key, text and model must be strings")
            except (ValueError, KeyError, TypeError) as err:
                warnings.warn(f"{path}:{number}: skipping malformed cache line ({err})", stacklevel=3)
                continue
            self._cache[key] = (text, model)

    def _store(self, key: str, text: str, model: str) -> None:
        """Append one entry and force it to disk, so a kill right after loses nothing already paid for."""
        line = json.dumps({"key": key, "text": text, "model": model}, ensure_ascii=False).encode("utf-8") + b"\n"
        with self._lock:
            if self._unterminated:
                line = b"\n" + line
            with open(self._cache_path, "ab") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
            self._unterminated = False
            self._cache[key] = (text, model)


def _retry_after(value: str | None) -> float | None:
    """A numeric Retry-After header in seconds; None when absent or an HTTP date, which then falls back to backoff."""
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _error_body(err: urllib.error.HTTPError) -> str:
    """The body of an error response, or "" when it cannot be read (the connection may already be gone)."""
    try:
        return err.read().decode("utf-8", "replace")
    except (OSError, http.client.HTTPException):
        return ""
