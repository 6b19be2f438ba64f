"""`make bench`'s full-size rows: musicgen-small's training checkpoint, full and LoRA, written here as upstream
writes it and as checkpoints.py does; and a projection of the user's first job (50 clips x 30 s x 10 epochs) on a
24 GB GPU from its FLOPs at a stated utilisation plus the overheads measured here or estimated (each says which).

The LM has musicgen-small's exact dimensions with random weights (bench/matrix.py ARCHITECTURES), its optimizer
state made by one AdamW step, so every tensor a real checkpoint holds is there with its real size.
"""

import tempfile
import time
import typing as tp
from pathlib import Path

from .. import checkpoints
from .flops import gpu_peak_tflops, matrix_params, training_flops
from .matrix import ARCHITECTURES, StepConfig

ARCH = "musicgen-small"
JOB = {"clips": 50, "clip_s": 30.0, "epochs": 10, "valid_share": 0.2}  # the user's first job (issue 19)
GPU = "NVIDIA GeForce RTX 4090"  # the 24 GB card of the goal; its dense bf16 peak from flops.GPU_PEAK_TFLOPS
UTILISATION = 1 / 3  # of the dense bf16 peak: the stated assumption, below the 35% MFU goal of make bench
TEXT_TOKENS = 32  # a caption's T5 tokens (their share of the FLOPs is small)
# Estimates for what cannot be measured without that GPU, each stated in the report:
GPU_DECODE_STEP_S = 0.015  # one autoregressive step of musicgen-small at batch 4 (2 prompts x CFG): ~15 ms
HOST_COPY_GBPS = 4.0  # GPU -> pageable host memory, the snapshot of a checkpoint that is not the run's last
DISK_WRITE_GBPS = 2.0  # the background write on an NVMe disk; measured here as well (this machine's disk)
ENCODE_S = 5.0  # EnCodec encoding of the 50 clips once (the token cache serves later epochs), and T5 of captions
STARTUP_S = 20.0  # imports, reading the 841 MB model and T5, building: measured start-up of the tiny model is ~5 s


def build(mode: str, t5: Path):
    """musicgen-small's LM (LoRA-injected in lora mode) and its AdamW after one step: what a checkpoint holds."""
    import torch

    from .. import patches
    from .step import build_lm

    patches.apply()  # a local T5 folder (modules/conditioners.py:393)
    lm, params, trainable, total = build_lm(StepConfig(ARCH, mode, "cached", 1, 1.0, False, "cpu", t5=str(t5)), t5)
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.01)
    for p in params:
        p.grad = torch.full_like(p, 1e-3)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return lm, optimizer, trainable, total


def timed_save(state: tp.Any, path: Path) -> tp.Tuple[int, float]:
    begin = time.time()
    checkpoints.save(state, path)
    return path.stat().st_size, time.time() - begin


def checkpoint_row(mode: str, t5: Path, folder: Path) -> dict:
    """One mode's checkpoint written upstream's way (model, a full best copy, optimizer; solvers/base.py:282, the
    training loop waiting) and checkpoints.py's way (snapshot on the loop, the write in a thread, the best state in
    its own fp16 file when a later epoch needs it)."""
    from .. import lora

    begin = time.time()
    lm, optimizer, trainable, total = build(mode, t5)
    build_s = time.time() - begin
    model = lm.state_dict()
    if mode == "lora":  # FinetuneSolver.state_dict: a LoRA checkpoint holds the adapters only
        model = {k: v for k, v in model.items() if lora.is_adapter_key(k)}
    best = {k: v.detach().clone() for k, v in model.items()}  # upstream's best copy: fp32 on the CPU (autocast off)
    upstream = {"model": model, "best_state": {"model": best}, "optimizer": optimizer.state_dict()}
    upstream_bytes, upstream_s = timed_save(upstream, folder / f"upstream-{mode}.th")
    (folder / f"upstream-{mode}.th").unlink()
    del upstream, best
    lean = {"model": model, "best_state": checkpoints.reference(1, in_file=False), "optimizer": optimizer.state_dict()}
    begin = time.time()
    snapshot = checkpoints.snapshot(lean)
    snapshot_s = time.time() - begin
    lean_bytes, lean_s = timed_save(snapshot, folder / f"lean-{mode}.th")
    del snapshot
    best_file = {"epoch": 1, "best_state": {"model": checkpoints.in_best_precision(model)}}
    best_bytes, best_s = timed_save(best_file, folder / f"best-{mode}.th")
    for name in (f"lean-{mode}.th", f"best-{mode}.th"):
        (folder / name).unlink()
    return {
        "mode": mode,
        "trainable": trainable,
        "total": total,
        "build_s": round(build_s, 1),
        "upstream_bytes": upstream_bytes,
        "upstream_write_s": round(upstream_s, 2),
        "lean_bytes": lean_bytes,
        "lean_snapshot_s": round(snapshot_s, 2),
        "lean_write_s": round(lean_s, 2),
        "best_file_bytes": best_bytes,
        "best_file_write_s": round(best_s, 2),
        "lm": lm if mode == "full" else None,
    }


