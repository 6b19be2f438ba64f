"""`make bench`: measured numbers, each with the machine it ran on, to output/bench/ (JSON + markdown).

Benchmarks here are measurements, never pass/fail tests. Each section records what it did, so numbers from
different machines are not confused.
"""
import contextlib
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
    if results.get("lora"):
        lines += lora_markdown(results["lora"])
    return "\n".join(lines)


def run(quick: bool = False, out: tp.Optional[Path] = None) -> Path:
    out = out or output_dir() / "bench"
    out.mkdir(parents=True, exist_ok=True)
    results: tp.Dict[str, tp.Any] = {"machine": machine(), "time": time.time(), "quick": quick}
    results["manifests"] = bench_manifests(files=100 if quick else 1000)
    results["lora"] = bench_lora(quick)
    (out / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "bench.md").write_text(markdown(results))
    print(markdown(results))
    return out


# -- training steps: full fine-tuning against LoRA -------------------------------------------------------------

ARCHITECTURES = {
    # musicgen-small's LM (random weights; its shapes are public); the text encoder is a tiny T5, so the
    # conditioner's input projection is 32 wide instead of T5-base's 768 (0.7 M of 420 M parameters).
    "musicgen-small": ["model/lm/model_scale=small", "transformer_lm.card=2048"],
    "tiny": ["model/lm/model_scale=xsmall", "transformer_lm.card=64"],
}


def step_measurement(arch: str, mode: str, batch: int, segment: float, steps: int, device: str) -> dict:
    """Time and peak memory of `steps` training steps (forward, backward, AdamW) in this process."""
    import resource
    import torch
    from audiocraft.models import builders
    from . import lora, patches
    from .config import compose
    from .tiny_model import write_t5
    patches.apply()
    with tempfile.TemporaryDirectory() as tmp:
        t5 = write_t5(Path(tmp) / "t5", seed=0)
        preset = "finetune/musicgen_small_lora" if mode == "lora" else "finetune/musicgen_small"
        cfg = compose([f"solver={preset}", f"device={device}", f"conditioners.description.t5.name={t5}",
                       *ARCHITECTURES[arch]])
        if arch == "tiny" and mode == "lora":
            cfg.lora.rank, cfg.lora.alpha = 4, 8
        torch.manual_seed(0)
        lm = builders.get_lm_model(cfg).to(device)
    if mode == "lora":
        lora.inject(lm, lora.LoraConfig.from_dict(cfg.lora))
        trainable, total = lora.freeze_base(lm)
        params = list(lora.adapter_parameters(lm).values())
    else:
        params = list(lm.parameters())
        trainable = total = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    frames = int(segment * 50)
    codes = torch.randint(0, lm.card, (batch, lm.num_codebooks, frames), device=device)
    conditions = {"description": (torch.randn(batch, 8, lm.dim, device=device),
                                  torch.ones(batch, 8, device=device, dtype=torch.long))}
    use_cuda = device == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_cuda else contextlib.nullcontext()
    if use_cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps + 1):  # the first step warms up (allocations, kernels) and is not timed
        start = time.perf_counter()
        with autocast:
            output = lm.compute_predictions(codes, [], conditions)
            logits = output.logits.float()
            loss = torch.nn.functional.cross_entropy(logits[output.mask].view(-1, logits.shape[-1]),
                                                     codes[output.mask].view(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if use_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() / 2 ** 30 if use_cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20)
    return {"arch": arch, "mode": mode, "batch": batch, "segment_s": segment, "device": device,
            "trainable": trainable, "total": total, "step_s": round(sum(times[1:]) / steps, 3),
            "peak_gib": round(peak, 3), "memory": "GPU allocated" if use_cuda else "process RSS"}


def measure_in_subprocess(**kwargs) -> dict:
    """One configuration per process, so that peak memory belongs to it alone."""
    args = [f"--{k.replace('_', '-')}={v}" for k, v in kwargs.items()]
    result = subprocess.run([sys.executable, "-m", "musicgen_finetune.bench", "step", *args],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"bench step {kwargs} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def bench_lora(quick: bool) -> dict:
    import torch
    device = "cuda" if torch.cuda.is_available() else "cpu"
    configs = [("tiny", 4, 2.0, 3)]
    if device == "cuda":
        configs += [("musicgen-small", 4, 30.0, 3), ("musicgen-small", 1, 30.0, 3)]
    else:
        configs += [("musicgen-small", 1, 2.0, 1 if quick else 2)]
    rows = []
    for arch, batch, segment, steps in configs:
        for mode in ("full", "lora"):
            rows.append(measure_in_subprocess(arch=arch, mode=mode, batch=batch, segment=segment, steps=steps,
                                              device=device))
    return {"device": device, "rows": rows}


def lora_markdown(section: dict) -> tp.List[str]:
    lines = [f"## Full fine-tuning vs LoRA ({section['device']}; one training step: forward, backward, AdamW)", "",
             "| model | batch x segment | mode | trainable | step (s) | peak memory (GiB) |",
             "|---|---|---|---|---|---|"]
    rows = section["rows"]
    for row in rows:
        share = f"{row['trainable']:,} ({100 * row['trainable'] / row['total']:.2f}%)"
        lines.append(f"| {row['arch']} | {row['batch']} x {row['segment_s']:g} s | {row['mode']} | {share} | "
                     f"{row['step_s']} | {row['peak_gib']} ({row['memory']}) |")
    lines += ["", "Ratios, LoRA / full, from the same run:", ""]
    for full, low_rank in zip(rows[::2], rows[1::2], strict=True):
        lines.append(f"- {full['arch']}, batch {full['batch']} x {full['segment_s']:g} s: trainable "
                     f"{low_rank['trainable'] / full['trainable']:.4f}, step time "
                     f"{low_rank['step_s'] / full['step_s']:.2f}, peak memory "
                     f"{low_rank['peak_gib'] / full['peak_gib']:.2f}")
    return lines + [""]


if __name__ == "__main__":
    import argparse
    from . import environment
    environment.prepare()
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["step"])
    parser.add_argument("--arch", choices=list(ARCHITECTURES), required=True)
    parser.add_argument("--mode", choices=["full", "lora"], required=True)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--segment", type=float, default=2.0)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    opts = parser.parse_args()
    print(json.dumps(step_measurement(opts.arch, opts.mode, opts.batch, opts.segment, opts.steps, opts.device)))
