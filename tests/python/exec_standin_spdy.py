"""SPDY/3.1 server side of tests/python/exec_standin.py (a stand-in, see there):
exec/attach with the v4.channel.k8s.io stream protocol, and port-forward
(portforward.k8s.io), on the TLS socket or tunnelled in WebSocket messages.

Flow control: spdystream (kubectl's SPDY library) never sends WINDOW_UPDATE
and ignores the ones it gets, so this side does not limit what it sends; it
still grants WINDOW_UPDATEs (stream and session) for the stdin it consumes.
"""

import json
import struct
import time
import zlib

from exec_standin_command import Command, ProtocolError, command_of, log, status_for

MAX_FRAME = 64 << 20  # more is refused

# The SPDY/3 header dictionary (draft 3, section 2.6.10.1): length-prefixed
# words, then a raw tail. Checked by length and adler32 at import.
_WORDS = (
    "options head post put delete trace accept accept-charset accept-encoding "
    "accept-language accept-ranges age allow authorization cache-control "
    "connection content-base content-encoding content-language content-length "
    "content-location content-md5 content-range content-type date etag expect "
    "expires from host if-match if-modified-since if-none-match if-range "
    "if-unmodified-since last-modified location max-forwards pragma "
    "proxy-authenticate proxy-authorization range referer retry-after server te "
    "trailer transfer-encoding upgrade user-agent vary via warning "
    "www-authenticate method get status 200_OK version HTTP/1.1 url public "
    "set-cookie keep-alive origin"
).split()
_TAIL = (
    "100101201202205206300302303304305306307402405406407408409410411412413414"
    "415416417502504505203 Non-Authoritative Information204 No Content301 "
    "Moved Permanently400 Bad Request401 Unauthorized403 Forbidden404 Not "
    "Found500 Internal Server Error501 Not Implemented503 Service Unavailable"
    "Jan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 Mon, Tue, Wed, "
    "Thu, Fri, Sat, Sun, GMTchunked,text/html,image/png,image/jpg,image/gif,"
    "application/xml,application/xhtml+xml,text/plain,text/javascript,"
    "publicprivatemax-age=gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,"
    "utf-,*,enq=0."
)
SPDY_DICT = b"".join(
    struct.pack(">I", len(w)) + w.replace("_", " ").encode() for w in _WORDS
) + _TAIL.encode()
assert len(SPDY_DICT) == 1423 and zlib.adler32(SPDY_DICT) == 0xE3C6A7C2

SYN_STREAM, SYN_REPLY, RST_STREAM, SETTINGS = 1, 2, 3, 4
PING, GOAWAY, HEADERS, WINDOW_UPDATE = 6, 7, 8, 9
FLAG_FIN = 0x01
WINDOW_GRANT = 32 << 10  # grant stdin window back once this much is consumed


class SocketIO:
    """SPDY byte stream straight on the TLS socket."""

    def __init__(self, rf, sock):
        self.rf, self.sock = rf, sock

    def read(self, n):
        return self.rf.read(n)

    def write(self, data):
        self.sock.sendall(data)


class WsTunnel:
    """SPDY byte stream carried in WebSocket binary messages (port-forward tunnel)."""

    def __init__(self, ws):
        self.ws, self.buf = ws, bytearray()

    def read(self, n):
        while len(self.buf) < n:
            msg = self.ws.recv()
            if msg is None:
                break
            self.buf += msg[1]
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def write(self, data):
        self.ws.send(2, data)


