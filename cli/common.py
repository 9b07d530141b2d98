"""Options and helpers shared by the ``steerserve`` commands: the common options (model, device, dtype, threads,
vector directory), model and vector checks that run before any model loads, torch's thread pools, progress
reporting for long jobs (rich bars on a terminal, plain lines otherwise), output consoles and ``--json``."""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console

from server.settings import ServerSettings

console = Console(stderr=True)
"""Messages, status and progress: stderr, so that stdout carries only the command's output."""

DEFAULT_VECTOR_DIR: Path = ServerSettings.model_fields["vector_dir"].default
"""The server's default vector store, so that the CLI and the server read the same directory."""

WIDE = 4096
"""Width of a console that is not a terminal: tables keep whole names instead of fitting 80 columns."""

PROGRESS_ENV = "STEERSERVE_PROGRESS_SECONDS"
PROGRESS_SECONDS = 5.0
"""Without a terminal, a progress line is printed this often (``--progress-seconds`` on ``steerserve``)."""
progress_seconds = PROGRESS_SECONDS


def default_threads() -> int:
    """``$OMP_NUM_THREADS`` when set, else the cores this process may run on (its affinity, not the machine's)."""
    try:
        omp = int(os.environ.get("OMP_NUM_THREADS", ""))
        if omp > 0:
            return omp
    except ValueError:
        pass
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


ModelOpt = Annotated[str | None, typer.Option(
    "--model", "-m", envvar="STEERSERVE_MODEL", show_envvar=True, show_default="the embedded SmolLM2-135M-Instruct",
    help="Hugging Face model directory or .gguf file (steerserve never downloads weights).")]
DeviceOpt = Annotated[str, typer.Option(envvar="STEERSERVE_DEVICE", show_envvar=True,
                                        help="auto (CUDA when present), cpu, cuda, cuda:N.")]
DtypeOpt = Annotated[str, typer.Option(envvar="STEERSERVE_DTYPE", show_envvar=True,
                                       help="auto (bf16/fp16 on GPU, fp32 on CPU), float32, bfloat16, float16.")]
ThreadsOpt = Annotated[int | None, typer.Option(
    "--threads", envvar="STEERSERVE_THREADS", show_envvar=True, min=1,
    show_default=f"$OMP_NUM_THREADS, else the cores this process may use: {default_threads()}",
    help="Torch CPU threads (inter-op threads: 1), set before the model loads, so that jobs and servers on one "
         "machine do not oversubscribe its cores.")]
DirOpt = Annotated[Path, typer.Option("--vector-dir", envvar="STEERSERVE_VECTOR_DIR", show_envvar=True,
                                      help="Vector store directory (the server's vector_dir).")]
RowsOpt = Annotated[str | None, typer.Option(help="Rows of the file to use, e.g. '0-49' or '0-9,20' (default: "
                                                  "all).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout instead of a table.")]


# -- errors ---------------------------------------------------------------------------------------------------

def error_line(message: str) -> None:
    """One line on stderr, never wrapped (a supervisor's log keeps it whole)."""
    console.print(f"[red]error:[/red] {message}", soft_wrap=True, highlight=False)


def fail(exc: BaseException | str, code: int = 2) -> NoReturn:
    """Report an error (a core error's message, not a traceback) and exit."""
    error_line(exc if isinstance(exc, str) else str(getattr(exc, "message", exc)))
    raise typer.Exit(code) from (exc if isinstance(exc, BaseException) else None)


# -- parsing --------------------------------------------------------------------------------------------------

def parse_layers(text: str | None, param: str = "--layers") -> list[int] | None:
    if not text:
        return None
    out: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                a, b = part.split("-", 1)
                out.extend(range(int(a), int(b) + 1))
            elif part:
                out.append(int(part))
    except ValueError:
        raise typer.BadParameter(f"layers are numbers or ranges, e.g. '3', '2-4' or '1,5-7'; got {text!r}",
                                 param_hint=param) from None
    return out


