"""Run calls in a child process and kill it when one overruns: the only cure for decoders that hang in native code."""

from __future__ import annotations

import multiprocessing as mp
import sys
from collections.abc import Callable
from typing import Any

from mlprep.failures import ItemError, describe_error


class CallTimeoutError(ItemError):
    """The call did not answer within the watchdog's timeout; its process was killed."""

    def __init__(self, message: str):
        super().__init__("decoder_timeout", message)


class WorkerDiedError(ItemError):
    """The child process died during the call (a crash in native code, or killed from outside)."""

    def __init__(self, message: str):
        super().__init__("decoder_crash", message)


def _no_thread_pools_across_fork() -> None:
    """OpenCV's worker threads, once started in this process, do not survive a fork, but its pool thinks they do: a
    child's first cv2 call that goes parallel (or sets its thread count) then waits for ever, and every call of the
    watchdog times out (found when a test had resized images with cv2 in the process before). With one thread
    OpenCV keeps no pool, so it is set so here, before each fork; this process's own cv2 calls then run on one
    thread, as the extract job's do anyway. Nothing to do where cv2 was never imported."""
    cv2 = sys.modules.get("cv2")
    if cv2 is not None and cv2.getNumThreads() != 1:
        cv2.setNumThreads(1)


def _serve(conn) -> None:
    while True:
        message = conn.recv()
        if message is None:
            return
        fn, args, kwargs = message
        try:
            conn.send((True, fn(*args, **kwargs)))
        except BaseException as err:  # noqa: BLE001 - every error goes back to the caller as (code, reason)
            conn.send((False, describe_error(err)))


class Watchdog:
    """One long-lived child process (forked, so start-up is cheap) that runs one call at a time.

    A call that overruns `timeout` seconds gets its child killed and CallTimeoutError raised; the
    next call starts a fresh child. An error inside the call comes back as an ItemError with the
    error's own reason code (decode_error and the error's type for errors that carry none).
    """

    def __init__(self, timeout: float):
        self.timeout = timeout
        self._ctx = mp.get_context("fork")
        self._proc = None
        self._conn = None

    def _start(self) -> None:
        _no_thread_pools_across_fork()
        parent, child = self._ctx.Pipe()
        self._proc = self._ctx.Process(target=_serve, args=(child,), daemon=True)
        self._proc.start()
        child.close()
        self._conn = parent

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.join(timeout=10)
        if self._conn is not None:
            self._conn.close()
        self._proc = self._conn = None

    def start(self) -> Watchdog:
        """Start the child now (a call starts it otherwise): DecodeLanes forks its children before its threads run."""
        if self._proc is None or not self._proc.is_alive():
            self._kill()
            self._start()
        return self

    def interrupt(self) -> None:
        """Kill the child from another thread: the call in flight there ends at once with WorkerDiedError."""
        proc = self._proc
        if proc is not None:
            proc.kill()

    def call(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        self.start()
        self._conn.send((fn, args, kwargs))
        if not self._conn.poll(self.timeout):
            self._kill()
            raise CallTimeoutError(f"no answer within {self.timeout:g} s (process killed)")
        try:
            ok, value = self._conn.recv()
        except EOFError:
            code = self._proc.exitcode if self._proc else None
            self._kill()
            raise WorkerDiedError(f"decoder process died (exit code {code})") from None
        if not ok:
            raise ItemError(*value)
        return value

    def close(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            try:
                self._conn.send(None)
                self._proc.join(timeout=5)
            except (OSError, BrokenPipeError):
                pass
        self._kill()

    def __enter__(self) -> Watchdog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
