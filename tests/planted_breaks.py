"""`make breaks`: every one-line break in tests/planted_breaks.toml, planted alone in a copy of this checkout, must
make `make test` fail.

Each break names the file, the exact text it replaces (found exactly once, so a registry that no longer matches the
code is an error, not a silent pass) and the test files or nodes that should catch it. Those are run in the copy
with `make test`'s own selection (TEST_SELECT, the markers it deselects), so a catching test that moved to
`make test-all` no longer counts. Exit status 1 when a break survives, 2 when an entry is stale.

    python tests/planted_breaks.py [--only WORDS] [--select 'not long'] [--jobs 2] [--list]
"""

import argparse
import concurrent.futures
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10: mutmut's dependency `toml` reads it too
    import toml as tomllib

REPO = Path(__file__).resolve().parent.parent
REGISTRY = Path(__file__).resolve().with_suffix(".toml")
# what the copies share with this checkout instead of copying (git-ignored, large)
SHARED = (".venv", "audiocraft")
# pytest's exit status when tests ran and some failed; anything else (errors, nothing collected) is no catch
TESTS_FAILED = 1


@dataclass(frozen=True)
class Break:
    issue: int
    what: str
    file: str
    find: str
    replace: str
    tests: tuple

    def plant(self, root: Path) -> None:
        path = root / self.file
        text = path.read_text()
        if text.count(self.find) != 1:
            raise StaleEntry(
                f"{self.file}: {self.find!r} occurs {text.count(self.find)} times (must be once); update the entry "
                f"'{self.what}' in {REGISTRY.name}"
            )
        path.write_text(text.replace(self.find, self.replace))


class StaleEntry(Exception):
    pass


def load(path: Path = REGISTRY) -> list:
    entries = tomllib.loads(path.read_text())["break"]
    return [Break(e["issue"], e["what"], e["file"], e["find"], e["replace"], tuple(e["tests"])) for e in entries]


def copy_checkout(into: Path) -> Path:
    """The checkout's files as git sees them (tracked and new, not ignored), with .venv and audiocraft linked."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, (n.decode() for n in listed)):
        source = REPO / name
        if source.is_file() and not source.is_symlink():
            (into / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, into / name)
    for name in SHARED:
        if (REPO / name).exists():
            (into / name).symlink_to((REPO / name).resolve())
    return into


def run_one(entry: Break, select: str, timeout: int) -> tuple:
    """(outcome, seconds, the tail of pytest's output): caught, SURVIVED, stale or error."""
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="planted_break_") as tmp:
        root = copy_checkout(Path(tmp))
        try:
            entry.plant(root)
        except StaleEntry as err:
            return "stale", 0.0, str(err)
        command = [sys.executable, "-m", "pytest", *entry.tests, "-m", select, "-x", "-q", "-n", "0"]
        command += ["-p", "no:cacheprovider", "-W", "ignore"]
        try:
            done = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return "error", time.monotonic() - started, f"timed out after {timeout} s"
    tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-3:])
    outcome = {TESTS_FAILED: "caught", 0: "SURVIVED"}.get(done.returncode, "error")
    return outcome, time.monotonic() - started, tail


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="run the breaks whose description or file contains this")
    parser.add_argument("--select", default=os.environ.get("TEST_SELECT", "not long"), help="make test's markers")
    parser.add_argument("--jobs", type=int, default=2, help="breaks tried at once")
    parser.add_argument("--timeout", type=int, default=900, help="seconds for one break's tests")
    parser.add_argument("--list", action="store_true", help="list the breaks and exit")
    opts = parser.parse_args(argv)
    entries = [e for e in load() if opts.only in e.what or opts.only in e.file]
    if not entries:
        print(f"error: ONLY={opts.only!r} matches no break's description or file; `--list` shows them", file=sys.stderr)
        return 2
    if opts.list:
        for e in entries:
            print(f"issue {e.issue:>2}  {e.file:<40} {e.what}")
        return 0
    print(f"{len(entries)} planted breaks, each alone, against `pytest -m '{opts.select}'` on the tests named")
    failures = 0
    with concurrent.futures.ThreadPoolExecutor(max_workers=opts.jobs) as pool:
        futures = {pool.submit(run_one, e, opts.select, opts.timeout): e for e in entries}
        for future in concurrent.futures.as_completed(futures):
            entry, (outcome, seconds, tail) = futures[future], future.result()
            print(f"{outcome:<9} {seconds:6.0f} s  issue {entry.issue:>2}  {entry.file}: {entry.what}", flush=True)
            if outcome != "caught":
                failures += 1
                print("    " + tail.replace("\n", "\n    "), flush=True)
    print(f"{len(entries) - failures} of {len(entries)} caught")
    return 0 if failures == 0 else (2 if any(f.result()[0] == "stale" for f in futures) else 1)


if __name__ == "__main__":
    sys.exit(main())
