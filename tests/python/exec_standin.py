#!/usr/bin/env python3
"""exec_standin.py: a STAND-IN for the Kubernetes API server's exec, attach and
port-forward endpoints (not a real API server, no kubelet, no containers).

Why: the tests' kube-apiserver has no kubelet, so nothing behind it speaks the
remote-command protocols. This process does, so a real kubectl (directly, or
through `stepmesh gateway serve`) can run `exec`/`attach`/`port-forward`
against it and the test can check every byte that comes back.

Usage:  python3 exec_standin.py CERT.pem KEY.pem [PORT]
        prints `PORT <n>` on stdout once listening on 127.0.0.1 (TLS 1.3,
        ALPN http/1.1); logs one JSON line per request and per session on
        stderr (token values are never logged, only a sha256 prefix).

HTTP (Python 3.11 stdlib only, one thread per connection, keep-alive):
  GET /version, /api, /apis, /api/v1        discovery kubectl may ask for
  GET /api/v1/namespaces/NS/pods/NAME       a Running pod, one container `app`
  GET|POST .../pods/NAME/exec|attach        upgrade (below)
  GET|POST .../pods/NAME/portforward        upgrade (below)
  anything else: a Kubernetes Status (404); no bearer token: 401.

Upgrades:
  WebSocket (RFC 6455), subprotocol v5.channel.k8s.io (preferred) or
    v4.channel.k8s.io: binary messages, first byte the channel (0 stdin,
    1 stdout, 2 stderr, 3 status, 4 resize; 255 = close of the channel in the
    next byte, v5). Fragmentation, masking, ping/pong, close handled.
  SPDY/3.1 with X-Stream-Protocol-Version v4.channel.k8s.io: streams opened by
    the client with a `streamtype` header (error, stdin, stdout, stderr,
    resize); headers zlib-compressed with the SPDY/3 dictionary.
  Port-forward: SPDY/3.1 with `portforward.k8s.io`, or that same SPDY byte
    stream tunnelled in WebSocket binary messages (subprotocol
    `SPDY/3.1+portforward.k8s.io`, kubectl >= 1.31). Every port echoes.

Commands (exec `command=` values; attach behaves as `cat`):
  cat            stdout = stdin, byte for byte
  sha256sum      after stdin ends: "<hex>  -\\n"
  wc -c          after stdin ends: "<count>\\n"
  echo ARGS...   "ARGS\\n" at once, stdin ignored
  false          exit code 1 (a NonZeroExitCode Status)
  other          "stand-in: unknown command" on stderr, exit code 127
When stdin ends (v5 close signal, SPDY FIN) the Status goes on the status
channel ({"metadata":{},"status":"Success"} or Failure with the exit code),
then WebSocket sends close 1000 and waits for the client's close; SPDY FINs
every stream and waits for kubectl to reset them and close (GOAWAY, EOF).

Files: this one (HTTP, routes, WebSocket), exec_standin_spdy.py (SPDY/3.1),
exec_standin_command.py (commands, Status, log lines).
"""

import base64
import hashlib
import json
import socket
import ssl
import struct
import sys
import threading
import time
from urllib.parse import parse_qs, urlsplit

from exec_standin_command import Command, ProtocolError, command_of, log, status_for
from exec_standin_spdy import SocketIO, SpdySession, WsTunnel

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_MESSAGE = 64 << 20  # one WebSocket message; more is refused
IDLE_TIMEOUT = 120.0


# ---------------------------------------------------------------- HTTP

class Request:
    def __init__(self, method, target, headers):
        self.method, self.target, self.headers = method, target, headers
        parts = urlsplit(target)
        self.path = parts.path
        self.query = parse_qs(parts.query, keep_blank_values=True)

    def header(self, name):
        values = self.headers.get(name.lower())
        return values[0] if values else ""

    def header_list(self, name):
        """Comma-separated values across repeated header lines."""
        out = []
        for v in self.headers.get(name.lower(), []):
            out += [p.strip() for p in v.split(",") if p.strip()]
        return out

    def flag(self, name):
        return self.query.get(name, ["false"])[-1].lower() in ("1", "true")


