"""airlock's API from Python: sandboxes, processes that stream (pipes or a
PTY), and files. Standard library only; the process io WebSocket is spoken
by the small client in ``_ws``."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

from . import _ws

__all__ = ["Airlock", "AirlockError", "Sandbox", "ProcessHandle", "RunResult", "ROUTES"]

#: Every API route this SDK calls, as (method, path); a test checks each
#: against the server's OpenAPI document so the two cannot drift apart.
ROUTES: List[Tuple[str, str]] = [
    ("post", "/api/v1/sandboxes"),
    ("get", "/api/v1/sandboxes"),
    ("get", "/api/v1/sandboxes/{id}"),
    ("delete", "/api/v1/sandboxes/{id}"),
    ("post", "/api/v1/sandboxes/{id}/processes"),
    ("get", "/api/v1/sandboxes/{id}/processes"),
    ("get", "/api/v1/sandboxes/{id}/processes/{pid}"),
    ("delete", "/api/v1/sandboxes/{id}/processes/{pid}"),
    ("get", "/api/v1/sandboxes/{id}/processes/{pid}/io"),
    ("put", "/api/v1/sandboxes/{id}/files"),
    ("get", "/api/v1/sandboxes/{id}/files"),
]

STDOUT = 1
STDERR = 2


class AirlockError(Exception):
    """A refusal from the API: its HTTP status and ``error.code``."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status = status
        self.code = code


class Airlock:
    """``url`` and ``token`` default to AIRLOCK_URL and AIRLOCK_TOKEN."""

    def __init__(self, url: Optional[str] = None, token: Optional[str] = None):
        self.url = (url or os.environ.get("AIRLOCK_URL") or "http://127.0.0.1:4000").rstrip("/")
        self.token = token if token is not None else os.environ.get("AIRLOCK_TOKEN")
        self.sandboxes = _Sandboxes(self)

    def sandbox(self, id: str) -> "Sandbox":
        """A handle on sandbox ``id`` (no request is made)."""
        return Sandbox(self, id)

    def headers(self) -> Dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def request(self, method: str, path: str, json_body: Any = None, data: Optional[bytes] = None,
                raw: bool = False) -> Any:
        headers = self.headers()
        body = None
        if json_body is not None:
            body = json.dumps(json_body).encode()
            headers["Content-Type"] = "application/json"
        elif data is not None:
            body = data
            headers["Content-Type"] = "application/octet-stream"
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=300) as resp:
                payload = resp.read()
        except urllib.error.HTTPError as e:
            try:
                err = json.loads(e.read())["error"]
                raise AirlockError(e.code, err["code"], err["message"]) from None
            except (ValueError, KeyError, TypeError):
                raise AirlockError(e.code, "error", f"{e.code} {e.reason}") from None
        return payload if raw else json.loads(payload or b"null")


class _Sandboxes:
    def __init__(self, client: Airlock):
        self.client = client

    def create(self, kind: str = "workspace", wait: bool = True, timeout_s: float = 300) -> "Sandbox":
        info = self.client.request("POST", "/api/v1/sandboxes", {"kind": kind})
        sb = Sandbox(self.client, info["id"], info)
        if wait:
            sb.wait_ready(timeout_s)
        return sb

    def list(self) -> List[Dict[str, Any]]:
        return self.client.request("GET", "/api/v1/sandboxes")["sandboxes"]

    def get(self, id: str) -> "Sandbox":
        sb = Sandbox(self.client, id)
        sb.refresh()
        return sb


@dataclass
class RunResult:
    exit_code: Optional[int]
    signal: Optional[int]
    timed_out: bool
    stdout: str
    stderr: str


class Sandbox:
    def __init__(self, client: Airlock, id: str, info: Optional[Dict[str, Any]] = None):
        self.client = client
        self.id = id
        self.info = info
        self.path = "/api/v1/sandboxes/" + urllib.parse.quote(id, safe="")
        self.processes = _Processes(self)
        self.files = _Files(self)

    def refresh(self) -> Dict[str, Any]:
        self.info = self.client.request("GET", self.path)
        return self.info

    def wait_ready(self, timeout_s: float = 300) -> Dict[str, Any]:
        until = time.monotonic() + timeout_s
        while True:
            info = self.refresh()
            if info["state"] == "ready":
                return info
            if info["state"] in ("failed", "stopping", "stopped"):
                raise AirlockError(409, "conflict", f"sandbox {self.id} is {info['state']}: {info.get('failure_reason')}")
            if time.monotonic() > until:
                raise AirlockError(408, "timeout", f"sandbox {self.id} is still {info['state']}")
            time.sleep(0.5)

    def delete(self) -> Dict[str, Any]:
        return self.client.request("DELETE", self.path)


