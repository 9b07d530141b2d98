"""Components registered by name (attribution methods, vector builders, behaviour scorers), like Inseq's.

Each kind has one :class:`Registry`. A component is a class with a ``name`` (and usually a pydantic ``Params``
model); ``@registry.register`` adds it, refusing a name already taken, and :meth:`Registry.get` answers an
unknown name with an error that lists the valid ones.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Generic, TypeVar

from steering.errors import InvalidRequestError
from steering.params import parse_params

C = TypeVar("C", bound=type)


class Registry(Generic[C]):
    def __init__(self, kind: str, param: str, plural: str = "") -> None:
        self.kind = kind
        """What a component is, for messages ("attribution method")."""
        self.param = param
        """The request field that names one."""
        self.plural = plural
        """What to call them in the list of valid names ("methods"), if anything."""
        self._items: dict[str, C] = {}

    def register(self, cls: C) -> C:
        """Add ``cls`` under its ``name`` (a class attribute)."""
        name: str = getattr(cls, "name")  # noqa: B009 - every component class declares one
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._items[name] = cls
        return cls

    def names(self) -> list[str]:
        return sorted(self._items)

    def get(self, name: str) -> C:
        try:
            return self._items[name]
        except (KeyError, TypeError):
            valid = f"valid {self.plural}" if self.plural else "valid"
            raise InvalidRequestError(f"unknown {self.kind} {name!r}; {valid}: {', '.join(self.names())}",
                                      param=self.param) from None

    def parse_params(self, cls: C, params: dict[str, Any] | None) -> Any:
        """``cls.Params`` validated from ``params``: unknown names are rejected, with the valid ones listed."""
        return parse_params(getattr(cls, "Params"), params, getattr(cls, "name"))  # noqa: B009

    def __getitem__(self, name: str) -> C:
        return self._items[name]

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[C]:
        return (self._items[n] for n in self.names())

    def __len__(self) -> int:
        return len(self._items)
