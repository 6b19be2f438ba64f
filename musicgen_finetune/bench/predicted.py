"""The plan's predictions (musicgen_finetune.planning) next to what was measured: the published full fine-tuning
figures of musicgen-small on one A100, and, on a GPU, this run's own training-step rows (max_memory_allocated and
max_memory_reserved against the predicted peak and total)."""

import typing as tp

from ..config import compose
from ..planning.fit import Planner
from ..planning.gpu import CUDA_CONTEXT_GIB, Device, training_device
from ..planning.trace import run_models

# Full fine-tuning of musicgen-small, 30 s segments, one A100 (../shared/notes/what-users-hit.md: a peer's
# measurements with AudioCraft's musicgen_base_32khz solver), in GB; None: out of memory.
PUBLISHED_A100_GB = {1: 13.4, 2: 14.6, 4: 19.0, 8: 27.5, 16: None}
# That solver as published, on our preset: fp16 autocast with loss scaling, AdamW unfused (torch runs it with
# foreach on CUDA), EMA on the GPU, EnCodec and T5 run every step, one micro-batch per step.
PUBLISHED_SETTINGS = (
    "model/lm/model_scale=small",
    "autocast_dtype=float16",
    "optim.adam.fused=false",
    "optim.ema.use=true",
    "optim.ema.device=cuda",
    "optim.grad_accum_steps=1",
    "dataset.batch_size=1",
    "dataset.segment_duration=30",
)
GB = 1e9
GIB = 2**30


def published_rows(
    batches: tp.Sequence[int] = tuple(PUBLISHED_A100_GB), device: tp.Optional[Device] = None
) -> tp.List[dict]:
    """The plan of each published batch size, beside the published figure."""
    cfg = compose(["solver=finetune/musicgen_small", "device=cuda", *PUBLISHED_SETTINGS])
    device = device or training_device("cuda", memory_gib=40.0, name="A100")
    planner = Planner(run_models(cfg), device)
    rows = []
    for batch in batches:
        published = PUBLISHED_A100_GB[batch]
        row = planner.row(batch)
        rows.append(
            {
                "batch": batch,
                "segment_s": row.segment_s,
                "published_gb": published,
                "predicted_peak_gb": round((row.peak_gib + row.extras_gib) * GIB / GB, 2),
                "predicted_total_gb": round(row.total_gib * GIB / GB, 2),
                "parts_gib": {k: round(v, 3) for k, v in row.parts_gib.items()},
            }
        )
    return rows


def measured_rows(training_rows: tp.List[dict]) -> tp.List[dict]:
    """For each GPU row of musicgen-small measured by this bench, the plan of the same step (its preset, batch,
    segment, tokens, checkpointing; one micro-batch, no EMA, as bench/step.py runs it)."""
    out = []
    for measured in training_rows:
        if measured["device"] != "cuda" or measured["arch"] != "musicgen-small" or measured["error"]:
            continue
        preset = "finetune/musicgen_small" + ("_lora" if measured["mode"] == "lora" else "")
        dtype = "float16" if (measured["precision"] or "").startswith("fp16") else "bfloat16"
        cfg = compose(
            [
                f"solver={preset}",
                "model/lm/model_scale=small",
                f"autocast_dtype={dtype}",
                "optim.grad_accum_steps=1",
                "dataset.batch_size=1",
                f"dataset.segment_duration={measured['segment_s']}",
                f"transformer_lm.checkpointing={'torch' if measured['checkpointing'] else 'none'}",
            ]
        )
        inputs = "cached" if measured["tokens"] == "cached" else "encoded"
        row = Planner(run_models(cfg), training_device("cuda"), inputs).row(measured["batch"])
        out.append(
            {
                **{k: measured[k] for k in ("arch", "mode", "tokens", "batch", "segment_s", "checkpointing")},
                "measured_allocated_gib": measured["peak_gib"],
                "measured_reserved_gib": measured["peak_reserved_gib"],
                "predicted_peak_gib": round(row.peak_gib + row.extras_gib, 3),
                "predicted_reserved_gib": round(row.total_gib - CUDA_CONTEXT_GIB, 3),
            }
        )
    return out


def section(training_rows: tp.List[dict]) -> dict:
    """bench.json's `plan`: predicted against published, and against this run's GPU measurements."""
    return {"published_a100": published_rows(), "measured": measured_rows(training_rows)}
