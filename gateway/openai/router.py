"""Routes of the OpenAI API; thin on purpose: authenticate (role `app`), validate, check the request's caps
(`gateway.limits`), hand to the service.

Each route is handed only what it uses: the caller, and the `CompletionService` (`Completions`) or
the `Router` (`Models`), by the providers in `gateway.deps`.
"""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Request, Response

from core.keys import Principal
from core.settings import GatewaySettings
from gateway.deps import AppCaller, GatewayConfig, get_completions, get_router
from gateway.limits import check_request
from gateway.openai.schemas import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from gateway.openai.service import CompletionService
from gateway.routing import Router

router = APIRouter(prefix="/v1", tags=["openai"])
UserHeader = Annotated[str | None, Header(alias="X-TuneGate-User")]
Completions = Annotated[CompletionService, Depends(get_completions)]
Models = Annotated[Router, Depends(get_router)]
STARTED = int(time.time())


async def _complete(
    kind: str,
    body: ChatCompletionRequest | CompletionRequest,
    caller: Principal,
    completions: CompletionService,
    settings: GatewaySettings,
    request: Request,
    user: str | None,
) -> Response:
    """What both completion routes do: check the request's caps, then hand it to the service."""
    check_request(body, user, settings.limits)
    return await completions.complete(kind, body, caller, request, user)


@router.post("/chat/completions", summary="Chat completion (roles: app, admin)")
async def chat_completions(
    body: ChatCompletionRequest,
    caller: AppCaller,
    completions: Completions,
    settings: GatewayConfig,
    request: Request,
    user: UserHeader = None,
) -> Response:
    return await _complete("chat", body, caller, completions, settings, request, user)


@router.post("/completions", summary="Text completion (roles: app, admin)")
async def completions(
    body: CompletionRequest,
    caller: AppCaller,
    completions: Completions,
    settings: GatewayConfig,
    request: Request,
    user: UserHeader = None,
) -> Response:
    return await _complete("completions", body, caller, completions, settings, request, user)


@router.get("/models", summary="Models a client may name (roles: app, admin)")
async def models(_: AppCaller, routes: Models) -> ModelList:
    return ModelList(
        data=[
            ModelCard(id=name, created=STARTED, description=description) for name, description in routes.model_names()
        ]
    )
