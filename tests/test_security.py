"""The project's security properties in one place, each checked against real behaviour.

1. Custom modelling code never runs unless `base.trust_remote_code` turns it on.
2. Weights are written and read as safetensors only; pickled weights are refused unread.
3. Every `torch.load` in the package refuses pickled code (`weights_only=True`).
4. The judge's API key goes to the judge server and nowhere else: not to logs, warnings,
   the terminal, error messages or the answer cache.
5. A path named by a data file cannot leave the root it is relative to.

The static checks parse vlm_rlaif/ rather than grep it, so a call split over lines or an
import alias cannot slip past; each also asserts it found something to check.
"""

from __future__ import annotations

import ast
import functools
import json
import logging
import os
import pickle
import re
import shutil
import sys
import threading
import traceback
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from vlm_rlaif import base, prepare
from vlm_rlaif.config import BaseConfig, load_params
from vlm_rlaif.data import (
    RecordError,
    read_consistency_qa,
    read_generic_qa,
    read_preferences,
    read_rl_prompts,
    read_sft,
    read_zeroshot_qa,
)
from vlm_rlaif.llm_client import BODY_SNIPPET, ChatClient, LLMClientError
from vlm_rlaif.modeling import ModelLoadError, load_model_and_processor, save_processor
from vlm_rlaif.tiny import build_tiny_model
from vlm_rlaif.video import VideoError, resolve_video, safe_join

from conftest import PARAMS, TINY_CORPUS, TINY_VLM, make_project, serving

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "vlm_rlaif"


# --------------------------------------------------------------------------- static view of the package


@dataclass(frozen=True)
class Call:
    """One call in the package source: where it is, and what it calls with import aliases resolved."""

    file: str  # relative to the repository root
    line: int
    function: str  # the innermost enclosing def, "<module>" at top level
    name: str  # "torch.save"; "<expr>.save_pretrained" for a method of a computed object
    node: ast.Call

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"

    def keyword(self, name: str) -> ast.keyword | None:
        return next((k for k in self.node.keywords if k.arg == name), None)


def _aliases(tree: ast.Module) -> dict[str, str]:
    """Local name -> dotted origin for every import in the module (`import torch as th`: th -> torch)."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]  # `import a.b` binds `a`
                names[alias.asname or top] = alias.name if alias.asname else top
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _dotted(node: ast.expr, aliases: dict[str, str]) -> str:
    if isinstance(node, ast.Name):
        return aliases.get(node.id, node.id)
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value, aliases)}.{node.attr}"
    return "<expr>"


class _CallCollector(ast.NodeVisitor):
    def __init__(self, file: str, aliases: dict[str, str]) -> None:
        self.file, self.aliases, self.stack, self.calls = file, aliases, ["<module>"], []

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.stack.append(node.name)
        self.generic_visit(node)
        self.stack.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = _function

    def visit_Call(self, node: ast.Call) -> None:
        self.calls.append(Call(self.file, node.lineno, self.stack[-1], _dotted(node.func, self.aliases), node))
        self.generic_visit(node)


@functools.cache
def package_calls() -> tuple[Call, ...]:
    """Every call in vlm_rlaif/**/*.py, parsed once per session."""
    calls = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        collector = _CallCollector(path.relative_to(ROOT).as_posix(), _aliases(tree))
        collector.visit(tree)
        calls.extend(collector.calls)
    assert len(calls) > 500, "the package parsed to almost nothing: the scan would prove nothing"
    return tuple(calls)


def calls_named(name: str) -> list[Call]:
    return [c for c in package_calls() if c.name == name]


def calls_of_method(method: str) -> list[Call]:
    return [c for c in package_calls() if c.name.rsplit(".", 1)[-1] == method]


def passes_literal(call: Call, name: str, value: bool) -> bool:
    """`call` passes `name=value` as a literal: a variable could hold anything at run time."""
    keyword = call.keyword(name)
    return keyword is not None and isinstance(keyword.value, ast.Constant) and keyword.value.value is value


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny base as `build_tiny_model` saves it."""
    return build_tiny_model(TINY_VLM, TINY_CORPUS, tmp_path_factory.mktemp("security") / "tiny", seed=0)


