"""Real S3-compatible servers for the tests, on 127.0.0.1 only, and a fault proxy.

- MotoServer: moto's ThreadedMotoServer in a child process.  moto checks SigV4
  only once IAM auth is on, so we create a user with an s3:* policy and an
  access key through its IAM API while auth is off, then switch auth on with
  /moto-api/reset-auth (INITIAL_NO_AUTH_ACTION_COUNT = 0): from then on a wrong
  secret gets a real 403.
- RgwServer: a one-node Ceph cluster (mon + memstore OSD) and radosgw, started
  by .ci/rgw.sh in a temp dir.
- FaultProxy: a small HTTP proxy in front of a server.  It injects what a real
  server cannot be made to do on demand (5xx, resets, hangs, truncated or
  damaged bodies), forwards everything else byte-for-byte (SigV4 signatures
  stay valid: the Host header is passed through) and counts requests.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import socketserver
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field

import boto3
from botocore.config import Config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RGW_SCRIPT = os.path.join(REPO, ".ci", "rgw.sh")
LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for daemons that need one up front)."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


@dataclass
class S3Server:
    """What a test needs to reach a running server."""

    name: str
    endpoint: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"
    info: dict = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        """Standard AWS env vars for a child process (the default credentials chain)."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": self.region,
        }

    def client(self, endpoint: str | None = None):
        """A raw boto3 client, to check what the server itself does."""
        return boto3.client(
            "s3", endpoint_url=endpoint or self.endpoint, region_name=self.region,
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
            config=Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": 1},
                          request_checksum_calculation="when_required",
                          response_checksum_validation="when_required"),
        )


# --- moto -------------------------------------------------------------------------------

_MOTO_CHILD = """
import sys
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()   # until the parent closes our stdin
server.stop()
"""

_S3_ALL = json.dumps(
    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
)


