"""The ORES-HTTP driver: the hub's client side of the open module protocol (docs/module-protocol.md).

One ``OresHttpDriver`` talks to one module at ``http://host:port/ores/v1``.  It keeps one aiohttp session
with a keep-alive connection per module (created lazily inside the running loop) so that a 1 Hz ``read()``
costs a single ``GET /telemetry`` on an open socket.  Every exchange is bounded by the driver's timeout and
every response body is capped at 64 KiB.  Wire problems become ``devices.errors`` exceptions with a precise
reason: no answer → ``DeviceUnreachable``; malformed, oversized or out-of-spec answers → ``ProtocolError``;
401/403 → ``AuthenticationFailed``; a refused control → ``CommandRejected`` carrying the module's message;
an address that answers HTTP but not ORES-HTTP 1.x → ``NotSupported`` (from ``probe``).  Parsing lives in
``devices.ores_http_wire``, shared with the simulated module server.  The authentication of §6 is here too:
``authenticate`` fetches the module's certificate and its signature over the hub's nonce (verification is
``devices.attest.verify_attestation``'s job), ``provision``/``deprovision`` set and clear the module's
credential, and ``set_credential`` changes the bearer the driver sends.
"""

from __future__ import annotations

import asyncio
import logging
from typing import ClassVar, Final

import aiohttp
from yarl import URL

from devices.attest import DeviceCertificate, challenge_message
from devices.drivers.base import DEFAULT_TIMEOUT_S, Address
from devices.errors import (
    AuthenticationFailed,
    CommandRejected,
    DeviceError,
    DeviceUnreachable,
    NotSupported,
    ProtocolError,
)
from devices.model import DeviceInfo, Setpoint, Telemetry
from devices.ores_http_wire import (
    AUTH_CHALLENGE_PATH,
    AUTH_CREDENTIAL_PATH,
    MAX_BODY_BYTES,
    SETPOINT_KIND,
    ActiveSetpoint,
    ModuleStatus,
    WireError,
    WireUnsupportedError,
    auth_challenge_to_wire,
    auth_credential_to_wire,
    control_to_wire,
    decode_json,
    encode_json,
    parse_active_setpoint,
    parse_auth_challenge_reply,
    parse_error,
    parse_identity,
    parse_identity_provisioned,
    parse_status,
    parse_telemetry,
)

__all__ = ["OresHttpDriver", "parse_identity_body", "parse_telemetry_body"]

_LOGGER = logging.getLogger(__name__)

#: Statuses on ``GET /identity`` that mean "this HTTP server is not an ORES module".
_NOT_ORES_STATUSES: Final = frozenset({400, 404, 405, 406, 410, 415, 501})
#: Statuses that mean "the module is there but cannot answer now" (treated like no answer).
_UNAVAILABLE_STATUSES: Final = frozenset({502, 503, 504})


def parse_telemetry_body(body: bytes) -> Telemetry:
    """Decode and validate a ``GET /telemetry`` body; raises only ``ProtocolError``."""
    try:
        return parse_telemetry(decode_json(body))
    except WireError as err:
        raise ProtocolError(str(err)) from err


def parse_identity_body(body: bytes) -> DeviceInfo:
    """Decode and validate a ``GET /identity`` body.

    Raises ``NotSupported`` when the body is not an ORES-HTTP 1.x identity (not JSON, no ``protocol`` marker,
    another major version) and ``ProtocolError`` when it is one but malformed.
    """
    try:
        value = decode_json(body)
    except WireError as err:
        raise NotSupported(f"identity is not JSON: {err}") from err
    try:
        return parse_identity(value)
    except WireUnsupportedError as err:
        raise NotSupported(str(err)) from err
    except WireError as err:
        raise ProtocolError(str(err)) from err


def _check_credential(credential: str | None) -> None:
    if credential is not None and (
        not credential or not credential.isascii() or not credential.isprintable() or " " in credential
    ):
        raise ValueError("credential must be non-empty printable ASCII without spaces")


