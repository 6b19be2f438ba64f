"""Dataset versions: what a run trains on never changes under it.

    manifests/<name>                              a symbolic link to the dataset's current version
    manifests/.versions/<name>/<created>/         one version, never modified once published:
        train/ valid/ audio/ dset.yaml report.json    what `make manifests` writes (data/manifests.py)
        version.json                                  {"name", "hash", "created"}: `hash` is the content hash
        readers.lock                                  held shared (flock) by every process training on it

The manifests list absolute paths inside their version folder, and dset.yaml names the splits by the link
(`manifests/<name>/train`), so an experiment's signature does not change with the data. A training run resolves the
link once (`pin`), reads that version for its whole life, records its hash in every checkpoint, and a resumed run
whose dataset's current version has another hash refuses (solver.py `check_datasets`). `make manifests` builds a new
version beside the current one, then swaps the link (one rename): it refuses while a run reads the current version
unless FORCE=1, and removes only the old versions that no process reads.

The content hash covers what training reads: every segment's audio and MusicInfo sidecar, and the manifests' rows
with their paths relative to the version folder. It leaves out report.json (counts such as files reused differ
between two builds of the same data) and the conversion records (source.json).
"""

import contextlib
import datetime
import fcntl
import hashlib
import json
import os
import shutil
import typing as tp
from pathlib import Path

from ..errors import UserError
from ..files import lock_held
from ..paths import experiments_dir

VERSIONS_FOLDER = ".versions"
VERSION_FILE = "version.json"
READERS_LOCK = "readers.lock"
BUILD_LOCK = "build.lock"  # in .versions/<name>/: held by the `make manifests` building a version of it
PINNED_FILE = "datasets.json"  # in an experiment folder: the versions its current run reads (for `make manifests`)
NOT_HASHED = {VERSION_FILE, READERS_LOCK, "report.json", "source.json"}
HASH_LENGTH = 16  # hex digits shown in messages


class DatasetInUseError(UserError, RuntimeError):
    """`make manifests` into a dataset that a running experiment reads."""


def versions_dir(out: Path) -> Path:
    """Where the versions of the dataset `out` (manifests/<name>) are kept."""
    return out.parent / VERSIONS_FOLDER / out.name


def content_hash(root: Path) -> str:
    """sha256 of what training reads in the version folder `root` (see the module's docstring)."""
    # where the dataset lies is not content: the version's folder in the manifests' paths, the manifests folder
    # (root.parents[2], the link's parent) in dset.yaml's
    located = [(str(root) + os.sep).encode(), (str(root.parents[2]) + os.sep).encode()]
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name not in NOT_HASHED):
        relative = path.relative_to(root).as_posix()
        data = path.read_bytes()
        if path.name in ("data.jsonl", "dset.yaml"):
            for prefix in located:
                data = data.replace(prefix, b"")
        digest.update(f"{relative}\0{len(data)}\0".encode())
        digest.update(hashlib.sha256(data).digest())
    return digest.hexdigest()


def read_version(root: Path) -> tp.Optional[dict]:
    """The version.json of a version folder, or None for a dataset written before versions (or by hand)."""
    path = root / VERSION_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def readers_busy(root: Path) -> bool:
    """Whether a process holds the version's readers lock (a run is training on it)."""
    return lock_held(root / READERS_LOCK, exclusive=True)  # readers hold it shared


def experiments_reading(root: Path) -> tp.List[str]:
    """The running experiments whose datasets.json names the version folder `root` (signatures)."""
    from ..experiments import is_running  # experiments.py imports nothing of data/

    found = []
    for pinned in sorted(experiments_dir().glob(f"*/{PINNED_FILE}")):
        try:
            versions = [d.get("version") for d in json.loads(pinned.read_text())]
        except (OSError, ValueError, AttributeError):
            continue
        if str(root) in versions and is_running(pinned.parent):
            found.append(pinned.parent.name)
    return found


def check_not_read(out: Path, force: bool) -> None:
    """Refuse to rebuild the dataset `out` while a run reads its current version, unless `force`."""
    if not out.is_symlink():
        return
    current = out.resolve()
    if force or not readers_busy(current):
        return
    xps = experiments_reading(current)
    who = f"experiment{'s' if len(xps) > 1 else ''} {', '.join(xps)}" if xps else "a running process"
    raise DatasetInUseError(
        f"NAME={out.name} is being trained on now by {who} ({current}). Wait for the run to end, build the new "
        f"data under another NAME, or FORCE=1 to build it beside the one being read: that run keeps its data to "
        "the end, and resuming it afterwards refuses, as its dataset changed."
    )