# --------------------------------------------------------------------------- 1. trust_remote_code


CUSTOM_CODE = """\
from pathlib import Path

from transformers import PretrainedConfig

Path({marker!r}).write_text("custom code ran")


class HomemadeConfig(PretrainedConfig):
    model_type = "homemade_vlm"
"""


def write_custom_code(folder: Path, marker: Path, config: dict, hooks: dict[str, str]) -> Path:
    """`config.json` mapping the auto classes in `hooks` to classes of custom_code.py, which
    leaves `marker` behind when imported: the marker is the proof that code shipped with the
    model ran."""
    folder.mkdir(parents=True, exist_ok=True)
    auto_map = {auto: f"custom_code.{cls}" for auto, cls in hooks.items()}
    (folder / "config.json").write_text(json.dumps({**config, "auto_map": auto_map}))
    (folder / "custom_code.py").write_text(CUSTOM_CODE.format(marker=str(marker)))
    return folder


def custom_model(folder: Path, marker: Path) -> Path:
    """A model folder of a type transformers does not know, so only its own code could load it."""
    write_custom_code(folder, marker, {"model_type": "homemade_vlm"}, {"AutoConfig": "HomemadeConfig"})
    save_file({"weight": torch.zeros(2)}, folder / "model.safetensors")  # passes the safetensors-only check
    return folder


@pytest.fixture
def modules_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Custom code that transformers is allowed (or, by a bug, wrongly allowed) to run is copied
    here, not into ~/.cache/huggingface."""
    from transformers import dynamic_module_utils

    cache = tmp_path / "hf_modules"
    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(cache))
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield cache
    for name in set(sys.modules) - before:
        if name.startswith("transformers_modules"):
            del sys.modules[name]


def test_trust_remote_code_defaults_to_off() -> None:
    assert BaseConfig().trust_remote_code is False


@pytest.mark.parametrize("profile", ["params.yaml", "params/paper.yaml"])
def test_shipped_profiles_keep_trust_remote_code_off(profile: str) -> None:
    raw = yaml.safe_load((ROOT / profile).read_text())
    assert raw["base"]["trust_remote_code"] is False  # written out, so turning it on is a visible diff
    assert load_params(ROOT / profile).base.trust_remote_code is False


@pytest.mark.usefixtures("modules_cache")
def test_custom_code_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    folder = custom_model(tmp_path / "homemade", marker)
    with pytest.raises(ModelLoadError) as err:
        load_model_and_processor(folder)
    message = str(err.value)
    assert str(folder) in message and "base.trust_remote_code" in message
    assert not marker.exists(), "the model folder's own Python code was executed"


@pytest.mark.usefixtures("modules_cache")
def test_custom_code_hooks_on_a_known_model_type_are_ignored(tmp_path: Path, tiny_model: Path) -> None:
    """A folder that claims a type transformers knows but maps the auto classes to its own code
    (a tampered download) loads with transformers' classes; its code never runs."""
    marker = tmp_path / "marker"
    folder = tmp_path / "tampered"
    shutil.copytree(tiny_model, folder)
    hooks = {"AutoConfig": "HomemadeConfig", "AutoProcessor": "HomemadeProcessor", "AutoModelForImageTextToText": "HomemadeModel"}
    write_custom_code(folder, marker, json.loads((tiny_model / "config.json").read_text()), hooks)
    for name, auto_map in (("processor_config.json", {"AutoProcessor": "custom_code.HomemadeProcessor"}),
                           ("tokenizer_config.json", {"AutoTokenizer": ["custom_code.HomemadeTokenizer", None]})):
        settings = json.loads((folder / name).read_text())
        (folder / name).write_text(json.dumps({**settings, "auto_map": auto_map}))
    model, processor = load_model_and_processor(folder)
    assert type(model).__module__.startswith("transformers.models.llava_next_video")
    assert type(processor).__module__.startswith("transformers.models.llava_next_video")
    assert not marker.exists(), "the model folder's own Python code was executed"


