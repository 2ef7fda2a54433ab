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
credential, and ``set_credential`` changes the bearer the driver sends.  The firmware update of §9 makes it a
``FirmwareCapable`` driver: ``firmware_begin`` announces a signed manifest (and learns the resume point),
``firmware_chunk`` uploads the image in ``PUT /firmware/image`` requests of at most 256 KiB each (request
bodies may be that large; responses stay capped at 64 KiB), ``firmware_install`` and ``firmware_rollback``
make the module reboot; the module's refusals (409, 422) become ``CommandRejected`` with its reason, a
rebooting module (503) ``DeviceUnreachable``, a module without §9 (404) ``NotSupported``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import ClassVar, Final, TypeVar

import aiohttp
from yarl import URL

from devices.attest import DeviceCertificate, challenge_message
from devices.drivers.base import DEFAULT_TIMEOUT_S, Address, FirmwareSlots
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
    FIRMWARE_BEGIN_PATH,
    FIRMWARE_IMAGE_PATH,
    FIRMWARE_INSTALL_PATH,
    FIRMWARE_PATH,
    FIRMWARE_ROLLBACK_PATH,
    MAX_BODY_BYTES,
    MAX_FIRMWARE_CHUNK_BYTES,
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
    firmware_begin_to_wire,
    parse_active_setpoint,
    parse_auth_challenge_reply,
    parse_error,
    parse_firmware_received,
    parse_firmware_status,
    parse_identity,
    parse_identity_provisioned,
    parse_status,
    parse_telemetry,
)
from firmware.manifest import MAX_MANIFEST_BYTES, BadSignature, decode_signature

__all__ = ["OresHttpDriver", "parse_identity_body", "parse_telemetry_body"]

_LOGGER = logging.getLogger(__name__)

_T = TypeVar("_T")