def bytes_per_epoch(row: dict, epochs: int, checkpoint_writes: int) -> dict:
    """Bytes a run writes per epoch: upstream's checkpoint after every epoch; ours `checkpoint_writes` times, plus at
    most one best-state file per checkpoint written (only when that checkpoint's epoch is not the best)."""
    upstream = row["upstream_bytes"]
    lean = checkpoint_writes * (row["lean_bytes"] + row["best_file_bytes"]) / epochs
    return {"upstream": upstream, "lean": round(lean), "ratio": round(lean / upstream, 3)}


def projection(full: dict, lm) -> dict:
    """The 50 clips x 30 s x 10 epochs job on a 24 GB GPU: training compute from the FLOPs at UTILISATION of the
    GPU's dense bf16 peak, and every other second, measured here or estimated (each named)."""
    arch = ARCHITECTURES[ARCH]
    frames = round(JOB["clip_s"] * 50)  # EnCodec 32 kHz: 50 frames per second
    positions = frames + arch.codebooks - 1  # the delay pattern adds K - 1 steps
    per_clip = training_flops(matrix_params(lm), 1, positions, TEXT_TOKENS, arch.layers, arch.dim)
    peak = gpu_peak_tflops(GPU) * 1e12 * UTILISATION
    train_s = JOB["epochs"] * JOB["clips"] * per_clip / peak
    valid_clips = round(JOB["clips"] * JOB["valid_share"])
    valid_s = JOB["epochs"] * valid_clips * per_clip / 3 / peak  # forward only: a third of a training step
    generate_epochs = len({e for e in range(1, JOB["epochs"] + 1) if e % 5 == 0} | {JOB["epochs"]})
    generate_s = generate_epochs * 5.0 * 50 * GPU_DECODE_STEP_S  # 2 prompts x 5 s in one batch: 250 steps
    upstream_generate_s = generate_epochs * 30.0 * 50 * GPU_DECODE_STEP_S  # 4 prompts x 30 s: 1,500 steps
    gb = full["lean_bytes"] / 1e9
    # one lean checkpoint (save_last_interval_s=600 > the run), after the last epoch: no snapshot, the run waits for
    # the write (and a best-state file, when the last epoch is not the best)
    checkpoint_s = (full["lean_bytes"] + full["best_file_bytes"]) / 1e9 / DISK_WRITE_GBPS
    every_epoch_checkpoint_s = (JOB["epochs"] - 1) * gb / HOST_COPY_GBPS + checkpoint_s  # snapshots on the loop
    upstream_checkpoint_s = JOB["epochs"] * full["upstream_bytes"] / 1e9 / DISK_WRITE_GBPS
    overhead = {"startup_s": STARTUP_S, "encode_s": ENCODE_S, "valid_s": valid_s, "generate_s": generate_s}
    overhead["checkpoint_s"] = checkpoint_s
    wall = train_s + sum(overhead.values())
    upstream_wall = train_s + STARTUP_S + ENCODE_S + valid_s + upstream_generate_s + upstream_checkpoint_s
    return {
        "job": JOB,
        "gpu": GPU,
        "utilisation": round(UTILISATION, 3),
        "flops": JOB["epochs"] * JOB["clips"] * per_clip,
        "train_s": round(train_s, 1),
        **{k: round(v, 1) for k, v in overhead.items()},
        "wall_s": round(wall, 1),
        "overhead_share": round(1 - train_s / wall, 3),
        # the same without start-up and the first epoch's encoding: what the training loop adds to training
        "loop_overhead_share": round(
            (valid_s + generate_s + checkpoint_s) / (train_s + valid_s + generate_s + checkpoint_s), 3
        ),
        "every_epoch_checkpoint_s": round(every_epoch_checkpoint_s, 1),
        "upstream_wall_s": round(upstream_wall, 1),
        "estimates": {
            "gpu_decode_step_s": GPU_DECODE_STEP_S,
            "host_copy_gbps": HOST_COPY_GBPS,
            "disk_write_gbps": DISK_WRITE_GBPS,
            "encode_s": ENCODE_S,
            "startup_s": STARTUP_S,
        },
    }