@pytest.mark.usefixtures("modules_cache")
def test_only_the_param_lets_custom_code_run(tmp_path: Path) -> None:
    """The base stage with base.trust_remote_code false refuses; set to true, the same folder's
    code runs (the marker appears), so the param is what gates it and the marker is live."""
    marker = tmp_path / "marker"
    folder = custom_model(tmp_path / "homemade", marker)

    def materialise(trust: bool) -> None:
        params = load_params(ROOT / "params.yaml", overrides={"base": {"model": str(folder), "trust_remote_code": trust}})
        base.materialise(params, tmp_path / "prepared", tmp_path / "base")

    with pytest.raises(ModelLoadError, match=r"base\.trust_remote_code"):
        materialise(False)
    assert not marker.exists()
    with pytest.raises(ModelLoadError):  # the homemade folder has no processor: it fails after its code ran
        materialise(True)
    assert marker.read_text() == "custom code ran"
    assert not (tmp_path / "base").exists()


@pytest.mark.usefixtures("modules_cache")
def test_saving_a_processor_never_asks_to_run_custom_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """sft, reward_model and ppo re-load the base's processor to save it beside their weights.
    Only the param may allow custom code there too: no prompt is shown, and a "y" typed at
    one (here, answered for the user) must not run the folder's code."""
    marker = tmp_path / "marker"
    folder = custom_model(tmp_path / "homemade", marker)
    prompts: list[str] = []
    monkeypatch.setattr("builtins.input", lambda prompt="": prompts.append(prompt) or "y")
    with pytest.raises(Exception):  # a custom-code folder cannot be saved without trusting it
        save_processor(folder, tmp_path / "saved")
    assert not marker.exists(), f"the model folder's own Python code was executed after {len(prompts)} stdin prompt(s)"
    assert prompts == [], "transformers asked on stdin whether to run the model's code"


def test_trust_remote_code_is_never_hardcoded() -> None:
    passing = [c for c in package_calls() if c.keyword("trust_remote_code")]
    assert len(passing) >= 3, "expected the loader's config, processor and model calls"
    def turned_on(value: ast.expr) -> bool:
        return not isinstance(value, (ast.Name, ast.Attribute)) and not (isinstance(value, ast.Constant) and value.value is False)

    literal = [c.where for c in passing if turned_on(c.keyword("trust_remote_code").value)]
    assert literal == [], "trust_remote_code must come from a parameter (or be a literal False), never a literal True"


# --------------------------------------------------------------------------- 2. safetensors


WEIGHT_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".h5", ".msgpack"}


