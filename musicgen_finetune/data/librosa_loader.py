"""librosa, imported so that two processes never compile its numba kernels into the same cache at once.

librosa declares its numba kernels with `cache=True`; the `guvectorize`/`vectorize` ones with explicit signatures
(`util/utils.py` peak picking and local maxima, `beat.py`, `core/audio.py` zero crossings) compile when their module
is first imported. Two processes compiling one `guvectorize(cache=True)` kernel at the same time write its two cache
files (the kernel and its `guf-` wrapper) by separate `os.replace` calls, and a process that loads a pair from two
different writers crashes with SIGSEGV (numba/numba#10128, librosa/librosa#1998). It crashed CI: two test workers
computing onset density at once on a fresh install, and so would `make manifests` with several workers, or two
jobs on one node. Measured here: one crash in 72 processes started six at a time on an empty cache.

`load_librosa()` imports librosa and those modules holding an exclusive lock (one lock file per user, in the
temporary folder), so the first process compiles and writes the cache alone and the others then load it complete.
`make setup` calls it once, so that a fresh install compiles before anything runs in parallel. Kernels compiled
lazily (`numba.jit`, at their first call) write one self-contained file per signature and are not affected.
"""

import fcntl
import functools
import importlib
import os
import tempfile
import types
from pathlib import Path

# The librosa modules whose numba kernels compile at import; those we call import some of them lazily.
EAGERLY_COMPILED = ("librosa.util.utils", "librosa.beat", "librosa.core.audio", "librosa.core.pitch")


def lock_path() -> Path:
    return Path(tempfile.gettempdir()) / f"musicgen_finetune-numba-{os.getuid()}.lock"


@functools.cache
def load_librosa() -> types.ModuleType:
    """librosa, with every kernel it compiles at import in numba's cache (written by one process at a time)."""
    with open(lock_path(), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            for name in EAGERLY_COMPILED:
                importlib.import_module(name)
            import librosa
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return librosa


if __name__ == "__main__":  # make setup: compile once, before anything runs in parallel
    load_librosa()
