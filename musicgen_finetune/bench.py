"""`make bench`: measured numbers, each with the machine it ran on, to output/bench/ (JSON + markdown).

Benchmarks here are measurements, never pass/fail tests. Each section records what it did, so numbers from
different machines are not confused.
"""
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import typing as tp
from pathlib import Path

from . import output_dir


def machine() -> dict:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "gpu": None}
    try:
        import torch
        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def write_folder(folder: Path, files: int, seconds: float) -> None:
    """`files` captioned 808 beats (44.1 kHz stereo wav, as users bring them), rendered once and copied."""
    import shutil
    from .synth808 import write_dataset
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
    from .data import ManifestOptions, build_manifests
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "beats"
        write_folder(folder, files, seconds)
        timings = {}
        for run in ("first run", "re-run (cached)"):
            start = time.perf_counter()
            build_manifests(folder, "bench", ManifestOptions(segment=30.0), out_root=Path(tmp) / "manifests")
            timings[run] = time.perf_counter() - start
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "audiocraft.data.audio_dataset", str(folder), str(Path(tmp) / "ac.jsonl"),
                        "--workers", str(os.cpu_count() or 1)], check=True, capture_output=True)
        timings["audiocraft indexer"] = time.perf_counter() - start
    return {"files": files, "seconds_per_file": seconds,
            "rows": [{"what": name, "wall_s": round(wall, 2), "files_per_s": round(files / wall, 1)}
                     for name, wall in timings.items()]}


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [f"# Benchmark ({time.strftime('%Y-%m-%d', time.gmtime(results['time']))})", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, GPU: {m['gpu'] or 'none'}, Python {m['python']}, "
             f"torch {m.get('torch', '?')}", ""]
    manifests = results.get("manifests")
    if manifests:
        lines += [f"## make manifests: {manifests['files']} files of {manifests['seconds_per_file']:g} s "
                  "(44.1 kHz stereo wav)", "", "| run | wall (s) | files/s |", "|---|---|---|"]
        lines += [f"| {r['what']} | {r['wall_s']} | {r['files_per_s']} |" for r in manifests["rows"]]
        lines += ["", "AudioCraft's indexer (`python -m audiocraft.data.audio_dataset`, its start-up included) only "
                  "lists files and reads their headers; ours also decodes, converts, normalises loudness, measures "
                  "tempo and key and writes segments.", ""]
    return "\n".join(lines)


def run(quick: bool = False, out: tp.Optional[Path] = None) -> Path:
    out = out or output_dir() / "bench"
    out.mkdir(parents=True, exist_ok=True)
    results: tp.Dict[str, tp.Any] = {"machine": machine(), "time": time.time(), "quick": quick}
    results["manifests"] = bench_manifests(files=100 if quick else 1000)
    (out / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "bench.md").write_text(markdown(results))
    print(markdown(results))
    return out