class Trap:
    """Unpickling this creates `marker`: proof that a pickle was executed, not just parsed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def pickled_copy(tiny_model: Path, folder: Path, **extra: object) -> Path:
    """The tiny model with its weights as pytorch_model.bin (a pickled state dict, plus `extra`
    entries) instead of model.safetensors."""
    shutil.copytree(tiny_model, folder)
    (folder / "model.safetensors").unlink()
    state = load_model_and_processor(tiny_model)[0].state_dict()
    torch.save({**state, **extra}, folder / "pytorch_model.bin")
    return folder


def test_tiny_base_is_saved_as_safetensors_only(tiny_model: Path) -> None:
    files = [p for p in tiny_model.rglob("*") if p.is_file()]
    assert [p.name for p in files if p.suffix in WEIGHT_SUFFIXES] == []
    weights = [p for p in files if p.suffix == ".safetensors"]
    assert weights, f"no safetensors in {sorted(p.name for p in files)}"
    for path in weights:
        with safe_open(str(path), framework="pt") as f:
            assert len(list(f.keys())) > 10  # real weights, not a placeholder


def test_pickled_weights_are_refused_unread(tmp_path: Path, tiny_model: Path) -> None:
    """Weights only as a pickle (a real state dict, plus a trap) are refused before anything
    unpickles them; the same file does run code when unpickled, so the trap is armed."""
    marker = tmp_path / "unpickled"
    folder = pickled_copy(tiny_model, tmp_path / "pickled", trap=Trap(marker))
    with pytest.raises(ModelLoadError, match="safetensors") as err:
        load_model_and_processor(folder)
    assert str(folder) in str(err.value)
    assert not marker.exists(), "pytorch_model.bin was unpickled"

    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        torch.load(folder / "pytorch_model.bin", weights_only=True)  # how the package's torch.load reads
    assert not marker.exists()
    torch.load(folder / "pytorch_model.bin", weights_only=False)
    assert marker.is_dir(), "control: the trap did not fire, so the checks above could not have failed"


def test_a_stray_safetensors_file_does_not_let_pickled_weights_in(tmp_path: Path, tiny_model: Path) -> None:
    """With some other *.safetensors beside pytorch_model.bin, the folder check passes and only
    use_safetensors=True stops transformers from reading the pickle, which it otherwise would."""
    folder = pickled_copy(tiny_model, tmp_path / "pickled")
    save_file({"lora_A": torch.zeros(2)}, folder / "adapter.safetensors")
    with pytest.raises(ModelLoadError, match=re.escape(str(folder))):
        load_model_and_processor(folder)

    from transformers import AutoModelForImageTextToText

    loaded = AutoModelForImageTextToText.from_pretrained(folder)  # control: without the flag, the pickle loads
    assert loaded.get_input_embeddings().num_embeddings == TINY_VLM.vocab_size


def test_torch_save_is_only_ppo_optimizer_state() -> None:
    """Weights go through save_pretrained or safetensors; torch.save (a pickle) is allowed for
    PPO's optimizer and scheduler state alone. A new torch.save anywhere fails here."""
    saves = calls_named("torch.save")
    assert {(c.file, c.function) for c in saves} == {("vlm_rlaif/ppo.py", "save_checkpoint")}, [c.where for c in saves]
    [save] = saves
    saved = save.node.args[0]
    assert isinstance(saved, ast.Dict)
    assert {k.value for k in saved.keys if isinstance(k, ast.Constant)} == {"optimizer", "scheduler"}
    assert all(ast.unparse(v).endswith(".state_dict()") for v in saved.values)


def test_no_save_turns_safetensors_off() -> None:
    saves = calls_of_method("save_pretrained")
    assert len(saves) >= 5, [c.where for c in saves]
    hidden = [c.where for c in saves if any(k.arg is None for k in c.node.keywords)]
    assert hidden == [], "save_pretrained(**kwargs) could pass safe_serialization=False unseen"
    unsafe = [c.where for c in package_calls() for arg in ("safe_serialization", "save_safetensors")
              if c.keyword(arg) and not passes_literal(c, arg, True)]
    assert unsafe == []


# --------------------------------------------------------------------------- 3. torch.load


def test_every_torch_load_is_weights_only() -> None:
    loads = calls_named("torch.load")
    assert loads, "no torch.load found: the scan checked nothing (did the loader move?)"
    unsafe = [c.where for c in loads if not passes_literal(c, "weights_only", True)]
    assert unsafe == [], "torch.load without weights_only=True unpickles arbitrary code"


@pytest.mark.parametrize("name, why", [
    ("pickle.load", "unpickles"), ("pickle.loads", "unpickles"), ("dill.load", "unpickles"),
    ("joblib.load", "unpickles"), ("yaml.load", "can build arbitrary objects; use yaml.safe_load"),
    ("yaml.unsafe_load", "builds arbitrary objects"), ("marshal.loads", "loads code objects"),
    ("eval", "runs text as code"), ("exec", "runs text as code"),
])
def test_nothing_else_deserialises_or_runs_code(name: str, why: str) -> None:
    assert [c.where for c in calls_named(name)] == [], f"{name} {why}"


def test_numpy_never_loads_pickles() -> None:
    pickling = [c.where for c in calls_named("numpy.load") if c.keyword("allow_pickle") and not passes_literal(c, "allow_pickle", False)]
    assert pickling == []


