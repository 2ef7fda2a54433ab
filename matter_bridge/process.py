"""Runs and supervises the Node.js Matter bridge (matter_bridge/js/bridge.mjs) as a child process.

:class:`MatterProcess` spawns ``[*launcher, node, bridge.mjs, key=value…]`` in its own session (so a signal to
the hub's process group does not reach it), reads its stdout as protocol events and its stderr as log lines,
matches replies to requests by ``seq``, and drives the start-up handshake: ``hello`` → every op of
``initial_ops()`` → ``start_op()`` → ``ready`` and the start result.  When the child dies unexpectedly it is
started again after a backoff (1, 2, 4 … 30 s, reset after 60 s of running) and the handshake is replayed with
a fresh ``initial_ops()``, so the node comes back with the hub's current endpoints.  ``stop()`` shuts the child
down cleanly (stdin closed, then SIGTERM, then SIGKILL).  With a launcher such as ``ip netns exec NS`` the pid
is still the node process's, since ``ip`` execs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import signal
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from matter_bridge.protocol import (
    MAX_LINE_BYTES,
    PROTOCOL_VERSION,
    STATUS_OPS,
    BridgeCommandError,
    BridgeEvent,
    BridgeUnavailable,
    BridgeWarning,
    Commissioned,
    Decommissioned,
    ErrorReply,
    FabricsChanged,
    Hello,
    MatterError,
    Op,
    ProtocolError,
    Ready,
    Result,
    StartOp,
    Status,
    Unknown,
    Window,
    encode,
    parse_event,
    parse_status,
    status_op,
)

logger = logging.getLogger(__name__)
js_logger = logging.getLogger("matter_bridge.js")

JS_DIR = Path(__file__).resolve().parent / "js"
State = Literal["stopped", "starting", "running", "restarting", "failed"]

STABLE_S = 60.0  # a child that ran this long resets the backoff
TERM_GRACE_S = 5.0  # SIGTERM → SIGKILL
READER_GRACE_S = 2.0  # after the exit, how long the pipes may stay open (a grandchild holding them)
STDERR_TAIL = 20  # stderr lines kept to explain an exit
MAX_WRITE_BUFFER = 4 << 20  # send() drops ops while this much is queued for the child's stdin
_LOUD = frozenset({"WARN", "WARNING", "ERROR", "FATAL"})


@dataclass(frozen=True, slots=True)
class BridgeOptions:
    """The bridge's command line: its storage, UDP port, commissioning data and basic information."""

    storage_dir: Path
    port: int = 5540
    passcode: int = 20202021
    discriminator: int = 3840
    vendor_id: int = 0xFFF1
    product_id: int = 0x8000
    vendor_name: str = "ORES"
    product_name: str = "ORES Hub"
    serial: str = "ores-hub"
    version: str = "0.1.0"
    log_level: str = "notice"
    ipv4: bool = True
    interface: str | None = None

    def argv(self) -> list[str]:
        """The ``key=value`` words for bridge.mjs (never ``--flags``: matter.js would read them)."""
        words = [
            f"storage={self.storage_dir}",
            f"port={self.port}",
            f"passcode={self.passcode}",
            f"discriminator={self.discriminator}",
            f"vendor-id={self.vendor_id}",
            f"product-id={self.product_id}",
            f"vendor-name={self.vendor_name}",
            f"product-name={self.product_name}",
            f"serial={self.serial}",
            f"version={self.version}",
            f"log-level={self.log_level}",
            f"ipv4={1 if self.ipv4 else 0}",
        ]
        if self.interface:
            words.append(f"interface={self.interface}")
        return words


def bridge_installed(js_dir: Path = JS_DIR) -> str | None:
    """None when bridge.mjs and its dependencies are in ``js_dir``, else the reason why not."""
    if not (js_dir / "bridge.mjs").is_file():
        return f"the Matter bridge is missing: no {js_dir / 'bridge.mjs'}"
    if not (js_dir / "node_modules" / "@matter" / "main").is_dir():
        return f"the Matter bridge's dependencies are not installed: run `npm ci --prefix {js_dir}`"
    return None


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


