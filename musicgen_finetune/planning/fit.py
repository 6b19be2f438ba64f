"""From traced updates to a plan: per micro-batch, the peak memory and its parts, what the card must hold, whether it
fits, the FLOPs of the update and an estimated step and epoch time; and `optim.grad_accum_steps: auto`, the largest
micro-batch that fits, with activation checkpointing only when micro-batch 1 does not fit.

    Planner(models, device)           traces of one run's update, and rows from them
    choose_micro_batch(...)           `auto`: the split of the per-GPU batch, or NothingFitsError with what would fit
    resolve_grad_accum_steps(cfg)     `auto` in a run's config replaced by the chosen split (the solver, at start)
    check_fits(cfg)                   `make train`'s refusal before anything is loaded
"""

import dataclasses
import math
import typing as tp

from omegaconf import DictConfig, OmegaConf

from ..bench.flops import MatrixParams, matrix_params, training_flops
from ..errors import UserError
from ..machine import GIB
from .gpu import (
    FIT_MARGIN,
    Device,
    device_extras_bytes,
    device_total_gib,
    fits,
    memory_override,
    training_device,
)
from .trace import MemoryTrace, RunModels, Trainee, resolved_copy, run_models
from .tracker import PARTS

AUTO = "auto"
# Model FLOP utilisation assumed for step times: the share of the card's dense bf16 peak a training step of a
# few-hundred-million-parameter transformer at ~1500 positions reaches with fused attention and AdamW (published
# LLM training runs report 30-50% at larger sizes; smaller models reach less). `make bench` on a GPU measures it.
ASSUMED_MFU = 0.30
SEGMENTS_WITHOUT_DATASET = 100  # epoch times are per this many segments when no dataset is named
SHORTER_SEGMENTS = (20.0, 15.0, 10.0, 5.0)  # what a refusal tries, shortest last


class NothingFitsError(UserError, ValueError):
    """`optim.grad_accum_steps=auto` found no micro-batch that fits the device; the message says what would."""


@dataclasses.dataclass
class Row:
    """One micro-batch size of a plan."""

    micro_batch: int
    accum_steps: int
    segment_s: float
    checkpointing: bool
    peak_gib: float  # predicted max_memory_allocated of one update
    parts_gib: tp.Dict[str, float]  # at the peak; they add up to peak_gib
    phase: str  # what was being allocated at the peak
    extras_gib: float  # allocated besides the tensors: cuBLAS workspaces, flash backward's accumulator
    total_gib: float  # what the device must hold: allocator reserve and CUDA context included
    fits: bool
    flops: float  # model FLOPs of the update (all its micro-batches)
    step_s: tp.Optional[float]  # estimated time of the update
    epoch_s: tp.Optional[float]

    def to_dict(self) -> dict:
        row = dataclasses.asdict(self)
        for key in ("peak_gib", "extras_gib", "total_gib"):
            row[key] = round(row[key], 3)
        row["parts_gib"] = {k: round(v, 3) for k, v in row["parts_gib"].items()}
        row["step_s"] = None if self.step_s is None else round(self.step_s, 3)
        row["epoch_s"] = None if self.epoch_s is None else round(self.epoch_s, 1)
        return row


def accum_steps_for(batch: int, micro_batch: int) -> int:
    """Micro-batches an update of `batch` segments takes at micro-batch size `micro_batch` (the solver's
    split_batch then makes them as even as it can)."""
    return max(1, math.ceil(batch / micro_batch))


def forward_flops(params: MatrixParams, batch: int, positions: int, text_tokens: int, layers: int, dim: int) -> float:
    """The forward's share of bench.flops.training_flops: what activation checkpointing computes again."""
    matmuls = batch * (positions * 2 * params.sequence + text_tokens * 2 * params.text)
    return float(matmuls + batch * layers * (2 * positions**2 * dim + 4 * positions * text_tokens * dim))


