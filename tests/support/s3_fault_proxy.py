"""A fault-injecting HTTP proxy in front of an S3 server (or any HTTP server, e.g. `mlflow server`),
for tests of retries and error reporting.

    proxy = FaultProxy("http://127.0.0.1:5000", seed=1, slowdown=0.2, drop=0.1, cut=0.1).start()
    ... point clients at proxy.endpoint (boto3, pyarrow, Ray workers: AWS_ENDPOINT_URL_S3) ...
    proxy.injected("slowdown"), proxy.injected("drop", client="pyarrow")
    proxy.down = True    # every request fails from now on
    proxy.stop()

It listens on 127.0.0.1 (a thread of the test process) and relays each request to the upstream
server, except that a seeded random draw makes a share of them fail the way a real endpoint does:

- `slowdown`: HTTP 503 with S3's `SlowDown` error body (the request never reaches the server);
- `drop`: the connection closes without a response (the request never reaches the server);
- `cut`: the request is relayed, then the connection closes halfway through the response body
  (a response without a body is dropped whole instead, and counted as a `drop`).

A request (method, path without the query, Range) that draws a fault fails `burst` times in a row, then goes through:
transient faults that need `burst + 1` attempts. Whether it draws one depends only on the seed, the
request and how many times it was seen before, not on the order in which threads send requests: a
run that makes the same requests meets the same faults. With `down` set, every request fails with
a 503 or a drop. `refuse`, a predicate of (method, path with query), picks requests that are always
answered 503 and never relayed, e.g. only MLflow's read of one alias:

    proxy.refuse = lambda method, path: method == "GET" and "alias=champion" in path
"""

from __future__ import annotations

import http.client
import random
import sys
import threading
from collections import Counter
from typing import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade", "expect"}
SLOWDOWN_BODY = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
                 b"<Message>Please reduce your request rate.</Message><RequestId>fault-proxy</RequestId></Error>")
REFUSED_BODY = b'{"error_code": "TEMPORARILY_UNAVAILABLE", "message": "refused by the fault proxy"}'
FAULTS = ("slowdown", "drop", "cut")


def client_of(user_agent: str) -> str:
    """`pyarrow` for the AWS C++ SDK (pyarrow's S3FileSystem), `boto3` for botocore clients."""
    agent = user_agent.lower()
    return "pyarrow" if "aws-sdk-cpp" in agent else "boto3" if "botocore" in agent else "other"


class FaultProxy:
    def __init__(self, upstream: str, seed: int = 0, slowdown: float = 0.0, drop: float = 0.0, cut: float = 0.0,
                 burst: int = 1):
        if slowdown + drop + cut > 1:
            raise ValueError("fault probabilities add up to more than 1")
        location = urlsplit(upstream)
        self.upstream = (location.hostname, location.port)
        self.rates = {"slowdown": slowdown, "drop": drop, "cut": cut}
        self.burst = burst
        self.down = False
        self.refuse: Callable[[str, str], bool] = lambda method, path: False
        # picks requests that reach the server but whose answer is lost (the connection closes)
        self.lose_answer: Callable[[str, str], bool] = lambda method, path: False
        self.seed = seed
        self.counts: Counter[tuple[str, str]] = Counter()  # (client, "forwarded" or a fault) -> requests
        self._seen: Counter[tuple[str, str, str]] = Counter()
        self._streaks: Counter[tuple[str, str, str]] = Counter()  # faults so far in a request's burst
        self._lock = threading.Lock()
        self._server = _QuietServer(("127.0.0.1", 0), _handler_for(self))
        self._thread = threading.Thread(target=self._server.serve_forever, name="s3-fault-proxy", daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def injected(self, fault: str, client: str | None = None) -> int:
        """How many `fault`s were served (to `client` only, if given)."""
        return sum(n for (who, what), n in self.counts.items() if what == fault and client in (None, who))

    def summary(self) -> dict[str, int]:
        return {f"{who}:{what}": n for (who, what), n in sorted(self.counts.items())}

    def decide(self, request: tuple[str, str, str]) -> str | None:
        """The fault to inject into `request`, or None to relay it untouched."""
        with self._lock:
            draw = random.Random(f"{self.seed}:{request}:{self._seen[request]}").random()
            self._seen[request] += 1
            if self.down:
                return "slowdown" if draw < 0.5 else "drop"
            if self._streaks[request] == self.burst:  # the burst is over
                del self._streaks[request]
                return None
            total = sum(self.rates.values())
            if not self._streaks[request] and draw >= total:
                return None
            self._streaks[request] += 1
            draw %= total  # which fault, for this attempt of the burst
            for fault in FAULTS[:-1]:
                if draw < self.rates[fault]:
                    return fault
                draw -= self.rates[fault]
            return FAULTS[-1]

    def count(self, client: str, what: str) -> None:
        with self._lock:
            self.counts[client, what] += 1


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        """Clients reset connections (after a fault, or idle keep-alive ones): not worth a traceback."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def _handler_for(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect

        def do_GET(self):
            self.relay()

        do_HEAD = do_PUT = do_POST = do_DELETE = do_GET

        def log_message(self, format, *args):  # quiet: the test's output is the counts
            pass

        def relay(self) -> None:
            body = self.request_body()
            client = client_of(self.headers.get("User-Agent", ""))
            if proxy.refuse(self.command, self.path):
                proxy.count(client, "refused")
                self.respond(503, [("Content-Type", "application/json")], REFUSED_BODY)
                return
            fault = proxy.decide((self.command, urlsplit(self.path).path, self.headers.get("Range", "")))
            if fault == "slowdown":
                proxy.count(client, fault)
                self.respond(503, [("Content-Type", "application/xml")], SLOWDOWN_BODY)
                return
            if fault == "drop":
                proxy.count(client, fault)
                self.close_connection = True
                return
            status, headers, payload = self.forward(body)
            if proxy.lose_answer(self.command, self.path):
                proxy.count(client, "answer lost")
                self.close_connection = True
                return
            if fault == "cut":
                self.close_connection = True
                if self.command == "HEAD" or len(payload) < 2:  # no body to cut: the whole response is lost
                    proxy.count(client, "drop")
                    return
                proxy.count(client, "cut")
                self.respond(status, headers, payload[: len(payload) // 2], length=len(payload))
                return
            proxy.count(client, "forwarded")
            self.respond(status, headers, payload)

        def request_body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                    pass
                return b"".join(chunks)
            return self.rfile.read(int(self.headers.get("Content-Length", 0)))

        def forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
            headers = {name: value for name, value in self.headers.items() if name.lower() not in HOP_BY_HOP}
            headers["Content-Length"] = str(len(body))
            upstream = http.client.HTTPConnection(*proxy.upstream, timeout=60)
            try:
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                payload = response.read()
                kept = [(name, value) for name, value in response.getheaders() if name.lower() not in HOP_BY_HOP]
                return response.status, kept, payload
            finally:
                upstream.close()

        def respond(self, status: int, headers: list[tuple[str, str]], payload: bytes,
                    length: int | None = None) -> None:
            self.send_response_only(status)
            for name, value in headers:
                if name.lower() != "content-length" or self.command == "HEAD":
                    self.send_header(name, value)
            if self.command != "HEAD":
                self.send_header("Content-Length", str(len(payload) if length is None else length))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)
            self.wfile.flush()

    return Handler
