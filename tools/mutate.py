"""make mutate [MODULES=config,prior,...] [RECORD=1]: mutation testing of the logic modules (issue 25).

Runs mutmut (pinned in requirements.lock, configured in pyproject.toml's [tool.mutmut]) over the functions that
tests/mutation/scope.toml names, against the fast in-process tests, then reports per module the mutants killed,
survived, timed out and not covered, and every survivor by file and line with its mutated line. Mutants listed in
tests/mutation/equivalent.toml (with the reason each cannot change behaviour) count as accounted for. Exits 1 when a
module's score is below the one recorded in tests/mutation/score.json; --record (RECORD=1) rewrites that file.
"""

import argparse
import ast
import json
import os
import shutil
import subprocess
import sys
import time
import typing as tp
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10: mutmut itself depends on `toml` there
    import toml as tomllib

from musicgen_finetune import cli
from musicgen_finetune.errors import UserError

REPO = Path(__file__).resolve().parent.parent
MUTATION = REPO / "tests" / "mutation"
SCOPE = MUTATION / "scope.toml"
EQUIVALENT = MUTATION / "equivalent.toml"
SCORES = MUTATION / "score.json"
MUTANTS = REPO / "mutants"
CLASS_SEPARATOR = "ǁ"  # mutmut's mangled method names: x<sep>Class<sep>method
LOG = MUTANTS / "mutmut-run.log"
KILLED = ("killed", "timeout")


class MutateError(UserError):
    """MODULES= names no module, or the mutation tool is missing; the message says what to do."""


def read_toml(path: Path) -> dict:
    text = path.read_text()
    return tomllib.loads(text)


def module_name(file: str) -> str:
    """musicgen_finetune/data/audio.py -> musicgen_finetune.data.audio (mutmut's names start so)."""
    return file[: -len(".py")].replace("/", ".")


def functions_of(file: Path) -> tp.Dict[str, tp.Tuple[int, int]]:
    """Top-level functions and methods of classes (Class.method) with their first and last lines."""
    tree = ast.parse(file.read_text())
    found = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found[node.name] = (node.lineno, node.end_lineno)
        elif isinstance(node, ast.ClassDef):
            for child in node.body:
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    found[f"{node.name}.{child.name}"] = (child.lineno, child.end_lineno)
    return found


def mangled(function: str) -> str:
    """mutmut's name of a function or Class.method, without its module."""
    if "." in function:
        cls, name = function.split(".")
        return f"x{CLASS_SEPARATOR}{cls}{CLASS_SEPARATOR}{name}"
    return f"x_{function}"


def function_of(mutant: str) -> str:
    """musicgen_finetune.caches.xǁTokenCacheǁentry_path__mutmut_3 -> TokenCache.entry_path."""
    name = mutant.partition("__mutmut_")[0].rpartition(".")[2]
    if name.startswith(f"x{CLASS_SEPARATOR}"):
        return ".".join(name[2:].split(CLASS_SEPARATOR))
    return name[len("x_") :]


class Module:
    def __init__(self, name: str, entry: dict):
        self.name, self.file, self.why = name, entry["file"], entry.get("why", "")
        known = functions_of(REPO / self.file)
        only, skip = entry.get("only"), entry.get("skip", [])
        unknown = [f for f in (only or []) + skip if f not in known]
        if unknown:
            raise MutateError(
                f"{SCOPE.relative_to(REPO)}: [{name}] names {', '.join(unknown)}, not functions of {self.file} "
                "(renamed or removed?): fix the scope."
            )
        self.functions = [f for f in known if (only is None or f in only) and f not in skip]
        self.lines = known
        self.restricted = only is not None or bool(skip)

    def patterns(self) -> tp.List[str]:
        """mutmut's mutant names of the functions in scope, as globs."""
        prefix = module_name(self.file)
        if not self.restricted:
            return [f"{prefix}.*"]
        # `x_f*` also matches the function's own name, which is how mutmut picks the tests of its clean run (with
        # no match it runs the whole selection once more); used where no other function's name starts the same.
        names = [mangled(f) for f in self.lines]
        unique = [name for name in names if not any(o != name and o.startswith(name) for o in names)]
        return [f"{prefix}.{name}{'*' if name in unique else '__mutmut_*'}" for name in map(mangled, self.functions)]

    def owns(self, mutant: str) -> bool:
        prefix = module_name(self.file) + "."
        return mutant.startswith(prefix) and "." not in mutant[len(prefix) :] and function_of(mutant) in self.functions


