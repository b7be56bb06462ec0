"""The "container" side of tests/python/exec_standin.py (a stand-in, see there):
what a command does with stdin, the Status it ends with, and the JSON log."""

import hashlib
import json
import sys
import time

SUCCESS = {"metadata": {}, "status": "Success"}


class ProtocolError(Exception):
    """A peer broke the WebSocket or SPDY framing: logged, connection ended."""


def command_of(req, sub):
    """exec runs its `command=` query values; attach talks to the container as `cat`."""
    return req.query.get("command", []) if sub == "exec" else ["cat"]


def log(event, **fields):
    fields = {"event": event, "t": round(time.time(), 3), **fields}
    sys.stderr.write(json.dumps(fields) + "\n")
    sys.stderr.flush()


def status_for(code, argv):
    if code == 0:
        return SUCCESS
    return {
        "metadata": {},
        "status": "Failure",
        "message": f"command terminated with non-zero exit code: error executing "
        f"command {argv}, exit code {code}",
        "reason": "NonZeroExitCode",
        "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]},
    }


class Command:
    """What the "container" runs: fed stdin, yields stdout/stderr/exit code."""

    def __init__(self, argv):
        self.argv = argv
        self.name = argv[0] if argv else "cat"
        self.hash = hashlib.sha256()
        self.count = 0
        self.wants_stdin = self.name in ("cat", "sha256sum", "wc")

    def feed(self, data):
        self.hash.update(data)
        self.count += len(data)
        return data if self.name == "cat" else b""

    def finish(self):
        """(stdout, stderr, exit code) once stdin has ended."""
        if self.name == "cat":
            return b"", b"", 0
        if self.name == "sha256sum":
            return f"{self.hash.hexdigest()}  -\n".encode(), b"", 0
        if self.name == "wc" and self.argv[1:] == ["-c"]:
            return f"{self.count}\n".encode(), b"", 0
        if self.name == "echo":
            return (" ".join(self.argv[1:]) + "\n").encode(), b"", 0
        if self.name == "false":
            return b"", b"", 1
        return b"", f"stand-in: unknown command {self.argv}\n".encode(), 127

    def summary(self):
        return {"command": self.argv, "stdin_bytes": self.count,
                "stdin_sha256": self.hash.hexdigest()}