class MotoServer:
    """moto in server mode in a child process, with SigV4 checking switched on."""

    def __init__(self) -> None:
        env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="inf")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _MOTO_CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, env=env, text=True,
        )
        line = self.proc.stdout.readline()
        if not line.strip().isdigit():
            self.stop()
            raise RuntimeError("moto server did not start")
        self.endpoint = f"http://{LOOPBACK}:{int(line)}"
        iam = boto3.client("iam", endpoint_url=self.endpoint, region_name="us-east-1",
                           aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
        iam.create_user(UserName="quiver")
        iam.put_user_policy(UserName="quiver", PolicyName="s3-all", PolicyDocument=_S3_ALL)
        key = iam.create_access_key(UserName="quiver")["AccessKey"]
        # Auth on from now: every request must carry a valid SigV4 signature.
        req = urllib.request.Request(f"{self.endpoint}/moto-api/reset-auth", data=b"0", method="POST",
                                     headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(req, timeout=10).read()
        self.server = S3Server("moto", self.endpoint, key["AccessKeyId"], key["SecretAccessKey"])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# --- Ceph RGW -----------------------------------------------------------------------------


class RgwUnavailable(Exception):
    """radosgw is not installed and could not be installed (the reason says why)."""


def ensure_rgw_installed() -> float:
    """Install radosgw via .ci/rgw.sh if missing; returns seconds spent, or raises RgwUnavailable."""
    if shutil.which("radosgw") and shutil.which("ceph-mon") and shutil.which("ceph-osd"):
        return 0.0
    if os.environ.get("QUIVER_NO_RGW_INSTALL") or os.geteuid() != 0 or not shutil.which("apt-get"):
        raise RgwUnavailable("radosgw is not installed (and not root with apt-get, or QUIVER_NO_RGW_INSTALL set)")
    t0 = time.monotonic()
    r = subprocess.run([RGW_SCRIPT, "install"], capture_output=True, text=True, timeout=600)
    if r.returncode != 0 or not shutil.which("radosgw"):
        raise RgwUnavailable(f"installing radosgw failed (apt unreachable?): {r.stderr.strip()[-300:]}")
    return time.monotonic() - t0


class RgwServer:
    """A one-node Ceph cluster + radosgw in a temp dir, all on 127.0.0.1 (.ci/rgw.sh)."""

    def __init__(self) -> None:
        self.install_s = ensure_rgw_installed()
        self.dir = tempfile.mkdtemp(prefix="quiver-rgw-")
        env = dict(os.environ, RGW_PORT=str(free_port()), MON_PORT=str(free_port()))
        t0 = time.monotonic()
        r = subprocess.run([RGW_SCRIPT, "start", self.dir], capture_output=True, text=True,
                           env=env, timeout=300)
        self.start_s = time.monotonic() - t0
        values = dict(line.split("=", 1) for line in r.stdout.splitlines() if line.startswith("RGW_"))
        if r.returncode != 0 or "RGW_ENDPOINT" not in values:
            with open(os.path.join(self.dir, "start.log"), "w") as f:  # kept for a post-mortem
                f.write(r.stdout + r.stderr)
            self.stop(keep_dir=True)
            raise RuntimeError(f"rgw.sh start failed (log in {self.dir}/start.log): "
                               f"{r.stderr.strip()[-800:]}")
        self.server = S3Server(
            "rgw", values["RGW_ENDPOINT"], values["RGW_ACCESS_KEY"], values["RGW_SECRET_KEY"],
            info={"install_s": self.install_s, "start_s": self.start_s},
        )

    def stop(self, keep_dir: bool = False) -> None:
        subprocess.run([RGW_SCRIPT, "stop", self.dir], capture_output=True, timeout=60)
        if not keep_dir:
            shutil.rmtree(self.dir, ignore_errors=True)


# --- fault proxy ---------------------------------------------------------------------------

ACTIONS = ("status", "reset", "reset_after", "hang", "delay", "truncate", "short", "flip")


@dataclass
class Rule:
    """Apply ``action`` to the next ``times`` requests matching method and path substring."""

    action: str
    method: str | None = None
    path: str | None = None
    times: int = 1
    status: int = 503
    hang_s: float = 5.0

    def matches(self, method: str, path: str) -> bool:
        return (self.method is None or self.method == method) and (self.path is None or self.path in path)


class FaultProxy:
    """HTTP/1.1 proxy on 127.0.0.1 in front of ``upstream`` (host, port), injecting faults."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        assert upstream[0] == LOOPBACK
        self.upstream = upstream
        self.rules: list[Rule] = []
        self.requests: list[tuple[str, str, str]] = []  # (method, path, action or "forward")
        self.lock = threading.Lock()
        proxy = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                proxy._serve(self.connection, self.rfile)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server((LOOPBACK, 0), Handler)
        self.endpoint = f"http://{LOOPBACK}:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def inject(self, action: str, **kw) -> Rule:
        assert action in ACTIONS, action
        rule = Rule(action, **kw)
        with self.lock:
            self.rules.append(rule)
        return rule

    def reset(self) -> None:
        with self.lock:
            self.rules.clear()
            self.requests.clear()

    def count(self, method: str | None = None, path: str | None = None) -> int:
        with self.lock:
            return sum(1 for m, p, _ in self.requests
                       if (method is None or m == method) and (path is None or path in p))

    def methods(self) -> Counter:
        with self.lock:
            return Counter(m for m, _, _ in self.requests)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # -- one client connection: requests in a loop (keep-alive) --
    def _serve(self, sock: socket.socket, rfile) -> None:
        upstream: http.client.HTTPConnection | None = None
        try:
            while True:
                line = rfile.readline(65537)
                if not line.strip():
                    return
                method, path, _ = line.decode("latin-1").split(" ", 2)
                headers: list[tuple[str, str]] = []
                while True:
                    h = rfile.readline(65537).decode("latin-1")
                    if h in ("\r\n", "\n", ""):
                        break
                    name, _, value = h.partition(":")
                    headers.append((name.strip(), value.strip()))
                lower = {n.lower(): v for n, v in headers}
                if lower.get("expect", "").lower() == "100-continue":
                    sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                body = rfile.read(int(lower.get("content-length", 0) or 0))
                rule = self._take_rule(method, path)
                action = rule.action if rule else "forward"
                with self.lock:
                    self.requests.append((method, path, action))
                if action == "reset":
                    return _reset(sock)
                if action == "hang":
                    time.sleep(rule.hang_s)
                    return
                if action == "delay":  # a slow server that answers: hang_s, then the request goes on
                    time.sleep(rule.hang_s)
                if action == "status":
                    _send_error(sock, method, rule.status)
                    continue
                if upstream is None:
                    upstream = http.client.HTTPConnection(*self.upstream, timeout=30)
                upstream.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
                for n, v in headers:
                    if n.lower() not in ("expect", "connection"):
                        upstream.putheader(n, v)
                upstream.endheaders(body if body else None)
                resp = upstream.getresponse()
                data = resp.read()
                if action == "reset_after":  # the server did it; the answer is lost
                    return _reset(sock)
                out_headers = [(n, v) for n, v in resp.getheaders()
                               if n.lower() not in ("transfer-encoding", "connection", "content-length")]
                length = resp.getheader("content-length") if method == "HEAD" else str(len(data))
                head = f"HTTP/1.1 {resp.status} {resp.reason}\r\n"
                head += "".join(f"{n}: {v}\r\n" for n, v in out_headers)
                head += f"Content-Length: {length or 0}\r\n\r\n"
                if action == "truncate" and data:
                    sock.sendall(head.encode("latin-1") + data[: len(data) // 2])
                    return
                if action == "short" and data:  # a short body that *claims* to be whole
                    data = data[: len(data) // 2]
                    head = head.replace(f"Content-Length: {length}\r\n", f"Content-Length: {len(data)}\r\n")
                if action == "flip" and data:
                    data = bytearray(data)
                    data[len(data) // 2] ^= 0x01
                    data = bytes(data)
                sock.sendall(head.encode("latin-1") + (b"" if method == "HEAD" else data))
        except (ConnectionError, OSError, ValueError):
            return
        finally:
            if upstream is not None:
                upstream.close()

    def _take_rule(self, method: str, path: str) -> Rule | None:
        with self.lock:
            for rule in self.rules:
                if rule.times > 0 and rule.matches(method, path):
                    rule.times -= 1
                    return rule
        return None


def _reset(sock: socket.socket) -> None:
    """Close with a TCP RST (SO_LINGER 0): the client sees 'connection reset'."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _send_error(sock: socket.socket, method: str, status: int) -> None:
    reason = http.client.responses.get(status, "Error")
    code = {500: "InternalError", 503: "ServiceUnavailable", 429: "SlowDown", 403: "AccessDenied"}.get(status, "InternalError")
    body = b"" if method == "HEAD" else (
        f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
        f"<Message>injected by FaultProxy</Message></Error>"
    ).encode()
    sock.sendall(
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode() + body
    )