# --------------------------------------------------------------------------- 4. the judge's API key


KEY = "sk-vlmrlaif-7f3c9a1e5b2d4068ac91e4"
KEY_ENV = "VLM_RLAIF_TEST_JUDGE_KEY"
MESSAGES = [{"role": "user", "content": "Score this answer."}]


class EchoServer(ThreadingHTTPServer):
    """A judge server that plays a script and quotes the caller's bearer token back in its
    failures, as a careless or hostile one might; it records what Authorization it got."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), EchoHandler)
        self.script: deque[tuple] = deque()
        self.authorization: list[str | None] = []
        self.stop = threading.Event()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class EchoHandler(BaseHTTPRequestHandler):
    server: EchoServer

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        token = self.headers.get("Authorization")
        self.server.authorization.append(token)
        key = (token or "").removeprefix("Bearer ")
        kind, *args = self.server.script.popleft() if self.server.script else ("ok",)
        if kind == "sleep":  # answer only after the client has given up
            self.server.stop.wait(args[0])
            kind = "ok"
        if kind == "ok":
            answer = {"model": "judge", "choices": [{"message": {"role": "assistant", "content": "Score: 7"}}]}
            self._send(200, json.dumps(answer))
        elif kind == "status":
            self._send(args[0], json.dumps({"error": f"invalid api key {key}"}), {"Retry-After": "0"})
        elif kind == "not-json":
            self._send(200, f"<html>no route; you sent {token}</html>")
        elif kind == "key-at-cut":  # the key straddles the point where an error message cuts the body
            self._send(400, "x" * (BODY_SNIPPET - len(key) // 2) + key)

    def _send(self, code: int, body: str, headers: dict[str, str] | None = None) -> None:
        try:
            self.send_response(code)
            for name, value in {"Content-Type": "application/json", "Content-Length": str(len(body)), **(headers or {})}.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body.encode())
        except OSError:
            pass  # the client timed out and left

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def echo_server() -> Iterator[EchoServer]:
    yield from serving(EchoServer())


def leaked(text: str, key: str = KEY, window: int = 8) -> list[str]:
    """Pieces of `key` found in `text`: the whole key, or any `window` characters of it, since
    a key cut in half by a truncated message has still leaked."""
    return sorted({key[i:i + window] for i in range(len(key) - window + 1) if key[i:i + window] in text})


@dataclass(frozen=True)
class Scenario:
    """One exchange with the judge server: its scripted answers, and how the client must end."""

    script: tuple[tuple, ...]
    max_retries: int = 2
    error: str | None = None  # what the LLMClientError must say; None: the request succeeds
    echoed: bool = False  # the server quoted the key in a body the error message quotes


SCENARIOS = {
    "success, then a cache hit": Scenario((("ok",),)),
    "401 quoting the key": Scenario((("status", 401),), error="HTTP 401", echoed=True),
    "500 quoting the key until retries run out": Scenario((("status", 500),) * 3, error="3 attempts", echoed=True),
    "500 and 429, then success": Scenario((("status", 500), ("status", 429), ("ok",))),
    "timeout, then success": Scenario((("sleep", 1.0), ("ok",))),
    "timeouts until retries run out": Scenario((("sleep", 1.0),) * 2, max_retries=1, error="timed out"),
    "200 that is not a chat completion, quoting the key": Scenario((("not-json",),), error="no choices", echoed=True),
    "key straddling the quoted part of the body": Scenario((("key-at-cut",),), error="HTTP 400", echoed=True),
}


def make_client(source: str, base_url: str, max_retries: int, cache: Path, monkeypatch: pytest.MonkeyPatch) -> ChatClient:
    """A client given KEY as the judge params give it (an environment variable) or directly."""
    options = {"timeout": 0.2, "backoff": 0.01, "max_retries": max_retries, "cache": cache}
    if source == "env":
        monkeypatch.setenv(KEY_ENV, KEY)
        return ChatClient.from_env(base_url, "judge", api_key_env=KEY_ENV, **options)
    return ChatClient(base_url, "judge", KEY, **options)


@pytest.mark.parametrize("source", ["env", "argument"])
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_api_key_reaches_the_server_and_nothing_else(name: str, source: str, echo_server: EchoServer, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
                                                       capsys: pytest.CaptureFixture) -> None:
    scenario = SCENARIOS[name]
    echo_server.script.extend(scenario.script)
    cache = tmp_path / "judge_cache.jsonl"
    caplog.set_level(logging.DEBUG)
    error = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        client = make_client(source, echo_server.base_url, scenario.max_retries, cache, monkeypatch)
        try:
            answers = [client.complete(MESSAGES), client.complete(MESSAGES)]
        except LLMClientError as e:
            error = e
    out, err = capsys.readouterr()

    assert echo_server.authorization and set(echo_server.authorization) == {f"Bearer {KEY}"}
    if scenario.error is None:
        assert error is None, error
        assert [a.cached for a in answers] == [False, True] and answers[0].text == "Score: 7"
    else:
        assert error is not None and scenario.error in str(error)
        if scenario.echoed:
            assert "***" in str(error)  # the quoted body reached the message, masked
    channels = {
        "log": caplog.text + "".join(r.getMessage() for r in caplog.records),
        "warnings": "".join(str(w.message) for w in caught),
        "stdout": out,
        "stderr": err,
        "exception": "" if error is None else "".join([repr(error), *map(str, error.args), *traceback.format_exception(error)]),
        "cache": cache.read_text() if cache.exists() else "",
    }
    assert {where: leaked(text) for where, text in channels.items() if leaked(text)} == {}
    if scenario.error is None:
        assert json.loads(channels["cache"])["text"] == "Score: 7"  # the cache was written, and checked


def test_leak_check_notices_a_leak() -> None:
    """The leak check is not vacuous: a whole key, or half of one, is found."""
    assert leaked(f"Bearer {KEY}") and leaked(f"body: ...{KEY[: len(KEY) // 2]}") and not leaked("Bearer ***")


# --------------------------------------------------------------------------- 5. paths stay under their root


ESCAPING = ["../x.png", "/etc/passwd", "a/../../b", "..", "frames/./../../x.png"]
HUMAN = {"from": "human", "value": "<image>\nWhat happens?"}
GPT = {"from": "gpt", "value": "A circle moves."}
READERS: dict[str, tuple[Callable, Callable[[str], dict], str]] = {
    # name: (reader, record with the path in place, the field the error must name)
    "sft images": (read_sft, lambda p: {"id": 1, "conversations": [HUMAN, GPT], "images": ["v/frame_0.png", p]}, "images[1]"),
    "sft video": (read_sft, lambda p: {"id": 1, "conversations": [HUMAN, GPT], "video": p}, "video"),
    "rl images": (read_rl_prompts, lambda p: {"uid": 1, "conversations": [HUMAN], "images": [p]}, "images[0]"),
    "preference video": (read_preferences, lambda p: {"conversations": [HUMAN, GPT], "video": p, "output_1": {"value": "a"},
                                                      "output_2": {"value": "b"}, "preference": 1}, "video"),
    "zero-shot qa": (read_zeroshot_qa, lambda p: {"video_name": p, "question_id": 1, "question": "q", "answer": "a"}, "video_name"),
    "generic qa": (read_generic_qa, lambda p: {"video_name": p, "Q": "q", "A": "a"}, "video_name"),
    "consistency qa": (read_consistency_qa, lambda p: {"video_name": p, "Q1": "q", "Q2": "q?", "A": "a"}, "video_name"),
}


@pytest.mark.parametrize("path", ESCAPING)
@pytest.mark.parametrize("kind", list(READERS))
def test_records_with_escaping_paths_are_refused(tmp_path: Path, kind: str, path: str) -> None:
    read, record, field = READERS[kind]
    source = tmp_path / "records.json"
    source.write_text(json.dumps([record("v/ok.mp4"), record(path)]))
    with pytest.raises(RecordError) as err:
        read(source)
    assert f"{source}, record 1" in str(err.value)
    assert f'"{field}" = {path!r} must be a path inside' in str(err.value)

    kept, skipped = read(source, on_bad_record="skip")
    assert len(kept) == 1 and [index for index, _ in skipped] == [1]


@pytest.mark.parametrize("name", [
    "../outside.mp4", "../outside", "a/../../outside.mp4", "/etc/passwd", "{tmp}/outside.mp4",
    "../videos_evil/clip", "mounted/../../outside.mp4", ".", "",
])
def test_video_names_cannot_leave_the_video_root(tmp_path: Path, name: str) -> None:
    """Each target exists, so the refusal is for leaving the root, not for a missing file;
    "videos_evil" shares the root's name as a prefix, which a string comparison would let by."""
    root = tmp_path / "videos"
    root.mkdir()
    (tmp_path / "outside.mp4").write_bytes(b"x")
    (tmp_path / "videos_evil").mkdir()
    (tmp_path / "videos_evil" / "clip.mp4").write_bytes(b"x")
    name = name.format(tmp=tmp_path)
    with pytest.raises(VideoError, match="leaves the video root|empty path"):
        resolve_video(root, name)
    with pytest.raises(VideoError, match="leaves the video root|empty path"):
        safe_join(root, name)


