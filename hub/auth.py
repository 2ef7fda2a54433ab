"""Authentication and authorisation of the hub's API clients: roles, pairing codes and bearer tokens.

A client (the mobile app, a browser, a script) gets a bearer token by *pairing*: it sends a one-time 8-digit
pairing code to the hub and receives a fresh random token.  At first start, while no token exists, the hub
makes a pairing code that lives in memory only and is shown on the console; the token made from it is an
``installer`` token (the owner setting the hub up).  Later, a homeowner or installer token can issue further
codes for a role not above its own.  Codes expire, are single use, are compared in constant time, and failed
attempts are rate limited per remote address and globally, so a flood of guesses from many addresses cannot
get round the lockout.  Tokens are stored hashed (SHA-256) in a tinydb file written atomically with mode 0600,
never in the clear; ``AuthStore.authenticate`` is a dict lookup.  The bottom of the module holds the aiohttp
glue: ``auth_store_key``, ``bearer_token``, ``require`` and ``setup_auth``.  Failures are ``AuthError``
subclasses carrying a stable machine ``code``, an HTTP status hint and ``details``; the API layer turns them
into its JSON error format.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import hashlib
import hmac
import logging
import math
import os
import secrets
import stat
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, TypedDict

from aiohttp import web
from tinydb import TinyDB, where

from hub.storage import AtomicJSONStorage

__all__ = [
    "DEFAULT_CODE_TTL_S",
    "AuthError",
    "AuthStorageError",
    "AuthStore",
    "Forbidden",
    "InvalidCode",
    "IssuedToken",
    "PairingCode",
    "Permission",
    "RateLimited",
    "Role",
    "TokenInfo",
    "Unauthenticated",
    "auth_store_key",
    "bearer_token",
    "require",
    "requires",
    "role_allows",
    "setup_auth",
    "token_info_key",
]

_log = logging.getLogger(__name__)

Clock = Callable[[], float]

DEFAULT_CODE_TTL_S = 600.0
MAX_CODE_TTL_S = 24 * 3600.0
MAX_PENDING_CODES = 8
"""Issued codes pending at once; each one adds to a guesser's odds, so the oldest are dropped beyond this."""
MAX_TOKEN_LENGTH = 256
MAX_CLIENT_NAME_LENGTH = 64
_CODE_DIGITS = 8
_TOKENS_TABLE = "tokens"


# ---------------------------------------------------------------------------------------------------------
# Roles and permissions


class Role(enum.StrEnum):
    """What a token may do.  Ordered: ``viewer`` < ``homeowner`` < ``installer``; a role can do everything
    the roles below it can."""

    VIEWER = "viewer"
    """Reads state, history and settings; changes nothing."""
    HOMEOWNER = "homeowner"
    """Also controls devices, changes app settings, registers devices, pairs clients and manages tokens."""
    INSTALLER = "installer"
    """Everything, including installer-only settings."""

    @property
    def rank(self) -> int:
        return _RANK[self]

    @classmethod
    def parse(cls, value: object) -> Role | None:
        """The role named ``value``, or ``None`` for an unknown name (a newer hub's role, a typo)."""
        if not isinstance(value, str):
            return None
        try:
            return cls(value)
        except ValueError:
            return None


_RANK: dict[Role, int] = {Role.VIEWER: 0, Role.HOMEOWNER: 1, Role.INSTALLER: 2}


def role_allows(have: Role, need: Role) -> bool:
    """Whether a token with role ``have`` may do what needs role ``need``."""
    return _RANK[have] >= _RANK[need]


class Permission(enum.StrEnum):
    """Kinds of action, each mapped to the lowest role allowed to do it (``Permission.X.role``), so the API
    layer picks roles from one table instead of scattering them over handlers."""

    READ = "read"
    CONTROL = "control"
    """Setpoints, modes, schedules."""
    SETTINGS = "settings"
    """App and hub settings."""
    REGISTER_DEVICES = "register_devices"
    MANAGE_TOKENS = "manage_tokens"
    """List and revoke tokens, issue pairing codes."""
    INSTALL = "install"
    """Installer-only: commissioning, grid-code and protection limits."""

    @property
    def role(self) -> Role:
        return _PERMISSION_ROLE[self]