class Planner:
    """Rows of a plan for one run: traces its update (one Trainee per checkpointing setting) at each micro-batch.

    Args:
        models: the run's configs (trace.run_models).
        device: the device it trains on (gpu.training_device).
        inputs: "encoded" (the first epoch: EnCodec and T5 run on the device) or "cached".
        segments: training segments per epoch, for epoch times (default SEGMENTS_WITHOUT_DATASET).
        mfu: the model FLOP utilisation the step times assume.
    """

    def __init__(
        self,
        models: RunModels,
        device: Device,
        inputs: str = "encoded",
        segments: tp.Optional[int] = None,
        mfu: float = ASSUMED_MFU,
    ):
        self.models, self.device, self.inputs, self.mfu = models, device, inputs, mfu
        self.segments = segments or SEGMENTS_WITHOUT_DATASET
        self._trainees: tp.Dict[bool, Trainee] = {}
        self._traces: tp.Dict[tuple, MemoryTrace] = {}

    @property
    def cfg(self) -> DictConfig:
        return self.models.cfg

    @property
    def batch(self) -> int:
        return int(self.cfg.dataset.batch_size)

    @property
    def preset_checkpointing(self) -> bool:
        return self.cfg.transformer_lm.get("checkpointing", "none") != "none"

    def trainee(self, checkpointing: bool) -> Trainee:
        if checkpointing not in self._trainees:
            self._trainees[checkpointing] = Trainee(self.models, checkpointing, self.inputs)
        return self._trainees[checkpointing]

    def row(
        self, micro_batch: int, checkpointing: tp.Optional[bool] = None, segment_s: tp.Optional[float] = None
    ) -> Row:
        """The plan of an update in micro-batches of `micro_batch` (traced once, then remembered)."""
        checkpointing = self.preset_checkpointing if checkpointing is None else checkpointing
        segment_s = float(segment_s or self.cfg.dataset.segment_duration)
        steps = accum_steps_for(self.batch, micro_batch)
        key = (micro_batch, checkpointing, segment_s, min(steps, 2))
        if key not in self._traces:
            self._traces[key] = self.trainee(checkpointing).trace(micro_batch, segment_s, steps)
        trace = self._traces[key]
        lm_cfg = self.cfg.transformer_lm
        extras = device_extras_bytes(self.device.kind, micro_batch, trace.positions, lm_cfg.dim) / GIB
        total = device_total_gib(self.device.kind, trace.peak_gib + extras)
        params = matrix_params(self.trainee(checkpointing).lm)
        shape = (trace.positions, trace.text_tokens, lm_cfg.num_layers, lm_cfg.dim)
        update_batch = max(self.batch, micro_batch)
        flops = training_flops(params, update_batch, *shape)
        computed = flops + (forward_flops(params, update_batch, *shape) if checkpointing else 0.0)
        step_s = computed / (self.device.peak_tflops * 1e12 * self.mfu) if self.device.peak_tflops else None
        epoch_s = step_s * math.ceil(self.segments / self.batch) if step_s is not None else None
        return Row(
            micro_batch=micro_batch,
            accum_steps=steps,
            segment_s=segment_s,
            checkpointing=checkpointing,
            peak_gib=trace.peak_gib,
            parts_gib=trace.parts_gib,
            phase=trace.phase,
            extras_gib=extras,
            total_gib=total,
            fits=fits(total, self.device),
            flops=flops,
            step_s=step_s,
            epoch_s=epoch_s,
        )

    def rows(self, micro_batches: tp.Sequence[int], segment_s: tp.Optional[float] = None) -> tp.List[Row]:
        return [self.row(m, segment_s=segment_s) for m in micro_batches]

    def variant(self, changes: tp.Mapping[str, tp.Any]) -> "Planner":
        """A planner for the same run with config keys changed (dotted keys: {"lora.enabled": True})."""
        cfg = resolved_copy(self.cfg)
        for key, value in changes.items():
            OmegaConf.update(cfg, key, value)
        models = dataclasses.replace(self.models, cfg=cfg)
        return Planner(models, self.device, self.inputs, self.segments, self.mfu)


# -- optim.grad_accum_steps: auto --------------------------------------------------------------------------------


@dataclasses.dataclass
class Choice:
    """What `auto` chose, and the rows it looked at."""

    row: Row
    rows: tp.List[Row]  # every row traced for the choice, smallest micro-batch first

    def describe(self, batch: int, device: Device) -> str:
        """The plan and why, for the log."""
        row = self.row
        larger = [
            r
            for r in self.rows
            if r.micro_batch > row.micro_batch and r.checkpointing == row.checkpointing and not r.fits
        ]
        why = (
            f"; micro-batch {larger[0].micro_batch} would need {larger[0].total_gib:.1f} GiB"
            if larger
            else "; the whole batch fits"
            if row.micro_batch >= batch
            else ""
        )
        checkpointing = (
            ", with activation checkpointing (micro-batch 1 does not fit without it)"
            if row.checkpointing and any(r.micro_batch == 1 and not r.checkpointing for r in self.rows)
            else ", with activation checkpointing (the preset's)"
            if row.checkpointing
            else ""
        )
        return (
            f"batch {batch} per GPU in {row.accum_steps} micro-batch(es) of up to {row.micro_batch} x "
            f"{row.segment_s:g} s{checkpointing}: predicted {row.total_gib:.1f} GiB of {device.describe()} "
            f"(peak allocated {row.peak_gib:.1f} GiB, {100 * FIT_MARGIN:.0f}% kept free){why}"
        )


