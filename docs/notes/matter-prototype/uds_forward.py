"""Forward a Unix socket to a TCP port, to reach a server inside another network namespace.

Unix sockets live in the file system, not in a network namespace: run this inside the namespace
(`ip netns exec ores-b python3 uds_forward.py /run/x.sock ::1 5580`) and connect from anywhere through
the socket path (aiohttp.UnixConnector).  Stdlib only.
"""

import asyncio
import contextlib
import os
import sys


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def main(path: str, host: str, port: int) -> None:
    async def handle(r1: asyncio.StreamReader, w1: asyncio.StreamWriter) -> None:
        try:
            r2, w2 = await asyncio.open_connection(host, port)
        except OSError:
            w1.close()
            return
        await asyncio.gather(pipe(r1, w2), pipe(r2, w1))

    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    server = await asyncio.start_unix_server(handle, path)
    print("listening", path, flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