def section() -> dict:
    """The full-size rows and the projection, measured in this process (~13 GB of RAM at the peak)."""
    from .step import write_text_encoder

    with tempfile.TemporaryDirectory(prefix="musicgen_ft_full_size_") as tmp:
        t5 = write_text_encoder("t5-base", Path(tmp) / "t5")
        rows = []
        for mode in ("full", "lora"):
            print(f"  full-size checkpoint, {mode} ...", flush=True)
            rows.append(checkpoint_row(mode, t5, Path(tmp)))
    full = rows[0]
    lm = full.pop("lm")
    rows[1].pop("lm")
    result = {
        "checkpoints": rows,
        "bytes_per_epoch": {
            "every_epoch": bytes_per_epoch(full, JOB["epochs"], JOB["epochs"]),
            "default": bytes_per_epoch(full, JOB["epochs"], 1),
        },
        "projection": projection(full, lm),
    }
    result["disk_write_gbps_here"] = round(full["lean_bytes"] / 1e9 / max(full["lean_write_s"], 1e-9), 2)
    return result


def goals(full_size: dict) -> tp.List[dict]:
    """The three goals of issue 19, with their measured or projected values."""
    from .results import goal

    every, default = full_size["bytes_per_epoch"]["every_epoch"], full_size["bytes_per_epoch"]["default"]
    p = full_size["projection"]
    return [
        goal(
            "bytes written per epoch by a full fine-tune <= half of upstream's",
            default["ratio"],
            f"{default['ratio']:.2f} of upstream's {every['upstream'] / 1e9:.2f} GB (default "
            f"save_last_interval_s=600: one checkpoint in this job); {every['ratio']:.2f} with one every epoch",
            default["ratio"] <= 0.5,
        ),
        goal(
            "projected non-compute overhead of the 50-clip job <= 20% of its wall time",
            p["overhead_share"],
            f"{100 * p['overhead_share']:.0f}% of {p['wall_s']:.0f} s, start-up included; "
            f"{100 * p['loop_overhead_share']:.0f}% in the training loop (validation, samples, checkpoint)",
            p["overhead_share"] <= 0.2,
        ),
        goal(
            "the 50-clip job under 5 minutes on a 24 GB GPU (projected)",
            p["wall_s"],
            f"{p['wall_s']:.0f} s on an {p['gpu']} at {100 * p['utilisation']:.0f}% of its bf16 peak "
            f"(upstream's settings: {p['upstream_wall_s']:.0f} s)",
            p["wall_s"] < 300,
        ),
    ]


def markdown(full_size: dict) -> tp.List[str]:
    lines = [
        "## Full size: musicgen-small's checkpoint and the 50-clip job",
        "",
        "| mode | trainable | upstream checkpoint | write | lean checkpoint | snapshot (on the loop) "
        "| write (background) | best file (fp16) | write |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in full_size["checkpoints"]:
        lines.append(
            f"| {r['mode']} | {r['trainable'] / 1e6:.1f} M | {r['upstream_bytes'] / 1e6:,.1f} MB | "
            f"{r['upstream_write_s']} s | {r['lean_bytes'] / 1e6:,.1f} MB | {r['lean_snapshot_s']} s | "
            f"{r['lean_write_s']} s | {r['best_file_bytes'] / 1e6:,.1f} MB | {r['best_file_write_s']} s |"
        )
    p = full_size["projection"]
    lines += [
        "",
        f"Projection, {p['job']['clips']} clips x {p['job']['clip_s']:g} s x {p['job']['epochs']} epochs on an "
        f"{p['gpu']} at {100 * p['utilisation']:.0f}% of its dense bf16 peak ({p['flops'] / 1e15:.2f} PFLOP of "
        f"training): training {p['train_s']} s, start-up {p['startup_s']} s (est.), token encoding {p['encode_s']} s "
        f"(est.), validation {p['valid_s']} s, samples {p['generate_s']} s (2 x 5 s at epochs 5 and 10, "
        f"{p['estimates']['gpu_decode_step_s'] * 1000:g} ms per step, est.), checkpoint {p['checkpoint_s']} s "
        f"(one lean write, {p['estimates']['disk_write_gbps']:g} GB/s est.; this machine's disk wrote "
        f"{full_size['disk_write_gbps_here']} GB/s; {p['every_epoch_checkpoint_s']} s with one every epoch, "
        f"{p['estimates']['host_copy_gbps']:g} GB/s host copies est.): **{p['wall_s']} s**, "
        f"{100 * p['overhead_share']:.0f}% overhead; with upstream's checkpoints and samples: "
        f"{p['upstream_wall_s']} s.",
        "",
    ]
    return lines
