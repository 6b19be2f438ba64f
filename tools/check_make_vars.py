"""The Makefile's check of the variables given on `make`'s command line: each must be one the goal reads.

    python3 tools/check_make_vars.py --goals "<MAKECMDGOALS>" NAME1 NAME2 ...

Prints nothing when every name is read by every goal's recipe (directly, through the variables the recipe uses,
the shell scripts of tools/ it runs, or the recipes of the targets it depends on), else one line naming the first
unknown variable and the closest known one. Make reads the variables before anything runs, so `make train ...
EPOCH=2` stops before it starts an experiment with the preset's epochs. Standard library only: it runs before
`make setup`.
"""

import argparse
import difflib
import os
import re
import sys
from pathlib import Path

MAKEFILE = Path(__file__).resolve().parent.parent / "Makefile"
REFERENCE = re.compile(r"\$[({]([A-Za-z_][A-Za-z0-9_]*)[)}]")
DEFINITION = re.compile(r"^(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*(?:\?|:|\+)?=\s*(.*)$")
SCRIPT = re.compile(r"tools/[\w.-]+\.sh")
SCRIPT_READS = re.compile(r"\$\{?([A-Z_][A-Z0-9_]*)")
RULE = re.compile(r"^([a-z][a-z0-9-]*(?:\s+[a-z][a-z0-9-]*)*)\s*:(?!=)\s*([^#]*)")
# Passed to every process as environment variables, whatever the goal (the tools or the libraries read them).
ENVIRONMENT_PREFIXES = ("MUSICGEN_FT_", "AUDIOCRAFT_", "HF_", "TRANSFORMERS_", "CUDA_", "NCCL_", "TORCH", "OMP_")
ENVIRONMENT_PREFIXES += ("PYTORCH_", "REQUIRE_", "DORA_", "SLURM_", "MASTER_", "WORLD_SIZE", "MAKE", "NUMBA_")
# What users type for a training setting, which is an override in ARGS.
SETTINGS = {
    "EPOCH": "optim.epochs",
    "EPOCHS": "optim.epochs",
    "LR": "optim.lr",
    "LEARNING_RATE": "optim.lr",
    "BATCH_SIZE": "dataset.batch_size",
    "RANK": "lora.rank",
    "LORA_RANK": "lora.rank",
    "ALPHA": "lora.alpha",
    "WARMUP": "schedule.cosine.warmup",
    "ACCUM": "optim.grad_accum_steps",
    "GRAD_ACCUM": "optim.grad_accum_steps",
}
TRAINING_GOALS = {"train", "grid", "plan", "demo"}


def parse(text: str):
    """(variable -> the variables its value references, target -> (prerequisites, variables its recipe reads),
    the variables every target reads: those the Makefile tests outside recipes, as `ifdef OUTPUT`)."""
    variables, targets, everywhere, current = {}, {}, set(), None
    for line in text.replace("\\\n", " ").splitlines():
        if line.startswith("\t") and current:
            targets[current][1].update(REFERENCE.findall(line))
            for script in SCRIPT.findall(line):  # a shell script the recipe runs reads its environment
                path = MAKEFILE.parent / script
                targets[current][1].update(SCRIPT_READS.findall(path.read_text()) if path.is_file() else [])
            continue
        current = None
        if line.startswith(("ifdef", "ifndef", "ifeq", "ifneq")):
            everywhere.update(line.split()[1:2] if line.startswith(("ifdef", "ifndef")) else [])
            everywhere.update(REFERENCE.findall(line))
            continue
        definition = DEFINITION.match(line)
        if definition:
            variables.setdefault(definition.group(1), set()).update(REFERENCE.findall(definition.group(2)))
            continue
        rule = RULE.match(line)
        if rule and not line.startswith("."):
            prerequisites = set(rule.group(2).split())
            for name in rule.group(1).split():
                targets[name] = (prerequisites, set(REFERENCE.findall(rule.group(2))))
                current = name
    return variables, targets, everywhere


def known_variables(goal: str, variables: dict, targets: dict) -> set:
    """Every variable the goal's recipe reads, through the variables it uses and the targets it depends on."""
    seen_targets, names, todo = set(), set(), [goal]
    while todo:
        target = todo.pop()
        if target in seen_targets or target not in targets:
            continue
        seen_targets.add(target)
        prerequisites, read = targets[target]
        todo.extend(prerequisites)
        names.update(read)
    pending = list(names)
    while pending:
        for used in variables.get(pending.pop(), ()):
            if used not in names:
                names.add(used)
                pending.append(used)
    return names


def given_value(name: str):
    """The value `name=` was given on the command line of the `make` that runs this (its nearest ancestor process
    with such an argument; Linux's /proc), or None."""
    pid = os.getppid()
    for _ in range(3):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        for arg in argv:
            if arg.startswith(name + "="):
                return arg[len(name) + 1 :]
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return None


def problem(goals, given, text: str):
    """The line to print for the first variable a goal does not read, or None."""
    variables, targets, everywhere = parse(text)
    goals = [g for g in goals if g in targets] or ["help"]
    for name in given:
        if name.startswith(ENVIRONMENT_PREFIXES) or not name.isupper() or name in everywhere:
            continue
        for goal in goals:
            known = known_variables(goal, variables, targets)
            if name in known:
                continue
            if name in SETTINGS and "ARGS" in known:
                value = given_value(name) or "<value>"
                hint = f"did you mean ARGS='{SETTINGS[name]}={value}' (a training setting is an override in ARGS)?"
            else:
                close = difflib.get_close_matches(name, sorted(v for v in known if v.isupper()), n=1, cutoff=0.6)
                hint = f"did you mean {close[0]}=?" if close else "`make help` lists each target's variables"
            return f"{name}= is not a variable of make {goal}: {hint}"
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--goals", default="")
    parser.add_argument("given", nargs="*")
    opts = parser.parse_args(argv)
    line = problem(opts.goals.split(), opts.given, MAKEFILE.read_text())
    if line:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