def parse_positions(text: str, param: str = "--positions"):
    from steering.spec import POSITION_KINDS

    if text in POSITION_KINDS:
        return text
    try:
        return [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise typer.BadParameter(f"{', '.join(POSITION_KINDS)}, or token positions such as '3,4,5'; got {text!r}",
                                 param_hint=param) from None


def local_images():
    """What the command line's examples may show: image files anywhere (they are the user's own), data URLs."""
    from steering.multimodal import ImageLimits

    return ImageLimits(allowed_dirs=(Path("/"),))


def parse_params(items: list[str]) -> dict:
    """``key=value`` pairs; values are read as JSON when they parse (numbers, true/false, null), else text."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected key=value, got {item!r}", param_hint="--param")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


# -- dependencies' noise --------------------------------------------------------------------------------------

class _NoDeprecations(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "deprecat" not in record.getMessage().lower()


def quiet_transformers() -> None:
    """transformers reports deprecations through its own logger, not :mod:`warnings`: drop those records (its
    other warnings, e.g. about weights it could not load, still show). Nothing when warnings were asked for."""
    if sys.warnoptions:
        return
    from transformers.utils import logging as hf_logging

    root = hf_logging.get_logger("transformers")  # the library's root logger, with its handler
    targets: list[Any] = [root, *root.handlers]
    for target in targets:
        if not any(isinstance(f, _NoDeprecations) for f in target.filters):
            target.addFilter(_NoDeprecations())


# -- threads, models, vectors ---------------------------------------------------------------------------------

def apply_threads(threads: int | None) -> int:
    """Size torch's CPU thread pools before any model work: ``threads`` intra-op threads (default:
    :func:`default_threads`) and one inter-op thread. Returns the intra-op count."""
    import torch

    n = threads or default_threads()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    try:
        if torch.get_num_interop_threads() != 1:
            torch.set_num_interop_threads(1)
    except RuntimeError:  # only possible before any inter-op work has run (e.g. a second command in one process)
        pass
    return n


def check_model(source: str | None, device: str | None = None, dtype: str | None = None) -> None:
    """The checks of loading that cost nothing (the model exists, the device and dtype are valid); raises
    ModelLoadError, so a wrong name fails at once instead of after imports, conversions or a server start."""
    from steering.backends.hf.loading import default_gguf_path, resolve_device, resolve_dtype, resolve_model_dir

    if source is None or source in ("", "default"):
        default_gguf_path()
    else:
        path = Path(source).expanduser()
        if not (path.suffix == ".gguf" and path.is_file()):  # an existing .gguf would be converted here
            resolve_model_dir(source)
    if device is not None:
        dev = resolve_device(device)
        if dtype is not None:
            resolve_dtype(dtype, dev)


def load(model, device, dtype, threads: int | None = None):
    """Check the model, size the thread pools, then load it (with a status line on a terminal)."""
    from steering.backends.hf.loading import load_model
    from steering.errors import ModelLoadError

    try:
        check_model(model, device, dtype)
        apply_threads(threads)
        quiet_transformers()
        if not console.is_terminal:
            return load_model(model, device=device, dtype=dtype)
        with console.status("loading model (the first run converts the default model once, ~30 s)..."):
            return load_model(model, device=device, dtype=dtype)
    except ModelLoadError as exc:
        fail(exc)


def open_store(vector_dir: Path, lm=None):
    """The vector store in ``vector_dir``, checked against ``lm`` when given."""
    from steering.store import VectorStore

    store = VectorStore(vector_dir, lm.info.identity() if lm is not None else None)
    store.load_all()
    return store


VECTOR_SUFFIXES = (".safetensors", ".gguf")


def read_vector(text: str, vector_dir: Path):
    """``--vector``: a file (``.safetensors``, or a llama.cpp control vector ``.gguf``) or the name of a vector
    in ``vector_dir``, read before any model loads. Returns ``(vector, name)``; ``name`` is None for a file.
    Raises SteeringError (SteeringValidationError, VectorNotFoundError) with a one-line message."""
    from steering.errors import SteeringValidationError
    from steering.gguf_vectors import import_controlvector
    from steering.store import SUFFIX, VectorNotFoundError, check_name
    from steering.vectors import SteeringVector

    path = Path(text).expanduser()
    if path.suffix.lower() in VECTOR_SUFFIXES or os.sep in text or path.is_file():
        if not path.is_file():
            raise SteeringValidationError(f"no such vector file: {path}", param="vector")
        with path.open("rb") as fh:
            is_gguf = fh.read(4) == b"GGUF"
        if path.suffix.lower() == ".gguf" and not is_gguf:
            raise SteeringValidationError(f"{path}: not a GGUF file (no GGUF magic)", param="vector")
        if is_gguf:
            return import_controlvector(path), None
        try:
            return SteeringVector.load(path), None
        except SteeringValidationError:
            raise
        except Exception as exc:  # noqa: BLE001 - safetensors raises assorted errors on a malformed file
            raise SteeringValidationError(f"{path}: not a valid safetensors steering vector ({exc})",
                                          param="vector") from None
    try:
        check_name(text)
    except SteeringValidationError:
        raise SteeringValidationError(f"--vector {text!r} is neither a vector file (.safetensors or .gguf) nor a "
                                      f"vector name", param="vector") from None
    if not (vector_dir / f"{text}{SUFFIX}").is_file():
        have = sorted(p.name[: -len(SUFFIX)] for p in vector_dir.glob(f"*{SUFFIX}")) if vector_dir.is_dir() else []
        raise VectorNotFoundError(
            f"no vector named {text!r} in {vector_dir}" + (f" (it has: {', '.join(have)})" if have else
                                                            " (the store is empty)") +
            "; give a .safetensors or .gguf file, or --vector-dir", param="vector")
    return SteeringVector.load(vector_dir / f"{text}{SUFFIX}"), text


# -- output ---------------------------------------------------------------------------------------------------

def out_console() -> Console:
    """A console on stdout for tables: the terminal's width, or wide when piped, so names are never cut."""
    probe = Console()
    return probe if probe.is_terminal else Console(width=WIDE)