_PERMISSION_ROLE: dict[Permission, Role] = {
    Permission.READ: Role.VIEWER,
    Permission.CONTROL: Role.HOMEOWNER,
    Permission.SETTINGS: Role.HOMEOWNER,
    Permission.REGISTER_DEVICES: Role.HOMEOWNER,
    Permission.MANAGE_TOKENS: Role.HOMEOWNER,
    Permission.INSTALL: Role.INSTALLER,
}


# ---------------------------------------------------------------------------------------------------------
# Exceptions


class AuthError(Exception):
    """Root of this module's errors.  ``code`` is a stable machine-readable name, ``http_status`` the status
    the API should answer with, ``details`` extra JSON-able facts for the client."""

    code: ClassVar[str] = "auth_error"
    http_status: ClassVar[int] = 500

    @property
    def details(self) -> dict[str, Any]:
        return {}


class Unauthenticated(AuthError):
    """No bearer token, a malformed one, or one the hub does not know (never issued or revoked).  The API
    should answer 401 with ``WWW-Authenticate: Bearer``."""

    code = "unauthenticated"
    http_status = 401


class Forbidden(AuthError):
    """The token is valid but its role is too low for the action."""

    code = "forbidden"
    http_status = 403


class InvalidCode(AuthError):
    """The pairing code is wrong, expired or already used (deliberately not told apart)."""

    code = "invalid_pairing_code"
    http_status = 401


class RateLimited(AuthError):
    """Too many failed pairing attempts; try again after ``retry_after_s`` seconds."""

    code = "rate_limited"
    http_status = 429

    def __init__(self, retry_after_s: float) -> None:
        self.retry_after_s = max(0.0, retry_after_s)
        super().__init__(f"too many failed pairing attempts; retry in {math.ceil(self.retry_after_s)} s")

    @property
    def retry_after_header(self) -> str:
        """The value for an HTTP ``Retry-After`` header (whole seconds, rounded up)."""
        return str(math.ceil(self.retry_after_s))

    @property
    def details(self) -> dict[str, Any]:
        return {"retry_after_s": math.ceil(self.retry_after_s)}


class AuthStorageError(AuthError):
    """The token file could not be read or written (I/O error, corrupt JSON)."""

    code = "auth_storage_error"
    http_status = 500


# ---------------------------------------------------------------------------------------------------------
# State


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """What the hub knows about a token; never the token itself."""

    id: str
    name: str
    role: Role
    created_at: datetime
    last_used_at: datetime | None
    created_by: str | None
    """Id of the token that issued the pairing code, ``None`` for the first-start code."""


@dataclass(frozen=True, slots=True)
class IssuedToken:
    """The result of a successful pairing: the bearer token (shown to the client once) and its record."""

    token: str = field(repr=False)
    info: TokenInfo


@dataclass(frozen=True, slots=True)
class PairingCode:
    """A pairing code as shown to people: ``code`` is formatted ``"1234-5678"``."""

    code: str = field(repr=False)
    role: Role
    expires_at: datetime | None
    """``None`` for the first-start code, which lasts until used or the hub restarts."""
    issued_by: str | None


@dataclass(frozen=True, slots=True)
class _PendingCode:
    digits: str
    role: Role
    expires_at_s: float | None
    issued_by: str | None
    issued_at_s: float

    @property
    def first_start(self) -> bool:
        return self.issued_by is None


class _TokenDoc(TypedDict):
    """One token as stored in the tinydb ``tokens`` table."""

    id: str
    name: str
    role: str
    sha256: str
    created_at: str
    last_used_at: str | None
    created_by: str | None