def candidate_micro_batches(batch: int) -> tp.List[int]:
    """The micro-batch sizes an update of `batch` can be split into (the largest of each split), descending."""
    return sorted({math.ceil(batch / steps) for steps in range(1, batch + 1)}, reverse=True)


def choose_micro_batch(planner: Planner) -> Choice:
    """The largest micro-batch that fits, without activation checkpointing if micro-batch 1 fits without it.

    Traces micro-batch 1, then the whole batch (one micro-batch: no gradients kept between micro-batches); when
    that does not fit, micro-batch 2, a linear prediction from the two (activation memory is linear in the
    micro-batch; tested), and the sizes from just above the prediction down, until one fits. NothingFitsError,
    saying what would fit, when micro-batch 1 does not fit even with checkpointing."""
    batch = planner.batch
    traced: tp.List[Row] = []
    for checkpointing in [True] if planner.preset_checkpointing else [False, True]:
        one = planner.row(1, checkpointing)
        traced.append(one)
        if not one.fits:
            continue
        best = one
        if batch > 1:
            whole = planner.row(batch, checkpointing)
            traced.append(whole)
            best = whole if whole.fits else best
        between = candidate_micro_batches(batch)[1:-1]  # between the whole batch and 1, largest first
        if best is one and 2 in between:
            two = planner.row(2, checkpointing)
            traced.append(two)
            if two.fits:
                best = two
                per_segment = max(two.total_gib - one.total_gib, 1e-6)
                room = planner.device.memory_gib * (1 - FIT_MARGIN) - two.total_gib
                estimate = 2 + int(room / per_segment) + 1  # one above the linear prediction
                for micro_batch in [m for m in between if 2 < m <= estimate]:
                    row = planner.row(micro_batch, checkpointing)
                    traced.append(row)
                    if row.fits:
                        best = row
                        break
        larger = [m for m in candidate_micro_batches(batch) if m > best.micro_batch]
        if larger and min(larger) not in [r.micro_batch for r in traced if r.checkpointing == checkpointing]:
            traced.append(planner.row(min(larger), checkpointing))  # the reason it stops here, for the log
        return Choice(best, sorted(traced, key=lambda r: (r.checkpointing, r.micro_batch)))
    raise NothingFitsError(refusal(planner, traced))


def refusal(planner: Planner, traced: tp.List[Row]) -> str:
    """Why nothing fits, and what would: LoRA, a shorter segment, a larger card."""
    one = traced[-1]
    would = []
    if not (planner.cfg.get("lora") and planner.cfg.lora.enabled):
        low_rank = planner.variant({"lora.enabled": True}).row(1, True)
        if low_rank.fits:
            would.append(f"LoRA (LORA=1: {low_rank.total_gib:.1f} GiB at micro-batch 1 with checkpointing)")
    # weights, gradients, optimizer state and EMA do not shrink with the segment: try shorter ones only if they fit
    fixed = sum(one.parts_gib[part] for part in ("parameters", "gradients", "optimizer", "ema"))
    shorter_may_fit = fits(device_total_gib(planner.device.kind, fixed), planner.device)
    for segment in [s for s in SHORTER_SEGMENTS if s < one.segment_s and shorter_may_fit]:
        shorter = planner.row(1, True, segment)
        if shorter.fits:
            would.append(
                f"segments of {segment:g} s ({shorter.total_gib:.1f} GiB with checkpointing; "
                f"make manifests ... SEGMENT={segment:g})"
            )
            break
    if not would:
        needed = one.total_gib / (1 - FIT_MARGIN)
        would.append(f"a device with at least {needed:.0f} GiB")
    return (
        f"optim.grad_accum_steps=auto: nothing fits on {planner.device.describe()}: one segment of "
        f"{one.segment_s:g} s per micro-batch needs {one.total_gib:.1f} GiB even with activation checkpointing "
        f"(peak allocated {one.peak_gib:.1f} GiB). What would fit: {'; '.join(would)}. Or set "
        "optim.grad_accum_steps to a number to try anyway."
    )


def is_auto(cfg: DictConfig) -> bool:
    return OmegaConf.select(cfg, "optim.grad_accum_steps") == AUTO


