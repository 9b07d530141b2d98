"""The analysis endpoints of a server that runs no analysis: every one answers 501 with the reason."""

from __future__ import annotations

from typing import NoReturn

from fastapi import APIRouter

from server.deps import ReadKey, StateDep
from steering.errors import UnsupportedError

router = APIRouter(tags=["unavailable"])

PATHS = (("/v1/attributions", ["POST"]), ("/v1/attributions/methods", ["GET"]), ("/v1/evaluations", ["POST"]),
         ("/v1/evaluations/scorers", ["GET"]), ("/v1/jobs", ["GET"]), ("/v1/jobs/{job_id}", ["GET", "DELETE"]),
         ("/v1/jobs/{job_id}/cancel", ["POST"]))


def _unavailable(state: StateDep, _: ReadKey) -> NoReturn:
    if state.settings.analysis == "off":
        raise UnsupportedError("analysis (attribution, evaluations, vector builds) is off on this server "
                               "(STEERSERVE_ANALYSIS=off)")
    kind = state.services.backend.kind if state.services is not None else state.settings.backend
    raise UnsupportedError(f"this server's backend ({kind}) runs no analysis jobs (attribution, evaluations, "
                           "vector builds); the hf backend runs them")


for _path, _methods in PATHS:
    router.add_api_route(_path, _unavailable, methods=_methods, status_code=501, response_model=None,
                         include_in_schema=False)
