"""The embedded S3 server's process: moto's WSGI app on loopback, its objects restored at start
from a snapshot file and written back to it atomically (every `--interval` seconds when something
changed, and when SIGTERM or SIGINT stops the process). What a kill can lose: docs/design/s3.md.

    python -m cluster.s3_snapshots --host 127.0.0.1 --port 9000 [--snapshot FILE --interval 30]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import moto
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from moto.s3.models import s3_backends
from werkzeug.serving import make_server

from cluster.s3_server import SNAPSHOT_FORMAT

READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class RequestGate:
    """Requests pass side by side; a snapshot waits until none is inside and holds new ones back
    while it runs, so it sees every request either whole or not at all."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._inside = 0
        self._closed = False
        self.changes = 0  # requests that may have changed something (not GET/HEAD/OPTIONS), ever

    @contextlib.contextmanager
    def request(self, changing: bool) -> Iterator[None]:
        with self._condition:
            self._condition.wait_for(lambda: not self._closed)
            self._inside += 1
            self.changes += changing
        try:
            yield
        finally:
            with self._condition:
                self._inside -= 1
                self._condition.notify_all()

    @contextlib.contextmanager
    def alone(self, reopen: bool = True) -> Iterator[int]:
        """Hold every request back; yields the number of changing requests so far (all of them
        done). Without `reopen` they stay held back: the process is stopping."""
        with self._condition:
            self._condition.wait_for(lambda: not self._closed)
            self._closed = True
            self._condition.wait_for(lambda: self._inside == 0)
        try:
            yield self.changes
        finally:
            if reopen:
                with self._condition:
                    self._closed = False
                    self._condition.notify_all()

    def wrap(self, app):
        """The WSGI app with every request passing through this gate (moto builds each response,
        body included, before the app returns)."""
        def gated(environ, start_response):
            with self.request(environ["REQUEST_METHOD"] not in READ_METHODS):
                return app(environ, start_response)

        return gated


class Snapshots:
    """The snapshot file of moto's S3 state: read once at start, written whole and atomically."""

    def __init__(self, path: Path, gate: RequestGate):
        self.path, self.gate = path, gate
        self.saved_changes = 0

    def restore(self) -> None:
        """Load the snapshot, if any, into moto's S3 backends (before the server answers)."""
        if not self.path.exists():
            return
        header = {}
        try:
            with self.path.open("rb") as file:
                header = pickle.load(file)  # a plain dict: readable whatever moto's classes became
                if header["format"] != SNAPSHOT_FORMAT:
                    raise ValueError(f"snapshot format {header['format']}, expected {SNAPSHOT_FORMAT}")
                backends = pickle.load(file)
        except Exception as error:  # refuse to start empty: the next snapshot would replace the objects
            sys.exit(f"cannot restore the S3 objects from {self.path} (written by moto {header.get('moto', '?')}, "
                     f"this is moto {moto.__version__}): {error!r}; move the file away to start empty")
        s3_backends.clear()
        s3_backends.update(backends)
        vars(s3_backends).update(vars(backends))  # bucket_accounts: which account holds each bucket
        print(f"restored S3 objects from {self.path} (written {time.ctime(header['written'])})", flush=True)

    def save_if_changed(self, final: bool = False) -> None:
        """A snapshot if anything may have changed since the last. `final`: the process is stopping,
        and no request is answered after the snapshot (it would be lost). A failed snapshot is logged
        and tried again next time (the previous one stays whole); the server goes on serving."""
        try:
            self._save_if_changed(final)
        except Exception as error:
            print(f"snapshot to {self.path} failed: {error!r}", file=sys.stderr, flush=True)

    def _save_if_changed(self, final: bool) -> None:
        """Pickle into a temporary file while requests are held back; then fsync it, rename it over
        the snapshot and fsync the directory."""
        started = time.monotonic()
        partial = self.path.with_name(f"{self.path.name}.partial")
        with self.gate.alone(reopen=not final) as changes:
            if changes == self.saved_changes:
                return
            held_since = time.monotonic()
            file = os.fdopen(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb")
            try:
                pickle.dump({"format": SNAPSHOT_FORMAT, "moto": moto.__version__, "written": time.time()}, file)
                pickle.dump(s3_backends, file, protocol=pickle.HIGHEST_PROTOCOL)
                file.flush()
            except BaseException:
                file.close()
                raise
        held_s = time.monotonic() - held_since
        with file:
            os.fsync(file.fileno())
        os.replace(partial, self.path)
        directory = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        self.saved_changes = changes
        print(f"snapshot: {self.path.stat().st_size} bytes written to {self.path} in "
              f"{time.monotonic() - started:.2f} s (requests held back {held_s:.2f} s)", flush=True)


def serve(host: str, port: int, snapshot: Path | None, interval_s: float) -> None:
    """Serve S3 on host:port until SIGTERM or SIGINT; with `snapshot`, restore and keep it."""
    os.environ.setdefault("MOTO_PORT", str(port))  # as moto.server sets it (URLs moto builds itself)
    gate = RequestGate()
    snapshots = Snapshots(snapshot, gate) if snapshot else None
    if snapshots:
        snapshots.restore()
    server = make_server(host, port, gate.wrap(DomainDispatcherApplication(create_backend_app)), threaded=True,
                         request_handler=MotoRequestHandler)
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(f"S3 (moto {moto.__version__}) on http://{host}:{port}"
          + (f", snapshots in {snapshot} every {interval_s:g} s when changed" if snapshots else ", in memory only"),
          flush=True)
    while not stopping.wait(interval_s):
        if snapshots:
            snapshots.save_if_changed()
    server.shutdown()
    if snapshots:
        snapshots.save_if_changed(final=True)  # waits for the requests still inside


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cluster.s3_snapshots", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--snapshot", type=Path, help="the snapshot file (none: objects in memory only)")
    parser.add_argument("--interval", type=float, default=30.0, help="seconds between snapshots (default 30)")
    args = parser.parse_args(argv)
    serve(args.host, args.port, args.snapshot, args.interval)


if __name__ == "__main__":
    main()
