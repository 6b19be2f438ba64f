"""Writing files and folders so that nothing half-written is ever left where a reader would look.

    write_atomically(path, write)      one file: written beside it, then renamed over it
    replaced_when_complete(folder)     a whole folder: built as <folder>.partial, swapped in when complete

Both leave their outputs with the permissions of an ordinary file of this process (0644 under the usual umask
022), not the 0600 that temporary files are created with.
"""

import contextlib
import fcntl
import os
import shutil
import tempfile
import typing as tp
from pathlib import Path


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_ordinary(path: Path) -> None:
    """Give `path` (a file, or a folder and everything in it) the modes open() and mkdir() would have given it."""
    mask = current_umask()
    if path.is_dir():
        for root, _, files in os.walk(path):
            os.chmod(root, 0o777 & ~mask)
            for name in files:
                if not os.path.islink(os.path.join(root, name)):
                    os.chmod(os.path.join(root, name), 0o666 & ~mask)
    elif path.is_file():
        os.chmod(path, 0o666 & ~mask)


def write_atomically(path: tp.Union[str, Path], write: tp.Callable[[Path], None]) -> Path:
    """`write(tmp)` to a temporary file beside `path`, then rename it over `path`: a reader (or a second writer of
    the same file) sees the old file or a whole new one, never half of one; a failure leaves `path` as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    os.close(descriptor)
    partial = Path(name)
    try:
        write(partial)
        make_ordinary(partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def write_text_atomically(path: tp.Union[str, Path], text: str) -> Path:
    """`write_atomically` for text (UTF-8)."""
    return write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


@contextlib.contextmanager
def replaced_when_complete(out: Path) -> tp.Iterator[Path]:
    """Yield `<out>.partial` to write into; it replaces `out` only if the block finishes, else it is removed.
    A run interrupted between the two renames leaves the old folder as `<out>.previous`, which the next run puts
    back."""
    out = Path(out)
    staging = out.with_name(out.name + ".partial")
    previous = out.with_name(out.name + ".previous")
    if previous.exists() and not out.exists():
        previous.rename(out)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    make_ordinary(staging)
    shutil.rmtree(previous, ignore_errors=True)
    if out.exists():
        out.rename(previous)  # until the new folder is in place, the old one can be recovered from here
    staging.rename(out)
    shutil.rmtree(previous, ignore_errors=True)


def lock_held(path: Path, exclusive: bool = False) -> bool:
    """Whether some process holds a flock on the file `path` that a shared (or, `exclusive`, an exclusive) lock
    would wait for; False when the file does not exist."""
    if not path.is_file():
        return False
    with open(path) as file:
        try:
            fcntl.flock(file, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(file, fcntl.LOCK_UN)
    return False
