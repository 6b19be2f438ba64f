"""librosa's import waits for the lock that keeps two processes from writing numba's cache at once (numba#10128)."""

import fcntl
import os
import subprocess
import sys
import tempfile
import time

from musicgen_finetune.data.librosa_loader import EAGERLY_COMPILED, load_librosa, lock_path

IMPORT_AND_REPORT = (
    "import sys; from musicgen_finetune.data.librosa_loader import load_librosa; print('ready', flush=True); "
    f"load_librosa(); print(sorted(m for m in {list(EAGERLY_COMPILED)!r} if m in sys.modules))"
)
# Once the child is ready, how long it is given to import librosa if it ignored the lock: 2-3 s on an idle 2-core
# machine with the kernels cached.
UNLOCKED_IMPORT_SECONDS = 10


def test_import_waits_for_the_lock_then_loads_every_eagerly_compiled_module(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # a lock of this test's own: other tests import librosa
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    with open(lock_path(), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process compiling
        child = subprocess.Popen([sys.executable, "-c", IMPORT_AND_REPORT], stdout=subprocess.PIPE, text=True, env=env)
        assert child.stdout.readline().strip() == "ready"
        time.sleep(UNLOCKED_IMPORT_SECONDS)
        assert child.poll() is None, "librosa was imported while another process held the lock"
        fcntl.flock(lock, fcntl.LOCK_UN)
    out, _ = child.communicate(timeout=120)
    assert child.returncode == 0
    assert out.strip() == str(sorted(EAGERLY_COMPILED))


def test_the_lock_is_released_after_loading(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    load_librosa.__wrapped__()  # not the cached module: the locking again
    with open(lock_path(), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises BlockingIOError if still held


def test_every_librosa_module_with_kernels_compiled_at_import_is_loaded_under_the_lock():
    """Independently of the list: librosa's source files that declare `guvectorize`/`vectorize` kernels with
    signatures (compiled at import, cached) are exactly the modules the loader imports under its lock."""
    import re
    from pathlib import Path

    import librosa

    package = Path(librosa.__file__).parent
    declaring = {
        ".".join(("librosa", *path.relative_to(package).with_suffix("").parts))
        for path in package.rglob("*.py")
        if re.search(r"^@(numba\.)?(gu)?vectorize\(\s*\[", path.read_text(), re.MULTILINE)
    }
    assert declaring == set(EAGERLY_COMPILED)
