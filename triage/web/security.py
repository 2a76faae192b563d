"""Passwords (scrypt), API tokens and the users who hold them.

Passwords are hashed with scrypt (RFC 7914; ``hashlib.scrypt``, N=2^15, r=8, p=1, a 16-byte
random salt), stored as ``scrypt$N$r$p$salt$hash`` so the parameters can be raised later
without invalidating old hashes. Tokens are 256 random bits shown once; the database keeps
only their SHA-256, so a copy of the database gives no working token. Comparisons are
constant-time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from storage.models import ApiToken, AuditEvent, User, utcnow

__all__ = ["ROLES", "create_token", "create_user", "hash_password", "token_user", "verify_password"]

ROLES = ("viewer", "admin")
_USERNAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_N, _R, _P = 2**15, 8, 1
_MAXMEM = 64 * 1024 * 1024


def _b64(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).decode().rstrip("=")


def _unb64(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def hash_password(password: str) -> str:
    if len(password) < 10:
        raise ValueError("a password needs at least 10 characters")
    salt = secrets.token_bytes(16)
    h = hashlib.scrypt(password.encode(), salt=salt, n=_N, r=_R, p=_P, maxmem=_MAXMEM)
    return f"scrypt${_N}${_R}${_P}${_b64(salt)}${_b64(h)}"


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, want = stored.split("$")
        if scheme != "scrypt":
            return False
        got = hashlib.scrypt(password.encode(), salt=_unb64(salt), n=int(n), r=int(r), p=int(p),
                             maxmem=_MAXMEM)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, _unb64(want))


def create_user(session: Session, username: str, password: str, role: str, actor: str = "cli") -> User:
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    if not _USERNAME.fullmatch(username):
        raise ValueError("a user name is 1-64 letters, digits, '-', '_' or '.'")
    if session.scalar(select(User.id).where(User.username == username)) is not None:
        raise ValueError(f"user {username!r} exists already")
    user = User(username=username, password_hash=hash_password(password), role=role)
    session.add(user)
    session.flush()
    session.add(AuditEvent(actor=actor, action="user created", detail={"user": username, "role": role}))
    return user


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(session: Session, user: User, name: str, actor: str = "cli") -> str:
    """A new token for ``user``; the returned text is shown once and never stored."""
    token = "trg_" + secrets.token_urlsafe(32)
    session.add(ApiToken(user_id=user.id, name=name[:64], token_sha256=_digest(token)))
    session.add(AuditEvent(actor=actor, action="token created", detail={"user": user.username, "name": name}))
    return token


def token_user(session: Session, token: str) -> User | None:
    """The active user holding ``token``, or None."""
    row = session.scalar(select(ApiToken).where(ApiToken.token_sha256 == _digest(token),
                                                ApiToken.revoked.is_(False)))
    if row is None or row.user.disabled:
        return None
    row.last_used_at = utcnow()
    return row.user
