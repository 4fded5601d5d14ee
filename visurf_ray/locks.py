"""Cross-process locks for the caches several processes build at once (the base model, step 0's evaluation,
DeepSpeed's JIT extensions). An flock is released by the kernel when its holder dies, so an interrupted build never
leaves a lock behind. Never imports Ray or torch."""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created if missing): serialises processes that build the same cache entry."""
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
