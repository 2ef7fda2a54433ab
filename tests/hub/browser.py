"""Headless Chromium for end-to-end tests of the web dashboard, driven over the Chrome DevTools Protocol.

``chromium()`` is the body of an async-generator fixture: it finds the browser (``ORES_CHROMIUM`` or
``chromium`` on the PATH; skips the test when there is none, but fails it when ``CI=true``: CI installs the
browser with tools/setup-browser.sh), starts it in its own process group with a fresh profile directory and
yields a ``Browser``.  At teardown the whole process group is killed and the profile removed, even when the
test failed.  ``CdpConnection`` is a small CDP client over aiohttp's websocket: commands are matched to their
answers by id, events are dispatched by session and method (flattened sessions: one websocket for the
browser and every page).  ``Page`` adds what a test of a page needs: navigate, evaluate, type, click, and
capture a screenshot.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
import tempfile
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Final

import aiohttp
import pytest

__all__ = ["Browser", "CdpConnection", "CdpError", "Page", "chromium", "find_chromium"]

FLAGS: Final = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-breakpad",
    "--disable-dev-shm-usage",
    "--no-proxy-server",
    "--window-size=1200,900",
    "--remote-debugging-port=0",
)
LISTENING: Final = "DevTools listening on "
START_TIMEOUT_S: Final = 30.0
COMMAND_TIMEOUT_S: Final = 10.0
STOP_TIMEOUT_S: Final = 5.0


class CdpError(Exception):
    """A DevTools command failed, timed out, or the connection to the browser is gone."""


@dataclass
class _Waiter:
    session_id: str | None
    method: str
    future: asyncio.Future[dict[str, Any]]


@dataclass
class CdpConnection:
    """One websocket to the browser; commands for a page carry that page's ``sessionId``."""

    http: aiohttp.ClientSession
    ws: aiohttp.ClientWebSocketResponse
    _next_id: int = 0
    _pending: dict[int, asyncio.Future[dict[str, Any]]] = field(default_factory=dict)
    _waiters: list[_Waiter] = field(default_factory=list)
    _handlers: dict[tuple[str | None, str], list[Callable[[dict[str, Any]], None]]] = field(
        default_factory=dict
    )
    _reader: asyncio.Task[None] | None = None
    _closed_reason: str | None = None

    @classmethod
    async def connect(cls, url: str) -> CdpConnection:
        http = aiohttp.ClientSession()
        try:
            ws = await http.ws_connect(url, max_msg_size=0, timeout=aiohttp.ClientWSTimeout(ws_close=2.0))
        except aiohttp.ClientError as err:
            await http.close()
            raise CdpError(f"cannot connect to {url}: {err}") from err
        conn = cls(http, ws)
        conn._reader = asyncio.create_task(conn._read(), name="cdp-reader")
        return conn

    async def _read(self) -> None:
        try:
            async for msg in self.ws:
                if msg.type is aiohttp.WSMsgType.TEXT:
                    self._dispatch(json.loads(msg.data))
        finally:
            self._fail_all(f"websocket closed ({self.ws.close_code})")

    def _dispatch(self, data: dict[str, Any]) -> None:
        if "id" in data:
            fut = self._pending.pop(data["id"], None)
            if fut is None or fut.done():
                return
            if "error" in data:
                fut.set_exception(CdpError(f"{data['error'].get('message')} ({data['error'].get('code')})"))
            else:
                fut.set_result(data.get("result", {}))
            return
        key = (data.get("sessionId"), str(data.get("method")))
        params = data.get("params", {})
        for handler in self._handlers.get(key, []):
            handler(params)
        for waiter in list(self._waiters):
            if (waiter.session_id, waiter.method) == key:
                self._waiters.remove(waiter)
                if not waiter.future.done():
                    waiter.future.set_result(params)

    def _fail_all(self, reason: str) -> None:
        self._closed_reason = reason
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(CdpError(reason))
        self._pending.clear()
        for waiter in self._waiters:
            if not waiter.future.done():
                waiter.future.set_exception(CdpError(reason))
        self._waiters.clear()

    async def send(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        session_id: str | None = None,
        timeout: float = COMMAND_TIMEOUT_S,
    ) -> dict[str, Any]:
        """Send one command and return its ``result``; raise ``CdpError`` on an error answer or timeout."""
        if self._closed_reason is not None:
            raise CdpError(self._closed_reason)
        self._next_id += 1
        msg_id = self._next_id
        message: dict[str, Any] = {"id": msg_id, "method": method, "params": params or {}}
        if session_id is not None:
            message["sessionId"] = session_id
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = fut
        try:
            await self.ws.send_str(json.dumps(message))
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError as err:
            raise CdpError(f"{method}: no answer within {timeout} s") from err
        except (aiohttp.ClientError, ConnectionError) as err:
            raise CdpError(f"{method}: {err}") from err
        finally:
            self._pending.pop(msg_id, None)

    def expect(self, method: str, session_id: str | None = None) -> asyncio.Future[dict[str, Any]]:
        """A future for the next ``method`` event (register it before the command that causes it)."""
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        if self._closed_reason is not None:
            fut.set_exception(CdpError(self._closed_reason))
        else:
            self._waiters.append(_Waiter(session_id, method, fut))
        return fut

    def on(
        self, method: str, handler: Callable[[dict[str, Any]], None], session_id: str | None = None
    ) -> None:
        """Call ``handler`` with the params of every ``method`` event."""
        self._handlers.setdefault((session_id, method), []).append(handler)

    async def new_page(self) -> Page:
        """Open a blank tab and attach to it (Page and Runtime domains enabled)."""
        target = await self.send("Target.createTarget", {"url": "about:blank"})
        attached = await self.send("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True})
        page = Page(self, str(target["targetId"]), str(attached["sessionId"]))
        self.on("Runtime.exceptionThrown", page._on_exception, page.session_id)
        await page.send("Page.enable")
        await page.send("Runtime.enable")
        return page

    async def close(self) -> None:
        await self.ws.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        await self.http.close()


@dataclass
class Page:
    """One tab.  ``exceptions`` collects the page's uncaught errors and unhandled promise rejections."""

    conn: CdpConnection
    target_id: str
    session_id: str
    exceptions: list[str] = field(default_factory=list)

    def _on_exception(self, params: dict[str, Any]) -> None:
        details = params.get("exceptionDetails", {})
        exc = details.get("exception", {})
        self.exceptions.append(str(exc.get("description") or details.get("text")))

    async def send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self.conn.send(method, params, session_id=self.session_id)

    async def navigate(self, url: str, timeout: float = COMMAND_TIMEOUT_S) -> None:
        """Load ``url`` and wait for its load event."""
        loaded = self.conn.expect("Page.loadEventFired", self.session_id)
        try:
            result = await self.send("Page.navigate", {"url": url})
            if result.get("errorText"):
                raise CdpError(f"navigating to {url}: {result['errorText']}")
            await asyncio.wait_for(loaded, timeout)
        except TimeoutError as err:
            raise CdpError(f"{url} did not finish loading within {timeout} s") from err
        finally:
            loaded.cancel()

    async def evaluate(self, expression: str) -> Any:
        """The JSON value of ``expression`` in the page (promises are awaited); page errors raise CdpError."""
        result = await self.send(
            "Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True}
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise CdpError(f"evaluating {expression!r}: {text}")
        return result["result"].get("value")

    async def type_into(self, selector: str, text: str) -> None:
        """Focus the field, select what it holds and type ``text`` over it (real ``input`` events)."""
        found = await self.evaluate(
            f"(() => {{ const el = document.querySelector({json.dumps(selector)});"
            " if (!el) return false; el.focus(); el.select(); return document.activeElement === el; })()"
        )
        if not found:
            raise CdpError(f"no focusable {selector} in the page")
        await self.send("Input.insertText", {"text": text})

    async def click(self, selector: str) -> None:
        """Click the middle of the element with the mouse, as a user would."""
        box = await self.evaluate(
            f"(() => {{ const el = document.querySelector({json.dumps(selector)});"
            " if (!el) return null; el.scrollIntoView({block: 'center'});"
            " const r = el.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        if not box:
            raise CdpError(f"no {selector} in the page")
        x, y = box
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            await self.send(
                "Input.dispatchMouseEvent",
                {
                    "type": kind,
                    "x": x,
                    "y": y,
                    "button": "left",
                    "clickCount": 0 if kind == "mouseMoved" else 1,
                },
            )

    async def screenshot(self) -> bytes:
        """A PNG of the viewport."""
        result = await self.send("Page.captureScreenshot", {"format": "png"})
        return base64.b64decode(result["data"])


@dataclass
class Browser:
    """A running headless Chromium and the DevTools connection to it."""

    process: asyncio.subprocess.Process
    conn: CdpConnection
    ws_url: str
    stderr_tail: deque[str]

    async def new_page(self) -> Page:
        return await self.conn.new_page()


def find_chromium() -> str | None:
    """The Chromium executable: ``ORES_CHROMIUM`` if set, else ``chromium`` (or a usual alias) on the PATH."""
    configured = os.environ.get("ORES_CHROMIUM")
    if configured:
        return configured if os.access(configured, os.X_OK) else None
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _require_chromium() -> str:
    path = find_chromium()
    if path is None:
        configured = os.environ.get("ORES_CHROMIUM")
        reason = (
            f"ORES_CHROMIUM={configured} is not an executable"
            if configured
            else "Chromium is not installed (run tools/setup-browser.sh, or set ORES_CHROMIUM)"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return path


async def _read_ws_url(stream: asyncio.StreamReader, tail: deque[str]) -> str:
    while True:
        line = await stream.readline()
        if not line:
            raise CdpError("Chromium exited before it listened for DevTools:\n" + "\n".join(tail))
        text = line.decode(errors="replace").rstrip()
        tail.append(text)
        if text.startswith(LISTENING):
            return text[len(LISTENING) :].strip()


async def _drain(stream: asyncio.StreamReader, tail: deque[str]) -> None:
    """Keep reading the browser's stderr so that it never blocks on a full pipe."""
    while line := await stream.readline():
        tail.append(line.decode(errors="replace").rstrip())


def _survivors(pgid: int, marker: str) -> list[int]:
    """Live (not zombie) processes of the browser: in its process group, or naming its profile directory
    on their command line (Chromium's crash handler starts in a session of its own)."""
    found: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue  # gone meanwhile
        state, pgrp = fields[0], int(fields[2])
        if state != b"Z" and (pgrp == pgid or marker.encode() in cmdline):
            found.append(int(entry))
    return found


def _remove(workdir: str) -> None:
    shutil.rmtree(workdir, ignore_errors=True)
    if os.path.exists(workdir):
        raise CdpError(f"could not remove Chromium's temporary directory {workdir}")


async def _kill_all(pgid: int, marker: str) -> None:
    """SIGKILL the browser's process group and stragglers until none is left (or fail after a deadline)."""
    deadline = time.monotonic() + STOP_TIMEOUT_S
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    while left := _survivors(pgid, marker):
        if time.monotonic() > deadline:
            raise CdpError(f"Chromium processes survived SIGKILL: {left}")
        for pid in left:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        await asyncio.sleep(0.05)


async def chromium() -> AsyncIterator[Browser]:
    """An async-generator body for a fixture: a running headless Chromium, stopped (its whole process
    group killed, its profile directory removed) when the fixture ends, whatever happened."""
    executable = _require_chromium()
    workdir = tempfile.mkdtemp(prefix="ores-chromium-")
    home = f"{workdir}/home"  # its caches and crash reports stay in the temporary directory too
    tail: deque[str] = deque(maxlen=40)
    process: asyncio.subprocess.Process | None = None
    drain: asyncio.Task[None] | None = None
    conn: CdpConnection | None = None
    try:
        process = await asyncio.create_subprocess_exec(
            executable,
            *FLAGS,
            f"--user-data-dir={workdir}/profile",
            "about:blank",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env={
                **os.environ,
                "HOME": home,
                "XDG_CONFIG_HOME": f"{home}/.config",
                "XDG_CACHE_HOME": f"{home}/.cache",
            },
            start_new_session=True,  # its own process group, killed as a whole at the end
        )
        assert process.stderr is not None
        try:
            ws_url = await asyncio.wait_for(_read_ws_url(process.stderr, tail), START_TIMEOUT_S)
        except TimeoutError as err:
            raise CdpError(
                f"Chromium did not listen for DevTools within {START_TIMEOUT_S} s:\n" + "\n".join(tail)
            ) from err
        drain = asyncio.create_task(_drain(process.stderr, tail), name="chromium-stderr")
        conn = await CdpConnection.connect(ws_url)
        yield Browser(process, conn, ws_url, tail)
    finally:
        if conn is not None:
            await conn.close()
        try:
            if process is not None:
                await _kill_all(process.pid, workdir)
                await asyncio.wait_for(process.wait(), STOP_TIMEOUT_S)
        finally:
            if drain is not None:
                drain.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await drain
            _remove(workdir)
