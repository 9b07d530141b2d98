"""Clients for steerserve's extensions (vector store, building and sweeps, jobs, evaluations, attributions,
tokenizer, probes): :class:`SteerClient` (``httpx.Client``) and its async twin :class:`AsyncSteerClient`
(``httpx.AsyncClient``), with the same methods. Both build their requests and read the answers through one shared
implementation (:mod:`clients.transport`): names are escaped as path segments, errors raise
:class:`SteerServeError`, and 503/429 answers are retried as ``Retry-After`` says (:class:`RetryPolicy`).

For generation, use the official OpenAI SDK and pass steering through ``extra_body``; :func:`steering` builds
that field::

    from openai import OpenAI
    from clients import steering
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="...")
    client.chat.completions.create(model=..., messages=[...],
                                   extra_body=steering({"name": "truthful", "scale": 4, "layers": [12, 13]}))
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

from clients.transport import (
    CALLS,
    Call,
    RetryPolicy,
    SteerServeError,
    T,
    http_options,
    job_finished,
    read_truthfulqa_csv,
    send_async,
    send_sync,
)
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

__all__ = ["AsyncSteerClient", "RetryPolicy", "SteerClient", "SteerServeError", "read_truthfulqa_csv", "steering"]

Examples = Sequence[Mapping[str, str]]
SteeringArg = Mapping[str, Any] | Sequence[Mapping[str, Any]]


def steering(*vectors: Mapping[str, Any]) -> dict[str, Any]:
    """The ``extra_body`` for the OpenAI SDK: ``steering({"name": "v", "scale": 4}, {...})``."""
    return {"steering": {"vectors": [dict(v) for v in vectors]}}


class SteerClient:
    """Synchronous client. ``retry``: how 503/429 answers are retried (``RetryPolicy(max_attempts=1)``: never)."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None,
                 timeout: float = 600.0, *, retry: RetryPolicy | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        self._http = httpx.Client(**http_options(base_url, api_key, timeout, headers))
        self.retry = retry or RetryPolicy()

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> SteerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, call: Call[T]) -> T:
        return send_sync(self._http, self.retry, call)

    # probes and models
    def ready(self) -> bool:
        return self._run(CALLS.ready())

    def models(self) -> list[ModelCard]:
        return self._run(CALLS.models())

    # vector store
    def upload_vector(self, name: str, values: Mapping[int, Sequence[float]], *, description: str | None = None,
                      overwrite: bool = False) -> VectorInfo:
        return self._run(CALLS.upload_vector(name, values, description=description, overwrite=overwrite))

    def upload_vector_file(self, name: str, path: str | Path, *, overwrite: bool = False,
                           description: str | None = None) -> VectorInfo:
        return self._run(CALLS.upload_vector_file(name, path, overwrite=overwrite, description=description))

    def list_vectors(self) -> list[VectorInfo]:
        return self._run(CALLS.list_vectors())

    def get_vector(self, name: str) -> VectorInfo:
        return self._run(CALLS.get_vector(name))

    def delete_vector(self, name: str) -> VectorDeleted:
        return self._run(CALLS.delete_vector(name))

    def rename_vector(self, name: str, new_name: str, *, overwrite: bool = False) -> VectorInfo:
        return self._run(CALLS.rename_vector(name, new_name, overwrite=overwrite))

    def export_gguf(self, name: str, path: str | Path, *, scale: float = 1.0) -> list[int]:
        """Save the vector as a llama.cpp control vector; returns the layers left out (layer 0)."""
        return self._run(CALLS.export_gguf(name, path, scale=scale))

    # vector building and sweeps
    def build_methods(self) -> list[BuilderInfo]:
        return self._run(CALLS.build_methods())

    def build_vector(self, name: str, examples: Examples, *, method: str = "grains",
                     params: Mapping[str, Any] | None = None, validation: Examples | None = None,
                     sweep: Mapping[str, Any] | None = None, overwrite: bool = False,
                     description: str | None = None) -> Job:
        """Start a build job; returns the job (poll it with :meth:`job` or :meth:`wait`). Examples are mappings
        with ``prompt``, ``preferred`` and ``dispreferred``."""
        return self._run(CALLS.build_vector(name, examples, method=method, params=params, validation=validation,
                                            sweep=sweep, overwrite=overwrite, description=description))

    def sweep_vector(self, name: str, examples: Examples, *, params: Mapping[str, Any] | None = None,
                     save: bool = False, **sweep: Any) -> Job:
        """Start a sweep job over settings (``scales``, ``layers``, ``positions``...: the ``sweep`` fields)."""
        return self._run(CALLS.sweep_vector(name, examples, params=params, save=save, **sweep))

    # jobs
    def job(self, job_id: str) -> Job:
        return self._run(CALLS.job(job_id))

    def jobs(self) -> list[Job]:
        return self._run(CALLS.jobs())

    def cancel_job(self, job_id: str) -> Job:
        return self._run(CALLS.cancel_job(job_id))

    def delete_job(self, job_id: str) -> Job:
        """Cancel the job and forget it; returns its last state."""
        return self._run(CALLS.delete_job(job_id))

    def wait(self, job_id: str, *, poll: float = 0.5, timeout: float | None = None,
             on_progress: Callable[[Job], Any] | None = None) -> Job:
        """Poll a job until it ends; returns it (check ``status``). ``on_progress(job)`` is called each poll (the
        job's ``stage``, ``progress`` and ``eta_seconds`` say how far it is)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if on_progress is not None:
                on_progress(job)
            if job_finished(job, job_id, deadline, timeout):
                return job
            time.sleep(poll)

    # evaluations
    def scorers(self) -> list[ScorerInfo]:
        return self._run(CALLS.scorers())

    def evaluate(self, body: Mapping[str, Any]) -> Job:
        """Start an evaluation job (``{"type": "truthfulqa" | "steer", ...}``); wait for it with :meth:`wait`. The
        finished job's ``result`` holds ``report`` (JSON) and ``markdown`` (a table)."""
        return self._run(CALLS.evaluate(body))

    def evaluate_truthfulqa(self, csv_path: str | Path, *, rows: Sequence[int] | None = None,
                            conditions: Sequence[Mapping[str, Any]] = (), **options: Any) -> Job:
        """TruthfulQA from a CSV in the standard format (read here, sent inline). ``conditions``: mappings with
        ``steering`` (as in ``extra_body``), and optionally ``label`` and ``relative``."""
        return self._run(CALLS.evaluate_truthfulqa(csv_path, rows=rows, conditions=conditions, **options))

    def evaluate_steering(self, prompts: Sequence[str], *, conditions: Sequence[Mapping[str, Any]] = (),
                          **options: Any) -> Job:
        return self._run(CALLS.evaluate_steering(prompts, conditions=conditions, **options))

    # attribution
    def attribution_methods(self) -> list[AttributionMethodInfo]:
        return self._run(CALLS.attribution_methods())

    def attribute(self, prompt: str | None = None, *, messages: Sequence[Mapping[str, Any]] | None = None,
                  target: str | None = None, contrast: tuple[str, str] | Mapping[str, str] | None = None,
                  method: str | None = None, params: Mapping[str, Any] | None = None,
                  per_token: bool | None = None, max_tokens: int | None = None, reduction: str | None = None,
                  top_k: int | None = None, steering: SteeringArg | None = None,
                  add_special_tokens: bool | None = None, model: str | None = None) -> Attribution:
        """Which prompt tokens drove ``target`` (or ``contrast=(preferred, dispreferred)``, or, with neither, the
        model's own greedy continuation). Unset options take the server's defaults."""
        return self._run(CALLS.attribute(
            prompt, messages=messages, target=target, contrast=contrast, method=method, params=params,
            per_token=per_token, max_tokens=max_tokens, reduction=reduction, top_k=top_k, steering=steering,
            add_special_tokens=add_special_tokens, model=model))

    # tokenizer
    def tokenize(self, prompt: str | None = None, messages: Sequence[Mapping[str, Any]] | None = None) -> list[int]:
        return self._run(CALLS.tokenize(prompt, messages))

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self._run(CALLS.detokenize(tokens))


