"""Dependencies the routes share: the app's state and services, and bearer authentication."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from server.errors import APIError
from server.lifespan import AppState
from server.serving import Services
from server.serving.attribution import AttributionService
from server.serving.evaluation import EvaluationService
from server.serving.jobs import JobService

bearer = HTTPBearer(auto_error=False, description="the server's API key, when it has one")


def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.steerserve
    return state


StateDep = Annotated[AppState, Depends(get_state)]


def get_services(state: StateDep) -> Services:
    return state.require()


ServicesDep = Annotated[Services, Depends(get_services)]


async def require_key(state: StateDep,
                      creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
    key = state.settings.api_key
    if not key:
        return
    if creds is None or not secrets.compare_digest(creds.credentials.encode(), key.encode()):
        raise APIError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                       type_="authentication_error", headers={"WWW-Authenticate": "Bearer"})


def _jobs(svc: ServicesDep) -> JobService:
    assert svc.jobs is not None  # analysis routes are mounted only for backends that run jobs
    return svc.jobs


def _attributions(svc: ServicesDep) -> AttributionService:
    assert svc.attributions is not None
    return svc.attributions


def _evaluations(svc: ServicesDep) -> EvaluationService:
    assert svc.evaluations is not None
    return svc.evaluations


JobsDep = Annotated[JobService, Depends(_jobs)]
AttributionsDep = Annotated[AttributionService, Depends(_attributions)]
EvaluationsDep = Annotated[EvaluationService, Depends(_evaluations)]