def resolve_grad_accum_steps(cfg: DictConfig, root=None) -> tp.Optional[str]:
    """`optim.grad_accum_steps: auto` in a run's config (batch per GPU already split): set to the number of
    micro-batches `choose_micro_batch` picks for this device, and `transformer_lm.checkpointing=torch` when it
    needs it. Returns the plan and why, for the log; None when the config says a number."""
    if not is_auto(cfg):
        return None
    planner = Planner(run_models(cfg, root), training_device(cfg.device))
    choice = choose_micro_batch(planner)
    cfg.optim.grad_accum_steps = choice.row.accum_steps
    if choice.row.checkpointing:
        cfg.transformer_lm.checkpointing = "torch"
    return choice.describe(planner.batch, planner.device)


def check_fits(cfg: DictConfig, gpus: int = 1, show: tp.Callable[[str], None] = print) -> tp.Optional[Choice]:
    """`make train`: with `auto`, say what the solver will choose, or refuse (NothingFitsError) before anything is
    loaded when no micro-batch fits, after showing the table. Skipped where the run's device is not here (a CUDA
    preset without a GPU: the device check refuses that)."""
    import torch

    if not is_auto(cfg) or (cfg.device == "cuda" and not torch.cuda.is_available() and memory_override() is None):
        return None
    cfg = resolved_copy(cfg)
    cfg.dataset.batch_size = max(1, cfg.dataset.batch_size // gpus)
    planner = Planner(run_models(cfg), training_device(cfg.device))
    try:
        choice = choose_micro_batch(planner)
    except NothingFitsError:
        show(table(planner, [planner.row(1, False), planner.row(1, True)], "Plan (nothing fits)"))
        raise
    show(f"optim.grad_accum_steps=auto: {choice.describe(planner.batch, planner.device)}")
    return choice


# -- the table ---------------------------------------------------------------------------------------------------

SHORT_PARTS = {
    "parameters": "params",
    "gradients": "grads",
    "optimizer": "optim",
    "ema": "EMA",
    "frozen_models": "codec+T5",
    "activations": "activ",
    "weight_casts": "casts",
    "logits_loss": "logits",
    "temporaries": "temp",
}


def duration(seconds: tp.Optional[float]) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.2f} s" if seconds < 10 else f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 3600 else f"{seconds / 3600:.1f} h"


def table(planner: Planner, rows: tp.Sequence[Row], title: str = "Plan") -> str:
    """The rows as a console table, with what they assume."""
    device = planner.device
    cfg = planner.cfg
    mode = "LoRA" if cfg.get("lora") and cfg.lora.enabled else "full fine-tuning"
    precision = f"{'fp16' if cfg.autocast_dtype == 'float16' else 'bf16'} autocast" if cfg.autocast else "fp32"
    ema = cfg.optim.get("ema") or {}
    inputs = (
        "EnCodec and T5 on the device, run every step (the first epoch, while the caches fill)"
        if planner.inputs == "encoded"
        else "tokens and T5 outputs cached, neither model on the device"
    )
    speed = (
        f"times at {device.peak_tflops:g} TFLOP/s dense bf16 x {100 * planner.mfu:.0f}% utilisation"
        if device.peak_tflops
        else "no times: unknown peak FLOP/s for this device"
    )
    head = [
        f"{title}: {mode}, {precision}, {cfg.optim.optimizer}{' (fused)' if cfg.optim.adam.get('fused') else ''}, "
        f"EMA {'on ' + str(ema.get('device')) if ema.get('use') else 'off'}; {inputs}",
        f"Device: {device.describe()}; {speed}; batch {planner.batch} per update, epoch = {planner.segments} segments",
        "GiB. peak = predicted max_memory_allocated; total = (peak + workspaces) x allocator reserve + CUDA context"
        if device.kind == "cuda"
        else "GiB. peak = live tensors; total = peak + the process's interpreter and libraries",
    ]
    unit, scale = ("MiB", 1024) if max((r.peak_gib for r in rows), default=0) < 1 else ("GiB", 1)
    head[-1] = head[-1].replace("GiB.", f"{unit}.")
    columns = ["micro", "steps", "ckpt", *(SHORT_PARTS[p] for p in PARTS), "peak", "total", "fits", "TFLOP", "step"]
    columns.append("epoch")
    lines = [" | ".join(f"{c:>8}" for c in columns)]
    for r in rows:
        cells = [
            f"{r.micro_batch} x {r.segment_s:g}s",
            str(r.accum_steps),
            "torch" if r.checkpointing else "none",
            *(f"{r.parts_gib[p] * scale:.2f}" for p in PARTS),
            f"{r.peak_gib * scale:.2f}",
            f"{r.total_gib * scale:.2f}",
            "yes" if r.fits else "NO",
            f"{r.flops / 1e12:.1f}",
            duration(r.step_s),
            duration(r.epoch_s),
        ]
        lines.append(" | ".join(f"{c:>8}" for c in cells))
    return "\n".join(head + lines)
