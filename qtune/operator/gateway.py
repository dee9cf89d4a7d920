"""The results gateway: an authenticating front of the Pushgateway (`qtune results-gateway`).

The Pushgateway has no authentication: any pod that reaches it may push, list or delete any tenant's
result group. The gateway is the only address unit pods may reach (the chart's NetworkPolicies), and
it lets through only:

* a unit's push (PUT or POST) of exactly `/metrics/job/qtune_result/job_uid/<uid>/unit/<unit>` (plain
  label values, no other label, no base64 form), with `Authorization: Bearer <attempt>:<token>` where
  token = HMAC(unit secret of (uid, unit, attempt), method, sha256 of the body) (`qtune.wire.push_token`).
  The gateway derives the unit secret from the operator's key (env QTUNE_SIGNING_KEY, the operator's
  Secret) and keeps no state. The body is read within `max_body_bytes` before it is checked. A unit
  never deletes: a leaked token would then only write the same bytes again.
* the operator's DELETE of any group whose first label is `job=qtune_result` (its junk siblings with
  extra labels included), and its listing `GET /api/v1/metrics`, with `Bearer <operator token>`
  (`qtune.wire.gateway_operator_token`, also derived from the operator key);
* `GET /metrics` (Prometheus' scrape, when it scrapes through the gateway) with the reader token
  (env QTUNE_RESULTS_READ_TOKEN, a Secret of its own that Prometheus' scrape config names) or the
  operator token;
* `GET /healthz` (no token).

Everything else is refused (401 without a bearer token, 403 with a wrong one or a path it does not
open, 404 for other endpoints). Answers of reads are streamed within `max_read_bytes`.
"""

from __future__ import annotations

import argparse
import hmac
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from yarl import URL

from qtune import protocol

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 256 * 1024
"""Default cap of a pushed body (a result's metric table is a few KiB)."""
MAX_READ_BYTES = 64 * 1024 * 1024
"""Default cap of a read's answer (the operator's own listing cap, qtune.operator.prom.LISTING_MAX_BYTES)."""
MAX_ATTEMPT = 1_000_000
UNIT_METHODS = ("PUT", "POST")
_PLAIN = re.compile(r"[A-Za-z0-9._~-]{1,253}")
_BASE64 = re.compile(r"[A-Za-z0-9_=-]{1,2048}")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]{0,127}")
_UNIT_TOKEN = re.compile(r"(\d{1,7}):([0-9a-f]{64})")
READ_HEADERS = ("Accept", "Accept-Encoding")
ANSWER_HEADERS = ("Content-Type", "Content-Encoding")


@dataclass(frozen=True)
class GatewayConfig:
    upstream: str
    """The Pushgateway's base URL as the gateway reaches it."""
    signing_key: str
    """The operator's key (unit secrets and the operator token are derived from it)."""
    read_token: str = ""
    """Prometheus' bearer token for GET /metrics ("" = only the operator token reads)."""
    max_body_bytes: int = MAX_BODY_BYTES
    max_read_bytes: int = MAX_READ_BYTES
    timeout: float = 30.0

    def __post_init__(self) -> None:
        if not self.signing_key:
            raise ValueError("the results gateway needs the operator's signing key (env QTUNE_SIGNING_KEY)")
        if not self.upstream:
            raise ValueError("the results gateway needs the Pushgateway's URL (--upstream)")


class Refused(Exception):
    """A request the gateway does not let through: its HTTP status and a short reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


Pair = tuple[str, str, bool]
"""One grouping label of a Pushgateway path: name, value as written, whether in base64 form."""


def split_group_path(raw_path: str) -> list[Pair]:
    """The grouping labels of a raw (still percent-encoded) `/metrics/<name>/<value>/...` path; Refused
    (403) for anything the Pushgateway might read otherwise than it looks: percent escapes, empty
    segments, bad label names, repeated labels, values outside the plain or base64url alphabets."""
    if not raw_path.startswith("/metrics/"):
        raise Refused(404, "not a group path")
    parts = raw_path[len("/metrics/"):].split("/")
    if len(parts) % 2 or len(parts) > 64:
        raise Refused(403, "not a group path: labels and values must pair up")
    pairs: list[Pair] = []
    for name, value in zip(parts[::2], parts[1::2], strict=True):
        encoded = name.endswith("@base64")
        name = name.removesuffix("@base64")
        if not _LABEL.fullmatch(name) or not (_BASE64 if encoded else _PLAIN).fullmatch(value):
            raise Refused(403, "a grouping label or value the gateway does not pass")
        if value in (".", "..") or any(name == seen for seen, _, _ in pairs):
            raise Refused(403, f"grouping label {name} repeated, or a dot segment")
        pairs.append((name, value, encoded))
    return pairs


def unit_group(pairs: list[Pair]) -> tuple[str, str]:
    """(job uid, unit) of a unit's own result group: exactly job=qtune_result, job_uid, unit, plain values."""
    names = [(name, encoded) for name, _, encoded in pairs]
    if names != [("job", False), ("job_uid", False), ("unit", False)] or pairs[0][1] != protocol.PUSH_JOB:
        raise Refused(403, f"a unit may write only /metrics/job/{protocol.PUSH_JOB}/job_uid/<uid>/unit/<unit>")
    return pairs[1][1], pairs[2][1]


