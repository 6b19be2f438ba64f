"""The pipeline around training, timed: `make manifests` on generated 808 beats (against AudioCraft's own
indexer), and `make demo` end to end with every output in a temporary folder."""

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import typing as tp
from pathlib import Path

from ..data.manifests import ManifestOptions, build_manifests
from ..data.synthetic import write_dataset
from ..paths import REPO_ROOT
from .isolation import describe_exit

# -- make manifests ----------------------------------------------------------------------------------------------


def write_folder(folder: Path, files: int, seconds: float) -> None:
    """`files` captioned 808 beats (44.1 kHz stereo wav, as users bring them), rendered once and copied."""
    unique = min(files, 16)
    write_dataset(folder, count=unique, seconds=seconds, seed=1)
    entries = json.loads((folder / "metadata.json").read_text())
    for i in range(unique, files):  # copies need distinct content, else they are (rightly) skipped as duplicates
        source = folder / entries[i % unique]["audio"]
        target = folder / f"train/copy_{i:05d}.wav"
        shutil.copy(source, target)
        with open(target, "r+b") as file:  # flip one sample's low byte near the end
            file.seek(-2 - 2 * (i // unique), os.SEEK_END)
            file.write(bytes([i % 251]))
        entries.append({**entries[i % unique], "audio": target.relative_to(folder).as_posix()})
    (folder / "metadata.json").write_text(json.dumps(entries))


def bench_manifests(files: int, seconds: float = 4.0) -> dict:
    """`make manifests` on `files` files, first run and re-run, against AudioCraft's own indexer on the same
    folder. They do different work: ours decodes, checks, converts, normalises, measures tempo and key and cuts
    segments; AudioCraft's only lists files and reads their headers."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "beats"
        write_folder(folder, files, seconds)
        timings = {}
        for run_name in ("first run", "re-run (cached)"):
            start = time.perf_counter()
            build_manifests(folder, "bench", ManifestOptions(segment=30.0), out_root=Path(tmp) / "manifests")
            timings[run_name] = time.perf_counter() - start
        start = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "audiocraft.data.audio_dataset",
                str(folder),
                str(Path(tmp) / "ac.jsonl"),
                "--workers",
                str(os.cpu_count() or 1),
            ],
            check=True,
            capture_output=True,
        )
        timings["audiocraft indexer"] = time.perf_counter() - start
    return {
        "files": files,
        "seconds_per_file": seconds,
        "rows": [
            {"what": name, "wall_s": round(wall, 2), "files_per_s": round(files / wall, 1)}
            for name, wall in timings.items()
        ],
    }


def manifests_markdown(manifests: dict) -> tp.List[str]:
    lines = [
        f"## make manifests: {manifests['files']} files of {manifests['seconds_per_file']:g} s (44.1 kHz stereo wav)",
        "",
        "| run | wall (s) | files/s |",
        "|---|---|---|",
    ]
    lines += [f"| {r['what']} | {r['wall_s']} | {r['files_per_s']} |" for r in manifests["rows"]]
    return lines + [
        "",
        "AudioCraft's indexer (`python -m audiocraft.data.audio_dataset`, its start-up included) "
        "only lists files and reads their headers; ours also decodes, converts, normalises loudness, "
        "measures tempo and key and writes segments.",
        "",
    ]


# -- make demo ---------------------------------------------------------------------------------------------------


def demo_path_overrides(makefile: Path, out: Path) -> tp.List[str]:
    """`VAR=<out>/...` for every `DEMO_* ?= output/...` of the Makefile, so that no demo path stays in the
    repository's output/ (the variables are read, not listed here: the demo gains steps and paths)."""
    import re

    pattern = re.compile(r"^(DEMO_\w+)\s*\?=\s*output/(\S+)\s*$", re.MULTILINE)
    return [f"{name}={out / rest}" for name, rest in pattern.findall(makefile.read_text())]


def folder_state(roots: tp.Sequence[Path]) -> tp.Dict[str, float]:
    """Modification times of these folders and of their sub-folders two levels down (a new entry shows)."""
    state = {}
    for root in roots:
        for folder in [root, *root.glob("*/"), *root.glob("*/*/")]:
            with contextlib.suppress(OSError):
                state[str(folder)] = folder.stat().st_mtime
    return state


def bench_demo(timeout_s: float = 1800) -> dict:
    """`make demo` end to end, every output in a temporary folder (the user's output/ and manifests/ untouched)."""
    watched = [REPO_ROOT / "output", REPO_ROOT / "manifests"]
    before = folder_state(watched)
    with tempfile.TemporaryDirectory(prefix="musicgen_ft_bench_demo_") as tmp:
        out = Path(tmp) / "output"
        command = ["make", "demo", f"OUTPUT={out}", *demo_path_overrides(REPO_ROOT / "Makefile", out)]
        env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
        env.update(
            MUSICGEN_FT_OUTPUT=str(out),
            MUSICGEN_FT_MANIFESTS=str(Path(tmp) / "manifests"),
            AUDIOCRAFT_DORA_DIR=str(out),
        )
        start = time.perf_counter()
        try:
            result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
            error = None if result.returncode == 0 else describe_exit(result.returncode, result.stderr)
        except subprocess.TimeoutExpired:
            error = f"timed out after {timeout_s:g} s"
        except FileNotFoundError:
            error = "`make` is not installed: install it (apt-get install make) or run with --no-demo"
        wall = time.perf_counter() - start
    after = folder_state(watched)
    changed = sorted(path for path, mtime in after.items() if before.get(path) != mtime)
    warning = (
        (
            f"the repository's {', '.join(changed[:5])} changed while the demo ran (a demo path the bench "
            "does not redirect, or another process)"
        )
        if changed
        else None
    )
    return {
        "command": "make demo " + " ".join(command[2:]).replace(str(out), "<tmp>"),
        "wall_s": None if error else round(wall, 1),
        "error": error,
        "warning": warning,
    }