class AsyncSteerClient:
    """The async twin of :class:`SteerClient`: the same methods, awaited (``async with AsyncSteerClient(url)``)."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None,
                 timeout: float = 600.0, *, retry: RetryPolicy | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        self._http = httpx.AsyncClient(**http_options(base_url, api_key, timeout, headers))
        self.retry = retry or RetryPolicy()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncSteerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _run(self, call: Call[T]) -> T:
        return await send_async(self._http, self.retry, call)

    # probes and models
    async def ready(self) -> bool:
        return await self._run(CALLS.ready())

    async def models(self) -> list[ModelCard]:
        return await self._run(CALLS.models())

    # vector store
    async def upload_vector(self, name: str, values: Mapping[int, Sequence[float]], *,
                            description: str | None = None, overwrite: bool = False) -> VectorInfo:
        return await self._run(CALLS.upload_vector(name, values, description=description, overwrite=overwrite))

    async def upload_vector_file(self, name: str, path: str | Path, *, overwrite: bool = False,
                                 description: str | None = None) -> VectorInfo:
        call = await asyncio.to_thread(CALLS.upload_vector_file, name, path, overwrite=overwrite,
                                       description=description)  # reads the file off the event loop
        return await self._run(call)

    async def list_vectors(self) -> list[VectorInfo]:
        return await self._run(CALLS.list_vectors())

    async def get_vector(self, name: str) -> VectorInfo:
        return await self._run(CALLS.get_vector(name))

    async def delete_vector(self, name: str) -> VectorDeleted:
        return await self._run(CALLS.delete_vector(name))

    async def rename_vector(self, name: str, new_name: str, *, overwrite: bool = False) -> VectorInfo:
        return await self._run(CALLS.rename_vector(name, new_name, overwrite=overwrite))

    async def export_gguf(self, name: str, path: str | Path, *, scale: float = 1.0) -> list[int]:
        """Save the vector as a llama.cpp control vector; returns the layers left out (layer 0)."""
        return await self._run(CALLS.export_gguf(name, path, scale=scale))

    # vector building and sweeps
    async def build_methods(self) -> list[BuilderInfo]:
        return await self._run(CALLS.build_methods())

    async def build_vector(self, name: str, examples: Examples, *, method: str = "grains",
                           params: Mapping[str, Any] | None = None, validation: Examples | None = None,
                           sweep: Mapping[str, Any] | None = None, overwrite: bool = False,
                           description: str | None = None) -> Job:
        return await self._run(CALLS.build_vector(name, examples, method=method, params=params,
                                                  validation=validation, sweep=sweep, overwrite=overwrite,
                                                  description=description))

    async def sweep_vector(self, name: str, examples: Examples, *, params: Mapping[str, Any] | None = None,
                           save: bool = False, **sweep: Any) -> Job:
        return await self._run(CALLS.sweep_vector(name, examples, params=params, save=save, **sweep))

    # jobs
    async def job(self, job_id: str) -> Job:
        return await self._run(CALLS.job(job_id))

    async def jobs(self) -> list[Job]:
        return await self._run(CALLS.jobs())

    async def cancel_job(self, job_id: str) -> Job:
        return await self._run(CALLS.cancel_job(job_id))

    async def delete_job(self, job_id: str) -> Job:
        return await self._run(CALLS.delete_job(job_id))

    async def wait(self, job_id: str, *, poll: float = 0.5, timeout: float | None = None,
                   on_progress: Callable[[Job], Any | Awaitable[Any]] | None = None) -> Job:
        """Poll a job until it ends; ``on_progress(job)`` (a function or a coroutine function) is called each
        poll."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = await self.job(job_id)
            if on_progress is not None:
                seen = on_progress(job)
                if inspect.isawaitable(seen):
                    await seen
            if job_finished(job, job_id, deadline, timeout):
                return job
            await asyncio.sleep(poll)

    # evaluations
    async def scorers(self) -> list[ScorerInfo]:
        return await self._run(CALLS.scorers())

    async def evaluate(self, body: Mapping[str, Any]) -> Job:
        return await self._run(CALLS.evaluate(body))

    async def evaluate_truthfulqa(self, csv_path: str | Path, *, rows: Sequence[int] | None = None,
                                  conditions: Sequence[Mapping[str, Any]] = (), **options: Any) -> Job:
        call = await asyncio.to_thread(CALLS.evaluate_truthfulqa, csv_path, rows=rows, conditions=conditions,
                                       **options)
        return await self._run(call)

    async def evaluate_steering(self, prompts: Sequence[str], *, conditions: Sequence[Mapping[str, Any]] = (),
                                **options: Any) -> Job:
        return await self._run(CALLS.evaluate_steering(prompts, conditions=conditions, **options))

    # attribution
    async def attribution_methods(self) -> list[AttributionMethodInfo]:
        return await self._run(CALLS.attribution_methods())

    async def attribute(self, prompt: str | None = None, *, messages: Sequence[Mapping[str, Any]] | None = None,
                        target: str | None = None, contrast: tuple[str, str] | Mapping[str, str] | None = None,
                        method: str | None = None, params: Mapping[str, Any] | None = None,
                        per_token: bool | None = None, max_tokens: int | None = None,
                        reduction: str | None = None, top_k: int | None = None,
                        steering: SteeringArg | None = None, add_special_tokens: bool | None = None,
                        model: str | None = None) -> Attribution:
        return await self._run(CALLS.attribute(
            prompt, messages=messages, target=target, contrast=contrast, method=method, params=params,
            per_token=per_token, max_tokens=max_tokens, reduction=reduction, top_k=top_k, steering=steering,
            add_special_tokens=add_special_tokens, model=model))

    # tokenizer
    async def tokenize(self, prompt: str | None = None,
                       messages: Sequence[Mapping[str, Any]] | None = None) -> list[int]:
        return await self._run(CALLS.tokenize(prompt, messages))

    async def detokenize(self, tokens: Sequence[int]) -> str:
        return await self._run(CALLS.detokenize(tokens))