def _hash_token(token: str) -> str | None:
    if not token or len(token) > MAX_TOKEN_LENGTH:
        return None
    try:
        raw = token.encode("ascii")
    except UnicodeEncodeError:
        return None
    return hashlib.sha256(raw).hexdigest()


def _new_code_digits() -> str:
    return f"{secrets.randbelow(10**_CODE_DIGITS):0{_CODE_DIGITS}d}"


def _format_code(digits: str) -> str:
    return f"{digits[:4]}-{digits[4:]}"


def _normalise_code(code: str) -> str | None:
    digits = code.replace("-", "").replace(" ", "")
    if len(digits) != _CODE_DIGITS or any(c not in "0123456789" for c in digits):
        return None
    return digits


def _clean_name(name: str) -> str:
    cleaned = "".join(c if c.isprintable() else " " for c in name).strip()[:MAX_CLIENT_NAME_LENGTH]
    return cleaned or "unnamed client"


def _to_datetime(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


class _FailureWindow:
    """Failure timestamps in a sliding window; locked once ``limit`` of them fall inside it."""

    __slots__ = ("_times", "limit", "window_s")

    def __init__(self, limit: int, window_s: float) -> None:
        self.limit = limit
        self.window_s = window_s
        self._times: deque[float] = deque()

    def prune(self, now: float) -> None:
        while self._times and self._times[0] <= now - self.window_s:
            self._times.popleft()

    def retry_after(self, now: float) -> float | None:
        """Seconds until the next attempt is allowed, or ``None`` if allowed now."""
        self.prune(now)
        if len(self._times) < self.limit:
            return None
        # The lock lifts when enough failures have left the window to get back under the limit.
        return self._times[len(self._times) - self.limit] + self.window_s - now

    def record(self, now: float) -> None:
        self._times.append(now)

    def __bool__(self) -> bool:
        return bool(self._times)


# ---------------------------------------------------------------------------------------------------------
# The store


class AuthStore:
    """Pairing codes, tokens and the pairing rate limits of one hub.

    Reads the token file at construction (call it at startup).  Everything that checks is synchronous and
    in memory; everything that writes is ``async`` and runs the tinydb write in a thread, one at a time.
    ``clock`` returns seconds since the epoch and drives code expiry, rate-limit windows and timestamps.
    """

    def __init__(
        self,
        path: Path,
        *,
        clock: Clock = time.time,
        per_remote_limit: int = 5,
        global_limit: int = 20,
        window_s: float = 300.0,
    ) -> None:
        self._path = Path(path)
        self._clock = clock
        self._per_remote_limit = per_remote_limit
        self._window_s = window_s
        self._global_failures = _FailureWindow(global_limit, window_s)
        self._remote_failures: dict[str, _FailureWindow] = {}
        self._lock = asyncio.Lock()
        self._by_hash: dict[str, TokenInfo] = {}
        self._hash_by_id: dict[str, str] = {}
        self._dirty: set[str] = set()
        self._codes: list[_PendingCode] = []
        self._closed = False
        try:
            self._fix_file_mode()
            self._db = TinyDB(self._path, storage=AtomicJSONStorage)
            docs = self._db.table(_TOKENS_TABLE).all()
        except (OSError, ValueError) as err:
            raise AuthStorageError(f"cannot read token file {self._path}: {err}") from err
        for doc in docs:
            self._load_doc(doc)
        if not self._by_hash:
            now = self._clock()
            self._codes.append(_PendingCode(_new_code_digits(), Role.INSTALLER, None, None, now))
            _log.info("no API tokens yet: the hub waits for pairing with its first-start code")

    # -- loading ------------------------------------------------------------------------------------------

    def _fix_file_mode(self) -> None:
        try:
            mode = stat.S_IMODE(os.stat(self._path).st_mode)
        except FileNotFoundError:
            return
        if mode & 0o077:
            _log.warning("token file %s had mode %o; setting it to 600", self._path, mode)
            os.chmod(self._path, 0o600)

    def _load_doc(self, doc: Mapping[str, Any]) -> None:
        try:
            token_id = str(doc["id"])
            digest = str(doc["sha256"])
            raw_role = doc["role"]
            created_at = datetime.fromisoformat(str(doc["created_at"]))
            raw_last = doc.get("last_used_at")
            last_used_at = datetime.fromisoformat(str(raw_last)) if raw_last else None
            raw_by = doc.get("created_by")
        except (KeyError, ValueError, TypeError) as err:
            _log.warning("skipping malformed token record in %s: %s", self._path, err)
            return
        role = Role.parse(raw_role)
        if role is None:
            _log.warning("token %s has unknown role %r; treating it as %s", token_id, raw_role, Role.VIEWER)
            role = Role.VIEWER
        info = TokenInfo(
            id=token_id,
            name=str(doc.get("name", "")),
            role=role,
            created_at=created_at,
            last_used_at=last_used_at,
            created_by=None if raw_by is None else str(raw_by),
        )
        self._by_hash[digest] = info
        self._hash_by_id[token_id] = digest

    # -- pairing ------------------------------------------------------------------------------------------

    @property
    def needs_pairing(self) -> bool:
        """True while the first-start code is pending: no token existed when the hub started."""
        return any(code.first_start for code in self._codes)

    @property
    def pairing_code(self) -> str | None:
        """The first-start code formatted for the console (``"1234-5678"``), or ``None`` once used."""
        for code in self._codes:
            if code.first_start:
                return _format_code(code.digits)
        return None

    def issue_pairing_code(
        self, role: Role, *, issued_by: TokenInfo, ttl_s: float = DEFAULT_CODE_TTL_S
    ) -> PairingCode:
        """Make a single-use code that pairs a client with ``role``.  The issuer must be a homeowner or
        installer and may not issue a role above its own (``Forbidden``); a revoked issuer is
        ``Unauthenticated``.  At most ``MAX_PENDING_CODES`` issued codes stay pending; older ones drop."""
        if not 0 < ttl_s <= MAX_CODE_TTL_S:
            raise ValueError(f"ttl_s must be in (0, {MAX_CODE_TTL_S}], got {ttl_s}")
        if issued_by.id not in self._hash_by_id:
            raise Unauthenticated("the issuing token has been revoked")
        if not role_allows(issued_by.role, Permission.MANAGE_TOKENS.role):
            raise Forbidden(f"a {issued_by.role} token cannot issue pairing codes")
        if not role_allows(issued_by.role, role):
            raise Forbidden(f"a {issued_by.role} token cannot issue a code for the {role} role")
        now = self._clock()
        self._drop_expired(now)
        issued = [c for c in self._codes if not c.first_start]
        while len(issued) >= MAX_PENDING_CODES:
            oldest = min(issued, key=lambda c: c.issued_at_s)
            issued.remove(oldest)
            self._codes.remove(oldest)
        digits = _new_code_digits()
        while any(hmac.compare_digest(digits, c.digits) for c in self._codes):
            digits = _new_code_digits()
        pending = _PendingCode(digits, role, now + ttl_s, issued_by.id, now)
        self._codes.append(pending)
        _log.info("token %s issued a pairing code for role %s, valid %.0f s", issued_by.id, role, ttl_s)
        return PairingCode(_format_code(digits), role, _to_datetime(now + ttl_s), issued_by.id)

    def _drop_expired(self, now: float) -> None:
        self._codes = [c for c in self._codes if c.expires_at_s is None or now < c.expires_at_s]

    def _check_rate_limit(self, remote: str, now: float) -> None:
        waits = [self._global_failures.retry_after(now)]
        window = self._remote_failures.get(remote)
        if window is not None:
            waits.append(window.retry_after(now))
        blocked = [w for w in waits if w is not None]
        if blocked:
            raise RateLimited(max(blocked))

    def _record_failure(self, remote: str, now: float) -> None:
        # Forget remotes whose failures have all left the window; the global limit keeps this dict small.
        stale = []
        for key, failures in self._remote_failures.items():
            failures.prune(now)
            if not failures:
                stale.append(key)
        for key in stale:
            del self._remote_failures[key]
        window = self._remote_failures.get(remote)
        if window is None:
            window = self._remote_failures[remote] = _FailureWindow(self._per_remote_limit, self._window_s)
        window.record(now)
        self._global_failures.record(now)

    async def exchange(
        self, code: str, *, client_name: str, role: Role | None = None, remote: str | None
    ) -> IssuedToken:
        """Trade a pairing code for a new bearer token.

        ``role`` is the role the client asks for; ``None`` means the code's role.  A role above the code's
        is ``Forbidden`` (the code stays valid); the first-start code only makes an installer token.
        ``remote`` is the client's address, for rate limiting.  Raises ``RateLimited`` (checked first, so
        even the right code is refused while locked), ``InvalidCode`` (counted as a failure) or
        ``AuthStorageError`` (the code stays valid).
        """
        remote_key = remote or "?"
        now = self._clock()
        self._check_rate_limit(remote_key, now)
        self._drop_expired(now)
        digits = _normalise_code(code) or ""
        match: _PendingCode | None = None
        for pending in self._codes:  # compare with every pending code; no early exit
            if hmac.compare_digest(digits.encode(), pending.digits.encode()) and match is None:
                match = pending
        if match is None:
            self._record_failure(remote_key, now)
            _log.warning("failed pairing attempt from %s", remote_key)
            raise InvalidCode("wrong, expired or already used pairing code")
        granted = match.role if role is None else role
        if not role_allows(match.role, granted):
            raise Forbidden(f"this pairing code does not allow the {granted} role")
        if match.first_start and granted is not Role.INSTALLER:
            raise Forbidden("the first-start pairing code makes the installer token")

        # Consume before the first await, so a concurrent exchange of the same code fails.
        self._codes.remove(match)
        token = secrets.token_urlsafe(32)
        digest = _hash_token(token)
        assert digest is not None
        token_id = secrets.token_hex(6)
        while token_id in self._hash_by_id:
            token_id = secrets.token_hex(6)
        info = TokenInfo(
            id=token_id,
            name=_clean_name(client_name),
            role=granted,
            created_at=_to_datetime(now),
            last_used_at=None,
            created_by=match.issued_by,
        )
        doc: _TokenDoc = {
            "id": info.id,
            "name": info.name,
            "role": info.role.value,
            "sha256": digest,
            "created_at": info.created_at.isoformat(),
            "last_used_at": None,
            "created_by": info.created_by,
        }
        try:
            await self._write(lambda table: table.insert(dict(doc)))
        except BaseException:
            self._codes.append(match)
            raise
        self._by_hash[digest] = info
        self._hash_by_id[info.id] = digest
        _log.info("paired client %r from %s as %s (token %s)", info.name, remote_key, info.role, info.id)
        return IssuedToken(token, info)

    # -- tokens -------------------------------------------------------------------------------------------

    def authenticate(self, token: str) -> TokenInfo | None:
        """The record of ``token``, or ``None`` if it is unknown or revoked.  Notes the time of use in
        memory; ``flush`` persists it."""
        digest = _hash_token(token)
        if digest is None:
            return None
        info = self._by_hash.get(digest)
        if info is None:
            return None
        stored = self._hash_by_id.get(info.id, "")
        if not hmac.compare_digest(stored.encode(), digest.encode()):
            return None
        used = replace(info, last_used_at=_to_datetime(self._clock()))
        self._by_hash[digest] = used
        self._dirty.add(info.id)
        return used

    def get_token(self, token_id: str) -> TokenInfo | None:
        digest = self._hash_by_id.get(token_id)
        return None if digest is None else self._by_hash[digest]

    def list_tokens(self) -> list[TokenInfo]:
        """Every valid token, oldest first."""
        return list(self._by_hash.values())  # insertion order: the file's order, then pairing order

    async def revoke(self, token_id: str) -> bool:
        """Revoke a token; ``False`` if there is no such token.  Takes effect at once, before the file is
        written; if the write fails (``AuthStorageError``) the token stays revoked until the hub restarts."""
        digest = self._hash_by_id.pop(token_id, None)
        if digest is None:
            return False
        del self._by_hash[digest]
        self._dirty.discard(token_id)
        _log.info("revoked token %s", token_id)
        await self._write(lambda table: table.remove(where("id") == token_id))
        return True

    async def flush(self) -> None:
        """Persist the last-use times noted since the previous flush (one file write, or none)."""
        if not self._dirty:
            return
        ids = list(self._dirty)
        self._dirty.clear()
        updates = []
        for token_id in ids:
            info = self.get_token(token_id)
            if info is not None and info.last_used_at is not None:
                fields = {"last_used_at": info.last_used_at.isoformat()}
                updates.append((fields, where("id") == token_id))
        if not updates:
            return
        try:
            await self._write(lambda table: table.update_multiple(updates))
        except AuthStorageError:
            self._dirty.update(ids)
            raise

    async def close(self) -> None:
        """Flush and close the file.  The store must not be used afterwards."""
        if self._closed:
            return
        try:
            await self.flush()
        finally:
            self._closed = True
            async with self._lock:
                self._db.close()

    async def _write(self, op: Callable[[Any], object]) -> None:
        if self._closed:
            raise AuthStorageError("the token store is closed")
        async with self._lock:
            table = self._db.table(_TOKENS_TABLE)
            try:
                await asyncio.to_thread(op, table)
            except (OSError, ValueError) as err:
                raise AuthStorageError(f"cannot write token file {self._path}: {err}") from err


# ---------------------------------------------------------------------------------------------------------
# aiohttp glue

auth_store_key: web.AppKey[AuthStore] = web.AppKey("auth_store", AuthStore)
token_info_key: web.RequestKey[TokenInfo] = web.RequestKey("token_info", TokenInfo)
"""Set by ``require`` on the request it authorised."""


def bearer_token(request: web.BaseRequest) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or ``None`` if absent or malformed."""
    header = request.headers.get("Authorization")
    if header is None:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        return None
    return token


async def require(request: web.Request, role: Role) -> TokenInfo:
    """Authenticate the request's bearer token and check it has at least ``role``.  Raises
    ``Unauthenticated`` or ``Forbidden``; on success also stores the record at ``request[token_info_key]``."""
    token = bearer_token(request)
    if token is None:
        raise Unauthenticated("missing bearer token")
    info = request.app[auth_store_key].authenticate(token)
    if info is None:
        raise Unauthenticated("unknown or revoked token")
    if not role_allows(info.role, role):
        raise Forbidden(f"this needs the {role} role; the token has {info.role}")
    request[token_info_key] = info
    return info


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def requires(role: Role) -> Callable[[Handler], Handler]:
    """Decorator for a handler: ``await require(request, role)`` before running it."""

    def decorate(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def wrapper(request: web.Request) -> web.StreamResponse:
            await require(request, role)
            return await handler(request)

        return wrapper

    return decorate


def setup_auth(app: web.Application, store: AuthStore, *, flush_interval_s: float = 300.0) -> None:
    """Put ``store`` at ``app[auth_store_key]`` and, while the app runs, flush last-use times every
    ``flush_interval_s`` seconds and once at shutdown.  The caller still owns (and closes) the store."""
    app[auth_store_key] = store

    async def flusher() -> None:
        while True:
            await asyncio.sleep(flush_interval_s)
            try:
                await store.flush()
            except AuthStorageError as err:
                _log.warning("could not persist token last-use times: %s", err)

    async def lifecycle(_: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(flusher(), name="auth-flush")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            try:
                await store.flush()
            except AuthStorageError as err:
                _log.warning("could not persist token last-use times at shutdown: %s", err)

    app.cleanup_ctx.append(lifecycle)
