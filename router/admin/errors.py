"""How the admin API fails: registry errors as HTTP statuses, in one place.

    TenantNotFound, UserNotFound   404
    TenantExists                   409
    VersionConflict                412 when the request had If-Match (its version is stale);
                                   409 without (concurrent writers kept winning the race)
    RegistryUnavailable            503 (Redis unreachable; retry later)
    RegistryDecryptError           503 "cannot decrypt ...": the record exists but this
                                   instance's keyring cannot open it. A deployment problem
                                   (a missing old key), fixed by the operator, not by the caller
                                   changing the request, and retryable once fixed: so 503, like
                                   an unreachable registry, never a 500.
    other RegistryError            503 (an unreadable stored record, a script reply we do not
                                   know): the registry cannot serve it right now
    ProvisionError                 502: the tenant's PostgreSQL refused or could not be reached
    pydantic ValidationError       422: a PATCH or PUT whose result breaks a rule spanning
                                   fields (say pool.min_size above the stored pool.size)
    invalid request body           422, FastAPI's shape, without echoing the input (it may hold
                                   passwords)

Bodies are ``{"detail": "message"}`` (422: ``{"detail": [{"loc", "msg", "type"}]}``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import FastAPI, Request, Response, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import ValidationError

from router.admin.provision import ProvisionError
from router.admin.views import ErrorView
from router.registry.errors import (
    RegistryDecryptError,
    RegistryError,
    RegistryUnavailable,
    TenantExists,
    TenantNotFound,
    UserNotFound,
    VersionConflict,
)

_STATUS: list[tuple[type[RegistryError], int]] = [
    (TenantNotFound, status.HTTP_404_NOT_FOUND),
    (UserNotFound, status.HTTP_404_NOT_FOUND),
    (TenantExists, status.HTTP_409_CONFLICT),
    (VersionConflict, status.HTTP_412_PRECONDITION_FAILED),
    (RegistryUnavailable, status.HTTP_503_SERVICE_UNAVAILABLE),
    (RegistryDecryptError, status.HTTP_503_SERVICE_UNAVAILABLE),
]

# For the OpenAPI document: what any tenant route may answer besides its success.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorView, "description": text}
    for code, text in [
        (401, "missing or wrong bearer token"),
        (403, "the router has no admin_token: tenant endpoints are disabled"),
        (404, "no such tenant (or user)"),
        (409, "the tenant exists already, or concurrent writes kept conflicting"),
        (412, "If-Match names a version the record is no longer at"),
        (502, "provisioning failed on the tenant's primary"),
        (503, "registry unreachable, or a stored secret cannot be decrypted"),
    ]
}


def registry_status(exc: RegistryError, request: Request) -> int:
    if isinstance(exc, VersionConflict) and "if-match" not in request.headers:
        return status.HTTP_409_CONFLICT
    for kind, code in _STATUS:
        if isinstance(exc, kind):
            return code
    return status.HTTP_503_SERVICE_UNAVAILABLE


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RegistryError)
    async def _registry_error(request: Request, exc: RegistryError) -> JSONResponse:
        return JSONResponse({"detail": exc.message}, status_code=registry_status(exc, request))

    @app.exception_handler(ProvisionError)
    async def _provision_error(request: Request, exc: ProvisionError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=status.HTTP_502_BAD_GATEWAY)

    @app.exception_handler(ValidationError)
    async def _invalid_result(request: Request, exc: ValidationError) -> JSONResponse:
        return JSONResponse({"detail": _errors(exc.errors())}, status_code=422)

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _errors(exc.errors())}, status_code=422)


def _errors(errors: Any) -> list[dict[str, Any]]:
    # Only where and what: pydantic's "input" and "ctx" may carry the submitted passwords.
    return [
        {"loc": list(error.get("loc", ())), "msg": error.get("msg", ""), "type": error.get("type")}
        for error in errors
    ]


class _NonFinite(ValueError):
    pass


def _reject_constant(name: str) -> float:
    raise _NonFinite(f"{name} is not a number JSON allows")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NonFinite(f"{text} is out of range for a double")
    return value


class StrictJSONRequest(Request):
    """Refuses what Python's json module accepts but JSON does not (NaN, Infinity) and numbers
    that overflow to infinity: stored, they would make every later response unserialisable."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = (await self.body()).decode("utf-8", errors="replace")
            try:
                self._json = json.loads(
                    body, parse_constant=_reject_constant, parse_float=_finite_float
                )
            except _NonFinite as exc:
                raise json.JSONDecodeError(str(exc), body, 0) from None
        return self._json


class StrictJSONRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict
