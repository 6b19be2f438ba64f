"""Our solver: AudioCraft's MusicGenSolver with what single-GPU fine-tuning needs on top.

- gradient accumulation (`optim.grad_accum_steps`): upstream has none; each batch is split in micro-batches;
- epochs sized from the dataset (`dataset.<split>.num_samples: null`), instead of upstream's fixed 1,000,000;
- LoRA (`lora.enabled`): adapters injected into the LM before the optimizer is built, the base frozen, the
  optimizer over adapters only, checkpoints holding adapters (with the base model's path and hash) instead of
  the whole LM; `lora.init_from` starts them from saved adapters (ours or a PEFT folder);
- a log that says which weights were loaded and how many tensors matched, what trains, and where outputs go;
- caches of EnCodec tokens (on disk) and frozen-T5 outputs (in memory), `token_cache.*`/`text_cache.*`
  (caches.py), so that epochs after the first do not encode the same audio and captions again;
- lean checkpoints written in the background (checkpoints.py), at most every `checkpoint.save_last_interval_s`;
  each epoch's history entry says where its time went (`time`: seconds per stage and for the checkpoint) and
  what the checkpoint wrote (`checkpoint.bytes`);
- a run you can watch (watch.py): TensorBoard with optimizer updates as steps, an ETA per epoch, `<xp>/run.json`;
- prior preservation, replay of a general dataset and a forgetting budget (`prior.*`, `replay.*`,
  `early_stop.forgetting_budget`): hooks here, the logic in prior.py and replay.py.
"""

import contextlib
import json
import math
import time
import typing as tp
from pathlib import Path
from unittest import mock

import flashy
import torch
from audiocraft.data.music_dataset import MusicDataset
from audiocraft.solvers import builders
from audiocraft.solvers.musicgen import MusicGenSolver
from audiocraft.utils.utils import get_dataset_from_loader, model_hash
from dora import git_save

from audiocraft import models

from . import caches, checkpoints, lora, patches, prior, random_state, replay, watch
from .data import versions
from .data.dataset import PreparedDataset, count_segments, read_each_segment_once
from .errors import UserError
from .experiments import HISTORY_FILE, RunLock, choose_best, write_done
from .files import write_text_atomically
from .models import folder as model_dir
from .models.hf.peft_lora import read_adapter
from .paths import output_dir
from .planning.fit import resolve_grad_accum_steps


def all_processes(value: tp.Any) -> tp.List[tp.Any]:
    """`value` of every process of a distributed run, in rank order ([value] when there is one process)."""
    if not flashy.distrib.is_distributed():
        return [value]
    values: tp.List[tp.Any] = [None] * flashy.distrib.world_size()
    torch.distributed.all_gather_object(values, value)
    return values


class TrainingRefusedError(UserError, ValueError):
    """Training cannot start or resume as asked (a replaced base model, a setting that does not fit); the message
    says why and how to go on."""


def split_batch(batch: tuple, parts: int) -> tp.List[tuple]:
    """Cut a (audio [B, C, T], infos) batch, or a token-cache (infos,) batch, into `parts` micro-batches, or into
    one per item when the batch is smaller (an epoch's last batch, one process's share of it): each micro-batch's
    loss is weighted by its size, so the update is the batch's whatever the split. Configurations whose full batch
    cannot be split are refused before training starts (launch.check_batch)."""
    size = len(batch[-1])
    parts = max(1, min(parts, size))
    bounds = [round(i * size / parts) for i in range(parts + 1)]
    return [tuple(part[start:end] for part in batch) for start, end in zip(bounds[:-1], bounds[1:], strict=True)]


