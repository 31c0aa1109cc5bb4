"""A cloud instance metadata service on loopback, for ``byol-ray spot-watch``: plain HTTP, the real paths.

AWS IMDSv2: ``PUT /latest/api/token`` (with ``X-aws-ec2-metadata-token-ttl-seconds``) hands out a token that
every ``GET`` must carry as ``X-aws-ec2-metadata-token`` (401 otherwise, as EC2 answers);
``/latest/meta-data/spot/instance-action`` and ``/latest/meta-data/events/recommendations/rebalance`` are 404
until set. GCP: ``/computeMetadata/v1/instance/preempted`` needs ``Metadata-Flavor: Google`` (403 otherwise).

A test sets what the service says (``.instance_action``, ``.rebalance``, ``.preempted``: a body, or None for
404) and can make it fail (``.status`` for every GET) or stop answering (``close()``).
"""
from __future__ import annotations

import secrets
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeMetadata:
    def __init__(self) -> None:
        self.instance_action: str | None = None
        self.rebalance: str | None = None
        self.preempted: str = "FALSE"
        self.status: int | None = None  # answer every GET with this status instead
        self.tokens: set[str] = set()
        self.requests: list[tuple[str, str]] = []
        service = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def _answer(self, status: int, body: str = "", headers: dict | None = None) -> None:
                data = body.encode()
                self.send_response(status)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_PUT(self) -> None:
                service.requests.append(("PUT", self.path))
                if self.path != "/latest/api/token" or not self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                    self._answer(400)
                    return
                token = secrets.token_urlsafe(16)
                service.tokens.add(token)
                self._answer(200, token)

            def do_GET(self) -> None:
                service.requests.append(("GET", self.path))
                if service.status is not None:
                    self._answer(service.status, "oops")
                    return
                if self.path.startswith("/latest/"):
                    if self.headers.get("X-aws-ec2-metadata-token") not in service.tokens:
                        self._answer(401)
                        return
                    body = {"/latest/meta-data/spot/instance-action": service.instance_action,
                            "/latest/meta-data/events/recommendations/rebalance": service.rebalance}.get(self.path)
                    self._answer(404) if body is None else self._answer(200, body, {"Content-Type": "text/plain"})
                elif self.path == "/computeMetadata/v1/instance/preempted":
                    if self.headers.get("Metadata-Flavor") != "Google":
                        self._answer(403)
                        return
                    self._answer(200, service.preempted, {"Metadata-Flavor": "Google"})
                else:
                    self._answer(404)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def gets(self, path: str) -> int:
        return sum(1 for method, p in self.requests if method == "GET" and p == path)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