def bearer(request: web.Request) -> str:
    """The request's bearer token; Refused (401) without one."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Refused(401, "a bearer token is required")
    return token.strip()


def _same(a: str, b: str) -> bool:
    return bool(a) and bool(b) and hmac.compare_digest(a.encode(), b.encode())


class ResultsGateway:
    """The aiohttp application: authorises each request, then forwards it to the Pushgateway."""

    def __init__(self, config: GatewayConfig, session: aiohttp.ClientSession | None = None) -> None:
        self.config = config
        self.upstream = config.upstream.rstrip("/")
        self.operator_token = protocol.gateway_operator_token(config.signing_key)
        self.session = session
        self.refused: Counter[int] = Counter()
        """HTTP status -> requests refused with it (reported by /healthz)."""
        self.forwarded: Counter[str] = Counter()
        """Method -> writes let through that the Pushgateway accepted (2xx; reported by /healthz): what shows that
        results really come through the gateway."""

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.max_body_bytes)
        app[GATEWAY] = self
        app.cleanup_ctx.append(self._client)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def _client(self, app: web.Application) -> Any:
        own = self.session is None
        if own:
            self.session = aiohttp.ClientSession(auto_decompress=False,
                                                 timeout=aiohttp.ClientTimeout(total=self.config.timeout))
        yield
        if own and self.session is not None:
            await self.session.close()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        try:
            return await self._route(request)
        except Refused as exc:
            self.refused[exc.status] += 1
            logger.debug("refused %s %s from %s: %s", request.method, request.raw_path[:300], request.remote,
                         exc.reason)
            headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
            return web.Response(status=exc.status, text=exc.reason + "\n", headers=headers)
        except (aiohttp.ClientError, TimeoutError) as exc:
            logger.warning("Pushgateway %s: %s", self.upstream, exc)
            return web.Response(status=502, text="the Pushgateway could not be reached\n")

    async def _route(self, request: web.Request) -> web.StreamResponse:
        path, method = request.rel_url.raw_path, request.method
        if path == "/healthz" and method == "GET":
            return web.json_response({"status": "ok", "refused": {str(k): v for k, v in self.refused.items()},
                                      "forwarded": dict(self.forwarded)})
        if path in ("/metrics", "/api/v1/metrics"):
            if method != "GET":
                raise Refused(405, "read-only")
            token = bearer(request)
            readers = (self.operator_token, self.config.read_token) if path == "/metrics" else (self.operator_token,)
            if not any(_same(token, allowed) for allowed in readers):
                raise Refused(403, "this token may not read")
            return await self._stream(request, path)
        if not path.startswith("/metrics/"):
            raise Refused(404, "not an endpoint of the results gateway")
        token = bearer(request)
        pairs = split_group_path(path)
        if _same(token, self.operator_token):
            return await self._operator_write(request, path, pairs)
        return await self._unit_write(request, token, pairs)

    async def _operator_write(self, request: web.Request, path: str, pairs: list[Pair]) -> web.StreamResponse:
        """The operator deletes any result group (whatever other labels a pod pushed it with)."""
        if request.method != "DELETE":
            raise Refused(403, "the operator token only deletes")
        if pairs[0] != ("job", protocol.PUSH_JOB, False):
            raise Refused(403, f"only groups of job {protocol.PUSH_JOB}")
        return await self._forward("DELETE", path, b"", {})

    async def _unit_write(self, request: web.Request, token: str, pairs: list[Pair]) -> web.StreamResponse:
        """A unit pushes its own result group, with the credential only its unit secret makes."""
        if request.method not in UNIT_METHODS:
            raise Refused(403, "a unit may only push (PUT or POST) its result")
        job_uid, unit = unit_group(pairs)
        match = _UNIT_TOKEN.fullmatch(token)
        if match is None or int(match.group(1)) >= MAX_ATTEMPT:
            raise Refused(403, "not a unit credential (Bearer <attempt>:<hex>)")
        body = await self._body(request)
        secret = protocol.derive_unit_secret(self.config.signing_key, job_uid, unit, int(match.group(1)))
        if not _same(match.group(2), protocol.push_token(secret, request.method, body)):
            raise Refused(403, "the credential is not this unit's for this body")
        path = f"/metrics/job/{protocol.PUSH_JOB}/job_uid/{job_uid}/unit/{unit}"
        headers = {k: request.headers[k] for k in ("Content-Type", "Content-Encoding") if k in request.headers}
        return await self._forward(request.method, path, body, headers)

    async def _body(self, request: web.Request) -> bytes:
        limit = self.config.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise Refused(413, f"body over {limit} bytes")
        body = bytearray()
        while chunk := await request.content.read(limit + 1 - len(body)):  # a read may return less: loop to EOF
            body += chunk
            if len(body) > limit:
                raise Refused(413, f"body over {limit} bytes")
        return bytes(body)

    async def _forward(self, method: str, path: str, body: bytes, headers: dict[str, str]) -> web.Response:
        assert self.session is not None
        url = URL(self.upstream + path, encoded=True)
        async with self.session.request(method, url, data=body or None, headers=headers) as answer:
            text = await answer.content.read(64 * 1024)
            if answer.status < 300:
                self.forwarded[method] += 1
            return web.Response(status=answer.status, body=text,
                                headers={k: answer.headers[k] for k in ANSWER_HEADERS if k in answer.headers})

    async def _stream(self, request: web.Request, path: str) -> web.StreamResponse:
        """The Pushgateway's answer passed on as it comes, cut (the connection dropped) past max_read_bytes."""
        assert self.session is not None
        limit = self.config.max_read_bytes
        headers = {k: request.headers[k] for k in READ_HEADERS if k in request.headers}
        async with self.session.get(URL(self.upstream + path, encoded=True), headers=headers) as answer:
            if answer.content_length is not None and answer.content_length > limit:
                logger.warning("GET %s: answer of %d bytes over the cap %d", path, answer.content_length, limit)
                return web.Response(status=502, text="the Pushgateway's answer is too large\n")
            response = web.StreamResponse(status=answer.status, headers={
                k: answer.headers[k] for k in ANSWER_HEADERS if k in answer.headers})
            await response.prepare(request)
            sent = 0
            async for chunk in answer.content.iter_chunked(64 * 1024):
                sent += len(chunk)
                if sent > limit:
                    logger.warning("GET %s: answer over the cap of %d bytes, cut", path, limit)
                    if request.transport is not None:
                        request.transport.close()
                    return response
                await response.write(chunk)
            await response.write_eof()
            return response


