"""API keys: minted once, stored only as a SHA-256 hash, looked up by hash, revoked by name or prefix.

Keys are 32 random bytes (URL-safe base64) behind a `tg-` prefix, so a plain hash is as strong as a
password hash would be and costs microseconds on the request path. Roles: `app` (the API),
`reviewer` (the review page and API), `admin` (everything). A reviewer or admin key's name is its
reviewer identity, unique among live keys of those roles. Imports `core.db`.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from core.db import ApiKey, utcnow
from core.vocab import Role

KEY_PREFIX = "tg-"
REVIEWER_ROLES = (Role.REVIEWER, Role.ADMIN)  # roles that claim and decide review items under their key's name


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key's id, name, role and limits (None: the gateway's defaults)."""

    key_id: int
    name: str
    role: str
    requests_per_minute: int | None
    tokens_per_minute: int | None


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(
    session: Session,
    name: str,
    role: str = Role.APP,
    requests_per_minute: int | None = None,
    tokens_per_minute: int | None = None,
) -> tuple[str, ApiKey]:
    """Mint a key; returns the key itself (shown once, never stored) and its row.

    A reviewer is known by its key's name, so at most one live `reviewer` or `admin` key bears a name
    (`ValueError` otherwise): two keys can never act as the same reviewer. To rotate, revoke, then create.
    """
    if role not in {r.value for r in Role}:
        raise ValueError(f"`role` {role!r} is not one of {', '.join(r.value for r in Role)}")
    if role in REVIEWER_ROLES and session.scalar(
        select(ApiKey.id).where(ApiKey.name == name, ApiKey.role.in_(REVIEWER_ROLES), ApiKey.revoked_at.is_(None))
    ):
        raise ValueError(
            f"a live reviewer or admin key is already named {name!r}: a reviewer name is one identity "
            f"(its verdicts, leases and agreement); revoke that key first, or pick another name"
        )
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(
        name=name,
        key_prefix=key[:10],
        key_hash=hash_key(key),
        role=role,
        requests_per_minute=requests_per_minute,
        tokens_per_minute=tokens_per_minute,
    )
    session.add(row)
    session.flush()
    return key, row


def lookup(session: Session, key: str) -> Principal | None:
    """The principal behind `key`, or None if it is unknown or revoked."""
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None)))
    if row is None:
        return None
    return Principal(row.id, row.name, row.role, row.requests_per_minute, row.tokens_per_minute)


def list_keys(session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).order_by(ApiKey.id)))


def revoke(session: Session, name_or_prefix: str) -> int:
    """Revoke every live key whose name or displayed prefix is `name_or_prefix`; returns how many."""
    rows = session.scalars(
        select(ApiKey).where(
            or_(ApiKey.name == name_or_prefix, ApiKey.key_prefix == name_or_prefix),
            ApiKey.revoked_at.is_(None),
        )
    ).all()
    for row in rows:
        row.revoked_at = utcnow()
    return len(rows)
