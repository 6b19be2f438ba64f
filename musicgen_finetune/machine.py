"""What this machine is, for every number the harness records (benchmarks, reports): measurements from different
machines must never be confused."""

import os
import platform
import typing as tp
from pathlib import Path

GIB = 2**30


def meminfo_gib(field: str) -> tp.Optional[float]:
    """A /proc/meminfo field (MemTotal, MemAvailable) in GiB; None where there is no /proc."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / GIB
    except (OSError, ValueError, IndexError):
        pass
    return None


def describe() -> dict:
    """CPU model and cores, RAM, Python, torch, and the first GPU with its memory (None without one)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(meminfo_gib("MemTotal") or 0, 1),
        "python": platform.python_version(),
        "gpu": None,
        "gpu_memory_gib": None,
    }
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / GIB, 1)
    except ImportError:
        pass
    return info


def one_line(m: dict) -> str:
    """`describe()` as one line of text."""
    gpu = f"{m['gpu']} ({m['gpu_memory_gib']} GiB)" if m.get("gpu") else "none"
    return (
        f"Machine: {m['cpu']}, {m['cores']} cores, {m.get('ram_gib', '?')} GiB RAM, GPU: {gpu}, "
        f"Python {m['python']}, torch {m.get('torch', '?')}"
    )
