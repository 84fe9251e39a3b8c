"""Atomic file writes, JSON/JSONL helpers, and the stamps that make partial runs resumable.

Every file a stage produces goes through here, so a killed stage never leaves a
half-written file that a rerun (or DVC) would mistake for a finished one; and a stage's
partial results (checkpoints, shards) are reused only by a run with the same stamp.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping


_UMASK = os.umask(0)
os.umask(_UMASK)


def _clear_leftovers(path: Path) -> None:
    """Remove the temp files or folders a killed writer of `path` left beside it."""
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[Any]:
    """Open a temp file beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _clear_leftovers(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp's 0600 would make outputs private to their writer
    try:
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp folder beside `path`; it replaces `path` only if the block succeeds.

    For outputs that are folders (a save_pretrained model): they appear complete or not at all.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _clear_leftovers(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():  # renamed aside, not deleted in place: a kill now leaves the old folder whole or none
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        os.replace(path, old / path.name)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[Any]) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None


def read_jsonl(path: str | os.PathLike) -> list[Any]:
    path = Path(path)
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {lineno}: invalid JSON: {e.msg}") from None
    return rows


def stable_log(log_history: list[dict]) -> list[dict]:
    """Trainer's log with its keys in order, without its wall-clock figures and without the
    summary's train_loss (a mean over the steps of the last session only), so the file saved
    beside a model is byte-stable across runs, resumed ones included."""
    return [{k: entry[k] for k in sorted(entry) if not k.endswith(("_runtime", "_per_second")) and k != "train_loss"} for entry in log_history]


STAMPED_BY_CONTENT = 256 * 2**20  # a model file above this size is stamped by its size alone


def run_stamp(code: Iterable[str | os.PathLike], settings: Mapping[str, Any], inputs: Iterable[str | os.PathLike], models: Iterable[str | os.PathLike] = ()) -> str:
    """A short hash of what a resumable run's results depend on: the source files that compute
    them, the settings, the content of the input files (a missing one hashes as absent), and
    the files of each model folder it loads: by content up to STAMPED_BY_CONTENT bytes (an
    adapter retrained is the same size), larger weights by name and size."""
    h = hashlib.sha256()
    for path in code:
        h.update(Path(path).read_bytes())
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for path in map(Path, inputs):
        h.update(path.name.encode() + (hashlib.md5(path.read_bytes()).digest() if path.is_file() else b"-"))
    for folder in map(Path, models):
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            size = path.stat().st_size
            content = ""
            if size <= STAMPED_BY_CONTENT:
                with path.open("rb") as f:  # streamed: an adapter need not sit in memory twice
                    content = hashlib.file_digest(f, "md5").hexdigest()
            h.update(f"{path.relative_to(folder)}:{size}:{content}".encode())
    return h.hexdigest()[:16]


def claim(folder: str | os.PathLike, stamp: str) -> Path:
    """Make `folder` the home of the run stamped `stamp`: what it holds is kept only if a run
    with the same stamp wrote it, so no run resumes from another's partial results."""
    folder = Path(folder)
    run = folder / "run.json"
    if folder.exists() and (not run.is_file() or read_json(run).get("fingerprint") != stamp):
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(run, {"fingerprint": stamp})
    return folder


def last_checkpoint(folder: str | os.PathLike, prefix: str = "checkpoint", marker: str = "trainer_state.json") -> Path | None:
    """The highest-numbered `<prefix>-N` folder under `folder` that holds `marker`, the file its
    writer saves last (Trainer's trainer_state.json by default), whole. A checkpoint that a kill
    cut short is passed over, where transformers' `get_last_checkpoint` would resume from it."""
    done = [p for p in Path(folder).glob(f"{prefix}-*") if p.name.split("-")[-1].isdigit() and _whole_json(p / marker)]
    return max(done, key=lambda p: int(p.name.split("-")[-1]), default=None)


def _whole_json(path: Path) -> bool:
    """Whether `path` holds a complete JSON document (Trainer writes its state in place, so a
    kill can leave it empty or cut short)."""
    try:
        json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return True


def report_resume(checkpoint: str | os.PathLike | None) -> None:
    """Say on stderr which checkpoint a stage resumes from. Kept out of the stage's outputs,
    so a resumed run writes the same files (and DVC hashes) as an uninterrupted one."""
    if checkpoint is not None:
        print(f"resuming from {checkpoint}", file=sys.stderr, flush=True)
