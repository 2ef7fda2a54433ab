"""Tests of hub.auth: pairing, rate limits, hashed token storage, roles and the aiohttp glue.

Every store writes a real file under ``tmp_path``; time comes from a hand-driven clock, so expiry and
rate-limit windows are tested without sleeping.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from hub.auth import (
    AuthError,
    AuthStorageError,
    AuthStore,
    Forbidden,
    InvalidCode,
    IssuedToken,
    Permission,
    RateLimited,
    Role,
    Unauthenticated,
    auth_store_key,
    bearer_token,
    require,
    requires,
    role_allows,
    setup_auth,
    token_info_key,
)

T0 = 1_700_000_000.0


class FakeClock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "auth.json"


@pytest.fixture
def store(path: Path, clock: FakeClock) -> AuthStore:
    return AuthStore(path, clock=clock)


def wrong_code(right: str) -> str:
    digits = right.replace("-", "")
    return f"{(int(digits) + 1) % 10**8:08d}"


# Plain file access for the async tests (blocking is fine in a test; ruff's ASYNC240 wants it out of line).
def _read(path: Path) -> bytes:
    return path.read_bytes()


def _write(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def pair_owner(store: AuthStore) -> IssuedToken:
    code = store.pairing_code
    assert code is not None
    return await store.exchange(code, client_name="owner phone", remote="10.0.0.2")


# --- roles -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("have", "need", "allowed"),
    [
        (Role.VIEWER, Role.VIEWER, True),
        (Role.VIEWER, Role.HOMEOWNER, False),
        (Role.VIEWER, Role.INSTALLER, False),
        (Role.HOMEOWNER, Role.VIEWER, True),
        (Role.HOMEOWNER, Role.HOMEOWNER, True),
        (Role.HOMEOWNER, Role.INSTALLER, False),
        (Role.INSTALLER, Role.VIEWER, True),
        (Role.INSTALLER, Role.HOMEOWNER, True),
        (Role.INSTALLER, Role.INSTALLER, True),
    ],
)
def test_role_hierarchy(have: Role, need: Role, allowed: bool) -> None:
    assert role_allows(have, need) is allowed


def test_permissions_map_to_roles() -> None:
    assert Permission.READ.role is Role.VIEWER
    assert Permission.CONTROL.role is Role.HOMEOWNER
    assert Permission.MANAGE_TOKENS.role is Role.HOMEOWNER
    assert Permission.INSTALL.role is Role.INSTALLER
    assert Role.parse("homeowner") is Role.HOMEOWNER
    assert Role.parse("superuser") is None


def test_error_codes_are_stable() -> None:
    assert Unauthenticated.code == "unauthenticated"
    assert Forbidden.code == "forbidden"
    assert InvalidCode.code == "invalid_pairing_code"
    assert RateLimited.code == "rate_limited"
    limited = RateLimited(12.2)
    assert isinstance(limited, AuthError)
    assert limited.details == {"retry_after_s": 13}
    assert limited.retry_after_header == "13"
    assert (Unauthenticated.http_status, Forbidden.http_status, RateLimited.http_status) == (401, 403, 429)


# --- first-start pairing -----------------------------------------------------------------------------------


async def test_first_start_code_gives_installer_token(store: AuthStore) -> None:
    assert store.needs_pairing
    code = store.pairing_code
    assert code is not None
    assert re.fullmatch(r"\d{4}-\d{4}", code)

    issued = await store.exchange(code, client_name="owner phone", remote="10.0.0.2")

    assert issued.info.role is Role.INSTALLER
    assert issued.info.name == "owner phone"
    assert issued.info.created_by is None
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", issued.token)  # 32 bytes, urlsafe base64, no padding
    assert issued.token not in repr(issued)
    authed = store.authenticate(issued.token)
    assert authed is not None
    assert authed.id == issued.info.id
    assert authed.role is Role.INSTALLER
    assert not store.needs_pairing
    assert store.pairing_code is None


async def test_code_is_accepted_without_dash(store: AuthStore) -> None:
    code = store.pairing_code
    assert code is not None
    issued = await store.exchange(code.replace("-", ""), client_name="x", remote="10.0.0.2")
    assert issued.info.role is Role.INSTALLER


async def test_code_is_single_use(store: AuthStore) -> None:
    code = store.pairing_code
    assert code is not None
    await store.exchange(code, client_name="first", remote="10.0.0.2")
    with pytest.raises(InvalidCode):
        await store.exchange(code, client_name="second", remote="10.0.0.3")
    assert len(store.list_tokens()) == 1


async def test_first_start_code_only_makes_installer(store: AuthStore) -> None:
    code = store.pairing_code
    assert code is not None
    with pytest.raises(Forbidden):
        await store.exchange(code, client_name="x", role=Role.VIEWER, remote="10.0.0.2")
    # Not consumed, not counted as a failure.
    issued = await store.exchange(code, client_name="x", role=Role.INSTALLER, remote="10.0.0.2")
    assert issued.info.role is Role.INSTALLER


async def test_restart_before_pairing_makes_new_code(path: Path, clock: FakeClock) -> None:
    first = AuthStore(path, clock=clock)
    old_code = first.pairing_code
    assert old_code is not None
    await first.close()

    second = AuthStore(path, clock=clock)
    assert second.needs_pairing
    assert second.pairing_code is not None
    with pytest.raises(InvalidCode):
        await second.exchange(old_code, client_name="x", remote="10.0.0.2")


# --- issued codes ------------------------------------------------------------------------------------------


async def test_issued_code_pairs_its_role(store: AuthStore) -> None:
    owner = await pair_owner(store)
    code = store.issue_pairing_code(Role.VIEWER, issued_by=owner.info)
    assert code.role is Role.VIEWER
    assert code.issued_by == owner.info.id
    assert code.code not in repr(code)

    viewer = await store.exchange(code.code, client_name="wall tablet", remote="10.0.0.5")

    assert viewer.info.role is Role.VIEWER
    assert viewer.info.created_by == owner.info.id
    authed = store.authenticate(viewer.token)
    assert authed is not None
    assert (authed.id, authed.role) == (viewer.info.id, Role.VIEWER)


async def test_issuing_above_own_role_is_forbidden(store: AuthStore) -> None:
    owner = await pair_owner(store)
    homeowner_code = store.issue_pairing_code(Role.HOMEOWNER, issued_by=owner.info)
    homeowner = await store.exchange(homeowner_code.code, client_name="h", remote="10.0.0.3")
    viewer_code = store.issue_pairing_code(Role.VIEWER, issued_by=homeowner.info)
    viewer = await store.exchange(viewer_code.code, client_name="v", remote="10.0.0.4")

    with pytest.raises(Forbidden):
        store.issue_pairing_code(Role.INSTALLER, issued_by=homeowner.info)
    with pytest.raises(Forbidden):
        store.issue_pairing_code(Role.VIEWER, issued_by=viewer.info)
    # A homeowner may issue its own role.
    assert store.issue_pairing_code(Role.HOMEOWNER, issued_by=homeowner.info).role is Role.HOMEOWNER


async def test_revoked_issuer_cannot_issue(store: AuthStore) -> None:
    owner = await pair_owner(store)
    await store.revoke(owner.info.id)
    with pytest.raises(Unauthenticated):
        store.issue_pairing_code(Role.VIEWER, issued_by=owner.info)


async def test_requesting_role_above_code_is_forbidden_and_keeps_code(store: AuthStore) -> None:
    owner = await pair_owner(store)
    code = store.issue_pairing_code(Role.HOMEOWNER, issued_by=owner.info)
    with pytest.raises(Forbidden):
        await store.exchange(code.code, client_name="x", role=Role.INSTALLER, remote="10.0.0.3")
    lower = await store.exchange(code.code, client_name="x", role=Role.VIEWER, remote="10.0.0.3")
    assert lower.info.role is Role.VIEWER


async def test_expired_code_is_refused(store: AuthStore, clock: FakeClock) -> None:
    owner = await pair_owner(store)
    still_valid = store.issue_pairing_code(Role.VIEWER, issued_by=owner.info, ttl_s=60)
    expired = store.issue_pairing_code(Role.VIEWER, issued_by=owner.info, ttl_s=60)
    assert expired.expires_at is not None
    assert expired.expires_at.timestamp() == T0 + 60

    clock.advance(59)
    await store.exchange(still_valid.code, client_name="in time", remote="10.0.0.3")
    clock.advance(1)
    with pytest.raises(InvalidCode):
        await store.exchange(expired.code, client_name="too late", remote="10.0.0.3")


async def test_ttl_must_be_sane(store: AuthStore) -> None:
    owner = await pair_owner(store)
    with pytest.raises(ValueError):
        store.issue_pairing_code(Role.VIEWER, issued_by=owner.info, ttl_s=0)
    with pytest.raises(ValueError):
        store.issue_pairing_code(Role.VIEWER, issued_by=owner.info, ttl_s=7 * 24 * 3600)


async def test_pending_issued_codes_are_capped(store: AuthStore) -> None:
    owner = await pair_owner(store)
    codes = [store.issue_pairing_code(Role.VIEWER, issued_by=owner.info) for _ in range(9)]
    with pytest.raises(InvalidCode):
        await store.exchange(codes[0].code, client_name="oldest", remote="10.0.0.3")
    await store.exchange(codes[-1].code, client_name="newest", remote="10.0.0.3")


# --- rate limiting -----------------------------------------------------------------------------------------


async def test_failures_lock_out_a_remote_even_for_the_right_code(store: AuthStore, clock: FakeClock) -> None:
    code = store.pairing_code
    assert code is not None
    for _ in range(5):
        with pytest.raises(InvalidCode):
            await store.exchange(wrong_code(code), client_name="x", remote="10.0.0.66")
        clock.advance(1)
    # Failures at T0..T0+4, now T0+5: the oldest leaves the 300 s window at T0+300.
    with pytest.raises(RateLimited) as info:
        await store.exchange(code, client_name="x", remote="10.0.0.66")
    assert info.value.retry_after_s == pytest.approx(295)
    assert store.needs_pairing  # the code was not consumed

    # Another address is not affected by this remote's lockout.
    issued = await store.exchange(code, client_name="owner", remote="10.0.0.2")
    assert issued.info.role is Role.INSTALLER


async def test_lockout_lifts_after_the_window(store: AuthStore, clock: FakeClock) -> None:
    code = store.pairing_code
    assert code is not None
    for _ in range(5):
        with pytest.raises(InvalidCode):
            await store.exchange("0000-000x", client_name="x", remote="10.0.0.66")
    clock.advance(299)
    with pytest.raises(RateLimited) as info:
        await store.exchange(code, client_name="x", remote="10.0.0.66")
    assert info.value.retry_after_s == pytest.approx(1)
    clock.advance(1)
    issued = await store.exchange(code, client_name="x", remote="10.0.0.66")
    assert issued.info.role is Role.INSTALLER


async def test_attempts_while_locked_do_not_extend_the_lock(store: AuthStore, clock: FakeClock) -> None:
    code = store.pairing_code
    assert code is not None
    for _ in range(5):
        with pytest.raises(InvalidCode):
            await store.exchange(wrong_code(code), client_name="x", remote="10.0.0.66")
    for _ in range(50):
        clock.advance(5)
        with pytest.raises(RateLimited):
            await store.exchange(wrong_code(code), client_name="x", remote="10.0.0.66")
    clock.advance(50)
    await store.exchange(code, client_name="x", remote="10.0.0.66")


async def test_global_limit_across_many_remotes(store: AuthStore, clock: FakeClock) -> None:
    code = store.pairing_code
    assert code is not None
    for i in range(20):
        with pytest.raises(InvalidCode):
            await store.exchange(wrong_code(code), client_name="x", remote=f"10.0.1.{i}")
    # A fresh address with the right code is refused too: the flood locked pairing for everyone.
    with pytest.raises(RateLimited) as info:
        await store.exchange(code, client_name="owner", remote="10.0.0.2")
    assert info.value.retry_after_s == pytest.approx(300)
    clock.advance(300)
    await store.exchange(code, client_name="owner", remote="10.0.0.2")


async def test_success_does_not_reset_other_remotes(store: AuthStore) -> None:
    owner = await pair_owner(store)
    for _ in range(4):
        with pytest.raises(InvalidCode):
            await store.exchange("1111-1111", client_name="x", remote="10.0.0.66")
    code = store.issue_pairing_code(Role.VIEWER, issued_by=owner.info)
    await store.exchange(code.code, client_name="tablet", remote="10.0.0.7")
    with pytest.raises(InvalidCode):
        await store.exchange("1111-1111", client_name="x", remote="10.0.0.66")
    second = store.issue_pairing_code(Role.VIEWER, issued_by=owner.info)
    with pytest.raises(RateLimited):
        await store.exchange(second.code, client_name="x", remote="10.0.0.66")


# --- tokens on disk ----------------------------------------------------------------------------------------


async def test_tokens_are_hashed_on_disk_with_mode_600(store: AuthStore, path: Path) -> None:
    issued = await pair_owner(store)
    raw = _read(path).decode()
    assert issued.token not in raw
    assert hashlib.sha256(issued.token.encode()).hexdigest() in raw
    assert _mode(path) == 0o600


async def test_loose_file_mode_is_tightened_on_open(path: Path, clock: FakeClock) -> None:
    first = AuthStore(path, clock=clock)
    await pair_owner(first)
    os.chmod(path, 0o644)
    AuthStore(path, clock=clock)
    assert _mode(path) == 0o600


async def test_reopen_keeps_tokens_and_roles(path: Path, clock: FakeClock) -> None:
    store = AuthStore(path, clock=clock)
    owner = await pair_owner(store)
    code = store.issue_pairing_code(Role.HOMEOWNER, issued_by=owner.info)
    home = await store.exchange(code.code, client_name="kitchen", remote="10.0.0.3")
    await store.close()

    reopened = AuthStore(path, clock=clock)
    assert not reopened.needs_pairing
    assert reopened.pairing_code is None
    owner_info = reopened.authenticate(owner.token)
    home_info = reopened.authenticate(home.token)
    assert owner_info is not None
    assert owner_info.role is Role.INSTALLER
    assert home_info is not None
    assert (home_info.id, home_info.name, home_info.role) == (home.info.id, "kitchen", Role.HOMEOWNER)
    assert home_info.created_by == owner.info.id
    assert [t.id for t in reopened.list_tokens()] == [owner.info.id, home.info.id]


async def test_last_use_is_kept_in_memory_until_flush(store: AuthStore, path: Path, clock: FakeClock) -> None:
    issued = await pair_owner(store)
    before = _read(path)
    clock.advance(42)
    info = store.authenticate(issued.token)
    assert info is not None
    assert info.last_used_at is not None
    assert info.last_used_at.timestamp() == T0 + 42
    assert _read(path) == before  # no write per request

    await store.flush()
    reopened = AuthStore(path, clock=clock)
    listed = reopened.get_token(issued.info.id)
    assert listed is not None
    assert listed.last_used_at == info.last_used_at


async def test_revoke_takes_effect_at_once_and_persists(path: Path, clock: FakeClock) -> None:
    store = AuthStore(path, clock=clock)
    owner = await pair_owner(store)
    code = store.issue_pairing_code(Role.VIEWER, issued_by=owner.info)
    viewer = await store.exchange(code.code, client_name="v", remote="10.0.0.3")
    assert store.authenticate(viewer.token) is not None

    assert await store.revoke(viewer.info.id)
    assert store.authenticate(viewer.token) is None
    assert [t.id for t in store.list_tokens()] == [owner.info.id]
    assert not await store.revoke(viewer.info.id)

    reopened = AuthStore(path, clock=clock)
    assert reopened.authenticate(viewer.token) is None
    assert reopened.authenticate(owner.token) is not None


async def test_unknown_and_malformed_tokens_are_rejected(store: AuthStore) -> None:
    await pair_owner(store)
    assert store.authenticate("") is None
    assert store.authenticate("not-a-token") is None
    assert store.authenticate("é" * 10) is None
    assert store.authenticate("a" * 10_000) is None


async def test_unknown_role_on_disk_is_read_as_viewer(path: Path, clock: FakeClock) -> None:
    store = AuthStore(path, clock=clock)
    issued = await pair_owner(store)
    data = json.loads(_read(path).decode())
    for doc in data["tokens"].values():
        doc["role"] = "grid_operator"
    _write(path, json.dumps(data).encode())

    info = AuthStore(path, clock=clock).authenticate(issued.token)
    assert info is not None
    assert info.role is Role.VIEWER


def test_corrupt_file_is_an_error_not_a_reset(path: Path, clock: FakeClock) -> None:
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with pytest.raises(AuthStorageError):
        AuthStore(path, clock=clock)


# --- aiohttp glue ------------------------------------------------------------------------------------------

ClientFactory = Callable[[web.Application], Awaitable[TestClient[web.Request, web.Application]]]


def _app(store: AuthStore) -> web.Application:
    @web.middleware
    async def errors(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except AuthError as err:
            body = {"error": {"code": err.code, "message": str(err), "details": err.details}}
            return web.json_response(body, status=err.http_status)

    async def token(request: web.Request) -> web.Response:
        return web.json_response({"token": bearer_token(request)})

    async def state(request: web.Request) -> web.Response:
        info = await require(request, Role.VIEWER)
        assert request[token_info_key] == info
        return web.json_response({"id": info.id, "role": info.role})

    @requires(Role.HOMEOWNER)
    async def control(request: web.Request) -> web.StreamResponse:
        return web.json_response({"ok": True, "by": request[token_info_key].id})

    app = web.Application(middlewares=[errors])
    setup_auth(app, store, flush_interval_s=3600)
    app.router.add_get("/token", token)
    app.router.add_get("/state", state)
    app.router.add_post("/control", control)
    return app


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("Bearer abc_DEF-1", "abc_DEF-1"),
        ("bearer   abc", "abc"),
        ("Basic dXNlcjpwdw==", None),
        ("Bearer", None),
        ("Bearer a b", None),
    ],
)
async def test_bearer_token_parsing(
    store: AuthStore, aiohttp_client: ClientFactory, header: str | None, expected: str | None
) -> None:
    client = await aiohttp_client(_app(store))
    headers = {} if header is None else {"Authorization": header}
    resp = await client.get("/token", headers=headers)
    assert (await resp.json())["token"] == expected


async def test_require_over_http(store: AuthStore, path: Path, aiohttp_client: ClientFactory) -> None:
    app = _app(store)
    assert app[auth_store_key] is store
    owner = await pair_owner(store)
    code = store.issue_pairing_code(Role.VIEWER, issued_by=owner.info)
    viewer = await store.exchange(code.code, client_name="v", remote="10.0.0.3")
    client = await aiohttp_client(app)

    resp = await client.get("/state")
    assert resp.status == 401
    assert (await resp.json())["error"]["code"] == "unauthenticated"

    resp = await client.get("/state", headers={"Authorization": "Bearer nope"})
    assert resp.status == 401

    resp = await client.get("/state", headers={"Authorization": f"Bearer {viewer.token}"})
    assert resp.status == 200
    assert await resp.json() == {"id": viewer.info.id, "role": "viewer"}

    resp = await client.post("/control", headers={"Authorization": f"Bearer {viewer.token}"})
    assert resp.status == 403
    assert (await resp.json())["error"]["code"] == "forbidden"

    resp = await client.post("/control", headers={"Authorization": f"Bearer {owner.token}"})
    assert resp.status == 200
    assert await resp.json() == {"ok": True, "by": owner.info.id}

    await store.revoke(viewer.info.id)
    resp = await client.get("/state", headers={"Authorization": f"Bearer {viewer.token}"})
    assert resp.status == 401

    # Shutting the app down persists the last-use times noted while serving.
    await client.close()
    reopened = AuthStore(path)
    persisted = reopened.get_token(owner.info.id)
    assert persisted is not None
    assert persisted.last_used_at is not None
