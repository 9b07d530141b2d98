"""Dependencies the routes share: the app's state and services, and bearer authentication with roles."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from server.auth import OPEN, Principal, Role
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


def require(role: Role) -> Callable[..., Awaitable[Principal]]:
    """A dependency that authenticates the request's key and checks that its role is at least ``role``."""

    async def authenticate(state: StateDep,
                           creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Principal:
        keys = state.keys
        if keys.open:
            return OPEN
        principal = keys.get(creds.credentials) if creds is not None else None
        if principal is None:
            raise APIError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                           type_="authentication_error", headers={"WWW-Authenticate": "Bearer"})
        if principal.role < role:
            raise APIError(403, f"this key has the {principal.role.name} role; this needs {role.name}",
                           type_="permission_error")
        return principal

    return authenticate


ReadKey = Annotated[Principal, Depends(require(Role.read))]
GenerateKey = Annotated[Principal, Depends(require(Role.generate))]
AdminKey = Annotated[Principal, Depends(require(Role.admin))]


def _jobs(svc: ServicesDep) -> JobService:
    assert svc.jobs is not None  # analysis routes are mounted only for backends that run jobs
    return svc.jobs


def _attributions(svc: ServicesDep) -> AttributionService:
    return svc.attributions  # 503 while a companion analysis model loads


def _evaluations(svc: ServicesDep) -> EvaluationService:
    return svc.evaluations


JobsDep = Annotated[JobService, Depends(_jobs)]
AttributionsDep = Annotated[AttributionService, Depends(_attributions)]
EvaluationsDep = Annotated[EvaluationService, Depends(_evaluations)]
