"""Teams and API keys (re-exported by ``jobs.service``; import from there).

A key is ``pcd_`` + 43 url-safe characters (256 random bits). Only its sha256 is stored, with
the first 12 characters as ``prefix`` to find the row; the plaintext is returned once, by
``create_api_key``, and cannot be recovered. A fast hash is right here (not bcrypt): the
keys are random, not guessable passwords, and every request is authenticated.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from jobs.models import ApiKey, Team, utcnow
from jobs.settings import Settings

KEY_PREFIX = "pcd_"
PREFIX_LEN = 12


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_team(session: Session, name: str) -> Team:
    """A new team; ``IntegrityError`` at flush when the name is taken. Does not commit."""
    team = Team(name=name, created_at=utcnow())
    session.add(team)
    session.flush()
    return team


def get_team_by_name(session: Session, name: str) -> Team | None:
    return session.scalars(select(Team).where(Team.name == name)).one_or_none()


def _team(session: Session, team: Team | str) -> Team:
    if isinstance(team, Team):
        return team
    return get_team_by_name(session, team) or create_team(session, team)


def _add_key(session: Session, team: Team, key: str, name: str) -> ApiKey:
    row = ApiKey(team_id=team.id, name=name, prefix=key[:PREFIX_LEN], key_hash=hash_key(key),
                 created_at=utcnow())
    session.add(row)
    session.flush()
    return row


def create_api_key(session: Session, team: Team | str, name: str = "") -> str:
    """A new key for ``team`` (a Team, or a team name: created if missing, which is how the
    ``pcd keys create --team`` bootstrap works). Returns the plaintext, shown once."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    _add_key(session, _team(session, team), key, name)
    return key


def authenticate(session: Session, key: str) -> Team | None:
    """The team of a valid, unrevoked key; None otherwise (the API answers 401)."""
    if not key or len(key) < PREFIX_LEN:
        return None
    digest = hash_key(key)
    rows = session.scalars(select(ApiKey).where(ApiKey.prefix == key[:PREFIX_LEN],
                                                ApiKey.revoked_at.is_(None))).all()
    for row in rows:
        if hmac.compare_digest(row.key_hash, digest):
            return session.get(Team, row.team_id)
    return None


def revoke_api_key(session: Session, key: str) -> bool:
    """Revoke a key by its plaintext; True when a live key was revoked."""
    row = session.scalars(select(ApiKey).where(ApiKey.key_hash == hash_key(key))).one_or_none()
    if row is None or row.revoked_at is not None:
        return False
    row.revoked_at = utcnow()
    session.flush()
    return True


def ensure_bootstrap_key(session: Session, settings: Settings) -> Team | None:
    """Register ``settings.bootstrap_api_key`` for ``settings.bootstrap_team`` if it is not
    registered yet (idempotent; call at API start). Returns its team, or None when unset."""
    if settings.bootstrap_api_key is None:
        return None
    key = settings.bootstrap_api_key.get_secret_value()
    if len(key) < 32:
        raise ValueError("PCD_BOOTSTRAP_API_KEY must be at least 32 characters")
    existing = session.scalars(select(ApiKey).where(ApiKey.key_hash == hash_key(key))
                               ).one_or_none()
    if existing is not None:
        return session.get(Team, existing.team_id)
    team = _team(session, settings.bootstrap_team)
    _add_key(session, team, key, "bootstrap")
    return team


__all__ = [
    "authenticate",
    "create_api_key",
    "create_team",
    "ensure_bootstrap_key",
    "get_team_by_name",
    "hash_key",
    "revoke_api_key",
]