#: Statuses on ``GET /identity`` that mean "this HTTP server is not an ORES module".
_NOT_ORES_STATUSES: Final = frozenset({400, 404, 405, 406, 410, 415, 501})
#: Statuses that mean "the module is there but cannot answer now" (treated like no answer).
_UNAVAILABLE_STATUSES: Final = frozenset({502, 503, 504})
#: Statuses on a firmware endpoint that mean "this module does not implement §9".
_NO_FIRMWARE_STATUSES: Final = frozenset({404, 405, 501})
#: The shortest bound on one firmware exchange (an image chunk takes longer than a telemetry poll).
MIN_FIRMWARE_TIMEOUT_S: Final = 10.0


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

    #: The image chunk size the hub should hand to ``firmware_chunk`` (larger ones are split into requests of
    #: this size).
    firmware_chunk_bytes: ClassVar[int] = MAX_FIRMWARE_CHUNK_BYTES

    def __init__(
        self,
        address: Address,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        credential: str | None = None,
        firmware_timeout: float | None = None,
    ) -> None:
        if address.scheme not in self.schemes:
            raise ValueError(f"ORES-HTTP needs an http:// address, not {address}")
        if not timeout > 0:
            raise ValueError("timeout must be positive")
        _check_credential(credential)
        self.address = address
        self._timeout = timeout
        self._firmware_timeout = (
            max(timeout, MIN_FIRMWARE_TIMEOUT_S) if firmware_timeout is None else firmware_timeout
        )
        if not self._firmware_timeout > 0:
            raise ValueError("firmware_timeout must be positive")
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
                FIRMWARE_PATH,
                FIRMWARE_BEGIN_PATH,
                FIRMWARE_IMAGE_PATH,
                FIRMWARE_INSTALL_PATH,
                FIRMWARE_ROLLBACK_PATH,
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

    # ------------------------------------------------------------------ firmware update (§9)

    async def firmware_status(self) -> FirmwareSlots:
        """``GET /firmware``: the module's slots and the state of an update."""
        status, body = await self._exchange("GET", FIRMWARE_PATH)
        self._check_firmware_status("GET", FIRMWARE_PATH, status, body)
        return self._parse_firmware("GET", FIRMWARE_PATH, body, parse_firmware_status)

    async def firmware_begin(self, manifest: bytes, signature: bytes) -> int:
        """``POST /firmware/begin``: announce a signed release (the manifest file's bytes, and its signature as
        64 raw bytes or the base64 text of a ``.sig`` file).  Returns how many bytes of its image the module
        already holds (the resume point).  ``CommandRejected`` carries the module's reason for refusing the
        release (``bad_signature``, ``wrong_model``, ``not_newer``, ...); ``ValueError`` for a manifest over
        64 KiB, which no module accepts."""
        if len(manifest) > MAX_MANIFEST_BYTES:
            raise ValueError(f"a manifest is at most {MAX_MANIFEST_BYTES} bytes, got {len(manifest)}")
        try:
            raw_signature = decode_signature(signature)
        except BadSignature:
            raw_signature = bytes(signature)  # sent as it is: the module refuses it with its own reason
        payload = encode_json(firmware_begin_to_wire(manifest, raw_signature))
        status, body = await self._exchange("POST", FIRMWARE_BEGIN_PATH, payload)
        self._check_firmware_status("POST", FIRMWARE_BEGIN_PATH, status, body)
        return self._parse_firmware("POST", FIRMWARE_BEGIN_PATH, body, parse_firmware_received)

    async def firmware_chunk(self, offset: int, data: bytes) -> int:
        """``PUT /firmware/image?offset=N``, once per ``firmware_chunk_bytes`` of ``data``.  Returns the
        module's received byte count after the last request.  A wrong offset is refused by the module
        (``CommandRejected`` naming the resume point; ``firmware_begin`` with the same manifest returns it)."""
        if offset < 0:
            raise ValueError("offset must be >= 0")
        view = memoryview(data)
        received = offset
        position = 0
        while True:
            piece = view[position : position + MAX_FIRMWARE_CHUNK_BYTES]
            status, body = await self._exchange(
                "PUT",
                FIRMWARE_IMAGE_PATH,
                bytes(piece),
                content_type="application/octet-stream",
                params={"offset": str(offset + position)},
                timeout=self._firmware_timeout,
            )
            self._check_firmware_status("PUT", FIRMWARE_IMAGE_PATH, status, body)
            received = self._parse_firmware("PUT", FIRMWARE_IMAGE_PATH, body, parse_firmware_received)
            position += len(piece)
            if position >= len(view):
                return received

    async def firmware_install(self) -> None:
        """``POST /firmware/install``: the module verifies the whole image and reboots into it (202).
        ``CommandRejected`` with ``hash_mismatch``, ``size_mismatch`` ... when it refuses the image."""
        status, body = await self._exchange(
            "POST", FIRMWARE_INSTALL_PATH, b"{}", timeout=self._firmware_timeout
        )
        self._check_firmware_status("POST", FIRMWARE_INSTALL_PATH, status, body)
        self._succeeded()

    async def firmware_rollback(self) -> None:
        """``POST /firmware/rollback``: the module boots its other slot again (202); ``CommandRejected``
        (``no_previous``) when that slot holds nothing."""
        status, body = await self._exchange("POST", FIRMWARE_ROLLBACK_PATH, b"{}")
        self._check_firmware_status("POST", FIRMWARE_ROLLBACK_PATH, status, body)
        self._succeeded()

    def _check_firmware_status(self, method: str, endpoint: str, status: int, body: bytes) -> None:
        if 200 <= status < 300:
            return
        what = f"{method} {endpoint} answered {_describe_error(status, body)}"
        if status in _NO_FIRMWARE_STATUSES:
            raise self._fail(NotSupported(f"{what}: no firmware update (§9)"))
        if status in (409, 422):
            raise self._fail(CommandRejected(f"{self.address} refused the firmware update: {what}"))
        self._check_status(method, endpoint, status, body)

    def _parse_firmware(self, method: str, endpoint: str, body: bytes, parse: Callable[[object], _T]) -> _T:
        try:
            result = parse(decode_json(body))
        except WireError as err:
            raise self._fail(ProtocolError(f"{method} {endpoint}: {err}")) from err
        self._succeeded()
        return result

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

    async def _exchange(
        self,
        method: str,
        endpoint: str,
        payload: bytes | None = None,
        *,
        content_type: str = "application/json",
        params: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> tuple[int, bytes]:
        """One request; returns (status, body).  Raises ``DeviceUnreachable`` or ``ProtocolError``."""
        session = self._ensure_session()
        url = self._urls[endpoint]
        if params:
            url = url.with_query(params)
        limit = self._timeout if timeout is None else timeout
        headers: dict[str, str] = {}
        if payload is not None:
            headers["Content-Type"] = content_type
        if self._credential is not None:
            headers["Authorization"] = f"Bearer {self._credential}"
        try:
            async with asyncio.timeout(limit):
                async with session.request(
                    method,
                    url,
                    data=payload,
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(total=limit),
                ) as response:
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
            raise self._fail(DeviceUnreachable(f"{method} {url}: no answer within {limit:g} s")) from err
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