GATEWAY = web.AppKey("qtune_results_gateway", ResultsGateway)
"""The gateway of an app built by ResultsGateway.app()."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qtune results-gateway", description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", default=os.environ.get("QTUNE_RESULTS_GATEWAY_UPSTREAM", ""),
                        help="the Pushgateway's URL (env QTUNE_RESULTS_GATEWAY_UPSTREAM)")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on")
    parser.add_argument("--port", type=int, default=9091, help="port to listen on")
    parser.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES, help="cap of a pushed body")
    parser.add_argument("--max-read-bytes", type=int, default=MAX_READ_BYTES, help="cap of a read's answer")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds a Pushgateway request may take")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the gateway. Secrets come from the environment only (never flags, which the process list shows):
    QTUNE_SIGNING_KEY (the operator's key) and QTUNE_RESULTS_READ_TOKEN (Prometheus' token, optional)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=os.environ.get("QTUNE_LOG_LEVEL", "INFO").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = GatewayConfig(upstream=args.upstream, signing_key=os.environ.get("QTUNE_SIGNING_KEY", ""),
                           read_token=os.environ.get("QTUNE_RESULTS_READ_TOKEN", ""),
                           max_body_bytes=args.max_body_bytes, max_read_bytes=args.max_read_bytes,
                           timeout=args.timeout)
    logger.info("results gateway on %s:%d in front of %s", args.host, args.port, config.upstream)
    web.run_app(ResultsGateway(config).app(), host=args.host, port=args.port, print=None,
                access_log=None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
