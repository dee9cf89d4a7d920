"""A tiny TCP/unix-socket forwarder: carries connections across network namespaces.

A unix socket is a file, so it is reachable from every network namespace that shares the mount
namespace. The real node (``realnode.py``) runs one forwarder on each side of its network
namespace:

* in the host namespace: ``unix:<dir>/apiserver.sock=tcp:127.0.0.1:<apiserver port>``
* in the node namespace: ``tcp:0.0.0.0:<apiserver port>=unix:<dir>/apiserver.sock``

so the kubelet (and pods, through the node's bridge) reach services that listen on the host's
loopback, while no address or link is ever added to the host's namespace.

Usage::

    python netfwd.py LISTEN=CONNECT [LISTEN=CONNECT ...]

with ``LISTEN``/``CONNECT`` each ``tcp:HOST:PORT`` or ``unix:PATH``. A ``--ready FILE`` is
created once every listener is bound.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("qtune.netfwd")

BUFFER = 256 * 1024


def parse_endpoint(spec: str) -> tuple[str, str, int]:
    """``tcp:HOST:PORT`` -> ("tcp", HOST, PORT); ``unix:PATH`` -> ("unix", PATH, 0)."""
    kind, _, rest = spec.partition(":")
    if kind == "unix" and rest:
        return "unix", rest, 0
    if kind == "tcp":
        host, _, port = rest.rpartition(":")
        if host and port.isdigit():
            return "tcp", host, int(port)
    raise ValueError(f"bad endpoint {spec!r} (tcp:HOST:PORT or unix:PATH)")


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(BUFFER):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        pass


async def _connect(target: tuple[str, str, int]) -> tuple[asyncio.StreamReader,
                                                          asyncio.StreamWriter]:
    kind, addr, port = target
    if kind == "unix":
        return await asyncio.open_unix_connection(addr)
    return await asyncio.open_connection(addr, port)


def _handler(target: tuple[str, str, int]):  # noqa: ANN202 - asyncio callback
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await _connect(target)
        except OSError as e:
            log.warning("cannot connect to %s: %s", target, e)
            writer.close()
            return
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                with contextlib.suppress(Exception):
                    w.close()

    return handle


async def serve(pairs: list[tuple[str, str]], ready: Path | None = None) -> None:
    servers = []
    for listen, connect in pairs:
        kind, addr, port = parse_endpoint(listen)
        handle = _handler(parse_endpoint(connect))
        if kind == "unix":
            with contextlib.suppress(FileNotFoundError):
                os.unlink(addr)
            servers.append(await asyncio.start_unix_server(handle, addr))
        else:
            servers.append(await asyncio.start_server(handle, addr, port, reuse_address=True))
        log.info("forwarding %s -> %s", listen, connect)
    if ready:
        ready.write_text(str(os.getpid()))
    await asyncio.gather(*(s.serve_forever() for s in servers))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("pairs", nargs="+", metavar="LISTEN=CONNECT")
    p.add_argument("--ready", type=Path, help="file to create once listening")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    pairs = []
    for spec in args.pairs:
        listen, sep, connect = spec.partition("=")
        if not sep:
            p.error(f"expected LISTEN=CONNECT, got {spec!r}")
        parse_endpoint(listen)
        parse_endpoint(connect)
        pairs.append((listen, connect))
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(pairs, args.ready))
    return 0


if __name__ == "__main__":
    sys.exit(main())
