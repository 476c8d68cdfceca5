"""The client side of RFC 6455, just what the process io socket needs:
the handshake, masked frames out, frames in (fragments joined), ping,
close. Standard library only."""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import ssl
import struct
import urllib.parse
from typing import Dict, Tuple

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class HandshakeError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class WebSocket:
    def __init__(self, sock: socket.socket, rest: bytes):
        self.sock = sock
        self.buf = rest

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the socket closed")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _send(self, opcode: int, payload: bytes) -> None:
        head = bytes([0x80 | opcode])
        n = len(payload)
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 65536:
            head += bytes([0x80 | 126]) + struct.pack("!H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack("!Q", n)
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(head + mask + masked)

    def send_binary(self, data: bytes) -> None:
        self._send(0x2, data)

    def send_text(self, text: str) -> None:
        self._send(0x1, text.encode())

    def recv(self) -> Tuple[str, object]:
        """("binary", bytes), ("text", str) or ("close", reason)."""
        message = b""
        first_op = None
        while True:
            b0, b1 = self._read(2)
            fin, op = b0 & 0x80, b0 & 0x0F
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack("!H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", self._read(8))[0]
            payload = self._read(n)
            if op == 0x9:  # ping
                self._send(0xA, payload)
                continue
            if op == 0xA:
                continue
            if op == 0x8:
                reason = payload[2:].decode(errors="replace")
                try:
                    self._send(0x8, payload[:2])
                except OSError:
                    pass
                return "close", reason
            if op != 0x0:
                first_op = op
            message += payload
            if fin:
                return ("text", message.decode()) if first_op == 0x1 else ("binary", message)

    def close(self) -> None:
        try:
            self._send(0x8, struct.pack("!H", 1000))
        except OSError:
            pass
        self.sock.close()


def connect(url: str, headers: Dict[str, str], timeout: float = 30) -> WebSocket:
    u = urllib.parse.urlsplit(url)
    secure = u.scheme in ("https", "wss")
    port = u.port or (443 if secure else 80)
    sock = socket.create_connection((u.hostname, port), timeout=timeout)
    if secure:
        sock = ssl.create_default_context().wrap_socket(sock, server_hostname=u.hostname)
    sock.settimeout(None)
    key = base64.b64encode(os.urandom(16)).decode()
    path = u.path + (f"?{u.query}" if u.query else "")
    lines = [f"GET {path} HTTP/1.1", f"Host: {u.netloc}", "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise HandshakeError(502, "the server closed during the WebSocket handshake")
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    status_line, *header_lines = head.decode(errors="replace").split("\r\n")
    status = int(status_line.split()[1])
    if status != 101:
        raise HandshakeError(status, f"the io socket was refused: {status_line} {rest[:300].decode(errors='replace')}")
    accept = base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()
    got = {k.strip().lower(): v.strip() for k, v in (l.split(":", 1) for l in header_lines if ":" in l)}
    if got.get("sec-websocket-accept") != accept:
        raise HandshakeError(502, "the server's WebSocket handshake did not match")
    return WebSocket(sock, rest)
