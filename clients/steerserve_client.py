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

    def __enter__(self) -> "SteerClient":
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

    # tokenizer
    def tokenize(self, prompt: str | None = None, messages: Sequence[Mapping] | None = None) -> list[int]:
        body = {"prompt": prompt} if prompt is not None else {"messages": list(messages or [])}
        return self._check(self._http.post("/tokenize", json=body))["tokens"]

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self._check(self._http.post("/detokenize", json={"tokens": list(tokens)}))["prompt"]
