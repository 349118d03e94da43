"""Real TCP listeners on loopback addresses for the tests: they answer with fixed bytes
(dripped slowly if asked) and count the connections they accept, so that a test can tell a
server was never contacted."""

import socket
import threading
import time


class Listener:
    """A TCP server on ``host`` that answers each connection with ``reply(path)`` bytes,
    dripping them ``delay`` seconds apart in ``step``-byte pieces, and counts connections."""

    def __init__(self, host: str = "127.0.0.1", reply=None, delay: float = 0.0, step: int = 0):
        self.sock = socket.socket()
        self.sock.bind((host, 0))
        self.sock.listen(16)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.reply = reply or (lambda path: b"")
        self.delay, self.step = delay, step
        self.accepted = 0
        self._stop = False
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _serve(self) -> None:
        while not self._stop:
            try:
                connection, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._answer, args=(connection,), daemon=True).start()

    def _answer(self, connection: socket.socket) -> None:
        with connection:
            try:
                request = connection.recv(65536).decode("latin-1")
                path = request.split(" ")[1] if " " in request else "/"
                data = self.reply(path)
                step = self.step or len(data) or 1
                for start in range(0, len(data), step):
                    connection.sendall(data[start : start + step])
                    if self.delay:
                        time.sleep(self.delay)
            except OSError:
                pass

    def close(self) -> None:
        self._stop = True
        self.sock.close()


def http_reply(status: str, body: bytes = b"", **headers: str) -> bytes:
    lines = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", "Connection: close"]
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body