class AdapterView(torch.nn.Module):
    """The LM's LoRA adapters as a module of their own (same parameter names), for upstream's EMA: it then tracks
    and swaps the adapters alone. Loading its state leaves the base untouched."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.__dict__["model"] = model  # not a child module: the base must stay out of named_parameters()

    def named_parameters(self, *args, **kwargs):
        return iter(lora.adapter_parameters(self.model).items())

    def named_buffers(self, *args, **kwargs):
        return iter(())

    def state_dict(self, *args, **kwargs):
        return lora.adapter_state_dict(self.model)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        unexpected = [k for k in state_dict if not lora.is_adapter_key(k)]
        if unexpected:
            raise KeyError(f"not adapter tensors: {unexpected[:3]}")
        return self.model.load_state_dict(state_dict, strict=False)


def resolve_precision(cfg) -> None:
    """`autocast_dtype: auto`: bf16 where the GPU supports it (no loss scaling needed), else fp16, for which
    upstream then adds a GradScaler (solvers/musicgen.py). Upstream only knows float16 and bfloat16."""
    if cfg.get("autocast_dtype") == "auto":
        fp16_only = cfg.device == "cuda" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported()
        cfg.autocast_dtype = "float16" if fp16_only else "bfloat16"


def describe_precision(cfg) -> str:
    if not cfg.autocast:
        return "fp32 (autocast off)"
    if cfg.autocast_dtype == "float16":
        return "fp16 autocast with loss scaling (this GPU has no bf16)"
    return "bf16 autocast"


class FinetuneSolver(MusicGenSolver):
    """AudioCraft's MusicGenSolver for fine-tuning on one to a few GPUs (see the module's docstring); built by
    train.get_solver when the config says `solver: musicgen_finetune`."""

    NAME = "musicgen_finetune"
    prior_term: tp.Optional[prior.PriorTerm] = None  # set by restore when prior.* or the forgetting budget asks

    def __init__(self, cfg):
        resolve_precision(cfg)
        # optim.grad_accum_steps=auto: micro-batches (and checkpointing) planned for this GPU before anything is built
        self.accumulation_plan = resolve_grad_accum_steps(cfg)
        self.watch = watch.RunWatch(self)
        super().__init__(cfg)
        self.fit_top_k_to_codebook()

    def init_tensorboard(self, **options: tp.Any) -> None:
        """Upstream's __init__ calls this for `logging.log_tensorboard` (solvers/base.py:51) before the updates per
        epoch and the restored checkpoint are known; watch.py opens the writer when training starts instead."""

    def fit_top_k_to_codebook(self) -> None:
        """Upstream samples among the `generate.lm.top_k` likeliest codes (solvers/musicgen.py:41), and torch.topk
        fails when k exceeds the codebook: a preset's 250 on a model with fewer codes samples among all of them."""
        top_k, card = self.generation_params.get("top_k"), self.model.card
        if top_k and top_k > card:
            self.logger.warning(
                "generate.lm.top_k=%d is more than this model's %d codes: samples are drawn among all %d.",
                top_k,
                card,
                card,
            )
            self.generation_params["top_k"] = card

    @property
    def grad_accum_steps(self) -> int:
        return int(self.cfg.optim.get("grad_accum_steps") or 1)

    @property
    def lora_config(self) -> lora.LoraConfig:
        return lora.LoraConfig.from_dict(self.cfg.get("lora") or {})

    def build_dataloaders(self) -> None:
        self.pin_datasets()
        replay.mix_into_train(self)  # replay.dataset: datasource.train becomes a manifest with it mixed in
        for split, path in self.cfg.datasource.items():
            if not isinstance(path, str) or split not in self.cfg.dataset:
                continue
            if self.cfg.dataset[split].get("num_samples", None) is None:
                self.cfg.dataset[split].num_samples = count_segments(path)
                self.logger.info(
                    "Dataset %s: %d segments per epoch (%s)", split, self.cfg.dataset[split].num_samples, path
                )
        super().build_dataloaders()
        valid = get_dataset_from_loader(self.dataloaders["valid"])
        if isinstance(valid, MusicDataset) and self.cfg.dataset.get("min_segment_ratio", 0) >= 1.0:
            read_each_segment_once(valid)
        generate = self.dataloaders.get("generate")
        if generate is not None and flashy.distrib.is_distributed():
            # rank 0 generates every sample (see generate): its loader holds the whole split, not one share
            self.dataloaders["generate"] = torch.utils.data.DataLoader(
                get_dataset_from_loader(generate),
                batch_size=generate.batch_size,
                shuffle=False,
                num_workers=generate.num_workers,
                collate_fn=generate.collate_fn,
            )

    def pin_datasets(self) -> None:
        """Read the datasets' current versions for the whole run (data/versions.py): the split paths resolved
        once, the versions locked as read; their content hashes go into every checkpoint (`check_datasets`)."""
        self.dataset_pins = versions.pin_splits(self.cfg.datasource)
        general = (self.cfg.get("replay") or {}).get("dataset")
        if general:  # replay.py reads this object: the version pinned here
            self.general_dataset = PreparedDataset(general, "GENERAL")
            self.dataset_pins.append(versions.Pin(self.general_dataset.root))
        records = [pin.record() for pin in self.dataset_pins]
        if len({str(r) for r in all_processes(records)}) > 1:
            raise TrainingRefusedError(
                "A dataset of this run was rebuilt while its processes were starting (they read different "
                "versions): run the same command again."
            )
        fresh = not self.checkpoint_path().exists()  # a new experiment, not a resumed one
        for record in records:
            if record["hash"]:
                self.logger.info(
                    "Dataset %s: version %s (content hash %s), read for the whole run",
                    record["name"],
                    record["version"],
                    record["hash"][: versions.HASH_LENGTH],
                )
            earlier = versions.trained_on_other_versions(record, self.folder) if fresh and record["hash"] else []
            if earlier and flashy.distrib.is_rank_zero():
                self.logger.warning(
                    "NAME=%s was rebuilt since experiment %s trained on it (content hash %s): this new experiment, "
                    "%s, trains on the new data (%s), so its results and theirs are on different data.",
                    record["name"],
                    ", ".join(sorted({sig for sig, _ in earlier})),
                    ", ".join(sorted({h[: versions.HASH_LENGTH] for _, h in earlier})),
                    self.folder.name,
                    record["hash"][: versions.HASH_LENGTH],
                )
        if fresh:  # a resumed run records them once they are checked against its checkpoint (load_state_dict)
            self.record_datasets()

    def record_datasets(self) -> None:
        """<xp>/datasets.json: the versions this run reads, for `make manifests` (versions.py) and for the next
        experiment on a rebuilt dataset (`trained_on_other_versions`)."""
        if flashy.distrib.is_rank_zero():
            records = [pin.record() for pin in getattr(self, "dataset_pins", [])]
            write_text_atomically(self.folder / versions.PINNED_FILE, json.dumps(records, indent=2) + "\n")

    def check_datasets(self, saved: tp.List[dict]) -> None:
        """Resuming: each dataset must be the version the run trained on (its content hash)."""
        now = [pin.record() for pin in getattr(self, "dataset_pins", [])]
        for record, there in versions.changed(saved, now):
            now_text = (
                f"manifests/{record['name']} is now {there['hash'][: versions.HASH_LENGTH]} ({there['version']})"
                if there and there.get("hash")
                else f"this run no longer reads NAME={record['name']}"
            )
            raise TrainingRefusedError(
                f"NAME={record['name']} changed since this experiment started: it trained on content hash "
                f"{record['hash'][: versions.HASH_LENGTH]} ({record['version']}), and {now_text}. Start the "
                "experiment again on the new data with `make train ... FRESH=1`, or build the new data under "
                f"another NAME and rebuild {record['name']} as it was to resume."
            )

    def generate(self) -> dict:
        """Upstream's generate stage; with several processes, rank 0 generates and writes all the samples (each
        process would otherwise write its share, under names that can collide) while the others wait for it."""
        if not flashy.distrib.is_distributed() or flashy.distrib.is_rank_zero():
            return super().generate()
        flashy.distrib.barrier()  # the one upstream's generate_audio ends with on rank 0
        return {}

    def fit_warmup_to_run(self) -> None:
        """Upstream's cosine schedule divides by (total - warmup) updates (optim/cosine_lr_scheduler.py:38): a small
        dataset with few epochs can have no more updates than the warmup. Shorten the warmup to a tenth then."""
        cosine = self.cfg.schedule.cosine
        if self.cfg.schedule.lr_scheduler == "cosine" and cosine.warmup and cosine.warmup >= self.total_updates:
            shorter = self.total_updates // 10
            self.logger.warning(
                "schedule.cosine.warmup=%d is not shorter than this run's %d updates; using %d.",
                cosine.warmup,
                self.total_updates,
                shorter,
            )
            cosine.warmup = shorter

    @contextlib.contextmanager
    def lm_with_adapters(self) -> tp.Iterator[None]:
        """While upstream's build_model runs, its LM comes with LoRA adapters and a frozen base."""
        config = self.lora_config
        if not config.enabled:
            yield
            return
        if not (self.cfg.continue_from or "").startswith(model_dir.PRETRAINED_PREFIX):
            raise TrainingRefusedError(
                "lora.enabled=true adapts a pretrained model: set "
                "continue_from=//pretrained/<model folder> (make train MODEL=... does)."
            )
        if self.cfg.fsdp.use:
            raise TrainingRefusedError(
                "lora.enabled=true does not support fsdp.use=true (FSDP shards what LoRA does not train): turn it off."
            )
        upstream_get_lm_model = models.builders.get_lm_model

        def get_lm_model(cfg):
            lm = upstream_get_lm_model(cfg)
            adapted = lora.inject(lm, config)
            lora.freeze_base(lm)
            self.logger.info(
                "LoRA rank %d, alpha %g, dropout %g on %d projections (%s, ...)",
                config.rank,
                config.alpha,
                config.dropout,
                len(adapted),
                ", ".join(adapted[:4]),
            )
            return lm

        with mock.patch.object(models.builders, "get_lm_model", get_lm_model):
            yield

    def build_model(self) -> None:
        if self.grad_accum_steps > 1 and self.cfg.fsdp.use:
            raise TrainingRefusedError("optim.grad_accum_steps > 1 is not supported with fsdp.use=true.")
        if self.accumulation_plan:
            self.logger.info("optim.grad_accum_steps=auto: %s", self.accumulation_plan)
        self.fit_warmup_to_run()
        self.base_model: tp.Optional[dict] = None  # {"path", "hash"} of the model this run continued from
        self.prepare_lean_checkpoints()
        with self.lm_with_adapters():
            super().build_model()
        if self.lora_config.enabled:  # upstream built the optimizer over every parameter: adapters only
            self.optimizer = builders.get_optimizer(list(lora.adapter_parameters(self.model).values()), self.cfg.optim)
            self.lr_scheduler = builders.get_lr_scheduler(self.optimizer, self.cfg.schedule, self.total_updates)
            # EMA (if enabled) averages the adapters only, not a second copy of the frozen base
            self.lora_adapters = AdapterView(self.model)
            self.register_stateful("lora_adapters")
            self._ema_sources = {"lora_adapters": self.lora_adapters}
        self.logger.info("Compression model (frozen): %s", self.cfg.compression_model_checkpoint)
        t5 = self.cfg.conditioners.get("description", {}).get("t5", {})
        if t5:
            self.logger.info(
                "Text encoder: T5 from %s (%s)",
                t5.name,
                "fine-tuned" if t5.finetune else "frozen, not saved in checkpoints",
            )
        self.install_caches()
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.model.parameters())
        self.logger.info(
            "Training %s of %s LM parameters (%.1f%%); batch %d per GPU in %d micro-batch(es), "
            "%d updates per epoch, %d epochs",
            f"{trainable:,}",
            f"{total:,}",
            100 * trainable / max(total, 1),
            self.cfg.dataset.batch_size,
            self.grad_accum_steps,
            self.train_updates_per_epoch,
            self.cfg.optim.epochs,
        )
        self.logger.info(
            "Precision: %s; activation checkpointing: %s; AdamW fused: %s",
            describe_precision(self.cfg),
            self.cfg.transformer_lm.get("checkpointing", "none"),
            self.cfg.optim.adam.get("fused"),
        )

    @property
    def lean_checkpoints(self) -> bool:
        """checkpoints.py's checkpoints; FSDP runs keep upstream's (sharded) ones."""
        return not self.cfg.fsdp.use

    def prepare_lean_checkpoints(self) -> None:
        """Before upstream's build_model registers the best state (solvers/musicgen.py register_best_state): keep it
        in fp16, which a lean checkpoint restores exactly (checkpoints.py)."""
        self.best_state_epoch: tp.Optional[int] = None  # the epoch whose weights the best state holds
        self.best_file_epoch: tp.Optional[int] = None  # the epoch whose best-state file is on disk
        self.checkpoint_writer = checkpoints.BackgroundWriter(self.logger)
        self.last_checkpoint_time = time.time()
        if self.lean_checkpoints and not self.lora_config.enabled:  # adapters: MB, kept in fp32 as trained
            self.best_state.dtype = checkpoints.BEST_DTYPE

    def update_best_state_from_stage(self, stage_name: str = "valid") -> None:
        self.update_best_state_within_budget(stage_name)
        if self._new_best_state:
            self.best_state_epoch = self.epoch

    def save_checkpoints(self) -> None:
        """Upstream's (solvers/base.py:282), lean and written in the background (checkpoints.py), skipped while the
        last one is less than `checkpoint.save_last_interval_s` old (the epoch that ends the run always writes).
        Records the seconds the training loop spent on it and the bytes it writes in the epoch's history entry."""
        if not self.lean_checkpoints:
            return super().save_checkpoints()
        if not flashy.distrib.is_rank_zero():
            return None
        begin, entry, epoch = time.time(), self.history[-1], len(self.history)
        interval, last = self.cfg.checkpoint.get("save_last_interval_s") or 0, self.ends_after_this_epoch()
        if not self.cfg.checkpoint.save_last or (
            interval and begin - self.last_checkpoint_time < interval and not last
        ):
            entry["checkpoint"] = {"bytes": 0}
            self.log_epoch_time(entry, 0.0, "no checkpoint this epoch (checkpoint.save_last_interval_s)")
            return None
        self.checkpoint_writer.wait()  # one write in flight at a time
        state = self.state_dict()
        ref = checkpoints.referenced(state["best_state"])
        files = []
        if ref and ref["file"] and self.best_file_epoch != ref["epoch"]:
            best = {"epoch": ref["epoch"], "best_state": self.best_state.state_dict()}
            files.append((self.folder / ref["file"], best))
            self.best_file_epoch = ref["epoch"]
        files.append((self.checkpoint_path(), state))
        entry["checkpoint"] = {"bytes": sum(checkpoints.tensor_bytes(s) for _, s in files)}  # before the snapshot
        files = [(path, checkpoints.snapshot(s, copy_tensors=not last)) for path, s in files]
        if self.cfg.checkpoint.save_every and epoch % self.cfg.checkpoint.save_every == 0:
            # an epoch's own copy outlives the best-state files: it holds its best state in full, as upstream's
            best_copy = checkpoints.snapshot(self.best_state.state_dict())
            files.append((self.epoch_checkpoint_path(epoch), {**files[-1][1], "best_state": best_copy}))
        self.checkpoint_writer.start(files, keep_best=ref["file"] if ref else None)
        self.last_checkpoint_time = time.time()
        self.log_epoch_time(
            entry, time.time() - begin, f"{entry['checkpoint']['bytes'] / 1e6:,.1f} MB written in the background"
        )
        return None

    def log_epoch_time(self, entry: dict, checkpoint_seconds: float, note: str) -> None:
        entry.setdefault("time", {})["checkpoint"] = checkpoint_seconds
        self.logger.info(
            "Epoch %d time: %s; %s",
            len(self.history),
            ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in entry["time"].items()),
            note,
        )

    def install_caches(self) -> None:
        """The T5 output cache on the LM's frozen text conditioner(s), and the token cache in front of the
        compression model (it answers `encode` in `_prepare_tokens_and_attributes` below)."""
        self.text_caches: tp.Dict[str, caches.CachedT5Encoder] = {}
        text = self.cfg.get("text_cache") or {}
        if text.get("enabled"):
            self.text_caches = caches.install_text_cache(self.model.condition_provider, text.get("max_mb", 1024))
            self.logger.info(
                "Text cache: frozen T5 outputs kept in memory for %s (up to %g MB)",
                ", ".join(self.text_caches) or "no conditioner (T5 is fine-tuned)",
                text.get("max_mb", 1024),
            )
        tokens = self.cfg.get("token_cache") or {}
        if not tokens.get("enabled"):
            self.logger.info("Token cache: off (token_cache.enabled=false)")
            return
        if not self.cfg.dataset.get("segment_duration"):
            self.logger.info("Token cache: off (dataset.segment_duration is not set)")
            return
        root = git_save.to_absolute_path(tokens.path) if tokens.get("path") else output_dir() / "cache" / "tokens"
        cache = caches.TokenCache(root, self.compression_model, self.cfg.dataset.segment_duration)
        self.compression_model = caches.CachedCompressionModel(self.compression_model, cache)
        self.logger.info("%s", cache.describe())
        if self.cfg.dataset.get("min_segment_ratio", 1.0) < 1.0:
            self.logger.warning(
                "dataset.min_segment_ratio=%g seeks at random into each segment, so the token cache "
                "will rarely hit; manifests from `make manifests` set it to 1.",
                self.cfg.dataset.min_segment_ratio,
            )

    def _prepare_tokens_and_attributes(self, batch: tp.Any, check_synchronization_points: bool = False):
        """Upstream's, with the token cache serving this batch's segments (train and valid: the data of the
        other stages is cropped or generated)."""
        serving = contextlib.nullcontext()
        if (
            isinstance(self.compression_model, caches.CachedCompressionModel)
            and len(batch) == 2
            and self.current_stage in ("train", "valid")
        ):
            serving = self.compression_model.serving(batch[1])
        with serving:
            return super()._prepare_tokens_and_attributes(batch, check_synchronization_points)

    def common_train_valid(self, dataset_split: str, **kwargs: tp.Any):
        """Upstream's train/valid stage, then how much of it the caches answered (this process only)."""
        counters = [cache.counter for cache in self.text_caches.values()]
        if isinstance(self.compression_model, caches.CachedCompressionModel):
            counters.append(self.compression_model.counter)
        for counter in counters:
            counter.take()  # what other stages (generation) used is not this stage's
        metrics = super().common_train_valid(dataset_split, **kwargs)
        self.log_cache_use(dataset_split)
        return metrics

    def log_cache_use(self, stage: str) -> None:
        parts = []
        if isinstance(self.compression_model, caches.CachedCompressionModel):
            counts = self.compression_model.counter.take()
            self.watch.cache_used(stage, "tokens", *counts)
            parts.append(f"tokens of {caches.hit_rate(*counts)} segments")
        for name, cache in self.text_caches.items():
            counts = cache.counter.take()
            self.watch.cache_used(stage, f"t5_{name}", *counts)
            parts.append(f"T5 outputs ({name}) of {caches.hit_rate(*counts)} texts ({cache.describe()})")
        if parts:
            self.logger.info("Cache hits, %s epoch %d: %s", stage, self.epoch, "; ".join(parts))

    def restore(self, *args: tp.Any, **kwargs: tp.Any) -> bool:
        """Upstream's restore, then the prior set (prior.py) of the base this run continues from."""
        restored = super().restore(*args, **kwargs)
        self.prior_term = None
        if prior.wanted(self.cfg):
            if self.base_model is None:
                raise TrainingRefusedError(
                    "prior.enabled / early_stop.forgetting_budget compare with a base model: set "
                    "continue_from=//pretrained/<model folder> (make train MODEL=... does)."
                )
            self.prior_term = prior.setup(self, self.base_model["hash"], self.base_weights)
        return restored

    @contextlib.contextmanager
    def base_weights(self) -> tp.Iterator[None]:
        """While inside, the LM computes the base model's logits: adapters off for LoRA; for a resumed full
        fine-tune, the base's weights swapped in and the run's put back after."""
        if self.lora_config.enabled:
            with lora.adapters_off(self.model):
                yield
            return
        if not self.history:  # a run that has not trained yet holds the base's weights
            yield
            return
        trained = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        name = self.cfg.continue_from[len(model_dir.PRETRAINED_PREFIX) :]
        self.model.load_state_dict(MusicGenSolver.load_from_pretrained(self, name)["best_state"]["model"])
        try:
            yield
        finally:
            self.model.load_state_dict(trained)

    def valid(self) -> dict:
        """Upstream's validation, plus the cross-entropy on the prior set (prior_ce, prior_ce_base)."""
        metrics = super().valid()
        if self.prior_term is not None:
            metrics.update(self.prior_term.validate(self))
        return metrics

    @property
    def forgetting_budget(self) -> tp.Optional[float]:
        return (self.cfg.get("early_stop") or {}).get("forgetting_budget")

    def update_best_state_within_budget(self, stage_name: str = "valid") -> None:
        """With `early_stop.forgetting_budget`, the best state is experiments.choose_best's epoch (lowest valid
        loss among the epochs within the budget) instead of upstream's lowest loss (solvers/base.py:147)."""
        if self.forgetting_budget is None or stage_name != "valid":
            return super().update_best_state_from_stage(stage_name)
        history = [*self.history, {stage_name: self._pending_metrics[stage_name]}]
        choice = choose_best(history, self.cfg.early_stop.metric, self.forgetting_budget)
        if choice.epoch != len(history):
            self._new_best_state = False
            return None
        self.logger.info("New best state, epoch %d: %s", choice.epoch, choice.reason)
        # upstream takes the current state as the best when it has no best metric (solvers/base.py:152)
        metric_name, self._best_metric_name = self._best_metric_name, None
        try:
            return super().update_best_state_from_stage(stage_name)
        finally:
            self._best_metric_name = metric_name

    def load_from_pretrained(self, name: str) -> dict:
        state = super().load_from_pretrained(name)
        source = model_dir.lm_file(name)
        self.base_model = {"path": str(source), "hash": lora.base_model_hash(state["best_state"]["model"])}
        model_state = {k: v for k, v in self.model.state_dict().items() if not lora.is_adapter_key(k)}
        report = model_dir.compare_state_dicts(model_state, state["best_state"]["model"])
        if report.unexpected or report.mismatched:
            raise TrainingRefusedError(
                f"{source} does not fit the LM this config builds: {report.describe()}. `make train MODEL=` reads "
                "the architecture from the model's xp.cfg; check the overrides given in ARGS."
            )
        self.logger.info(
            "Loaded pretrained LM weights from %s: %d of %d tensors matched%s",
            source,
            report.matched,
            report.total,
            f" ({len(report.missing)} keep their initial values: {', '.join(report.missing[:5])})"
            if report.missing
            else "",
        )
        if self.lora_config.enabled and self.lora_config.init_from:
            state["best_state"]["model"].update(self.adapters_to_start_from(state["best_state"]["model"]))
        return state

    def commit(self, save_checkpoints: bool = True) -> None:
        """Upstream's end of an epoch (history, checkpoint), with every process's random state taken first, so that
        the checkpoint resumes into exactly the epoch an uninterrupted run trains next (random_state.py). A
        collective: every process reaches it, while only rank 0 writes."""
        self.random_states = all_processes(random_state.capture(self.model))
        self.check_processes_agree()
        self._pending_metrics["time"] = {  # where the epoch's time went; save_checkpoints adds its own
            stage: self._pending_metrics.get(stage, {}).get("duration", 0.0) for stage in ("train", "valid", "generate")
        }
        super().commit(save_checkpoints)
        if save_checkpoints:  # an epoch of training (run_one_stage commits without checkpoints)
            self.watch.epoch_done()

    def run_epoch(self) -> None:
        self.watch.epoch_started()
        super().run_epoch()

    def check_processes_agree(self) -> None:
        """In a multi-process run, every process must hold the same weights after each epoch (the gradients are
        averaged over processes once per update); a difference means they trained apart, and the run stops."""
        if not flashy.distrib.is_distributed():
            return
        hashes = all_processes(model_hash(self.model))
        if len(set(hashes)) > 1:
            raise RuntimeError(
                f"The {len(hashes)} training processes hold different weights after epoch "
                f"{self.epoch} (hashes {', '.join(h[:12] for h in hashes)}): their gradients were "
                "not averaged. This is a bug; please report it with the log."
            )
        self.logger.info("Weights identical on the %d processes after epoch %d", len(hashes), self.epoch)

    def adapters_to_start_from(self, base: dict) -> tp.Dict[str, torch.Tensor]:
        """`lora.init_from`: the adapters a new run starts from instead of fresh ones, checked against the base just
        loaded and the run's own LoRA settings. They join the pretrained state, which upstream loads into the model,
        its best state and EMA (a resumed run loads its checkpoint instead, solvers/base.py load_checkpoints)."""
        path = git_save.to_absolute_path(Path(self.lora_config.init_from).expanduser())  # dora runs in the xp folder
        adapter = read_adapter(path, base, what="lora.init_from")
        lora.check_continuable(adapter.config, self.lora_config, str(path))
        self.logger.info("LoRA adapters start from %s (%d tensors)", path, len(adapter.tensors))
        return adapter.tensors

    def state_dict(self) -> dict:
        """Upstream's checkpoint plus the path and hash of the model the run continued from and the random state of
        every process. For a LoRA run the weights are the adapters only (megabytes), with the LoRA settings."""
        state = super().state_dict()
        state["random_states"] = getattr(self, "random_states", None)
        state["datasets"] = [pin.record() for pin in getattr(self, "dataset_pins", [])]
        base = self.base_model or {"path": None, "hash": None}
        if not self.lora_config.enabled:
            state["base_model"] = base
            return self.with_lean_best_state(state)
        state["model"] = {k: v for k, v in state["model"].items() if lora.is_adapter_key(k)}
        state["best_state"] = {
            name: {k: v for k, v in values.items() if lora.is_adapter_key(k)}
            for name, values in state["best_state"].items()
        }
        state["lora"] = {**base, "config": self.lora_config.to_dict()}
        return self.with_lean_best_state(state)

    def with_lean_best_state(self, state: dict) -> dict:
        """`best_state` as a reference (checkpoints.py): to the checkpoint's own weights when this epoch is the best
        (and no EMA, whose weights the best state would hold), else to the best epoch's file."""
        if self.lean_checkpoints and self.best_state_epoch is not None:
            current = self.best_state_epoch == len(self.history) and self.ema is None
            state["best_state"] = checkpoints.reference(self.best_state_epoch, in_file=not current)
        return state

    def load_state_dict(self, state: dict) -> None:
        saved_base = state.pop("base_model", None)  # ours, not stateful sources of upstream's solver
        saved_random = state.pop("random_states", None)
        saved_datasets = state.pop("datasets", None)
        if saved_datasets:
            self.check_datasets(saved_datasets)
        self.record_datasets()
        ref = checkpoints.referenced(state.get("best_state"))
        if ref is not None:  # a lean checkpoint of this experiment
            state["best_state"] = checkpoints.resolve_best_state(self.folder, state)
            self.best_state_epoch, self.best_file_epoch = ref["epoch"], ref["epoch"] if ref["file"] else None
        if "lora" in state:
            self.load_lora_checkpoint_base(state)
        elif saved_base and saved_base["hash"]:
            self.check_base_model(saved_base, "This run was trained on")
        super().load_state_dict(state)
        if saved_random:  # resuming this experiment: draw on from where the checkpoint was written
            rank = flashy.distrib.rank()
            random_state.restore(saved_random[rank] if rank < len(saved_random) else saved_random[0], self.model)
            self.random_states = saved_random

    def load_checkpoints(self, load_best: bool = False, ignore_state_keys: tp.Sequence[str] = ()) -> tp.Optional[dict]:
        """Upstream's, with an unreadable checkpoint of this experiment (truncated, corrupt) named with the two
        ways out instead of a traceback."""
        try:
            return super().load_checkpoints(load_best, list(ignore_state_keys))
        except patches.UnreadableCheckpointError as err:
            path = self.checkpoint_path()
            if str(path) not in str(err):
                raise
            raise TrainingRefusedError(
                f"{path} cannot be read (truncated or corrupt): start the experiment again with `make train ... "
                f"FRESH=1`, or put back a good copy of that file to resume from it."
            ) from None

    def check_base_model(self, saved: dict, what: str) -> tp.Dict[str, torch.Tensor]:
        """Resuming: the model at `continue_from` must be the one the run started from (a re-exported or replaced
        folder would otherwise be silently ignored, or mixed with adapters trained on another). Its weights."""
        prefix = model_dir.PRETRAINED_PREFIX
        if not (self.cfg.continue_from or "").startswith(prefix):
            raise TrainingRefusedError(
                "Resuming needs the model the run started from: "
                f"continue_from=//pretrained/<folder> (it was {saved['path']})."
            )
        name = self.cfg.continue_from[len(prefix) :]
        base = super().load_from_pretrained(name)["best_state"]["model"]
        base_hash = lora.base_model_hash(base)
        if base_hash != saved["hash"]:
            raise TrainingRefusedError(
                f"{what} {saved['path']} (base hash {saved['hash'][:16]}), but "
                f"{model_dir.lm_file(name)} now has hash {base_hash[:16]}: put that model back, or "
                "start this experiment again from the new one with `make train ... FRESH=1` "
                "(dora run --clear)."
            )
        self.base_model = {"path": str(model_dir.lm_file(name)), "hash": base_hash}
        self.logger.info("Base model %s (hash %s) matches the checkpoint", self.base_model["path"], base_hash[:16])
        return base

    def load_lora_checkpoint_base(self, state: dict) -> None:
        """A LoRA checkpoint holds adapters only: load the base from `continue_from`, check it is the one the
        adapters were trained on, and complete the checkpoint's model and best state with it."""
        saved = state.pop("lora")
        if not self.lora_config.enabled:
            raise TrainingRefusedError("This checkpoint holds LoRA adapters only; resume it with lora.enabled=true.")
        base = self.check_base_model(saved, "The adapters in this checkpoint were trained on")
        state["model"] = {**base, **state["model"]}
        state["best_state"] = {key: {**base, **values} for key, values in state["best_state"].items()}

    def should_stop_training(self) -> bool:
        """Also stop early when validation loss stopped improving (`early_stop.patience`), and, resumably, after
        epoch `stop_after_epoch` (time-limited jobs; not part of the signature)."""
        if super().should_stop_training():
            self.stop_reason = "completed"
            return True
        patience = (self.cfg.get("early_stop") or {}).get("patience")
        metric = (self.cfg.get("early_stop") or {}).get("metric", "ce")
        best = choose_best(self.history, metric, self.forgetting_budget).epoch
        if patience and best is not None and len(self.history) - best >= patience:
            self.logger.info(
                "Early stop: valid %s has not improved for %d epochs since its best, epoch %d "
                "(early_stop.patience=%d); the best state is that of epoch %d.",
                self.cfg.early_stop.metric,
                len(self.history) - best,
                best,
                patience,
                best,
            )
            self.stop_reason = "early_stop"
            return True
        stop_after = self.cfg.get("stop_after_epoch")
        if stop_after and self.epoch > stop_after:
            self.logger.info(
                "Stopping after epoch %d (stop_after_epoch); run the same command again to resume.", stop_after
            )
            return True
        return False

    def ends_after_this_epoch(self) -> bool:
        """Whether should_stop_training will stop the run before the next epoch (asked once the epoch is in the
        history), without its messages."""
        early_stop = self.cfg.get("early_stop") or {}
        best = choose_best(self.history, early_stop.get("metric", "ce"), self.forgetting_budget).epoch
        patience, stop_after = early_stop.get("patience"), self.cfg.get("stop_after_epoch")
        return (
            self.epoch > self.cfg.optim.epochs
            or bool(patience and best is not None and len(self.history) - best >= patience)
            or bool(stop_after and self.epoch > stop_after)
        )

    def run(self):
        """Upstream's training loop, one run of an experiment at a time (a lock its rank 0 holds), then done.json
        when the run ended for good."""
        with RunLock(self.folder) if flashy.distrib.is_rank_zero() else contextlib.nullcontext():
            try:
                self.run_locked()
            finally:
                self.checkpoint_writer.wait()  # never return (or raise) with a checkpoint half written

    def run_locked(self) -> None:
        self.logger.info("Experiment %s in %s", self.xp.sig, self.folder)
        self.logger.info(
            "Checkpoint: %s, samples: %s, metrics: %s",
            self.checkpoint_path(),
            self.folder / self.cfg.generate.path,
            self.folder / HISTORY_FILE,
        )
        self.stop_reason: tp.Optional[str] = None
        if flashy.distrib.is_rank_zero():
            checkpoints.remove_partials(self.folder)
        super().run()
        self.checkpoint_writer.wait()  # the last checkpoint is on disk before done.json says the run ended
        if self.stop_reason is None and self.epoch > self.cfg.optim.epochs:
            self.stop_reason = "completed"  # the loop ran out without asking (last epoch just committed)
        if self.stop_reason and flashy.distrib.is_rank_zero():
            metric = (self.cfg.get("early_stop") or {}).get("metric", "ce")
            choice = choose_best(self.history, metric, self.forgetting_budget)
            self.logger.info("Best epoch %s: %s", choice.epoch, choice.reason)
            write_done(self.folder, self.stop_reason, self.history, metric, self.forgetting_budget)
        self.watch.run_ended(self.stop_reason)

    def run_step(self, idx: int, batch: tp.Any, metrics: dict) -> dict:
        if not self.is_training:
            return super().run_step(idx, batch, metrics)
        if self.grad_accum_steps == 1 and not (self.prior_term is not None and self.prior_term.train):
            metrics = super().run_step(idx, batch, metrics)
        else:
            metrics = self._accumulated_train_step(idx, batch, metrics)
        self.watch.update_done(idx, metrics)
        return metrics

    def _accumulated_train_step(self, idx: int, batch: tp.Any, metrics: dict) -> dict:
        """Upstream's train step (solvers/musicgen.py run_step), one backward per micro-batch, one update; the
        prior term (prior.py), when on, backward into the same gradients before the update."""
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
        if self.prior_term is not None and self.prior_term.train:
            metrics.update(self.prior_term.backward(self, idx, batch_size))
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