def read_request(rf):
    line = rf.readline(65536)
    if not line:
        return None
    parts = line.decode("latin-1").rstrip("\r\n").split(" ")
    if len(parts) != 3:
        raise ValueError(f"bad request line {line[:80]!r}")
    headers = {}
    while True:
        h = rf.readline(65536).decode("latin-1").rstrip("\r\n")
        if not h:
            break
        name, _, value = h.partition(":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    req = Request(parts[0], parts[1], headers)
    length = int(req.header("content-length") or 0)
    if length:
        rf.read(length)  # no endpoint here takes a body
    if "chunked" in req.header("transfer-encoding").lower():
        while True:
            size = int(rf.readline(1024).split(b";")[0], 16)
            rf.read(size + 2)
            if size == 0:
                break
    return req


def respond(sock, code, reason, body, ctype="application/json", extra=()):
    data = json.dumps(body).encode() if not isinstance(body, bytes) else body
    head = [f"HTTP/1.1 {code} {reason}", f"Content-Type: {ctype}",
            f"Content-Length: {len(data)}", *extra]
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + data)


def status_body(code, reason, message):
    return {"kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": message, "reason": reason, "code": code}


def pod(ns, name):
    return {
        "kind": "Pod", "apiVersion": "v1",
        "metadata": {"name": name, "namespace": ns, "uid": "00000000-0000-0000-0000-0000000000e5",
                     "resourceVersion": "1", "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"containers": [{"name": "app", "image": "stand-in"}], "nodeName": "stand-in"},
        "status": {"phase": "Running",
                   "conditions": [{"type": "Ready", "status": "True"}],
                   "containerStatuses": [{"name": "app", "ready": True, "restartCount": 0,
                                          "image": "stand-in", "imageID": "", "started": True,
                                          "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}}}]},
    }


def discovery(path, port):
    if path == "/version":
        return {"major": "1", "minor": "36", "gitVersion": "v1.36.0-exec-standin",
                "platform": "linux/amd64"}
    if path == "/api":
        return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [
            {"clientCIDR": "0.0.0.0/0", "serverAddress": f"127.0.0.1:{port}"}]}
    if path == "/apis":
        return {"kind": "APIGroupList", "apiVersion": "v1", "groups": []}
    if path == "/api/v1":
        res = [{"name": "pods", "singularName": "pod", "namespaced": True, "kind": "Pod",
                "verbs": ["get", "list"], "shortNames": ["po"]}]
        res += [{"name": f"pods/{s}", "singularName": "", "namespaced": True,
                 "kind": kind, "verbs": ["create", "get"]}
                for s, kind in (("exec", "PodExecOptions"), ("attach", "PodAttachOptions"),
                                ("portforward", "PodPortForwardOptions"))]
        return {"kind": "APIResourceList", "groupVersion": "v1", "resources": res}
    return None


def serve_connection(raw, ctx, port):
    try:
        sock = ctx.wrap_socket(raw, server_side=True)
    except (ssl.SSLError, OSError) as e:
        log("tls_error", error=str(e))
        raw.close()
        return
    sock.settimeout(IDLE_TIMEOUT)
    rf = sock.makefile("rb")
    try:
        while True:
            req = read_request(rf)
            if req is None or not route(req, sock, rf, port):
                break
    except ValueError as e:  # a malformed request line, length or chunk size
        log("bad_request", error=str(e))
        try:
            respond(sock, 400, "Bad Request", status_body(400, "BadRequest", f"stand-in: {e}"))
        except OSError:
            pass
    except (OSError, ConnectionError) as e:
        log("connection_error", error=f"{type(e).__name__}: {e}")
    finally:
        try:
            sock.close()
        except OSError:
            pass


def token_fingerprint(req):
    auth = req.header("authorization")
    if not auth.lower().startswith("bearer ") or not auth[7:].strip():
        return None
    return "sha256:" + hashlib.sha256(auth[7:].strip().encode()).hexdigest()[:16]


def route(req, sock, rf, port):
    """Answers one request; False when the connection is done (upgraded or closed)."""
    token = token_fingerprint(req)
    log("request", method=req.method, path=req.path, query=req.query, token=token,
        upgrade=req.header("upgrade"), protocols=req.header_list("sec-websocket-protocol")
        + req.header_list("x-stream-protocol-version"),
        impersonate={k: v for k, v in req.headers.items() if k.startswith("impersonate-")},
        user_agent=req.header("user-agent"))
    if token is None:
        respond(sock, 401, "Unauthorized", status_body(401, "Unauthorized", "stand-in: no bearer token"))
        return True
    seg = req.path.strip("/").split("/")
    body = discovery(req.path, port) if req.method == "GET" else None
    if body is not None:
        respond(sock, 200, "OK", body)
        return True
    if len(seg) >= 6 and seg[:3] == ["api", "v1", "namespaces"] and seg[4] == "pods":
        ns, name, sub = seg[3], seg[5], (seg[6] if len(seg) == 7 else "")
        if sub == "" and len(seg) == 6 and req.method == "GET":
            respond(sock, 200, "OK", pod(ns, name))
            return True
        if sub in ("exec", "attach", "portforward") and req.method in ("GET", "POST"):
            return upgrade(req, sock, rf, sub)
    respond(sock, 404, "Not Found", status_body(404, "NotFound", f"stand-in: no route for {req.method} {req.path}"))
    return True


def upgrade(req, sock, rf, sub):
    kind = req.header("upgrade").lower()
    if kind == "websocket":
        wanted = ["SPDY/3.1+portforward.k8s.io"] if sub == "portforward" else ["v5.channel.k8s.io", "v4.channel.k8s.io"]
        offered = req.header_list("sec-websocket-protocol")
        chosen = next((p for p in wanted if p in offered), None)
        key = req.header("sec-websocket-key")
        if chosen is None or not key or req.method != "GET":
            msg = f"stand-in: no supported WebSocket subprotocol in {offered} (want one of {wanted}, GET)"
            respond(sock, 400, "Bad Request", status_body(400, "BadRequest", msg))
            return True
        accept = base64.b64encode(hashlib.sha1(key.encode() + WS_GUID).digest()).decode()
        sock.sendall(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      f"Sec-WebSocket-Accept: {accept}\r\nSec-WebSocket-Protocol: {chosen}\r\n\r\n").encode())
        ws = WebSocket(rf, sock)
        if sub == "portforward":
            SpdySession(WsTunnel(ws), sock, req, "portforward", chosen).run()
            try:
                ws.close(1000)
            except OSError:
                pass  # kubectl went away first: the usual end of a port-forward
        else:
            ws_exec(ws, req, chosen, sub)
        return False
    if kind == "spdy/3.1":
        wanted = "portforward.k8s.io" if sub == "portforward" else "v4.channel.k8s.io"
        offered = req.header_list("x-stream-protocol-version")
        if wanted not in offered:
            msg = f"stand-in: X-Stream-Protocol-Version {offered} has no {wanted}"
            respond(sock, 403, "Forbidden", status_body(403, "Forbidden", msg))
            return True
        sock.sendall(("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n"
                      f"X-Stream-Protocol-Version: {wanted}\r\n\r\n").encode())
        SpdySession(SocketIO(rf, sock), sock, req, sub, wanted).run()
        return False
    respond(sock, 400, "Bad Request", status_body(400, "BadRequest", f"stand-in: {sub} needs an upgrade (websocket or SPDY/3.1), got {kind!r}"))
    return True



# ---------------------------------------------------------------- WebSocket

def unmask(data, mask):
    if not data:
        return data
    n = len(data)
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")



class WebSocket:
    """Server side of RFC 6455 over a blocking TLS socket (one thread)."""

    def __init__(self, rf, sock):
        self.rf, self.sock = rf, sock
        self.closed_by_peer = None  # close code the client sent
        self.close_sent = False
        self.pings = 0  # answered with a pong

    def _read(self, n):
        data = self.rf.read(n)
        if len(data) != n:
            raise ConnectionError("connection closed mid-frame")
        return data

    def recv(self):
        """The next data message as (opcode, payload); None once closed."""
        op, parts, total = None, [], 0
        while True:
            b0, b1 = self._read(2)
            fin, rsv, opcode = b0 & 0x80, b0 & 0x70, b0 & 0x0F
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._read(8))[0]
            if rsv or not b1 & 0x80:
                raise ProtocolError("reserved bits set or unmasked client frame")
            mask = self._read(4)
            if opcode >= 8:
                if not fin or n > 125:
                    raise ProtocolError("fragmented or long control frame")
                payload = unmask(self._read(n), mask)
                if opcode == 9:
                    self.pings += 1
                    self.send(10, payload)
                elif opcode == 8:
                    self.closed_by_peer = struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else 1005
                    if not self.close_sent:
                        self.close(1000)
                    return None
                continue
            if (opcode == 0) == (op is None):
                raise ProtocolError(f"unexpected opcode {opcode} (continuation state {op})")
            total += n
            if total > MAX_MESSAGE:
                raise ProtocolError(f"message over {MAX_MESSAGE} bytes")
            op = op if opcode == 0 else opcode
            parts.append(unmask(self._read(n), mask))
            if fin:
                return op, b"".join(parts)

    def send(self, opcode, payload):
        n = len(payload)
        if n < 126:
            head = struct.pack(">BB", 0x80 | opcode, n)
        elif n < 65536:
            head = struct.pack(">BBH", 0x80 | opcode, 126, n)
        else:
            head = struct.pack(">BBQ", 0x80 | opcode, 127, n)
        self.sock.sendall(head + payload)

    def close(self, code, reason=b""):
        if not self.close_sent:
            self.close_sent = True
            self.send(8, struct.pack(">H", code) + reason[:120])

    def drain(self, seconds=10.0):
        """After our close frame: read until the client's close or EOF."""
        self.sock.settimeout(seconds)
        try:
            while self.closed_by_peer is None and self.recv() is not None:
                pass
        except (OSError, ConnectionError, ProtocolError):
            pass


def ws_exec(ws, req, proto, sub):
    cmd = Command(command_of(req, sub))
    started, out_bytes, resizes = time.monotonic(), 0, 0
    stdin_open = req.flag("stdin") and cmd.wants_stdin

    def out(channel, data):
        nonlocal out_bytes
        if data:
            out_bytes += len(data) if channel == 1 else 0
            ws.send(2, bytes([channel]) + data)

    try:
        while stdin_open:
            msg = ws.recv()
            if msg is None:
                break
            op, data = msg
            if op != 2:
                raise ProtocolError(f"opcode {op}: remote command messages are binary")
            if not data:
                continue
            channel, body = data[0], data[1:]
            if channel == 0:
                out(1, cmd.feed(body))
            elif channel == 4:
                resizes += 1
            elif channel == 255 and body[:1] == b"\x00":
                stdin_open = False
            elif channel != 255:
                log("ws_unexpected_channel", channel=channel, bytes=len(body))
        if ws.closed_by_peer is None:
            stdout, stderr, code = cmd.finish()
            out(1, stdout)
            out(2, stderr)
            ws.send(2, b"\x03" + json.dumps(status_for(code, cmd.argv)).encode())
            ws.close(1000)
            ws.drain()
        log("session", transport="websocket", protocol=proto, subresource=sub, stdout_bytes=out_bytes,
            resizes=resizes, pings=ws.pings, peer_close=ws.closed_by_peer, ms=round((time.monotonic() - started) * 1000),
            **cmd.summary())
    except ProtocolError as e:
        log("ws_protocol_error", error=str(e))
        ws.close(1002, str(e).encode())


def main():
    if len(sys.argv) not in (3, 4):
        sys.stderr.write("usage: exec_standin.py CERT.pem KEY.pem [PORT]\n")
        sys.exit(2)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(sys.argv[1], sys.argv[2])
    ctx.set_alpn_protocols(["http/1.1"])
    listener = socket.create_server(("127.0.0.1", int(sys.argv[3]) if len(sys.argv) == 4 else 0))
    port = listener.getsockname()[1]
    print(f"PORT {port}", flush=True)
    log("listening", port=port)
    while True:
        raw, _ = listener.accept()
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=serve_connection, args=(raw, ctx, port), daemon=True).start()


if __name__ == "__main__":
    main()
