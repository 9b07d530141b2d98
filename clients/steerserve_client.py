"""A small synchronous client for steerserve's extensions (vector store, tokenizer, probes).

For generation, use the official OpenAI SDK and pass steering through ``extra_body``; :func:`steering` builds
that field::

    from openai import OpenAI
    from clients import steering
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="...")
    client.chat.completions.create(model=..., messages=[...],
                                   extra_body=steering({"name": "truthful", "scale": 4, "layers": [12, 13]}))
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx


class SteerServeError(Exception):
    """An error answered by the server, in the OpenAI envelope."""

    def __init__(self, status: int, error: Mapping[str, Any]) -> None:
        super().__init__(f"{status}: {error.get('message')}")
        self.status = status
        self.message = error.get("message")
        self.type = error.get("type")
        self.param = error.get("param")


def steering(*vectors: Mapping[str, Any]) -> dict[str, Any]:
    """The ``extra_body`` for the OpenAI SDK: ``steering({"name": "v", "scale": 4}, {...})``."""
    return {"steering": {"vectors": [dict(v) for v in vectors]}}


class SteerClient:
    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None,
                 timeout: float = 600.0) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> SteerClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check(self, r: httpx.Response) -> Any:
        if r.status_code >= 400:
            try:
                err = r.json()["error"]
            except Exception:  # noqa: BLE001 - not our envelope
                err = {"message": r.text}
            raise SteerServeError(r.status_code, err)
        return r.json()

    # probes
    def ready(self) -> bool:
        return self._http.get("/ready").status_code == 200

    def models(self) -> list[dict]:
        return self._check(self._http.get("/v1/models"))["data"]

    # vector store
    def upload_vector(self, name: str, values: Mapping[int, Sequence[float]], *, description: str | None = None,
                      overwrite: bool = False) -> dict:
        body = {"name": name, "values": {str(k): list(map(float, v)) for k, v in values.items()},
                "overwrite": overwrite}
        if description:
            body["description"] = description
        return self._check(self._http.post("/v1/steering/vectors", json=body))

    def upload_vector_file(self, name: str, path: str | Path, *, overwrite: bool = False) -> dict:
        with open(path, "rb") as fh:
            return self._check(self._http.post(
                "/v1/steering/vectors", data={"name": name, "overwrite": str(overwrite).lower()},
                files={"file": (Path(path).name, fh, "application/octet-stream")}))

    def list_vectors(self) -> list[dict]:
        return self._check(self._http.get("/v1/steering/vectors"))["data"]

    def get_vector(self, name: str) -> dict:
        return self._check(self._http.get(f"/v1/steering/vectors/{name}"))

    def delete_vector(self, name: str) -> None:
        self._check(self._http.delete(f"/v1/steering/vectors/{name}"))

    def rename_vector(self, name: str, new_name: str, *, overwrite: bool = False) -> dict:
        return self._check(self._http.post(f"/v1/steering/vectors/{name}/rename",
                                           json={"new_name": new_name, "overwrite": overwrite}))

    def export_gguf(self, name: str, path: str | Path, *, scale: float = 1.0) -> list[int]:
        """Save the vector as a llama.cpp control vector; returns the layers left out (layer 0)."""
        r = self._http.get(f"/v1/steering/vectors/{name}/gguf", params={"scale": scale})
        if r.status_code >= 400:
            self._check(r)
        Path(path).write_bytes(r.content)
        dropped = r.headers.get("X-Steerserve-Dropped-Layers", "")
        return [int(x) for x in dropped.split(",") if x]

    # vector building and jobs
    def build_methods(self) -> list[dict]:
        return self._check(self._http.get("/v1/steering/methods"))["data"]

    def build_vector(self, name: str, examples: Sequence[Mapping[str, str]], *, method: str = "grains",
                     params: Mapping[str, Any] | None = None, validation: Sequence[Mapping[str, str]] | None = None,
                     sweep: Mapping[str, Any] | None = None, overwrite: bool = False,
                     description: str | None = None) -> dict:
        """Start a build job; returns the job (poll it with :meth:`job` or :meth:`wait`). Examples are mappings
        with ``prompt``, ``preferred`` and ``dispreferred``."""
        body: dict[str, Any] = {"name": name, "method": method, "examples": [dict(e) for e in examples],
                                "params": dict(params or {}), "overwrite": overwrite}
        if validation is not None:
            body["validation"] = [dict(e) for e in validation]
        if sweep is not None:
            body["sweep"] = dict(sweep)
        if description:
            body["description"] = description
        return self._check(self._http.post("/v1/steering/vectors/build", json=body))

    def sweep_vector(self, name: str, examples: Sequence[Mapping[str, str]], **sweep: Any) -> dict:
        return self._check(self._http.post(f"/v1/steering/vectors/{name}/sweep",
                                           json={"examples": [dict(e) for e in examples], "sweep": sweep}))

    def job(self, job_id: str) -> dict:
        return self._check(self._http.get(f"/v1/jobs/{job_id}"))

    def jobs(self) -> list[dict]:
        return self._check(self._http.get("/v1/jobs"))["data"]

    def cancel_job(self, job_id: str) -> dict:
        return self._check(self._http.post(f"/v1/jobs/{job_id}/cancel"))

    def wait(self, job_id: str, *, poll: float = 0.5, timeout: float | None = None, on_progress=None) -> dict:
        """Poll a job until it ends; returns it (check ``status``). ``on_progress(job)`` is called each poll."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if on_progress is not None:
                on_progress(job)
            if job["status"] in ("succeeded", "failed", "cancelled"):
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout} s")
            time.sleep(poll)

    # evaluations
    def scorers(self) -> list[dict]:
        return self._check(self._http.get("/v1/evaluations/scorers"))["data"]

    def evaluate(self, body: Mapping[str, Any]) -> dict:
        """Start an evaluation job (``{"type": "truthfulqa" | "steer", ...}``); wait for it with :meth:`wait`. The
        finished job's ``result`` holds ``report`` (JSON) and ``markdown`` (a table)."""
        return self._check(self._http.post("/v1/evaluations", json=dict(body)))

    def evaluate_truthfulqa(self, csv_path: str | Path, *, rows: Sequence[int] | None = None,
                            conditions: Sequence[Mapping[str, Any]] = (), **options: Any) -> dict:
        """TruthfulQA from a CSV in the standard format (read here, sent inline). ``conditions``: mappings with
        ``steering`` (as in ``extra_body``), and optionally ``label`` and ``relative``."""
        return self.evaluate({"type": "truthfulqa", "questions": read_truthfulqa_csv(csv_path, rows),
                              "conditions": [dict(c) for c in conditions], **options})

    def evaluate_steering(self, prompts: Sequence[str], *, conditions: Sequence[Mapping[str, Any]] = (),
                          **options: Any) -> dict:
        return self.evaluate({"type": "steer", "prompts": list(prompts), "conditions": [dict(c) for c in conditions],
                              **options})

    # tokenizer
    def tokenize(self, prompt: str | None = None, messages: Sequence[Mapping] | None = None) -> list[int]:
        body = {"prompt": prompt} if prompt is not None else {"messages": list(messages or [])}
        return self._check(self._http.post("/tokenize", json=body))["tokens"]

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self._check(self._http.post("/detokenize", json={"tokens": list(tokens)}))["prompt"]


def read_truthfulqa_csv(path: str | Path, rows: Sequence[int] | None = None) -> list[dict]:
    """Questions of a TruthfulQA CSV as ``/v1/evaluations`` takes them (answers in a cell are split on ``;``)."""
    import csv

    def split(cell: str | None) -> list[str]:
        return [a.strip() for a in (cell or "").split(";") if a.strip()]

    with open(path, newline="", encoding="utf-8") as fh:
        all_rows = list(csv.DictReader(fh))
    picked = all_rows if rows is None else [all_rows[i] for i in rows]
    return [{"question": r["Question"].strip(), "best_answer": r["Best Answer"].strip(),
             "correct_answers": split(r.get("Correct Answers")), "incorrect_answers": split(r["Incorrect Answers"])}
            for r in picked]