def load_scope(wanted: tp.Optional[str]) -> tp.List[Module]:
    entries = read_toml(SCOPE)
    if not wanted:
        return [Module(name, entry) for name, entry in entries.items()]
    names = [n.strip() for n in wanted.split(",") if n.strip()]
    for name in names:
        if name not in entries:
            raise MutateError(
                f"MODULES={wanted}: no module {name!r}; the modules are {', '.join(entries)} "
                f"({SCOPE.relative_to(REPO)}), comma-separated."
            )
    return [Module(name, entries[name]) for name in names]


def mutmut_command() -> Path:
    command = Path(sys.executable).parent / "mutmut"
    if not command.is_file():
        raise MutateError(
            f"mutmut is not installed in {Path(sys.executable).parent.parent}: run `make setup` "
            "(requirements.lock pins mutmut)."
        )
    return command


def run_mutmut(modules: tp.Sequence[Module], keep: bool) -> float:
    """mutmut run over the modules' scope; its output goes to mutants/mutmut-run.log. Returns the seconds taken."""
    command = mutmut_command()
    if not keep and MUTANTS.exists():
        shutil.rmtree(MUTANTS)  # a fresh run: results of an earlier source never stand
    MUTANTS.mkdir(exist_ok=True)
    env = dict(os.environ)
    # AudioCraft's config tree: the tests run in mutants/, a copy without it (2 MB of yaml)
    env.setdefault("AUDIOCRAFT_SRC", str((REPO / "audiocraft").resolve()))
    # one thread per worker: mutmut runs a worker per core, and torch's own threads would only contend for them
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "MUSICGEN_FT_TEST_THREADS"):  # the last: conftest.py
        env.setdefault(variable, "1")
    patterns = [p for m in modules for p in m.patterns()]
    if keep and (MUTANTS / "mutmut-stats.json").is_file():
        # only what the last run did not kill: new tests can kill survivors, and cannot revive killed mutants
        patterns = [name for m in modules for name, status in statuses(m).items() if status not in KILLED]
        if not patterns:
            print("mutate: every mutant in scope was killed in the last run; nothing to run again")
            return 0.0
    start = time.monotonic()
    print(f"mutate: mutmut run over {', '.join(m.name for m in modules)} (log: {LOG.relative_to(REPO)})", flush=True)
    with open(LOG, "w") as log:
        status = subprocess.run([str(command), "run", *patterns], cwd=REPO, env=env, stdout=log, stderr=log).returncode
    seconds = time.monotonic() - start
    if status != 0:
        tail = LOG.read_text(errors="replace")[-4000:]
        sys.exit(f"{tail}\nmutate: mutmut run failed (exit status {status}); its log is {LOG.relative_to(REPO)}.")
    return seconds


# -- the report ---------------------------------------------------------------------------------------------------


def statuses(module: Module) -> tp.Dict[str, str]:
    """mutant name -> mutmut's status (killed, survived, timeout, no tests, ...) of the module's mutants in scope."""
    from mutmut.stats import status_by_exit_code

    meta = MUTANTS / (module.file + ".meta")
    if not meta.is_file():
        return {}
    codes = json.loads(meta.read_text())["exit_code_by_key"]
    return {name: status_by_exit_code[code] for name, code in codes.items() if module.owns(name)}


def mutation(module: Module, mutant: str) -> tp.Tuple[int, str, str]:
    """(line in the original file, original line, mutated line) of a mutant, from mutmut's diff of its function."""
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    cwd = os.getcwd()
    os.chdir(REPO)  # mutmut reads mutants/ and the sources relative to the project
    try:
        diff = get_diff_for_mutant(mutant, path=module.file)
    finally:
        os.chdir(cwd)
    removed = [line[1:] for line in diff.splitlines()[2:] if line.startswith("-")]
    added = [line[1:] for line in diff.splitlines()[2:] if line.startswith("+")]
    original = removed[0].strip() if removed else ""
    first, last = module.lines[function_of(mutant)]
    source = (REPO / module.file).read_text().splitlines()
    line = next((n for n in range(first, last + 1) if source[n - 1].strip() == original), first)
    return line, original, " / ".join(a.strip() for a in added) or "(line removed)"


def load_equivalent() -> tp.Dict[str, dict]:
    if not EQUIVALENT.is_file():
        return {}
    return {entry["id"]: entry for entry in read_toml(EQUIVALENT).get("mutant", [])}


