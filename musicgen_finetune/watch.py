"""Watching a run while it trains: TensorBoard curves and samples, an ETA per epoch, and `<xp>/run.json`.

The solver calls three hooks (solver.py): `epoch_started` (run_epoch), `update_done` (each training update) and
`epoch_done` (after commit); everything else is here. TensorBoard is on when the run's config says upstream's
`logging.log_tensorboard: true` (our presets do); events go to `<xp>/tensorboard/`, and the steps are optimizer
updates, so that per-update and per-epoch curves share one axis:

    update/loss, update/lr, update/grad_norm     every update (step = updates done)
    train/*, valid/* (ce, ppl, ce_q1..), generate/* at the end of each epoch (step = epoch x updates per epoch),
                                                  the values of history.json
    time/<stage>                                  the epoch's time breakdown (history's `time` entry when the solver
                                                  records one, else the stages' `duration` that flashy measures)
    cache/<stage>_<cache>                         hit rates of the token and text caches (0..1)
    lora/adapter_norm                             L2 norm of all LoRA adapter weights (LoRA runs)
    generate/<sample> (audio) + its prompt (text) each sample of the epoch's generate stage
"""

import logging
import math
import time
import typing as tp
from pathlib import Path

import flashy
import torch
from audiocraft.utils.samples.manager import SampleManager
from flashy.loggers.tensorboard import TensorboardLogger

from . import lora, runs

logger = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"
UPDATE_SCALARS = {"ce": "loss", "lr": "lr", "grad_norm": "grad_norm"}  # training step metric -> update/<name>


