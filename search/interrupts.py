"""Ctrl-C that is never lost.

Python's own SIGINT handler raises KeyboardInterrupt wherever the main thread happens to be. Raised
inside a finalizer (a `__del__`, a weakref callback: storage connections and tensors run many), Python
prints "Exception ignored" and goes on, so a search told to stop ran to its end and exited 0. Within
`remembered()`, a Ctrl-C still raises at once, and is also remembered: the driver's loop calls
`check()` at each step, which raises it again if it was swallowed.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_pressed = threading.Event()


def _handler(signum, frame) -> None:
    _pressed.set()
    raise KeyboardInterrupt


@contextmanager
def remembered() -> Iterator[None]:
    """Ctrl-C remembered while inside (only the main thread can own a signal handler; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, _handler)
    _pressed.clear()
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _pressed.clear()


def check() -> None:
    """Raise the Ctrl-C that a finalizer swallowed, if any."""
    if _pressed.is_set():
        raise KeyboardInterrupt
