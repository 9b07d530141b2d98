"""What the sync and the async client share: every request built in one place (:class:`Calls`: path, body, how to
read the answer, whether it may be retried), errors read from the OpenAI envelope (:class:`SteerServeError`), and
when to retry (:class:`RetryPolicy`). The clients only send a :class:`Call` with ``httpx.Client`` or
``httpx.AsyncClient`` and sleep between attempts (:func:`send_sync`, :func:`send_async`).

Depends on ``httpx`` and the standard library only.
"""

from __future__ import annotations

import asyncio
import csv
import email.utils
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from typing import Any, Generic, TypeVar, cast
from urllib.parse import quote

import httpx

from clients.types import (
    Attribution,
    AttributionMethodInfo,
    BuilderInfo,
    Job,
    ModelCard,
    ScorerInfo,
    VectorDeleted,
    VectorInfo,
)

T = TypeVar("T")

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})


class SteerServeError(Exception):
    """An error answered by the server, in the OpenAI envelope."""

    def __init__(self, status: int, error: Mapping[str, Any], retry_after: float | None = None) -> None:
        super().__init__(f"{status}: {error.get('message')}")
        self.status = status
        self.message = error.get("message")
        self.type = error.get("type")
        self.param = error.get("param")
        self.retry_after = retry_after
        """The server's ``Retry-After`` (seconds), when it sent one (and retrying was not possible or gave up)."""