def new_version_folder(out: Path) -> Path:
    """A name for a new version of `out`, not yet taken: the time it was started."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
    parent = versions_dir(out)
    for suffix in ("", *(f"-{i}" for i in range(1, 1000))):
        folder = parent / f"{stamp}{suffix}"
        if not folder.exists() and not folder.with_name(folder.name + ".partial").exists():
            return folder
    raise RuntimeError(f"no free version folder name under {parent}")


@contextlib.contextmanager
def new_version(out: Path, force: bool = False) -> tp.Iterator[tp.Tuple[Path, Path]]:
    """Build a new version of the dataset `out` (manifests/<name>): yields (staging, final), the folder to write
    into and the one it will be once published (the manifests' paths). Published when the block ends (`publish`);
    removed if it fails. One build of a name at a time; refused while a run reads the current version, unless
    `force`."""
    check_not_read(out, force)
    parent = versions_dir(out)
    parent.mkdir(parents=True, exist_ok=True)
    with open(parent / BUILD_LOCK, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DatasetInUseError(
                f"NAME={out.name} is being built right now by another `make manifests`: wait for it to end."
            ) from None
        for stale in parent.glob("*.partial"):  # left by a build that died: nobody else writes them now
            shutil.rmtree(stale, ignore_errors=True)
        final = new_version_folder(out)
        staging = final.with_name(final.name + ".partial")
        staging.mkdir()
        try:
            yield staging, final
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        staging.rename(final)
        publish(final, out)


def publish(built: Path, out: Path) -> Path:
    """Make the complete version folder `built` the dataset `out`: its version.json written, the link swapped in
    one rename, the old versions nobody reads removed. When the current version has the same content it stays
    (with the new report.json) and `built` is removed. Returns the current version folder."""
    digest = content_hash(built)
    if out.is_symlink():
        current = out.resolve()
        old = read_version(current)
        if old and old["hash"] == digest and current != built:
            shutil.copy2(built / "report.json", current / ".report.json.new")
            os.replace(current / ".report.json.new", current / "report.json")
            shutil.rmtree(built)
            return current
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    (built / VERSION_FILE).write_text(json.dumps({"name": out.name, "hash": digest, "created": created}) + "\n")
    (built / READERS_LOCK).touch()
    link = out.with_name(f".{out.name}.link")
    link.unlink(missing_ok=True)
    link.symlink_to(built.relative_to(out.parent))
    if out.is_dir() and not out.is_symlink():  # written before versions: moved aside, then removed by prune
        out.rename(new_version_folder(out))
    os.replace(link, out)
    prune(out)
    return built


def prune(out: Path) -> None:
    """Remove the versions of `out` other than its current one that no process reads (called while building)."""
    current = out.resolve()
    for folder in sorted(versions_dir(out).iterdir()):
        if folder != current and folder.is_dir() and not folder.name.endswith(".partial") and not readers_busy(folder):
            shutil.rmtree(folder, ignore_errors=True)


class Pin:
    """The version of a dataset that this process reads, held for the life of the process: a shared lock on its
    readers.lock, so that `make manifests` knows it is read and never removes it."""

    def __init__(self, root: Path):
        self.root = root
        self.version = read_version(root)
        self.lock: tp.Optional[tp.IO[str]] = None
        if self.version is not None:
            self.lock = open(root / READERS_LOCK, "a")
            fcntl.flock(self.lock, fcntl.LOCK_SH)

    def record(self) -> dict:
        """What a checkpoint keeps of it: name, content hash, folder."""
        version = self.version or {}
        return {"name": version.get("name"), "hash": version.get("hash"), "version": str(self.root)}


def pin_splits(datasource: tp.MutableMapping[str, tp.Any]) -> tp.List[Pin]:
    """Resolve each split path of `datasource` (cfg.datasource) through its dataset's link, once, and point the
    split at the version it resolved to; the versions, pinned for this process's life."""
    pins: tp.Dict[Path, Pin] = {}
    for split, path in list(datasource.items()):
        if not isinstance(path, str):
            continue
        resolved = Path(path).resolve()
        root = resolved.parent if resolved.name in ("train", "valid") else resolved
        if read_version(root) is None:
            continue  # a manifest folder of the user's own: nothing to pin
        datasource[split] = str(resolved)
        if root not in pins:
            pins[root] = Pin(root)
    return list(pins.values())


def trained_on_other_versions(record: dict, folder: Path) -> tp.List[tp.Tuple[str, str]]:
    """(signature, content hash) of the other experiments whose last run read the dataset named in `record` at
    another content hash (their datasets.json): a new experiment on a rebuilt dataset says so."""
    found = []
    for pinned in sorted(experiments_dir().glob(f"*/{PINNED_FILE}")):
        if pinned.parent.resolve() == folder.resolve():
            continue
        try:
            records = json.loads(pinned.read_text())
        except (OSError, ValueError):
            continue
        for other in records if isinstance(records, list) else []:
            if (
                isinstance(other, dict)
                and other.get("name") == record["name"]
                and other.get("hash")
                not in (
                    None,
                    record["hash"],
                )
            ):
                found.append((pinned.parent.name, other["hash"]))
    return found


def changed(saved: tp.Sequence[dict], now: tp.Sequence[dict]) -> tp.List[tp.Tuple[dict, tp.Optional[dict]]]:
    """The saved dataset records whose dataset now reads as another hash (or is gone), with what is there now."""
    current = {r["name"]: r for r in now if r.get("name")}
    out = []
    for record in saved:
        if not record.get("name") or not record.get("hash"):
            continue
        there = current.get(record["name"])
        if there is None or there.get("hash") != record["hash"]:
            out.append((record, there))
    return out
