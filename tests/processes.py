"""Processes the tests start: killing a CLI job at a chosen moment (the kill-and-resume tests), a free
loopback port for a server or a process group."""

import signal
import socket
import subprocess
import time
from collections.abc import Callable


def kill_when(argv: list[str], ready: Callable[[], bool], extra: float = 0.0, timeout: float = 300.0) -> None:
    """Run `argv` and SIGKILL it `extra` seconds after `ready()` first holds (or when it exits or times out)."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(extra)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def free_port() -> int:
    """A loopback port no one listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