def score(row: dict) -> float:
    tested = row["mutants"]
    return 100.0 * (row["killed"] + row["timeout"] + row["equivalent"]) / tested if tested else 100.0


def report(modules: tp.Sequence[Module]) -> tp.Tuple[tp.Dict[str, dict], tp.List[str]]:
    equivalent = load_equivalent()
    rows, survivors, stale = {}, [], []
    for module in modules:
        found = statuses(module)
        row = {"mutants": len(found), "killed": 0, "timeout": 0, "survived": 0, "no tests": 0, "equivalent": 0}
        row["other"] = 0
        for name, status in sorted(found.items(), key=lambda item: (item[0].partition("__mutmut_")[0], item[0])):
            if status in KILLED:
                row[status] += 1
                continue
            line, original, mutated = mutation(module, name)
            entry = equivalent.get(name)
            if entry is not None:
                if entry.get("mutated", mutated).strip() == mutated:
                    row["equivalent"] += 1
                    continue
                stale.append(f"{name}: listed as equivalent with `{entry.get('mutated')}`, now mutates `{mutated}`")
            row[status if status in row else "other"] += 1
            survivors.append(f"{module.file}:{line}: {status}: {name}\n      - {original}\n      + {mutated}")
        row["score"] = round(score(row), 1)
        rows[module.name] = row
    for line in stale:
        print(f"mutate: stale entry in {EQUIVALENT.relative_to(REPO)}: {line}")
    return rows, survivors


def table(rows: tp.Dict[str, dict]) -> str:
    columns = ("mutants", "killed", "timeout", "survived", "no tests", "equivalent", "other", "score")
    total = {c: sum(row[c] for row in rows.values()) for c in columns[:-1]}
    total["score"] = round(score(total), 1)
    lines = [("module",) + columns]
    for name, row in [*rows.items(), ("total", total)]:
        lines.append((name, *(f"{row[c]:.1f}%" if c == "score" else str(row[c]) for c in columns)))
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))
        for line in lines
    )


def compare(rows: tp.Dict[str, dict], record: bool) -> int:
    recorded = json.loads(SCORES.read_text()) if SCORES.is_file() else {}
    if record:
        recorded.update({name: {"score": row["score"], "mutants": row["mutants"]} for name, row in rows.items()})
        SCORES.write_text(json.dumps(dict(sorted(recorded.items())), indent=2) + "\n")
        print(f"mutate: recorded the scores of {', '.join(rows)} in {SCORES.relative_to(REPO)}")
        return 0
    dropped = [
        f"{name} {row['score']:.1f}% < recorded {recorded[name]['score']:.1f}%"
        for name, row in rows.items()
        if name in recorded and row["score"] < recorded[name]["score"]
    ]
    if dropped:
        print(
            f"mutate: mutation score dropped: {'; '.join(dropped)} (kill the survivors above with a test, or list "
            f"a true equivalent in {EQUIVALENT.relative_to(REPO)} with the reason)",
            file=sys.stderr,
        )
        return 1
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--modules", help="comma-separated module names of tests/mutation/scope.toml (default: all)")
    parser.add_argument("--record", action="store_true", help="write these scores to tests/mutation/score.json")
    parser.add_argument(
        "--keep",
        action="store_true",
        help="reuse mutants/ and its test stats; run only the mutants the last run did not kill (after adding tests, "
        "not after changing the code)",
    )
    parser.add_argument("--report-only", action="store_true", help="report the last run's results, run nothing")
    opts = parser.parse_args(argv)
    modules = load_scope(opts.modules)
    if not opts.report_only:
        seconds = run_mutmut(modules, keep=opts.keep)
        print(f"mutate: mutmut ran in {seconds / 60:.1f} min")
    elif not MUTANTS.is_dir():
        raise MutateError("--report-only: no mutants/ folder yet; run make mutate first.")
    sys.path.insert(0, str(REPO))  # mutmut's report helpers read pyproject.toml and mutants/ from the project
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        rows, survivors = report(modules)
    finally:
        os.chdir(cwd)
    if survivors:
        print(f"\nSurviving and uncovered mutants ({len(survivors)}), not listed as equivalent:")
        print("\n".join(f"  {line}" for line in survivors))
    print("\n" + table(rows))
    return compare(rows, opts.record)


if __name__ == "__main__":
    cli.main(main)
