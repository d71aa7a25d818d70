"""Routes of the review API and the reviewer's page (filled in by the review work)."""

from fastapi import APIRouter

router = APIRouter(tags=["review"])
