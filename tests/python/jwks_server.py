#!/usr/bin/env python3
"""A JWKS endpoint over HTTPS in a process of its own, for the step-up tests.

Usage: jwks_server.py DIR. DIR holds cert.pem and key.pem (the server's TLS
identity), `status` (the HTTP status to answer) and `body` (the bytes to
answer with); the test swaps those two files atomically to change behaviour.
Every request appends its path to DIR/hits. Prints the bound port, then
serves until killed.
"""
import http.server
import os
import ssl
import sys

DIR = sys.argv[1]


def read(name, mode="r"):
    with open(os.path.join(DIR, name), mode) as f:
        return f.read()


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        with open(os.path.join(DIR, "hits"), "a") as f:
            f.write(self.path + "\n")
        status = int(read("status").strip())
        body = read("body", "rb")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(os.path.join(DIR, "cert.pem"), os.path.join(DIR, "key.pem"))
server.socket = ctx.wrap_socket(server.socket, server_side=True)
print(server.server_address[1], flush=True)
server.serve_forever()