def test_a_symlink_the_user_put_under_the_root_is_followed(tmp_path: Path) -> None:
    """The containment check is lexical on purpose: a DVC cache link or a mounted data set
    under the root is the user's choice and stays usable."""
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    (dataset / "clip.mp4").write_bytes(b"x")
    (dataset / "frame_0.png").write_bytes(b"x")
    root = tmp_path / "videos"
    root.mkdir()
    (root / "mounted").symlink_to(dataset, target_is_directory=True)

    assert safe_join(root, "mounted/clip.mp4") == root / "mounted" / "clip.mp4"
    assert resolve_video(root, "mounted/clip") == root / "mounted" / "clip.mp4"
    source = tmp_path / "records.json"
    source.write_text(json.dumps([{"id": 1, "conversations": [HUMAN, GPT], "images": ["mounted/frame_0.png"]}]))
    [record] = read_sft(source).records
    assert record.media(root) == [root / "mounted" / "frame_0.png"] and record.media(root)[0].is_file()


def test_prepare_refuses_or_skips_a_record_reaching_outside(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """End to end: an RL prompt whose frame is "../../outside.png" (a real, decodable image just
    outside data/) stops `prepare` naming the record, or with on_bad_record: skip is left out,
    listed in the skipped report, and absent from what later stages read."""
    project = tmp_path / "project"
    make_project(project)
    monkeypatch.chdir(project)
    rl_file = Path("data/RL_data.json")
    prompts = json.loads(rl_file.read_text())
    video_root = Path(load_params("params.yaml").data.video_root)
    outside = (video_root / "../../outside.png").resolve()
    shutil.copy(video_root / prompts[1]["images"][0], outside)
    assert outside.parent == project.resolve()
    prompts[1]["images"] = ["../../outside.png"]
    rl_file.write_text(json.dumps(prompts))

    with pytest.raises(RecordError, match=r"data/RL_data\.json, record 1: .*\.\./\.\./outside\.png"):
        prepare.run(load_params("params.yaml"))
    assert not prepare.OUT.exists()

    Path("params.yaml").write_text(yaml.safe_dump({**PARAMS, "data": {**PARAMS["data"], "on_bad_record": "skip"}}))
    prepared = prepare.run(load_params("params.yaml"))
    skipped = json.loads(prepare.SKIPPED.read_text())
    assert len(skipped) == 1 and "RL_data.json, record 1" in skipped[0] and "outside.png" in skipped[0]
    assert prepared.counts["rl_prompts"] == len(prompts) - 1
    assert "outside.png" not in (prepare.OUT / "rl_prompts.json").read_text()
