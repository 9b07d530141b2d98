"""API keys with roles, sent as ``Authorization: Bearer <key>``.

Roles nest: ``read`` (list and read models, vectors, methods, one's own jobs; tokenize), ``generate`` (read, plus
chat, completions, attributions, evaluations and sweeps: anything that runs the model without changing what the
server stores) and ``admin`` (everything: uploading, building, renaming and deleting vectors, and every client's
jobs). Keys come from ``api_key`` (one admin key), ``api_keys`` (a JSON list, e.g. from the environment) and
``api_keys_file`` (the same list in a file, e.g. a mounted secret). A server with no key is open: every client
is an admin (it binds to 127.0.0.1 by default).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter


class Role(IntEnum):
    read = 1
    generate = 2
    admin = 3


class APIKey(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key: str = Field(min_length=1)
    role: Literal["read", "generate", "admin"] = "generate"
    name: str | None = None
    """Who holds it (owns its jobs); default: derived from the key."""


@dataclass(frozen=True)
class Principal:
    name: str
    role: Role

    def owns(self, owner: str) -> bool:
        return self.role >= Role.admin or owner == self.name


OPEN = Principal("anonymous", Role.admin)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


class KeyRing:
    """The server's keys, held as digests (a timing attack on a hash lookup learns nothing about a key)."""

    def __init__(self, keys: list[APIKey]) -> None:
        self._by_digest: dict[bytes, Principal] = {}
        for k in keys:
            name = k.name or f"key-{_digest(k.key).hex()[:8]}"
            self._by_digest[_digest(k.key)] = Principal(name, Role[k.role])

    @property
    def open(self) -> bool:
        return not self._by_digest

    def get(self, token: str) -> Principal | None:
        return self._by_digest.get(_digest(token))

    @classmethod
    def load(cls, api_key: str | None, api_keys: list[Any], api_keys_file: Path | None) -> KeyRing:
        keys = [APIKey(key=api_key, role="admin", name="admin")] if api_key else []
        keys += TypeAdapter(list[APIKey]).validate_python(api_keys)
        if api_keys_file is not None:
            data = json.loads(Path(api_keys_file).read_text())
            keys += TypeAdapter(list[APIKey]).validate_python(data.get("keys", data) if isinstance(data, dict)
                                                              else data)
        return cls(keys)