class UpdateStepTensorboardLogger(TensorboardLogger):
    """flashy's TensorboardLogger (flashy/loggers/tensorboard.py) whose steps are optimizer updates, not epochs:
    flashy's solvers pass the epoch as the step (flashy/solver.py log_metrics), which puts per-update and per-epoch
    curves on different axes. `first_step` is the first update this process trains: SummaryWriter's purge_step then
    drops whatever an earlier, interrupted process wrote from that step on (updates of an epoch it did not
    finish), so a resumed run continues the same curves without a repeated or missing step."""

    def __init__(self, save_dir: Path, updates_per_epoch: int, first_step: int, with_media_logging: bool = True):
        self.updates_per_epoch = updates_per_epoch
        super().__init__(save_dir, with_media_logging, name="tensorboard", purge_step=first_step)

    def epoch_step(self, epoch: int) -> int:
        """The step of the end of 1-based `epoch`: the updates done by then."""
        return epoch * self.updates_per_epoch

    def log_hyperparams(self, params, metrics=None) -> None:
        """Not written: SummaryWriter.add_hparams writes each call into a folder of its own, which TensorBoard
        lists as one more run each time a run resumes. The config is in <xp>/.argv.json and the checkpoint."""

    def log_metrics(self, prefix, metrics: dict, step: tp.Optional[int] = None) -> None:
        """`step` is the epoch, as flashy passes it."""
        super().log_metrics(prefix, metrics, None if step is None else self.epoch_step(step))

    def log_audio(self, key, prefix, audio, sample_rate, step=None, **kwargs) -> None:
        super().log_audio(key, prefix, audio, sample_rate, None if step is None else self.epoch_step(step), **kwargs)

    def log_text(self, prefix, key, text, step=None, **kwargs) -> None:
        super().log_text(prefix, key, text, None if step is None else self.epoch_step(step), **kwargs)

    def log_update(self, metrics: dict, step: int) -> None:
        """update/* scalars of one training update, flushed so that the curve is live (and a killed run's last
        updates are on disk for purge_step to find)."""
        for name, tag in UPDATE_SCALARS.items():
            if name in metrics:
                value = metrics[name]
                self.writer.add_scalar(f"update/{tag}", value.item() if torch.is_tensor(value) else value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def epoch_scalars(entry: dict) -> tp.Dict[str, tp.Dict[str, float]]:
    """The scalars of one history.json entry by stage, with the stages' durations moved under `time`:
    the solver's own `time` breakdown when the entry has one, else flashy's `duration` of each stage. Numbers only:
    flashy's logger writes a dict value as add_scalars, into folders TensorBoard lists as runs of their own."""
    stages = {
        stage: {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for stage, metrics in entry.items()
        if isinstance(metrics, dict)
    }
    durations = {stage: metrics.pop("duration") for stage, metrics in stages.items() if "duration" in metrics}
    if "time" not in stages:
        stages["time"] = durations
    return {stage: metrics for stage, metrics in stages.items() if metrics}


def format_duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def adapter_norm(model: torch.nn.Module) -> float:
    """The L2 norm of all LoRA adapter weights (lora_A and lora_B) together: B starts at zero (lora.py), so its
    growth is the adapters' departure from the base model."""
    squares = sum(float(p.detach().float().pow(2).sum()) for p in lora.adapter_parameters(model).values())
    return math.sqrt(squares)


class RunWatch:
    """What one training process shows of its run (rank 0 only writes): see the module's docstring."""

    def __init__(self, solver):
        self.solver = solver
        self.tensorboard: tp.Optional[UpdateStepTensorboardLogger] = None
        self.epoch_times: tp.List[float] = []
        self.epoch_began = 0.0
        self.cache_hits: tp.Dict[str, tp.Tuple[int, int]] = {}  # "<stage>_<cache>" -> (hits, misses) this epoch

    @property
    def writes(self) -> bool:
        return flashy.distrib.is_rank_zero()

    def open_tensorboard(self) -> None:
        """At the first epoch this process trains (after the checkpoint was restored): the step it starts from
        is known only then."""
        cfg = self.solver.cfg
        if not cfg.logging.get("log_tensorboard") or not self.writes:
            return
        options = cfg.get("tensorboard") or {}
        folder = self.solver.folder / TENSORBOARD_DIR
        if options.get("sub_dir"):
            folder = folder / options.sub_dir
        folder.mkdir(parents=True, exist_ok=True)
        updates = self.solver.train_updates_per_epoch
        first_step = (self.solver.epoch - 1) * updates + 1
        self.tensorboard = UpdateStepTensorboardLogger(
            folder, updates, first_step, with_media_logging=bool(options.get("with_media_logging", True))
        )
        logger.info("TensorBoard: %s from update %d (make board XP=%s)", folder, first_step, self.solver.xp.sig)

    def epoch_started(self) -> None:
        if self.tensorboard is None and not self.epoch_times:
            self.open_tensorboard()
            self.write_status("running")
        self.epoch_began = time.time()

    def update_done(self, index: int, metrics: dict) -> None:
        """After training update `index` (0-based within the epoch) of the current epoch."""
        if self.tensorboard is not None:
            step = (self.solver.epoch - 1) * self.solver.train_updates_per_epoch + index + 1
            self.tensorboard.log_update(metrics, step)

    def cache_used(self, stage: str, cache: str, hits: int, misses: int) -> None:
        self.cache_hits[f"{stage}_{cache}"] = (hits, misses)

    def epoch_done(self) -> None:
        """After the epoch was committed (history.json and checkpoint written): its scalars and samples to
        TensorBoard, run.json, and one console line with the time left."""
        solver = self.solver
        epoch, planned = len(solver.history), solver.cfg.optim.epochs
        self.epoch_times.append(time.time() - self.epoch_began)
        if self.tensorboard is not None:
            self.log_epoch(epoch, solver.history[-1])
        if self.writes:
            self.write_status("running")
        mean = sum(self.epoch_times) / len(self.epoch_times)
        left = max(0, planned - epoch)
        solver.logger.info(
            "Epoch %d/%d done in %s; ETA %s (run)%s",
            epoch,
            planned,
            format_duration(self.epoch_times[-1]),
            format_duration(mean * left),
            f", {left} epoch{'s' if left > 1 else ''} to go" if left else "",
        )

    def log_epoch(self, epoch: int, entry: dict) -> None:
        tensorboard = self.tensorboard
        for stage, metrics in epoch_scalars(entry).items():
            tensorboard.log_metrics(stage, metrics, epoch)
        rates = {name: hits / (hits + misses) for name, (hits, misses) in self.cache_hits.items() if hits + misses}
        if rates:
            tensorboard.log_metrics("cache", rates, epoch)
        self.cache_hits = {}
        if self.solver.lora_config.enabled:
            tensorboard.log_metrics("lora", {"adapter_norm": adapter_norm(self.solver.model)}, epoch)
        if "generate" in entry:
            self.log_samples(epoch)
        tensorboard.writer.flush()

    def log_samples(self, epoch: int) -> None:
        """The samples upstream's generate stage wrote for `epoch` (solvers/musicgen.py generate_audio, through
        SampleManager), each as audio with its prompt as text."""
        samples = SampleManager(self.solver.xp).get_samples(epoch=epoch)
        for sample in sorted(samples, key=lambda s: s.id):
            audio, sample_rate = sample.audio()
            key = Path(sample.path).stem
            self.tensorboard.log_audio(key, "generate", audio, sample_rate, epoch)
            description = (sample.conditioning or {}).get("description") or "(no prompt: unconditional)"
            self.tensorboard.log_text("generate", f"{key}/prompt", str(description), epoch)

    def write_status(self, state: str) -> None:
        solver = self.solver
        early_stop = solver.cfg.get("early_stop") or {}
        runs.write_status(
            solver.folder,
            state=state,
            history=solver.history,
            epochs_planned=solver.cfg.optim.epochs,
            metric=early_stop.get("metric", "ce"),
            model=solver.cfg.get("continue_from"),
            # the run's own dataset: with replay (replay.py) datasource.train is a mixed manifest in the xp folder
            valid_manifest=solver.cfg.datasource.get("valid"),
            lora=solver.lora_config.to_dict() if solver.lora_config.enabled else None,
            forgetting_budget=early_stop.get("forgetting_budget"),
        )

    def run_ended(self, stop_reason: tp.Optional[str]) -> None:
        """The run returned: completed, early_stop, or paused (stop_after_epoch; the next run resumes it)."""
        if self.writes:
            self.write_status(stop_reason or "paused")
        if self.tensorboard is not None:
            self.tensorboard.close()
