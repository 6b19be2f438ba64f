"""Writing output folders so that nothing half-written is ever left where a reader would look."""
import contextlib
import shutil
import typing as tp
from pathlib import Path


@contextlib.contextmanager
def replaced_when_complete(out: Path) -> tp.Iterator[Path]:
    """Yield `<out>.partial` to write into; it replaces `out` only if the block finishes, else it is removed."""
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