class ProcessHandle:
    """One attachment to a process: write stdin, resize, signal; ``wait()``
    reads output (to the callbacks) until the process ends."""

    def __init__(self, pid: int, ws: "_ws.WebSocket", on_stdout=None, on_stderr=None):
        self.pid = pid
        self.ws = ws
        self.on_stdout = on_stdout
        self.on_stderr = on_stderr
        self.exit: Optional[Dict[str, Any]] = None

    def write(self, data) -> None:
        self.ws.send_binary(data.encode() if isinstance(data, str) else bytes(data))

    def resize(self, cols: int, rows: int) -> None:
        self.ws.send_text(json.dumps({"type": "resize", "cols": cols, "rows": rows}))

    def signal(self, signal: str) -> None:
        self.ws.send_text(json.dumps({"type": "signal", "signal": signal}))

    def eof(self) -> None:
        self.ws.send_text(json.dumps({"type": "eof"}))

    def wait(self) -> Dict[str, Any]:
        """Streams output until the process ends; answers its exit event."""
        while self.exit is None:
            kind, payload = self.ws.recv()
            if kind == "binary" and payload:
                cb = self.on_stderr if payload[0] == STDERR else self.on_stdout
                if cb:
                    cb(payload[1:])
            elif kind == "text":
                event = json.loads(payload)
                if event.get("type") == "exit":
                    self.exit = event
            elif kind == "close":
                raise AirlockError(502, "closed", f"the io socket closed before the process ended: {payload}")
        self.close()
        return self.exit

    def close(self) -> None:
        """Detaches; the process goes on."""
        self.ws.close()


class _Processes:
    def __init__(self, sandbox: Sandbox):
        self.sandbox = sandbox
        self.client = sandbox.client

    def start(self, argv: List[str], env: Optional[Dict[str, str]] = None, cwd: Optional[str] = None,
              pty: Optional[Tuple[int, int]] = None, stdin: bool = False,
              timeout_s: Optional[int] = None) -> Dict[str, Any]:
        """Starts a process; ``pty`` is (cols, rows)."""
        body = {"argv": argv, "env": env or {}, "cwd": cwd, "stdin": stdin, "timeout_s": timeout_s,
                "pty": {"cols": pty[0], "rows": pty[1]} if pty else None}
        return self.client.request("POST", f"{self.sandbox.path}/processes", body)

    def list(self) -> List[Dict[str, Any]]:
        return self.client.request("GET", f"{self.sandbox.path}/processes")["processes"]

    def get(self, pid: int) -> Dict[str, Any]:
        return self.client.request("GET", f"{self.sandbox.path}/processes/{pid}")

    def kill(self, pid: int, signal: Optional[str] = None) -> Dict[str, Any]:
        q = f"?signal={urllib.parse.quote(signal)}" if signal else ""
        return self.client.request("DELETE", f"{self.sandbox.path}/processes/{pid}{q}")

    def attach(self, pid: int, offset: int = 0, on_stdout: Optional[Callable[[bytes], None]] = None,
               on_stderr: Optional[Callable[[bytes], None]] = None) -> ProcessHandle:
        url = f"{self.client.url}{self.sandbox.path}/processes/{pid}/io?offset={offset}"
        try:
            ws = _ws.connect(url, self.client.headers())
        except _ws.HandshakeError as e:
            raise AirlockError(e.status, "refused", str(e)) from None
        return ProcessHandle(pid, ws, on_stdout, on_stderr)

    def run(self, argv: List[str], on_stdout: Optional[Callable[[bytes], None]] = None,
            on_stderr: Optional[Callable[[bytes], None]] = None, stdin=None, **options) -> RunResult:
        """Runs ``argv`` to its end, streaming output to the callbacks."""
        info = self.start(argv, stdin=stdin is not None, **options)
        out: List[bytes] = []
        err: List[bytes] = []

        def take(into, cb):
            def f(b: bytes) -> None:
                into.append(b)
                if cb:
                    cb(b)
            return f

        handle = self.attach(info["pid"], on_stdout=take(out, on_stdout), on_stderr=take(err, on_stderr))
        if stdin is not None:
            handle.write(stdin)
            handle.eof()
        exit = handle.wait()
        return RunResult(exit.get("exit_code"), exit.get("signal"), bool(exit.get("timed_out")),
                         b"".join(out).decode(errors="replace"), b"".join(err).decode(errors="replace"))


class _Files:
    def __init__(self, sandbox: Sandbox):
        self.sandbox = sandbox
        self.client = sandbox.client

    def _url(self, path: str) -> str:
        return f"{self.sandbox.path}/files?path={urllib.parse.quote(path, safe='')}"

    def write(self, path: str, data) -> Dict[str, Any]:
        """Writes a file (at most 64 MiB, else AirlockError 413) as the sandbox
        user; a path outside the home and /tmp is AirlockError 403."""
        return self.client.request("PUT", self._url(path), data=data.encode() if isinstance(data, str) else bytes(data))

    def read(self, path: str) -> bytes:
        """A file's bytes, or a directory as a tar archive (at most 1 GiB, else
        AirlockError 413); a path outside the home and /tmp is AirlockError 403."""
        return self.client.request("GET", self._url(path), raw=True)
