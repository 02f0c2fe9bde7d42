"""The service's view of the results folder: one slot per pipeline, loaded when its artefacts exist, loaded again
when the workflow rewrites them.

The workflow writes every artefact under a temporary name and renames it into place, so a file's (inode, size,
mtime) changes exactly when a new version is whole. A slot's version is that of its files; when it changes, the
new version is loaded beside the old one and swapped in with one assignment: a request that already holds the old
snapshot finishes on it (nothing closes it under its feet), the next one gets the new. A load that fails keeps the
old snapshot serving and says why in `status()`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class NotBuilt(LookupError):
    """A pipeline's artefacts are not (yet, or no longer) in the results folder; the message says which."""

    def __init__(self, pipeline: str, message: str):
        super().__init__(message)
        self.pipeline = pipeline


@dataclass
class Snapshot:
    value: Any
    version: tuple
    loaded_at: float
    seconds: float


class Slot:
    """One pipeline's loaded artefacts. `files` (relative to `folder`) make up a version; `load(folder)` builds
    the snapshot value from them (and may read other files of the folder)."""

    def __init__(self, pipeline: str, folder: Path, files: list[str], load: Callable[[Path], Any]):
        self.pipeline, self.folder, self.files, self._load = pipeline, Path(folder), files, load
        self._snapshot: Snapshot | None = None
        self.error: str | None = None
        self.failed_version: tuple | None = None
        self.reloads = 0
        self._lock = threading.Lock()  # one load at a time; readers never wait for it

    def version(self) -> tuple | None:
        """(inode, size, mtime) of every file, None while one is missing."""
        out = []
        for name in self.files:
            try:
                stat = (self.folder / name).stat()
            except OSError:
                return None
            out.append((name, stat.st_ino, stat.st_size, stat.st_mtime_ns))
        return tuple(out)

    def missing(self) -> list[str]:
        return [name for name in self.files if not (self.folder / name).is_file()]

    def refresh(self) -> bool:
        """Load the files' current version if it is new; True when a new snapshot was swapped in."""
        version = self.version()
        current = self._snapshot
        if version is None or (current is not None and current.version == version) or version == self.failed_version:
            return False
        with self._lock:
            started = time.perf_counter()
            try:
                value = self._load(self.folder)
            except Exception as err:  # noqa: BLE001 - a bad rebuild must not take the service down
                self.error = f"{type(err).__name__}: {err}"
                self.failed_version = version
                log.warning("%s: loading %s failed (%s); %s", self.pipeline, self.folder, self.error,
                            "the previous version keeps serving" if current else "not served")
                return False
            if self.version() != version:  # rewritten while loading: the next refresh takes the newer one
                return False
            self._snapshot = Snapshot(value, version, time.time(), time.perf_counter() - started)
            self.error, self.failed_version = None, None
            self.reloads += current is not None
            log.info("%s: loaded %s in %.2f s%s", self.pipeline, self.folder, self._snapshot.seconds,
                     " (reloaded)" if current else "")
            return True

    def get(self) -> Any:
        """The current snapshot's value, or NotBuilt saying which files are missing (or why loading failed)."""
        snapshot = self._snapshot
        if snapshot is None:
            missing = self.missing()
            if missing:
                raise NotBuilt(self.pipeline, f"{self.pipeline} has not been built: {', '.join(missing)} missing "
                                              f"in {self.folder} (run the workflow: snakemake {self.pipeline})")
            raise NotBuilt(self.pipeline, f"{self.pipeline} could not be loaded: {self.error or 'not loaded yet'}")
        return snapshot.value

    def status(self) -> dict:
        snapshot = self._snapshot
        return {"loaded": snapshot is not None, "missing": self.missing(), "error": self.error,
                "loaded_at": snapshot.loaded_at if snapshot else None,
                "load_seconds": round(snapshot.seconds, 3) if snapshot else None, "reloads": self.reloads}


class Registry:
    """Every pipeline's slot, and the thread that keeps them current."""

    def __init__(self, slots: dict[str, Slot], every_s: float = 2.0):
        self.slots, self.every_s = slots, every_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def refresh(self) -> None:
        for slot in self.slots.values():
            slot.refresh()

    def start(self) -> None:
        self.refresh()
        if self.every_s > 0:
            self._thread = threading.Thread(target=self._watch, name="artefact-reload", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(self.every_s):
            self.refresh()

    def get(self, pipeline: str) -> Any:
        return self.slots[pipeline].get()

    def ready(self) -> tuple[bool, dict]:
        """Ready when every pipeline whose artefacts are there is loaded (and at least one is)."""
        status = {name: slot.status() for name, slot in self.slots.items()}
        present = [name for name, s in status.items() if not s["missing"]]
        return bool(present) and all(status[name]["loaded"] for name in present), status
