"""Writing output folders so that nothing half-written is ever left where a reader would look."""
import contextlib
import shutil
import typing as tp
from pathlib import Path


@contextlib.contextmanager
def replaced_when_complete(out: Path) -> tp.Iterator[Path]:
    """Yield `<out>.partial` to write into; it replaces `out` only if the block finishes, else it is removed.
    A run interrupted between the two renames leaves the old folder as `<out>.previous`, which the next run puts
    back."""
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
    previous = out.with_name(out.name + ".previous")
    shutil.rmtree(previous, ignore_errors=True)
    if out.exists():
        out.rename(previous)  # until the new folder is in place, the old one can be recovered from here
    staging.rename(out)
    shutil.rmtree(previous, ignore_errors=True)