class _Child:
    """One spawned bridge process and what belongs to it."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.hello: asyncio.Future[Hello] = asyncio.get_running_loop().create_future()
        self.stderr_tail: deque[str] = deque(maxlen=STDERR_TAIL)
        self.readers: list[asyncio.Task[None]] = []

    def tail(self) -> str:
        return " | ".join(self.stderr_tail) or "no output on stderr"


async def _lines(reader: asyncio.StreamReader, what: str) -> AsyncIterator[bytes]:
    """Lines of ``reader`` (without the newline); a line over the reader's limit is skipped and logged."""
    skipping = 0
    while True:
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as err:  # EOF
            if err.partial and not skipping:
                yield err.partial
            return
        except asyncio.LimitOverrunError as err:
            # Drop what is buffered and keep dropping until the end of this line.
            await reader.readexactly(err.consumed)
            skipping += err.consumed
            continue
        if skipping:
            logger.warning(
                "skipped an over-long line on the Matter bridge's %s (%s bytes)", what, skipping + len(line)
            )
            skipping = 0
            continue
        yield line.rstrip(b"\r\n")


class MatterProcess:
    """Starts the bridge, keeps it running and talks to it.  See the module docstring."""

    def __init__(
        self,
        options: BridgeOptions,
        *,
        on_event: Callable[[BridgeEvent], None],
        initial_ops: Callable[[], list[Op]],
        start_op: Callable[[], StartOp],
        launcher: Sequence[str] = (),
        node: str = "node",
        js_dir: Path = JS_DIR,
        backoff_s: tuple[float, float] = (1.0, 30.0),
        ready_timeout_s: float = 60.0,
        stop_timeout_s: float = 10.0,
    ) -> None:
        self.options = options
        self._on_event = on_event
        self._initial_ops = initial_ops
        self._start_op = start_op
        self._launcher = tuple(launcher)
        self._node = node
        self._js_dir = js_dir
        self._backoff = backoff_s
        self._ready_timeout = ready_timeout_s
        self._stop_timeout = stop_timeout_s

        self.state: State = "stopped"
        self.pid: int | None = None
        self.restarts = 0
        self.last_exit: str | None = None
        self.status: Status | None = None

        self._child: _Child | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._stopper: asyncio.Task[None] | None = None
        self._first_ready: asyncio.Future[None] | None = None
        self._aux: set[asyncio.Task[Any]] = set()
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._seq = 0

    # ---- public ------------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Spawn and supervise; returns after the first ``ready``.  MatterError if that failed (nothing runs)."""
        if self._stopper is not None:
            await asyncio.shield(self._stopper)
            self._stopper = None
        if self._supervisor is not None:
            raise MatterError(f"the Matter bridge is already {self.state}")
        reason = bridge_installed(self._js_dir)
        if reason is None:
            program = self._launcher[0] if self._launcher else self._node
            if shutil.which(program) is None:
                reason = f"cannot run the Matter bridge: {program!r} not found (is Node.js installed?)"
        if reason is not None:
            self.state = "failed"
            self.last_exit = reason
            raise MatterError(reason)

        self.state = "starting"
        self._first_ready = first = asyncio.get_running_loop().create_future()
        self._supervisor = asyncio.create_task(self._supervise(), name="matter-bridge-supervisor")
        try:
            await asyncio.shield(first)
        except MatterError:
            if self._stopper is None:  # the first start failed: the supervisor has ended and killed the child
                supervisor, self._supervisor = self._supervisor, None
                if supervisor is not None:
                    await asyncio.gather(supervisor, return_exceptions=True)
            raise
        except asyncio.CancelledError:
            await asyncio.shield(self.stop())
            raise

    async def stop(self) -> None:
        """Shut the child down cleanly and end supervision; idempotent, safe while starting or restarting."""
        if self._stopper is None:
            if self._supervisor is None and self._child is None:
                if self.state != "failed":
                    self.state = "stopped"
                return
            self._stopper = asyncio.create_task(self._stop(), name="matter-bridge-stop")
        await asyncio.shield(self._stopper)

    async def request(self, op: Op, timeout: float = 15.0) -> dict[str, Any]:
        """Send ``op`` and wait for its reply's data; BridgeCommandError if the bridge refused it."""
        child = self._child
        if child is None or self.state != "running" or self._stopper is not None:
            raise BridgeUnavailable(f"the Matter bridge is {self.state}")
        return await self._request(child, op, timeout)

    def send(self, op: Op) -> bool:
        """Write ``op`` without waiting; False (op dropped) when the bridge is not running or not keeping up.

        Its reply carries no seq and arrives through ``on_event`` (an ErrorReply is also logged here).
        """
        child = self._child
        if child is None or self.state != "running" or self._stopper is not None:
            return False
        stdin = child.proc.stdin
        if stdin is None or stdin.is_closing():
            return False
        if stdin.transport.get_write_buffer_size() > MAX_WRITE_BUFFER:
            logger.warning("Matter bridge is not reading its input: dropped %s", op.get("op"))
            return False
        stdin.write(encode(op))
        return True

    # ---- supervision -------------------------------------------------------------------------------------------

    async def _supervise(self) -> None:
        loop = asyncio.get_running_loop()
        first = True
        attempt = 0  # index into the backoff sequence
        while True:
            try:
                child = await self._launch()
            except MatterError as err:
                if first:
                    self.state = "failed"
                    self.last_exit = str(err)
                    logger.info("Matter bridge failed to start: %s", err)
                    if self._first_ready is not None and not self._first_ready.done():
                        self._first_ready.set_exception(err)
                    return
                self.last_exit = str(err)
                logger.warning("Matter bridge restart failed: %s", err)
            else:
                first = False
                up_since = loop.time()
                if self._first_ready is not None and not self._first_ready.done():
                    self._first_ready.set_result(None)
                returncode = await child.proc.wait()
                await self._reap(child)
                self.last_exit = describe_exit(returncode)
                logger.warning(
                    "Matter bridge (pid %s) exited unexpectedly: %s; stderr: %s",
                    child.proc.pid,
                    self.last_exit,
                    child.tail(),
                )
                if loop.time() - up_since >= STABLE_S:
                    attempt = 0
            self.state = "restarting"
            self.restarts += 1
            low, high = self._backoff
            delay = min(low * 2 ** min(attempt, 32), high)
            attempt += 1
            logger.info("restarting the Matter bridge in %s s (restart %s)", delay, self.restarts)
            await asyncio.sleep(delay)

    async def _launch(self) -> _Child:
        """Spawn a child and run the handshake; on failure the child is killed and MatterError raised."""
        argv = [*self._launcher, self._node, str(self._js_dir / "bridge.mjs"), *self.options.argv()]
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
                limit=MAX_LINE_BYTES,
            )
        except OSError as err:
            raise MatterError(f"cannot run the Matter bridge ({argv[0]}): {err}") from err
        child = self._child = _Child(proc)
        self.pid = proc.pid
        child.readers = [
            asyncio.create_task(self._read_stdout(child), name=f"matter-bridge-stdout-{proc.pid}"),
            asyncio.create_task(self._read_stderr(child), name=f"matter-bridge-stderr-{proc.pid}"),
        ]
        logger.info("started the Matter bridge, pid %s", proc.pid)
        try:
            async with asyncio.timeout(self._ready_timeout):
                await self._handshake(child)
        except (MatterError, TimeoutError) as err:
            if isinstance(err, TimeoutError):
                reason = f"no ready from the Matter bridge within {self._ready_timeout} s"
            else:
                reason = f"the Matter bridge did not start: {err}"
            await self._kill(child)
            returncode = child.proc.returncode
            exit_text = describe_exit(returncode) if returncode is not None else "still running"
            raise MatterError(f"{reason} ({exit_text}; stderr: {child.tail()})") from err
        return child

    async def _handshake(self, child: _Child) -> None:
        try:
            hello = await asyncio.shield(child.hello)
        except BridgeUnavailable as err:
            raise MatterError("it exited before saying hello") from err
        if hello.protocol != PROTOCOL_VERSION:
            raise MatterError(f"it speaks protocol {hello.protocol}, this hub speaks {PROTOCOL_VERSION}")
        try:
            ops = self._initial_ops()
            start = self._start_op()
        except Exception as err:
            raise MatterError(f"initial ops failed: {err!r}") from err
        stdin = child.proc.stdin
        assert stdin is not None
        for op in ops:  # no seq: the replies (endpoint numbers, errors) go to on_event
            stdin.write(encode(op))
        data = await self._request(child, start, self._ready_timeout)
        if self._child is child:
            self.state = "running"
        logger.info(
            "Matter bridge ready (pid %s, %s endpoints, commissioned: %s)",
            child.proc.pid,
            len(ops),
            data.get("commissioned"),
        )

    async def _stop(self) -> None:
        supervisor = self._supervisor
        if supervisor is not None:
            supervisor.cancel()
            await asyncio.gather(supervisor, return_exceptions=True)
        first = self._first_ready
        if first is not None and not first.done():
            first.set_exception(MatterError("the Matter bridge was stopped before it was ready"))
        child = self._child
        if child is not None:
            await self._terminate(child)
        aux = list(self._aux)
        for task in aux:
            task.cancel()
        await asyncio.gather(*aux, return_exceptions=True)
        self._supervisor = None
        self._child = None
        self.pid = None
        self.state = "stopped"

    async def _terminate(self, child: _Child) -> None:
        """Close stdin → wait → SIGTERM → wait → SIGKILL; always ends with the child reaped."""
        proc = child.proc
        try:
            if proc.returncode is None:
                if proc.stdin is not None:
                    proc.stdin.close()
                if not await self._wait_exit(proc, self._stop_timeout):
                    logger.warning("Matter bridge did not stop within %s s: SIGTERM", self._stop_timeout)
                    self._signal(proc, signal.SIGTERM)
                    if not await self._wait_exit(proc, TERM_GRACE_S):
                        logger.warning("Matter bridge ignored SIGTERM: SIGKILL")
                        self._signal(proc, signal.SIGKILL)
                        await proc.wait()
        except BaseException:
            await self._kill(child)
            raise
        assert proc.returncode is not None
        self.last_exit = describe_exit(proc.returncode)
        logger.info("Matter bridge (pid %s) stopped: %s", proc.pid, self.last_exit)
        await self._reap(child)

    async def _kill(self, child: _Child) -> None:
        self._signal(child.proc, signal.SIGKILL)
        await child.proc.wait()
        await self._reap(child)

    @staticmethod
    async def _wait_exit(proc: asyncio.subprocess.Process, timeout: float) -> bool:
        try:
            async with asyncio.timeout(timeout):
                await proc.wait()
        except TimeoutError:
            return False
        return True

    @staticmethod
    def _signal(proc: asyncio.subprocess.Process, sig: signal.Signals) -> None:
        """Signal the child's process group (its session: a launcher that forks is included)."""
        if proc.returncode is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)

    async def _reap(self, child: _Child) -> None:
        """After the exit: let the readers drain the pipes, fail what waits for a reply."""
        if child.proc.stdin is not None and not child.proc.stdin.is_closing():
            child.proc.stdin.close()
        if child.readers:
            _, late = await asyncio.wait(child.readers, timeout=READER_GRACE_S)
            for task in late:
                task.cancel()
            await asyncio.gather(*child.readers, return_exceptions=True)
        self._fail_pending(child)
        if self._child is child:
            self._child = None
            self.pid = None

    def _fail_pending(self, child: _Child) -> None:
        if not child.hello.done():
            child.hello.set_exception(BridgeUnavailable("the Matter bridge exited"))
            child.hello.exception()  # retrieved: nobody may be waiting
        for seq, future in list(self._pending.items()):
            if not future.done():
                future.set_exception(BridgeUnavailable("the Matter bridge exited"))
            del self._pending[seq]

    # ---- requests ----------------------------------------------------------------------------------------------

    async def _request(self, child: _Child, op: Op, timeout: float) -> dict[str, Any]:
        stdin = child.proc.stdin
        if stdin is None or stdin.is_closing():
            raise BridgeUnavailable("the Matter bridge's input is closed")
        self._seq += 1
        seq = self._seq
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[seq] = future
        try:
            async with asyncio.timeout(timeout):
                stdin.write(encode({**op, "seq": seq}))
                try:
                    await stdin.drain()
                except ConnectionError as err:
                    raise BridgeUnavailable(f"the Matter bridge's input is closed: {err}") from err
                return await future
        except TimeoutError as err:
            raise MatterError(
                f"no reply from the Matter bridge to {op.get('op')} within {timeout} s"
            ) from err
        finally:
            self._pending.pop(seq, None)

    def _write_raw(self, data: bytes) -> None:
        """Test hook: write bytes as they are to the running child's stdin."""
        child = self._child
        if child is None or child.proc.stdin is None:
            raise BridgeUnavailable("no Matter bridge process")
        child.proc.stdin.write(data)

    # ---- readers -----------------------------------------------------------------------------------------------

    async def _read_stdout(self, child: _Child) -> None:
        assert child.proc.stdout is not None
        try:
            async for line in _lines(child.proc.stdout, "stdout"):
                if not line.strip():
                    continue
                try:
                    event = parse_event(line)
                except ProtocolError as err:
                    logger.warning("ignored a line from the Matter bridge: %s", err)
                    continue
                self._dispatch(child, event)
        finally:  # the child is gone (or as good as gone): nothing more will be answered
            self._fail_pending(child)

    async def _read_stderr(self, child: _Child) -> None:
        assert child.proc.stderr is not None
        async for raw in _lines(child.proc.stderr, "stderr"):
            line = raw.decode(errors="replace").rstrip()
            if not line:
                continue
            child.stderr_tail.append(line)
            loud = not _LOUD.isdisjoint(line.split(maxsplit=3)[:3])
            js_logger.log(logging.WARNING if loud else logging.DEBUG, "%s", line)

    def _dispatch(self, child: _Child, event: BridgeEvent) -> None:
        if isinstance(event, (Result, ErrorReply)) and event.seq is not None:
            future = self._pending.get(event.seq)
            if future is not None:
                if isinstance(event, Result):
                    self._note_result(event)
                    if not future.done():
                        future.set_result(event.data)
                elif not future.done():
                    future.set_exception(BridgeCommandError(event.reason, event.op))
                return
        if isinstance(event, Hello):
            if not child.hello.done():
                child.hello.set_result(event)
        elif isinstance(event, Result):
            self._note_result(event)
        elif isinstance(event, ErrorReply):
            logger.warning("the Matter bridge refused %s: %s", event.op or "a message", event.reason)
        elif isinstance(event, Ready):
            self.status = event.status
            if self._child is child:
                self.state = "running"
        elif isinstance(event, Window):
            if self.status is not None:
                self.status = dataclasses.replace(self.status, window_open=event.open)
        elif isinstance(event, (Commissioned, Decommissioned)):
            if self.status is not None:
                self.status = dataclasses.replace(self.status, commissioned=isinstance(event, Commissioned))
        elif isinstance(event, FabricsChanged):
            self._background(self._refresh_status())
        elif isinstance(event, BridgeWarning):
            logger.warning("Matter bridge: %s", event.reason)
        elif isinstance(event, Unknown):
            logger.info("unknown event from the Matter bridge: %s", event.event)
        try:
            self._on_event(event)
        except Exception:
            logger.exception("on_event failed for %s", type(event).__name__)

    def _note_result(self, result: Result) -> None:
        if result.op in STATUS_OPS:
            try:
                self.status = parse_status(result.data)
            except ProtocolError as err:
                logger.warning("bad status in the result of %s: %s", result.op, err)

    def _background(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._aux.add(task)
        task.add_done_callback(self._aux.discard)

    async def _refresh_status(self) -> None:
        try:
            await self.request(status_op())  # the result updates self.status
        except MatterError as err:
            logger.debug("could not refresh the Matter status: %s", err)