def segment(value: str) -> str:
    """One path segment, escaped: a name with ``?``, ``#``, ``%``, ``;`` or a space never changes the route, and
    ``.``/``..`` are not resolved away. A ``/`` cannot be sent: ASGI servers decode ``%2F`` before routing, so
    ``x/gguf`` would reach another endpoint; no steerserve name or id contains one, so it is refused here."""
    if "/" in value:
        raise ValueError(f"{value!r}: a name or id cannot contain '/'")
    if value in (".", ".."):
        return value.replace(".", "%2E")
    return quote(value, safe="")


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` in seconds: delta-seconds or an HTTP date; None when absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def check(r: httpx.Response) -> Any:
    """The JSON of a successful answer; raise :class:`SteerServeError` for an error."""
    if r.status_code >= 400:
        try:
            err = r.json()["error"]
            if not isinstance(err, Mapping):
                raise TypeError(err)
        except Exception:  # noqa: BLE001 - not our envelope (a proxy's page, say)
            err = {"message": r.text}
        raise SteerServeError(r.status_code, err, parse_retry_after(r.headers.get("Retry-After")))
    return r.json()


@dataclass(frozen=True)
class RetryPolicy:
    """Retry answers 503 (overloaded, loading, draining) and 429 (rate limited), waiting as ``Retry-After`` says.

    An idempotent request (GET, DELETE, and the POSTs that change nothing stored: tokenize, attributions, cancel)
    is retried on these statuses, with exponential backoff when the answer has no ``Retry-After``. Any other
    request is retried only when the server refused it before doing anything: a 429, or a 503 with
    ``Retry-After`` (steerserve sends one only from admission control: queue full, model loading, draining). At most
    ``max_attempts`` attempts and ``max_wait`` seconds of waiting in all; a ``Retry-After`` beyond what is left is
    not waited for (the error is raised at once, with its ``retry_after``)."""

    max_attempts: int = 4
    max_wait: float = 30.0
    backoff: float = 0.5
    max_backoff: float = 8.0
    statuses: frozenset[int] = frozenset({429, 503})

    def delay(self, r: httpx.Response, idempotent: bool, attempt: int, waited: float) -> float | None:
        """Seconds to wait before attempt ``attempt + 1`` (``attempt`` counts from 0), or None: do not retry."""
        if r.status_code not in self.statuses or attempt + 1 >= self.max_attempts:
            return None
        after = parse_retry_after(r.headers.get("Retry-After"))
        if after is None:
            if not idempotent and r.status_code != 429:
                return None  # a 503 without Retry-After may have come after the work started
            after = min(self.backoff * 2 ** attempt, self.max_backoff)
        if waited + after > self.max_wait:
            return None
        return after


NO_RETRY = RetryPolicy(max_attempts=1)


@dataclass(frozen=True)
class Call(Generic[T]):
    """One request and how to read its answer."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    json: Any = None
    params: Mapping[str, Any] | None = None
    data: Mapping[str, Any] | None = None
    files: Mapping[str, Any] | None = None
    idempotent: bool | None = None
    """None: by the method."""
    retry: bool = True

    @property
    def safe(self) -> bool:
        return self.method in IDEMPOTENT_METHODS if self.idempotent is None else self.idempotent

    def kwargs(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in ("json", "params", "data", "files"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out


def send_sync(http: httpx.Client, policy: RetryPolicy, call: Call[T]) -> T:
    attempt, waited = 0, 0.0
    while True:
        r = http.request(call.method, call.path, **call.kwargs())
        delay = policy.delay(r, call.safe, attempt, waited) if call.retry else None
        if delay is None:
            return call.parse(r)
        r.close()
        time.sleep(delay)
        attempt, waited = attempt + 1, waited + delay


async def send_async(http: httpx.AsyncClient, policy: RetryPolicy, call: Call[T]) -> T:
    attempt, waited = 0, 0.0
    while True:
        r = await http.request(call.method, call.path, **call.kwargs())
        delay = policy.delay(r, call.safe, attempt, waited) if call.retry else None
        if delay is None:
            return call.parse(r)
        await r.aclose()
        await asyncio.sleep(delay)
        attempt, waited = attempt + 1, waited + delay


def http_options(base_url: str, api_key: str | None, timeout: float,
                 headers: Mapping[str, str] | None) -> dict[str, Any]:
    """The ``httpx.Client`` / ``httpx.AsyncClient`` arguments, the same for both."""
    all_headers = dict(headers or {})
    if api_key:
        all_headers["Authorization"] = f"Bearer {api_key}"
    return {"base_url": base_url.rstrip("/"), "headers": all_headers, "timeout": timeout}


def _json(r: httpx.Response) -> Any:
    return check(r)


def _data(r: httpx.Response) -> Any:
    return check(r)["data"]


def steering_body(steering: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """A request's ``steering`` field from ``{"vectors": [...]}``, ``steering(...)``'s ``extra_body``, or a list
    of vector mappings."""
    if isinstance(steering, Mapping):
        inner = steering.get("steering", steering)
        return {"vectors": [dict(v) for v in inner["vectors"]]}
    return {"vectors": [dict(v) for v in steering]}


def _without_none(**fields: Any) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not None}


class Calls:
    """Every request of the API, built once for both clients."""

    vectors = "/v1/steering/vectors"

    # probes and models
    def ready(self) -> Call[bool]:
        return Call("GET", "/ready", lambda r: r.status_code == 200, retry=False)

    def models(self) -> Call[list[ModelCard]]:
        return Call("GET", "/v1/models", _data)

    # vector store
    def upload_vector(self, name: str, values: Mapping[int, Sequence[float]], *, description: str | None = None,
                      overwrite: bool = False) -> Call[VectorInfo]:
        body: dict[str, Any] = {"name": name, "values": {str(k): list(map(float, v)) for k, v in values.items()},
                                "overwrite": overwrite}
        if description:
            body["description"] = description
        return Call("POST", self.vectors, _json, json=body)

    def upload_vector_file(self, name: str, path: str | Path, *, overwrite: bool = False,
                           description: str | None = None) -> Call[VectorInfo]:
        content = Path(path).read_bytes()  # held, so that a retry sends it again
        data = {"name": name, "overwrite": str(overwrite).lower()}
        if description:
            data["description"] = description
        return Call("POST", self.vectors, _json, data=data,
                    files={"file": (Path(path).name, content, "application/octet-stream")})

    def list_vectors(self) -> Call[list[VectorInfo]]:
        return Call("GET", self.vectors, _data)

    def get_vector(self, name: str) -> Call[VectorInfo]:
        return Call("GET", f"{self.vectors}/{segment(name)}", _json)

    def delete_vector(self, name: str) -> Call[VectorDeleted]:
        return Call("DELETE", f"{self.vectors}/{segment(name)}", _json)

    def rename_vector(self, name: str, new_name: str, *, overwrite: bool = False) -> Call[VectorInfo]:
        return Call("POST", f"{self.vectors}/{segment(name)}/rename", _json,
                    json={"new_name": new_name, "overwrite": overwrite})

    def export_gguf(self, name: str, path: str | Path, *, scale: float = 1.0) -> Call[list[int]]:
        def save(r: httpx.Response) -> list[int]:
            if r.status_code >= 400:
                check(r)
            Path(path).write_bytes(r.content)
            dropped = r.headers.get("X-Steerserve-Dropped-Layers", "")
            return [int(x) for x in dropped.split(",") if x]

        return Call("GET", f"{self.vectors}/{segment(name)}/gguf", save, params={"scale": scale})

    # vector building and sweeps
    def build_methods(self) -> Call[list[BuilderInfo]]:
        return Call("GET", "/v1/steering/methods", _data)

    def build_vector(self, name: str, examples: Sequence[Mapping[str, str]], *, method: str = "grains",
                     params: Mapping[str, Any] | None = None, validation: Sequence[Mapping[str, str]] | None = None,
                     sweep: Mapping[str, Any] | None = None, overwrite: bool = False,
                     description: str | None = None) -> Call[Job]:
        body: dict[str, Any] = {"name": name, "method": method, "examples": [dict(e) for e in examples],
                                "params": dict(params or {}), "overwrite": overwrite}
        if validation is not None:
            body["validation"] = [dict(e) for e in validation]
        if sweep is not None:
            body["sweep"] = dict(sweep)
        if description:
            body["description"] = description
        return Call("POST", f"{self.vectors}/build", _json, json=body)

    def sweep_vector(self, name: str, examples: Sequence[Mapping[str, str]], *,
                     params: Mapping[str, Any] | None = None, save: bool = False, **sweep: Any) -> Call[Job]:
        body: dict[str, Any] = {"examples": [dict(e) for e in examples], "sweep": sweep}
        if params is not None:
            body["params"] = dict(params)
        if save:
            body["save"] = True
        return Call("POST", f"{self.vectors}/{segment(name)}/sweep", _json, json=body)

    # jobs
    def job(self, job_id: str) -> Call[Job]:
        return Call("GET", f"/v1/jobs/{segment(job_id)}", _json)

    def jobs(self) -> Call[list[Job]]:
        return Call("GET", "/v1/jobs", _data)

    def cancel_job(self, job_id: str) -> Call[Job]:
        return Call("POST", f"/v1/jobs/{segment(job_id)}/cancel", _json, idempotent=True)

    def delete_job(self, job_id: str) -> Call[Job]:
        return Call("DELETE", f"/v1/jobs/{segment(job_id)}", _json)

    # evaluations
    def scorers(self) -> Call[list[ScorerInfo]]:
        return Call("GET", "/v1/evaluations/scorers", _data)

    def evaluate(self, body: Mapping[str, Any]) -> Call[Job]:
        return Call("POST", "/v1/evaluations", _json, json=dict(body))

    def evaluate_truthfulqa(self, csv_path: str | Path, *, rows: Sequence[int] | None = None,
                            conditions: Sequence[Mapping[str, Any]] = (), **options: Any) -> Call[Job]:
        return self.evaluate({"type": "truthfulqa", "questions": read_truthfulqa_csv(csv_path, rows),
                              "conditions": [dict(c) for c in conditions], **options})

    def evaluate_steering(self, prompts: Sequence[str], *, conditions: Sequence[Mapping[str, Any]] = (),
                          **options: Any) -> Call[Job]:
        return self.evaluate({"type": "steer", "prompts": list(prompts), "conditions": [dict(c) for c in conditions],
                              **options})

    # attribution
    def attribution_methods(self) -> Call[list[AttributionMethodInfo]]:
        return Call("GET", "/v1/attributions/methods", _data)

    def attribute(self, prompt: str | None = None, *, messages: Sequence[Mapping[str, Any]] | None = None,
                  target: str | None = None, contrast: tuple[str, str] | Mapping[str, str] | None = None,
                  method: str | None = None, params: Mapping[str, Any] | None = None,
                  per_token: bool | None = None, max_tokens: int | None = None, reduction: str | None = None,
                  top_k: int | None = None, steering: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
                  add_special_tokens: bool | None = None, model: str | None = None) -> Call[Attribution]:
        if isinstance(contrast, tuple):
            contrast = {"preferred": contrast[0], "dispreferred": contrast[1]}
        body = _without_none(
            model=model, prompt=prompt, messages=None if messages is None else [dict(m) for m in messages],
            add_special_tokens=add_special_tokens, target=target,
            contrast=None if contrast is None else dict(contrast), max_tokens=max_tokens, per_token=per_token,
            method=method, params=None if params is None else dict(params), reduction=reduction, top_k=top_k,
            steering=None if steering is None else steering_body(steering))
        return Call("POST", "/v1/attributions", _json, json=body, idempotent=True)  # stores nothing

    # tokenizer
    def tokenize(self, prompt: str | None = None, messages: Sequence[Mapping[str, Any]] | None = None
                 ) -> Call[list[int]]:
        body = {"prompt": prompt} if prompt is not None else {"messages": [dict(m) for m in messages or []]}
        return Call("POST", "/tokenize", lambda r: cast(list[int], check(r)["tokens"]), json=body, idempotent=True)

    def detokenize(self, tokens: Sequence[int]) -> Call[str]:
        return Call("POST", "/detokenize", lambda r: cast(str, check(r)["prompt"]), json={"tokens": list(tokens)},
                    idempotent=True)


def job_finished(job: Job, job_id: str, deadline: float | None, timeout: float | None) -> bool:
    """Whether polling stops here; raise TimeoutError once past the deadline."""
    if job["status"] in ("succeeded", "failed", "cancelled"):
        return True
    if deadline is not None and time.monotonic() > deadline:
        raise TimeoutError(f"job {job_id} still {job['status']} after {timeout} s")
    return False


def read_truthfulqa_csv(path: str | Path, rows: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Questions of a TruthfulQA CSV as ``/v1/evaluations`` takes them (answers in a cell are split on ``;``)."""

    def split(cell: str | None) -> list[str]:
        return [a.strip() for a in (cell or "").split(";") if a.strip()]

    with open(path, newline="", encoding="utf-8") as fh:
        all_rows = list(csv.DictReader(fh))
    picked = all_rows if rows is None else [all_rows[i] for i in rows]
    return [{"question": r["Question"].strip(), "best_answer": r["Best Answer"].strip(),
             "correct_answers": split(r.get("Correct Answers")), "incorrect_answers": split(r["Incorrect Answers"])}
            for r in picked]


CALLS = Calls()

__all__ = ["CALLS", "Call", "Calls", "RetryPolicy", "NO_RETRY", "SteerServeError", "check", "job_finished",
           "parse_retry_after", "read_truthfulqa_csv", "segment", "send_async", "send_sync", "steering_body"]