class SpdySession:
    """Server side of one SPDY/3.1 connection: exec/attach (v4) or port-forward."""

    def __init__(self, io, sock, req, sub, protocol):
        self.io, self.sock, self.req, self.sub, self.protocol = io, sock, req, sub, protocol
        self.inflate = zlib.decompressobj(zdict=SPDY_DICT)
        self.deflate = zlib.compressobj(9, zlib.DEFLATED, 15, 9, zlib.Z_DEFAULT_STRATEGY, SPDY_DICT)
        self.streams = {}  # id -> headers dict (lower-case names)
        self.by_type = {}  # exec: streamtype -> id
        self.ungranted = {}  # id -> consumed bytes not yet granted back
        self.cmd = Command(command_of(req, sub)) if sub != "portforward" else None
        self.done = False
        self.counts = {"stdout_bytes": 0, "frames_in": 0, "pings": 0, "window_updates_in": 0,
                       "resets_in": 0, "goaway": False, "echoed": 0,
                       "window_updates_out": 0}

    # framing
    def _read(self, n):
        data = self.io.read(n)
        if len(data) != n:
            raise ConnectionError("EOF")
        return data

    def control(self, ftype, flags, payload):
        self.io.write(struct.pack(">HHI", 0x8003, ftype, (flags << 24) | len(payload)) + payload)

    def data(self, sid, payload, fin=False):
        self.io.write(struct.pack(">II", sid, ((FLAG_FIN if fin else 0) << 24) | len(payload)) + payload)

    def headers_block(self, headers):
        raw = struct.pack(">I", len(headers))
        for k, v in headers.items():
            raw += struct.pack(">I", len(k)) + k.encode() + struct.pack(">I", len(v)) + v.encode()
        return self.deflate.compress(raw) + self.deflate.flush(zlib.Z_SYNC_FLUSH)

    def parse_headers(self, block):
        raw = self.inflate.decompress(block)
        (count,), pos, out = struct.unpack_from(">I", raw), 4, {}
        for _ in range(count):
            (n,) = struct.unpack_from(">I", raw, pos)
            name = raw[pos + 4:pos + 4 + n].decode()
            pos += 4 + n
            (n,) = struct.unpack_from(">I", raw, pos)
            out[name] = raw[pos + 4:pos + 4 + n].decode()
            pos += 4 + n
        return out

    def run(self):
        started = time.monotonic()
        try:
            self.maybe_finish()
            while True:
                w0, w1 = struct.unpack(">II", self._read(8))
                flags, length = w1 >> 24, w1 & 0xFFFFFF
                if length > MAX_FRAME:
                    raise ProtocolError(f"frame of {length} bytes")
                payload = self._read(length)
                self.counts["frames_in"] += 1
                if w0 & 0x80000000:
                    self.on_control((w0 >> 16) & 0x7FFF, w0 & 0xFFFF, flags, payload)
                else:
                    self.on_data(w0 & 0x7FFFFFFF, flags, payload)
        except (ConnectionError, OSError):
            pass  # the client closed: normal end after it read everything
        except (ProtocolError, zlib.error, struct.error, UnicodeDecodeError) as e:
            log("spdy_protocol_error", error=f"{type(e).__name__}: {e}")
            self.control(GOAWAY, 0, struct.pack(">II", 0, 1))
        summary = self.cmd.summary() if self.cmd else {}
        log("session", transport="spdy", protocol=self.protocol, subresource=self.sub, finished=self.done,
            streams=sorted(h.get("streamtype", "?") for h in self.streams.values()),
            ms=round((time.monotonic() - started) * 1000), **self.counts, **summary)

    def on_control(self, version, ftype, flags, p):
        if version != 3:
            raise ProtocolError(f"SPDY version {version}")
        if ftype == SYN_STREAM:
            sid = struct.unpack(">I", p[:4])[0] & 0x7FFFFFFF
            headers = self.parse_headers(p[10:])
            self.streams[sid] = headers
            self.control(SYN_REPLY, 0, struct.pack(">I", sid) + self.headers_block({}))
            if self.sub != "portforward":
                self.by_type[headers.get("streamtype", "")] = sid
                self.maybe_finish()
        elif ftype == PING:
            self.counts["pings"] += 1
            self.control(PING, 0, p[:4])
        elif ftype == WINDOW_UPDATE:
            self.counts["window_updates_in"] += 1
        elif ftype == RST_STREAM:
            self.counts["resets_in"] += 1
        elif ftype == GOAWAY:
            self.counts["goaway"] = True
        elif ftype in (SETTINGS, HEADERS):
            if ftype == HEADERS:
                self.parse_headers(p[4:])  # keeps the shared zlib context in step
        else:
            raise ProtocolError(f"control frame type {ftype}")

    def grant(self, sid, n):
        """SPDY/3.1 flow control: give the consumed window back, per stream and per session."""
        self.ungranted[sid] = self.ungranted.get(sid, 0) + n
        if self.ungranted[sid] >= WINDOW_GRANT:
            delta, self.ungranted[sid] = self.ungranted[sid], 0
            self.counts["window_updates_out"] += 1
            self.control(WINDOW_UPDATE, 0, struct.pack(">II", sid, delta))
            self.control(WINDOW_UPDATE, 0, struct.pack(">II", 0, delta))

    def on_data(self, sid, flags, payload):
        headers = self.streams.get(sid)
        if headers is None:
            self.control(RST_STREAM, 0, struct.pack(">II", sid, 2))  # INVALID_STREAM
            return
        kind = headers.get("streamtype")
        if payload:
            self.grant(sid, len(payload))
        if self.sub == "portforward":
            if kind == "data":
                self.counts["echoed"] += len(payload)
                if payload:
                    self.data(sid, payload)
                if flags & FLAG_FIN:
                    self.data(sid, b"", fin=True)
                    err = next((s for s, h in self.streams.items() if h.get("streamtype") == "error"
                                and h.get("requestid") == headers.get("requestid")), None)
                    if err is not None:
                        self.data(err, b"", fin=True)
            return
        if kind == "stdin":
            if payload and not self.done:
                self.write_out("stdout", self.cmd.feed(payload))
            if flags & FLAG_FIN:
                self.by_type["stdin_closed"] = sid
                self.maybe_finish()

    def write_out(self, kind, data):
        sid = self.by_type.get(kind)
        if data and sid is not None:
            if kind == "stdout":
                self.counts["stdout_bytes"] += len(data)
            for i in range(0, len(data), 1 << 20):
                self.data(sid, data[i:i + (1 << 20)])

    def maybe_finish(self):
        """exec/attach: once every expected stream is open and stdin has ended, report and FIN all."""
        if self.done or self.sub == "portforward":
            return
        q, tty = self.req, self.req.flag("tty")
        need = ["error"] + [k for k, on in (("stdin", q.flag("stdin")), ("stdout", q.flag("stdout")),
                                            ("stderr", q.flag("stderr") and not tty), ("resize", tty)) if on]
        if any(k not in self.by_type for k in need):
            return
        if "stdin" in need and self.cmd.wants_stdin and "stdin_closed" not in self.by_type:
            return
        self.done = True
        stdout, stderr, code = self.cmd.finish()
        self.write_out("stdout", stdout)
        self.write_out("stderr", stderr)
        self.data(self.by_type["error"], json.dumps(status_for(code, self.cmd.argv)).encode())
        for kind in need:
            self.data(self.by_type[kind], b"", fin=True)
