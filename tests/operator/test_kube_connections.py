"""The operator's API client keeps its connections: every call's connection goes back to the pool.

Calls that do not read the response body (create, delete, status patch) used to leave their connection
behind, so the next call opened a new one: in the 100-job scale run TLS handshakes were the operator's
largest CPU cost. Here a local HTTP server counts the connections it accepts."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from kubernetes import client

from qtune.operator.kube import Kube


class _Api(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    connections = 0

    def setup(self) -> None:
        super().setup()
        type(self).connections += 1

    def _answer(self, code: int, body: dict) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        self._answer(201, {"kind": "ConfigMap", "metadata": {"name": "x"}})

    def do_DELETE(self) -> None:  # noqa: N802
        self._answer(200, {"kind": "Status", "status": "Success"})

    def do_PATCH(self) -> None:  # noqa: N802
        self._answer(200, {"status": {}})

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def api_url() -> Iterator[str]:
    _Api.connections = 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Api)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_calls_that_do_not_read_the_answer_reuse_one_connection(api_url: str) -> None:
    configuration = client.Configuration()
    configuration.host = api_url
    kube = Kube(client.ApiClient(configuration), threads=1)

    async def calls() -> None:
        for i in range(10):
            body = {"kind": "Secret", "metadata": {"name": f"s{i}", "namespace": "ns"}}
            assert await kube.ensure(body)
            assert await kube.delete("Secret", "ns", f"s{i}")
            assert await kube.create_pod({"metadata": {"name": f"p{i}", "namespace": "ns"}})
            assert await kube.patch_job_status("ns", "job", {"state": "Running"})

    try:
        asyncio.run(calls())
    finally:
        kube.close()
    assert _Api.connections == 1, f"40 calls opened {_Api.connections} connections"