def print_json(data: Any) -> None:
    """Machine-readable output: one JSON document on stdout."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


# -- progress -------------------------------------------------------------------------------------------------

def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class PlainProgress:
    """Progress without a terminal: a line on stderr every ``interval`` seconds with the fraction done, the
    elapsed time and an ETA (the same estimate as the server's jobs), then one when the work ends."""

    def __init__(self, label: str, interval: float, stream=None) -> None:
        self.label, self.interval = label, max(0.05, interval)
        self.stream = stream
        self.t0 = time.monotonic()
        self.fraction: float | None = None
        self.stage = ""
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._tick, name="steerserve-progress", daemon=True)

    def _write(self, line: str) -> None:
        stream = self.stream or sys.stderr
        with self._lock:
            stream.write(line + "\n")
            stream.flush()

    def line(self) -> str:
        elapsed = time.monotonic() - self.t0
        stage = f" [{self.stage}]" if self.stage else ""
        f = self.fraction
        if f is None:
            return f"{self.label}{stage}: elapsed {_clock(elapsed)}"
        eta = _clock(elapsed * (1 - f) / f) if f > 0 else "?"
        return f"{self.label}{stage}: {100 * f:5.1f}% ({f:.3f}), elapsed {_clock(elapsed)}, eta {eta}"

    def _tick(self) -> None:
        while not self._stop.wait(self.interval):
            self._write(self.line())

    def update(self, fraction: float | None, stage: str = "") -> None:
        self.fraction, self.stage = fraction, stage

    def __enter__(self) -> PlainProgress:
        self._write(f"{self.label}: started")
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop.set()
        self._thread.join()
        elapsed = _clock(time.monotonic() - self.t0)
        self._write(f"{self.label}: done in {elapsed}" if exc_type is None else f"{self.label}: stopped after "
                                                                                   f"{elapsed}")


def progress_bar():
    from rich.progress import (
        BarColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), TaskProgressColumn(),
                    TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console)


@contextmanager
def progress(label: str) -> Iterator[Callable[[Any], None]]:
    """Report a job's progress: yields ``on_progress(p)`` for a job's :class:`JobProgress` (``p.overall()``,
    ``p.stage``). A rich bar when stderr is a terminal, else :class:`PlainProgress` lines every
    ``--progress-seconds``. Every long command (vector builds and sweeps, evaluations, attribution) uses this."""
    if not console.is_terminal:
        with PlainProgress(label, progress_seconds) as plain:
            yield lambda p: plain.update(p.overall(), p.stage)
        return
    with progress_bar() as bar:
        task = bar.add_task(label, total=1000)

        def on_progress(p) -> None:
            f = p.overall()
            bar.update(task, completed=int(1000 * f) if f is not None else None,
                       description=f"{label} {p.stage}".strip())

        yield on_progress
        bar.update(task, completed=1000)


T = TypeVar("T")


def run_with_progress(label: str, fn: Callable[[Callable[[Any], None]], T]) -> T:
    """Run ``fn(on_progress)`` under :func:`progress`."""
    with progress(label) as on_progress:
        return fn(on_progress)


run_with_bar = run_with_progress
