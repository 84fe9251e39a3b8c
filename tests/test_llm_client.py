"""ChatClient against a real HTTP server on 127.0.0.1 whose answers each test scripts."""

import json
import socket
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from vlm_rlaif import llm_client
from vlm_rlaif.llm_client import ChatClient, Completion, LLMClientError

from conftest import serving

MESSAGES = [{"role": "system", "content": "You are a judge."}, {"role": "user", "content": "Score: 7?"}]
FAST = {"backoff": 0.01, "timeout": 0.3}


class Handler(BaseHTTPRequestHandler):
    """Records each request, then plays the next scripted action (or the server's default)."""

    def do_POST(self) -> None:
        server = self.server
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        server.seen.append({"path": self.path, "headers": dict(self.headers), "body": json.loads(raw)})
        action = server.actions.popleft() if server.actions else server.default
        kind = action[0]
        if kind == "sleep":
            server.stop.wait(action[1])
            action = ("ok", "late answer", "slow-model")
            kind = "ok"
        if self.path != "/v1/chat/completions":
            self._send(404, b"no such route")
        elif kind == "ok":
            text, model = action[1], action[2]
            body = {"id": "x", "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}
            if model is not None:
                body["model"] = model
            self._send(200, json.dumps(body).encode(), "application/json")
        elif kind == "raw":
            self._send(200, action[1], "application/json")
        elif kind == "status":  # ("status", code[, body[, headers]])
            body = action[2] if len(action) > 2 else b"error"
            self._send(action[1], body, extra=action[3] if len(action) > 3 else None)

    def _send(self, code: int, body: bytes, content_type: str = "text/plain", extra: dict | None = None) -> None:
        try:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in (extra or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)
        except OSError:
            pass  # the client gave up (timed out) before the answer came

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.seen, srv.actions, srv.default, srv.stop = [], deque(), ("ok", "fine", "judge-v1"), threading.Event()
    srv.base_url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
    yield from serving(srv)


def test_success_returns_server_answer_and_sends_openai_request(server):
    server.actions.append(("ok", "Score: 7", "judge-v1-2024"))
    client = ChatClient(server.base_url + "/", "judge-v1", "k", temperature=0.2, max_tokens=32, **FAST)
    result = client.complete(MESSAGES)
    assert result == Completion(text="Score: 7", model="judge-v1-2024", cached=False)
    assert client.requests == 1
    [request] = server.seen
    assert request["path"] == "/v1/chat/completions"
    assert request["body"] == {"model": "judge-v1", "messages": MESSAGES, "temperature": 0.2, "max_tokens": 32}
    assert request["headers"]["Authorization"] == "Bearer k"
    assert request["headers"]["Content-Type"] == "application/json"

    server.actions.append(("ok", "Score: 3", None))
    result = ChatClient(server.base_url, "judge-v1", **FAST).complete(MESSAGES)
    assert result.model == "judge-v1"  # the requested id when the server reports none
    assert "Authorization" not in server.seen[1]["headers"]


def test_cache_serves_repeats_across_instances_and_never_stores_the_key(server, tmp_path):
    cache = tmp_path / "deep" / "judge.jsonl"
    client = ChatClient(server.base_url, "judge-v1", "sk-secret-123", cache=cache, **FAST)
    first = client.complete(MESSAGES)
    second = client.complete(MESSAGES)
    assert (first.cached, second.cached) == (False, True)
    assert (second.text, second.model) == (first.text, first.model)
    assert client.requests == 1

    again = ChatClient(server.base_url, "judge-v1", "sk-secret-123", cache=cache, **FAST)
    assert again.complete(MESSAGES).cached and again.requests == 0
    other = again.complete([{"role": "user", "content": "Something else"}])
    assert not other.cached and again.requests == 1
    hotter = ChatClient(server.base_url, "judge-v1", cache=cache, temperature=1.0, **FAST)
    assert not hotter.complete(MESSAGES).cached  # sampling settings are part of the key
    assert len(server.seen) == 3
    assert b"sk-secret-123" not in cache.read_bytes()
    assert len(cache.read_text().splitlines()) == 3


def test_retries_server_errors_and_rate_limits(server):
    server.actions.extend([("status", 500), ("status", 500), ("ok", "third time", "m")])
    client = ChatClient(server.base_url, "m", **FAST)
    assert client.complete(MESSAGES).text == "third time"
    assert client.requests == 3

    server.actions.extend([("status", 429, b"slow down", {"Retry-After": "0"}), ("ok", "after 429", "m")])
    patient = ChatClient(server.base_url, "m", backoff=5.0, timeout=0.3)
    start = time.monotonic()
    assert patient.complete(MESSAGES).text == "after 429"
    assert time.monotonic() - start < 2.0  # Retry-After: 0 beat the 5 s backoff
    assert patient.requests == 2


def test_backoff_doubles_and_retry_after_is_capped(server, monkeypatch):
    sleeps = []
    monkeypatch.setattr(llm_client.time, "sleep", sleeps.append)
    server.actions.extend([("status", 502), ("status", 503), ("status", 429, b"", {"Retry-After": "3600"}),
                           ("status", 429, b"", {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}), ("ok", "ok", "m")])
    ChatClient(server.base_url, "m", backoff=0.5, timeout=0.3).complete(MESSAGES)
    assert sleeps == [0.5, 1.0, 60.0, 4.0]


def test_exhausted_retries_name_attempts_and_url(server):
    server.default = ("status", 503, b"overloaded")
    client = ChatClient(server.base_url, "m", max_retries=2, **FAST)
    with pytest.raises(LLMClientError) as err:
        client.complete(MESSAGES)
    assert len(server.seen) == 3 and client.requests == 3
    message = str(err.value)
    assert server.base_url + "/chat/completions" in message
    assert "3 attempts" in message and "503" in message and "overloaded" in message


def test_client_error_is_not_retried(server):
    server.actions.append(("status", 400, b'{"error": "unknown model judge-x for key sk-secret-123"}'))
    client = ChatClient(server.base_url, "judge-x", "sk-secret-123", **FAST)
    with pytest.raises(LLMClientError, match="400") as err:
        client.complete(MESSAGES)
    assert "unknown model judge-x" in str(err.value)
    assert "sk-secret-123" not in str(err.value)
    assert client.requests == 1 and len(server.seen) == 1


def test_timeout_is_retried_then_reported(server):
    server.actions.append(("sleep", 2.0))
    client = ChatClient(server.base_url, "m", **FAST)
    assert client.complete(MESSAGES).text == "fine"
    assert client.requests == 2

    server.default = ("sleep", 2.0)
    slow = ChatClient(server.base_url, "m", max_retries=1, **FAST)
    with pytest.raises(LLMClientError, match="timed out") as err:
        slow.complete(MESSAGES)
    assert slow.requests == 2 and "2 attempts" in str(err.value)


@pytest.mark.parametrize("body", [b"<html>not json</html>", b'{"choices": []}', b'{"choices": [{"message": {}}]}',
                                  b'{"choices": [{"message": {"content": null}}]}'])
def test_malformed_success_body_is_an_error(server, body):
    server.actions.append(("raw", body))
    client = ChatClient(server.base_url, "m", **FAST)
    with pytest.raises(LLMClientError, match="127.0.0.1"):
        client.complete(MESSAGES)
    assert client.requests == 1


def test_truncated_cache_line_is_skipped_with_a_warning(server, tmp_path):
    cache = tmp_path / "judge.jsonl"
    writer = ChatClient(server.base_url, "m", cache=cache, **FAST)
    writer.complete(MESSAGES)
    with open(cache, "ab") as f:
        f.write(b'{"key": "abc", "text": "half a li')  # a write cut short by a kill

    with pytest.warns(UserWarning, match=r"judge\.jsonl:2"):
        reader = ChatClient(server.base_url, "m", cache=cache, **FAST)
    assert reader.complete(MESSAGES).cached and reader.requests == 0
    reader.complete([{"role": "user", "content": "new"}])

    with pytest.warns(UserWarning, match=r"judge\.jsonl:2"):
        third = ChatClient(server.base_url, "m", cache=cache, **FAST)
    assert third.complete([{"role": "user", "content": "new"}]).cached  # appended after the torn line, not onto it
    assert third.complete(MESSAGES).cached and third.requests == 0


def test_from_env_reads_url_and_key(server, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    monkeypatch.setenv("JUDGE_KEY", "env-key")
    client = ChatClient.from_env(None, "judge-v1", api_key_env="JUDGE_KEY", **FAST)
    client.complete(MESSAGES)
    assert server.seen[0]["headers"]["Authorization"] == "Bearer env-key"

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    ChatClient.from_env(None, "judge-v1", **FAST).complete(MESSAGES)
    assert "Authorization" not in server.seen[1]["headers"]

    with pytest.raises(LLMClientError, match=r"evaluate\.judge\.model"):
        ChatClient.from_env(server.base_url, None)
    monkeypatch.delenv("OPENAI_BASE_URL")
    with pytest.raises(LLMClientError, match=r"evaluate\.judge\.base_url.*OPENAI_BASE_URL"):
        ChatClient.from_env(None, "judge-v1")


def test_unreachable_server():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = ChatClient(f"http://127.0.0.1:{port}/v1", "m", max_retries=1, **FAST)
    with pytest.raises(LLMClientError, match=f"127.0.0.1:{port}.*2 attempts.*connection failed"):
        client.complete(MESSAGES)
    assert client.requests == 2
