"""Routes of the OpenAI API; thin on purpose: authenticate (role `app`), validate, hand to the service."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Header, Request

from gateway.deps import AppCaller, Svc
from gateway.openai.schemas import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from gateway.openai.service import CompletionService

router = APIRouter(prefix="/v1", tags=["openai"])
UserHeader = Annotated[str | None, Header(alias="X-TuneGate-User")]
STARTED = int(time.time())


@router.post("/chat/completions", summary="Chat completion (roles: app, admin)")
async def chat_completions(
    body: ChatCompletionRequest, caller: AppCaller, services: Svc, request: Request, user: UserHeader = None
):
    return await CompletionService(services).complete("chat", body, caller, request, user)


@router.post("/completions", summary="Text completion (roles: app, admin)")
async def completions(
    body: CompletionRequest, caller: AppCaller, services: Svc, request: Request, user: UserHeader = None
):
    return await CompletionService(services).complete("completions", body, caller, request, user)


@router.get("/models", summary="Models a client may name (roles: app, admin)")
async def models(caller: AppCaller, services: Svc) -> ModelList:
    return ModelList(
        data=[
            ModelCard(id=name, created=STARTED, description=description)
            for name, description in services.router.model_names()
        ]
    )