def _describe_error(status: int, body: bytes) -> str:
    """``HTTP 422 out_of_range: power_limit_pct must be 0..100`` from an error response."""
    info = parse_error(body)
    if info is None:
        return f"HTTP {status}"
    text = f"HTTP {status} {info.code}" if info.code else f"HTTP {status}"
    return f"{text}: {info.message}" if info.message else text


class _BodyTooLarge(Exception):
    """Internal: the response body exceeded ``MAX_BODY_BYTES``."""


class OresHttpDriver:
    """One ORES-HTTP module at one address (see the module docstring)."""

    protocol: ClassVar[str] = "ores-http"
    schemes: ClassVar[tuple[str, ...]] = ("http",)

    def __init__(
        self, address: Address, *, timeout: float = DEFAULT_TIMEOUT_S, credential: str | None = None
    ) -> None:
        if address.scheme not in self.schemes:
            raise ValueError(f"ORES-HTTP needs an http:// address, not {address}")
        if not timeout > 0:
            raise ValueError("timeout must be positive")
        _check_credential(credential)
        self.address = address
        self._timeout = timeout
        base = str(address)
        self._urls: dict[str, URL] = {
            name: URL(f"{base}/{name}")
            for name in (
                "identity",
                "status",
                "telemetry",
                "control",
                AUTH_CHALLENGE_PATH,
                AUTH_CREDENTIAL_PATH,
            )
        }
        self._headers: dict[str, str] = {"Accept": "application/json", "Accept-Encoding": "identity"}
        self._credential = credential  # sent per request, so that set_credential takes effect at once
        self._session: aiohttp.ClientSession | None = None
        self._info: DeviceInfo | None = None
        self._provisioned: bool | None = None
        self._last_logged: str | None = None

    def __repr__(self) -> str:
        return f"OresHttpDriver({self.address})"

    @property
    def info(self) -> DeviceInfo | None:
        """What the last successful ``probe`` learnt, if any."""
        return self._info

    @property
    def provisioned(self) -> bool | None:
        """The ``provisioned`` flag of the last successful ``probe`` (``None``: the module did not say, so it
        predates §6 or was not probed)."""
        return self._provisioned

    @property
    def has_credential(self) -> bool:
        """Whether the driver sends a bearer credential."""
        return self._credential is not None

    def set_credential(self, credential: str | None) -> None:
        """Send ``Authorization: Bearer <credential>`` from now on (``None``: send none).  Raises
        ``ValueError`` for a credential that is not a valid header token."""
        _check_credential(credential)
        self._credential = credential

    # ------------------------------------------------------------------ Driver operations

    async def probe(self) -> DeviceInfo:
        status, body = await self._exchange("GET", "identity")
        if status in _NOT_ORES_STATUSES:
            raise self._fail(
                NotSupported(f"GET identity answered {_describe_error(status, body)}: not ORES-HTTP")
            )
        self._check_status("GET", "identity", status, body)
        try:
            info = parse_identity_body(body)
            provisioned = parse_identity_provisioned(decode_json(body))
        except WireError as err:
            raise self._fail(ProtocolError(str(err))) from err
        except DeviceError as err:
            self._fail(err)
            raise
        self._info = info
        self._provisioned = provisioned
        self._succeeded()
        return info

    async def read(self) -> Telemetry:
        status, body = await self._exchange("GET", "telemetry")
        self._check_status("GET", "telemetry", status, body)
        try:
            sample = parse_telemetry_body(body)
        except ProtocolError as err:
            self._fail(err)
            raise
        self._succeeded()
        return sample

    async def status(self) -> ModuleStatus:
        """``GET /status``: operating state, faults and the active setpoint (an extra beyond ``Driver``)."""
        status, body = await self._exchange("GET", "status")
        self._check_status("GET", "status", status, body)
        try:
            result = parse_status(decode_json(body))
        except WireError as err:
            raise self._fail(ProtocolError(f"GET status: {err}")) from err
        self._succeeded()
        return result

    async def apply(self, setpoint: Setpoint, *, revert_after_s: float | None = None) -> None:
        await self.control(setpoint, revert_after_s=revert_after_s)

    async def control(
        self, setpoint: Setpoint, *, revert_after_s: float | None = None
    ) -> ActiveSetpoint | None:
        """``apply`` that also returns the active setpoint the module reports (``None`` for an empty setpoint,
        which sends nothing)."""
        if setpoint.is_empty():
            _LOGGER.debug("%s: empty setpoint, nothing to send", self.address)
            return None
        if self._info is not None and not setpoint.release:
            kind = self._info.kind
            for name in control_to_wire(setpoint):
                if SETPOINT_KIND[name] is not kind:
                    raise NotSupported(f"{name} does not apply to a {kind.value} ({self.address})")
        try:
            payload = encode_json(control_to_wire(setpoint, revert_after_s))
        except ValueError as err:
            raise CommandRejected(f"setpoint for {self.address} is not finite: {setpoint}") from err
        status, body = await self._exchange("POST", "control", payload)
        if status in (401, 403):
            raise self._fail(AuthenticationFailed(f"POST control refused: {_describe_error(status, body)}"))
        if 400 <= status < 500:
            info = parse_error(body)
            reason = f"{self.address} rejected {setpoint}: {_describe_error(status, body)}"
            if status == 422 and info is not None and info.code == "not_applicable":
                raise self._fail(NotSupported(reason))
            raise self._fail(CommandRejected(reason))
        self._check_status("POST", "control", status, body)
        try:
            active = parse_active_setpoint(decode_json(body), "control reply")
        except WireError as err:
            raise self._fail(ProtocolError(f"POST control: {err}")) from err
        self._succeeded()
        return active

    # ------------------------------------------------------------------ authentication (§6)

    async def authenticate(self, nonce: bytes, hub_id: str) -> tuple[DeviceCertificate, bytes]:
        """``POST /auth/challenge``: the module's certificate and its signature over the challenge message.

        Nothing is verified here: pass the result to ``devices.attest.verify_attestation``.  Raises
        ``NotSupported`` when the module does not implement §6 (404), ``ProtocolError`` for a malformed answer
        (a malformed certificate included), ``ValueError`` for a malformed nonce or hub id.
        """
        payload = encode_json(auth_challenge_to_wire(nonce, _checked_hub_id(nonce, hub_id)))
        status, body = await self._exchange("POST", AUTH_CHALLENGE_PATH, payload)
        if status in (404, 405, 501):
            raise self._fail(
                NotSupported(
                    f"POST {AUTH_CHALLENGE_PATH} answered {_describe_error(status, body)}: no §6 authentication"
                )
            )
        self._check_status("POST", AUTH_CHALLENGE_PATH, status, body)
        try:
            result = parse_auth_challenge_reply(decode_json(body))
        except WireError as err:
            raise self._fail(ProtocolError(f"POST {AUTH_CHALLENGE_PATH}: {err}")) from err
        self._succeeded()
        return result

    async def provision(self, credential: str, hub_id: str) -> None:
        """``POST /auth/credential``: give the module ``credential`` (from ``generate_credential``) and use it
        from now on.  Sent with the current credential, if any (a re-key).  Raises ``AuthenticationFailed``
        when the module refuses (it belongs to another hub, or our current credential is wrong),
        ``NotSupported`` (404) for a module without §6, ``ProtocolError`` for other refusals."""
        _check_credential(credential)
        payload = encode_json(auth_credential_to_wire(credential, hub_id))
        status, body = await self._exchange("POST", AUTH_CREDENTIAL_PATH, payload)
        self._check_auth_status("POST", status, body)
        self._credential = credential
        self._provisioned = True
        self._succeeded()

    async def deprovision(self) -> None:
        """``DELETE /auth/credential``: the module forgets its credential and is unprovisioned again (the hub
        calls it when a module is removed).  The driver then sends no credential."""
        status, body = await self._exchange("DELETE", AUTH_CREDENTIAL_PATH)
        self._check_auth_status("DELETE", status, body)
        self._credential = None
        self._provisioned = False
        self._succeeded()

    def _check_auth_status(self, method: str, status: int, body: bytes) -> None:
        if status in (404, 405, 501):
            raise self._fail(
                NotSupported(f"{method} {AUTH_CREDENTIAL_PATH} answered {_describe_error(status, body)}")
            )
        self._check_status(method, AUTH_CREDENTIAL_PATH, status, body)

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None and not session.closed:
            await session.close()

    # ------------------------------------------------------------------ transport

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=4),
                timeout=aiohttp.ClientTimeout(total=self._timeout),
                headers=self._headers,
                cookie_jar=aiohttp.DummyCookieJar(),
                raise_for_status=False,
            )
        return self._session

    async def _exchange(self, method: str, endpoint: str, payload: bytes | None = None) -> tuple[int, bytes]:
        """One request; returns (status, body).  Raises ``DeviceUnreachable`` or ``ProtocolError``."""
        session = self._ensure_session()
        url = self._urls[endpoint]
        headers: dict[str, str] = {}
        if payload is not None:
            headers["Content-Type"] = "application/json"
        if self._credential is not None:
            headers["Authorization"] = f"Bearer {self._credential}"
        try:
            async with asyncio.timeout(self._timeout):
                async with session.request(method, url, data=payload, headers=headers) as response:
                    length = response.content_length
                    if length is not None and length > MAX_BODY_BYTES:
                        raise _BodyTooLarge(f"Content-Length {length}")
                    body = await _read_capped(response.content)
                    return response.status, body
        except _BodyTooLarge as err:
            raise self._fail(
                ProtocolError(f"{method} {endpoint}: response body exceeds {MAX_BODY_BYTES} bytes ({err})")
            ) from None
        except TimeoutError as err:
            raise self._fail(
                DeviceUnreachable(f"{method} {url}: no answer within {self._timeout:g} s")
            ) from err
        except aiohttp.ClientConnectionError as err:
            raise self._fail(DeviceUnreachable(f"{method} {url}: {err or type(err).__name__}")) from err
        except aiohttp.ClientError as err:
            raise self._fail(ProtocolError(f"{method} {url}: invalid HTTP response: {err}")) from err

    def _check_status(self, method: str, endpoint: str, status: int, body: bytes) -> None:
        """Raise for any non-2xx status of a GET (or an unexpected one of a POST)."""
        if 200 <= status < 300:
            return
        what = f"{method} {endpoint} answered {_describe_error(status, body)}"
        if status in (401, 403):
            raise self._fail(AuthenticationFailed(what))
        if status in _UNAVAILABLE_STATUSES:
            raise self._fail(DeviceUnreachable(what))
        raise self._fail(ProtocolError(what))

    # ------------------------------------------------------------------ logging

    def _fail(self, err: DeviceError) -> DeviceError:
        """Log an error once per distinct reason (WARNING; INFO for no answer or not ORES); repeats go to
        DEBUG so that a broken module polled at 1 Hz does not flood the log.  Returns the error to raise."""
        reason = f"{type(err).__name__}: {err}"
        if reason == self._last_logged:
            level = logging.DEBUG
        elif isinstance(err, DeviceUnreachable | NotSupported):
            level = logging.INFO
        else:
            level = logging.WARNING
        _LOGGER.log(level, "ores-http %s: %s", self.address, reason)
        self._last_logged = reason
        return err

    def _succeeded(self) -> None:
        self._last_logged = None


def _checked_hub_id(nonce: bytes, hub_id: str) -> str:
    """Refuse locally what no module would sign (``ValueError``)."""
    challenge_message(nonce, hub_id)
    return hub_id


async def _read_capped(stream: aiohttp.StreamReader) -> bytes:
    """Read a whole response body, giving up as soon as it exceeds ``MAX_BODY_BYTES``."""
    chunks: list[bytes] = []
    size = 0
    while chunk := await stream.readany():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise _BodyTooLarge(f"more than {size} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
