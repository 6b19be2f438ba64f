"""Our solver: AudioCraft's MusicGenSolver with what single-GPU fine-tuning needs on top.

- gradient accumulation (`optim.grad_accum_steps`): upstream has none; each batch is split in micro-batches;
- epochs sized from the dataset (`dataset.<split>.num_samples: null`), instead of upstream's fixed 1,000,000;
- a log that says which weights were loaded and how many tensors matched, what trains, and where outputs go.
"""
import math
import typing as tp
from pathlib import Path

import flashy
import torch
from audiocraft.data.audio_dataset import load_audio_meta
from audiocraft.solvers.musicgen import MusicGenSolver

from . import model_dir


def split_batch(batch: tuple, parts: int) -> tp.List[tuple]:
    """Cut a (audio [B, C, T], infos) batch, or a token-cache (infos,) batch, into `parts` micro-batches."""
    infos = batch[-1]
    size = len(infos)
    if size < parts:
        raise ValueError(f"a batch of {size} cannot be split in optim.grad_accum_steps={parts} micro-batches; "
                         f"raise dataset.batch_size or lower optim.grad_accum_steps.")
    bounds = [round(i * size / parts) for i in range(parts + 1)]
    micro_batches = []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        micro_batches.append(tuple(part[start:end] for part in batch))
    return micro_batches


def count_segments(split_path: str) -> int:
    """Number of audio files in a manifest folder (data.jsonl[.gz]) or file, as AudioCraft reads it."""
    path = Path(split_path)
    if path.is_dir():
        candidates = [path / "data.jsonl", path / "data.jsonl.gz"]
        found = [c for c in candidates if c.exists()]
        if not found:
            raise FileNotFoundError(f"no data.jsonl in {path}: run `make manifests` for this dataset first.")
        path = found[0]
    elif not path.exists():
        raise FileNotFoundError(f"manifest {path} does not exist: run `make manifests` for this dataset first.")
    return len(load_audio_meta(path))


class FinetuneSolver(MusicGenSolver):
    NAME = "musicgen_finetune"

    @property
    def grad_accum_steps(self) -> int:
        return int(self.cfg.optim.get("grad_accum_steps") or 1)

    def build_dataloaders(self) -> None:
        for split, path in self.cfg.datasource.items():
            if not isinstance(path, str) or split not in self.cfg.dataset:
                continue
            if self.cfg.dataset[split].get("num_samples", None) is None:
                self.cfg.dataset[split].num_samples = count_segments(path)
                self.logger.info("Dataset %s: %d segments per epoch (%s)",
                                 split, self.cfg.dataset[split].num_samples, path)
        super().build_dataloaders()

    def fit_warmup_to_run(self) -> None:
        """Upstream's cosine schedule divides by (total - warmup) updates (optim/cosine_lr_scheduler.py:38): a small
        dataset with few epochs can have no more updates than the warmup. Shorten the warmup to a tenth then."""
        cosine = self.cfg.schedule.cosine
        if self.cfg.schedule.lr_scheduler == "cosine" and cosine.warmup and cosine.warmup >= self.total_updates:
            shorter = self.total_updates // 10
            self.logger.warning("schedule.cosine.warmup=%d is not shorter than this run's %d updates; using %d.",
                                cosine.warmup, self.total_updates, shorter)
            cosine.warmup = shorter

    def build_model(self) -> None:
        if self.grad_accum_steps > 1 and self.cfg.fsdp.use:
            raise ValueError("optim.grad_accum_steps > 1 is not supported with fsdp.use=true.")
        self.fit_warmup_to_run()
        super().build_model()
        self.logger.info("Compression model (frozen): %s", self.cfg.compression_model_checkpoint)
        t5 = self.cfg.conditioners.get("description", {}).get("t5", {})
        if t5:
            self.logger.info("Text encoder: T5 from %s (%s)", t5.name,
                             "fine-tuned" if t5.finetune else "frozen, not saved in checkpoints")
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.model.parameters())
        self.logger.info("Training %s of %s LM parameters (%.1f%%); batch %d per GPU in %d micro-batch(es), "
                         "%d updates per epoch, %d epochs", f"{trainable:,}", f"{total:,}",
                         100 * trainable / max(total, 1), self.cfg.dataset.batch_size, self.grad_accum_steps,
                         self.train_updates_per_epoch, self.cfg.optim.epochs)

    def load_from_pretrained(self, name: str) -> dict:
        state = super().load_from_pretrained(name)
        source = model_dir.lm_file(name)
        report = model_dir.compare_state_dicts(self.model.state_dict(), state["best_state"]["model"])
        if report.unexpected or report.mismatched:
            raise ValueError(
                f"{source} does not fit the LM this config builds: {report.describe()}. `make train MODEL=` reads "
                "the architecture from the model's xp.cfg; check the overrides given in ARGS.")
        self.logger.info("Loaded pretrained LM weights from %s: %d of %d tensors matched%s", source,
                         report.matched, report.total,
                         f" ({len(report.missing)} keep their initial values: {', '.join(report.missing[:5])})"
                         if report.missing else "")
        return state

    def run(self):
        self.logger.info("Experiment %s in %s", self.xp.sig, self.folder)
        self.logger.info("Checkpoint: %s, samples: %s, metrics: %s", self.checkpoint_path(),
                         self.folder / self.cfg.generate.path, self.folder / "history.json")
        return super().run()

    def run_step(self, idx: int, batch: tp.Any, metrics: dict) -> dict:
        if not self.is_training or self.grad_accum_steps == 1:
            return super().run_step(idx, batch, metrics)
        return self._accumulated_train_step(batch, metrics)

    def _accumulated_train_step(self, batch: tp.Any, metrics: dict) -> dict:
        """Upstream's train step (solvers/musicgen.py run_step), one backward per micro-batch, one update."""
        micro_batches = split_batch(batch, self.grad_accum_steps)
        batch_size = len(batch[-1])
        ce_total = torch.zeros([], device=self.device)
        ce_per_codebook_total: tp.List[torch.Tensor] = []
        for micro_batch in micro_batches:
            weight = len(micro_batch[-1]) / batch_size
            condition_tensors, audio_tokens, padding_mask = self._prepare_tokens_and_attributes(micro_batch)
            with self.autocast:
                output = self.model.compute_predictions(audio_tokens, [], condition_tensors)
                mask = padding_mask & output.mask
                ce, ce_per_codebook = self._compute_cross_entropy(output.logits, audio_tokens, mask)
            loss = ce * weight
            if self.scaler is not None:
                loss = self.scaler.scale(loss)
            loss.backward()
            ce_total += ce.detach() * weight
            if not ce_per_codebook_total:
                ce_per_codebook_total = [torch.zeros_like(c) for c in ce_per_codebook]
            for total, ce_q in zip(ce_per_codebook_total, ce_per_codebook, strict=True):
                total += ce_q * weight
        flashy.distrib.sync_model(self.model)  # average gradients over GPUs once per update

        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.cfg.optim.max_norm:
            metrics["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.max_norm)
        if self.scaler is None:
            self.optimizer.step()
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            metrics["grad_scale"] = self.scaler.get_scale()
        if self.lr_scheduler:
            self.lr_scheduler.step()
        self.optimizer.zero_grad()
        if not math.isfinite(ce_total.item()):
            raise RuntimeError("Model probably diverged: the training loss is not finite.")
        metrics["ce"] = ce_total
        metrics["ppl"] = torch.exp(ce_total)
        for k, ce_q in enumerate(ce_per_codebook_total):
            metrics[f"ce_q{k + 1}"] = ce_q
        return metrics
