"""Parameters of named components (attribution methods, vector builders): pydantic models that reject unknown
names, and one way to turn a validation failure into a request error that says what is valid."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from steering.errors import InvalidRequestError

P = TypeVar("P", bound=BaseModel)


class StrictParams(BaseModel):
    """Unknown names are rejected, not ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def parse_params(model: type[P], params: dict[str, Any] | None, owner: str) -> P:
    try:
        return model.model_validate(params or {})
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        msg = "unknown parameter" if err["type"] == "extra_forbidden" else err["msg"]
        valid = ", ".join(model.model_fields) or "none"
        raise InvalidRequestError(f"invalid parameter for {owner}: {loc}: {msg} (its parameters: {valid})",
                                     param=f"params.{loc}" if loc else "params") from None
