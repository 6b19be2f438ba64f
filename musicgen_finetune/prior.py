"""Keeping what the base model could do: prior preservation and the forgetting measure (`prior.*`,
`early_stop.forgetting_budget`).

DreamBooth's prior preservation for MusicGen: before training, the base LM generates token sequences (tokens only,
never decoded) for general prompts, several seeds each (`PriorSet`). Training adds a term on them to every update
(`PriorTerm`), weighted `prior.weight`, with `prior.ratio` prior sequences per real segment of the batch:

- `prior.loss: kl`: the tuned model's distribution kept close to the base's on those sequences. For LoRA the teacher
  is the same LM with its adapters off (lora.adapters_off), full distribution, computed each step. For full
  fine-tuning there is no second model in memory: the base's `prior.teacher_top_k` likeliest codes per position and
  their log-probabilities are stored with the tokens when the set is generated, and the loss is the KL from that
  top-k distribution (renormalised) to the tuned model's.
- `prior.loss: ce`: plain cross-entropy on the base's tokens (DreamBooth's original form).

Prior prompts are conditioned as written: no T5 word dropout (the conditioner runs in eval mode) and no
classifier-free-guidance or attribute dropout (upstream applies those in _prepare_tokens_and_attributes, which the
prior items do not go through).

The set is stored once under `<output>/cache/prior/<key>/` (`prior.safetensors`, `key.json`, `prompts.json`), the key
a hash of the base LM's weights, the text encoder, the prompts, seeds, generation settings and sequence length (as
caches.TokenCache keys its folders), and reused by every run on that base. Generation draws from its own forked
random state, one seed per (seed, prompt batch), so it is deterministic and leaves training's random state as it was.

Validation also reports `prior_ce` (the model's cross-entropy on the prior set) and `prior_ce_base` (the base's,
measured when the set was made); experiments.choose_best uses them for `early_stop.forgetting_budget`.
"""

import contextlib
import dataclasses
import json
import logging
import typing as tp
from pathlib import Path

import flashy
import torch
from audiocraft.modules.conditioners import ConditioningAttributes

from . import lora
from .caches import short_hash, sync_allowed
from .errors import UserError
from .files import write_atomically

logger = logging.getLogger(__name__)

SET_FILE = "prior.safetensors"
KEY_FILE = "key.json"
PROMPTS_FILE = "prompts.json"
LOSSES = ("kl", "ce")


class PriorConfigError(UserError, ValueError):
    """A `prior.*` value that cannot work; the message names it."""


@dataclasses.dataclass
class PriorConfig:
    """The `prior.*` keys of the presets (config/solver/finetune/musicgen_small.yaml documents them)."""

    enabled: bool = False
    loss: str = "kl"
    ratio: float = 1.0
    weight: float = 1.0
    prompts: tp.Sequence[str] = ()
    seeds: tp.Sequence[int] = (0,)
    teacher_top_k: int = 32
    batch_size: int = 16
    path: tp.Optional[str] = None
    generate: tp.Dict[str, tp.Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_cfg(cls, cfg) -> "PriorConfig":
        values = dict(cfg.get("prior") or {})
        known = {f.name for f in dataclasses.fields(cls)}
        config = cls(**{k: v for k, v in values.items() if k in known})
        config.prompts = [str(p) for p in config.prompts]
        config.seeds = [int(s) for s in config.seeds]
        config.generate = dict(config.generate or {})
        config.check()
        return config

    def check(self) -> None:
        if self.loss not in LOSSES:
            raise PriorConfigError(f"prior.loss={self.loss}: use one of {', '.join(LOSSES)}.")
        if self.ratio <= 0 or self.weight < 0:
            raise PriorConfigError(
                f"prior.ratio={self.ratio}, prior.weight={self.weight}: the ratio must be > 0, the weight >= 0."
            )
        if not self.prompts or not self.seeds:
            raise PriorConfigError(
                "prior.prompts and prior.seeds must not be empty (PRIOR_PROMPTS=<file> gives your own prompts)."
            )


def wanted(cfg) -> bool:
    """Whether a run needs the prior set: to train on it, or to measure forgetting for the budget."""
    budget = (cfg.get("early_stop") or {}).get("forgetting_budget")
    return bool((cfg.get("prior") or {}).get("enabled")) or budget is not None


def read_prompts_file(path: tp.Union[str, Path]) -> tp.List[str]:
    """PRIOR_PROMPTS=<file>: one prompt a line; blank lines and lines starting with # are skipped."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise PriorConfigError(f"PRIOR_PROMPTS={path}: no such file (one prompt a line).")
    prompts = [line.strip() for line in file.read_text().splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise PriorConfigError(f"PRIOR_PROMPTS={path}: the file holds no prompt (one a line).")
    return prompts


# ---------------------------------------------------------------------------------------------------- the set


@dataclasses.dataclass
class PriorSet:
    """The base's sequences: tokens [N, K, T] (long), the prompt of each, and for the stored teacher its top-k
    codes [N, K, T, k] and log-probabilities; `base_ce` the base's cross-entropy on them."""

    tokens: torch.Tensor
    prompts: tp.List[str]
    seeds: tp.List[int]
    base_ce: float
    folder: Path
    teacher_codes: tp.Optional[torch.Tensor] = None
    teacher_logprobs: tp.Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def describe(self) -> str:
        n, k, t = self.tokens.shape
        teacher = f", teacher top-{self.teacher_codes.shape[-1]} stored" if self.teacher_codes is not None else ""
        return (
            f"Prior set at {self.folder}: {n} sequences ({len(set(self.prompts))} prompts x {len(set(self.seeds))} "
            f"seeds), {k} codebooks x {t} frames{teacher}; base cross-entropy on it {self.base_ce:.4f}"
        )


def key_ingredients(solver, config: PriorConfig, base_hash: str, store_teacher: bool) -> dict:
    """Everything that changes the prior set."""
    import audiocraft

    t5 = (solver.cfg.get("conditioners") or {}).get("description", {}).get("t5", {})
    return {
        "base_lm_hash": base_hash,
        "text_encoder": str(t5.get("name")) if t5 else None,
        "prompts": list(config.prompts),
        "seeds": list(config.seeds),
        "generate": generation_settings(solver, config),
        "frames": n_frames(solver),
        "batch_size": int(config.batch_size),
        "teacher_top_k": int(config.teacher_top_k) if store_teacher else None,
        "audiocraft": audiocraft.__version__,
    }


def generation_settings(solver, config: PriorConfig) -> dict:
    settings = {
        "use_sampling": bool(config.generate.get("use_sampling", True)),
        "temp": float(config.generate.get("temperature", 1.0)),
        "top_k": int(config.generate.get("top_k", 250)),
        "top_p": float(config.generate.get("top_p", 0.0)),
        "cfg_coef": float(config.generate.get("cfg_coef", 3.0)),
    }
    settings["top_k"] = min(settings["top_k"], int(solver.model.card))  # torch.topk fails beyond the codebook
    return settings


def n_frames(solver) -> int:
    """Frames of a training segment: the prior sequences are as long as the real ones."""
    return int(round(float(solver.cfg.dataset.segment_duration) * float(solver.compression_model.frame_rate)))


def cache_root(solver, config: PriorConfig) -> Path:
    from dora import git_save

    from .paths import output_dir

    return Path(git_save.to_absolute_path(config.path)) if config.path else output_dir() / "cache" / "prior"


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module) -> tp.Iterator[None]:
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def condition_tensors(model, prompts: tp.Sequence[str]) -> dict:
    """The conditioner's tensors for `prompts` as written: no word dropout (eval mode), no condition dropout."""
    attributes = [ConditioningAttributes(text={"description": p}) for p in prompts]
    with eval_mode(model.condition_provider):
        tokenized = model.condition_provider.tokenize(attributes)
        return model.condition_provider(tokenized)


def forked_rng(device: str):
    devices = [torch.cuda.current_device()] if device == "cuda" and torch.cuda.is_available() else []
    return torch.random.fork_rng(devices=devices)


@torch.no_grad()
def generate_set(solver, config: PriorConfig, store_teacher: bool) -> tp.Dict[str, torch.Tensor]:
    """The base model's sequences (the solver's model must compute the base's logits while this runs)."""
    model, settings, frames = solver.model, generation_settings(solver, config), n_frames(solver)
    tokens, codes, logprobs, ce_sum, items = [], [], [], 0.0, 0
    with eval_mode(model):
        for seed in config.seeds:
            for start in range(0, len(config.prompts), config.batch_size):
                prompts = list(config.prompts[start : start + config.batch_size])
                attributes = [ConditioningAttributes(text={"description": p}) for p in prompts]
                with forked_rng(solver.device):
                    torch.manual_seed(seed * 1_000_003 + start)  # one stream per (seed, batch of prompts)
                    with solver.autocast:
                        generated = model.generate(None, attributes, max_gen_len=frames, **settings)
                tokens.append(generated.cpu())
                with solver.autocast:
                    output = model.compute_predictions(generated, [], condition_tensors(model, prompts))
                logits = output.logits.float()
                ce, _ = solver._compute_cross_entropy(logits, generated, output.mask)
                ce_sum, items = ce_sum + float(ce) * len(prompts), items + len(prompts)
                if store_teacher:
                    top = logits.log_softmax(dim=-1).topk(min(config.teacher_top_k, logits.shape[-1]), dim=-1)
                    codes.append(top.indices.to(torch.int16).cpu())
                    logprobs.append(top.values.to(torch.float16).cpu())
    data = {"tokens": torch.cat(tokens).to(torch.int16), "base_ce": torch.tensor([ce_sum / items])}
    if store_teacher:
        data["teacher_codes"], data["teacher_logprobs"] = torch.cat(codes), torch.cat(logprobs)
    return data


def load_or_generate(
    solver, config: PriorConfig, base_hash: str, store_teacher: bool, base_weights: tp.Callable
) -> PriorSet:
    """The prior set of this base and these settings: from the cache, or generated once by rank 0 (inside
    `base_weights()`, which makes the solver's model compute the base's logits) and stored atomically."""
    from safetensors.torch import load_file, save_file

    ingredients = key_ingredients(solver, config, base_hash, store_teacher)
    folder = cache_root(solver, config) / short_hash(ingredients)
    path = folder / SET_FILE
    if not path.is_file() and flashy.distrib.is_rank_zero():
        solver.logger.info(
            "Prior set: generating %d sequences with the base model (%d prompts x %d seeds, %d frames, %s) into %s",
            len(config.prompts) * len(config.seeds),
            len(config.prompts),
            len(config.seeds),
            ingredients["frames"],
            ", ".join(f"{k}={v}" for k, v in ingredients["generate"].items()),
            folder,
        )
        with base_weights(), sync_allowed():
            data = generate_set(solver, config, store_teacher)
        folder.mkdir(parents=True, exist_ok=True)
        write_atomically(folder / KEY_FILE, lambda tmp: tmp.write_text(json.dumps(ingredients, indent=2) + "\n"))
        items = [{"prompt": p, "seed": s} for s in config.seeds for p in config.prompts]
        write_atomically(folder / PROMPTS_FILE, lambda tmp: tmp.write_text(json.dumps(items, indent=2) + "\n"))
        write_atomically(path, lambda tmp: save_file({k: v.contiguous() for k, v in data.items()}, str(tmp)))
    flashy.distrib.barrier()
    data = load_file(path)
    return PriorSet(
        tokens=data["tokens"].long(),
        prompts=[p for _ in config.seeds for p in config.prompts],
        seeds=[s for s in config.seeds for _ in config.prompts],
        base_ce=float(data["base_ce"][0]),
        folder=folder,
        teacher_codes=data["teacher_codes"].long() if "teacher_codes" in data else None,
        teacher_logprobs=data["teacher_logprobs"].float() if "teacher_logprobs" in data else None,
    )


# ---------------------------------------------------------------------------------------------------- training


def kl_from_teacher(student_logits: torch.Tensor, prior: PriorSet, rows: torch.Tensor, mask: torch.Tensor, teacher):
    """Mean over valid positions of KL(teacher || student). `teacher`: the base's full logits [B, K, T, card]
    (LoRA, adapters off), or None for the stored top-k (renormalised over those codes). Only valid positions are
    read: the LM's logits are NaN elsewhere (models/lm.py compute_predictions, revert_pattern_logits)."""
    valid = mask.bool()
    student = student_logits[valid].float().log_softmax(dim=-1)  # [M, card]
    if teacher is not None:
        teacher_logp = teacher[valid].float().log_softmax(dim=-1)
        per_position = (teacher_logp.exp() * (teacher_logp - student)).sum(dim=-1)
    else:
        codes = prior.teacher_codes[rows].to(student.device)[valid]  # [M, k]
        teacher_logp = prior.teacher_logprobs[rows].to(student.device)[valid].log_softmax(dim=-1)  # renormalised
        per_position = (teacher_logp.exp() * (teacher_logp - student.gather(-1, codes))).sum(dim=-1)
    return per_position.mean()


class PriorTerm:
    """What a run does with the prior set: the training term and the validation cross-entropy."""

    def __init__(self, config: PriorConfig, prior: PriorSet, train: bool, live_teacher: bool):
        self.config, self.prior, self.train, self.live_teacher = config, prior, train, live_teacher

    def items_for_step(self, solver, step: int, real_items: int) -> torch.Tensor:
        """Rows of the prior set for this update: `prior.ratio` per real segment, walking an order shuffled once per
        epoch by its own generator (training's random state untouched; a resumed run draws the same rows);
        processes of a multi-GPU run take different rows."""
        count = max(1, round(self.config.ratio * real_items))
        generator = torch.Generator().manual_seed(int(solver.cfg.seed) * 7919 + solver.epoch)
        order = torch.randperm(len(self.prior), generator=generator)
        start = (step * flashy.distrib.world_size() + flashy.distrib.rank()) * count
        return order[(start + torch.arange(count)) % len(self.prior)]

    def predict(self, solver, rows: torch.Tensor):
        """(tokens, condition tensors, LM output, cross-entropy) of the model on `rows` of the prior set."""
        tokens = self.prior.tokens[rows].to(solver.device)
        with solver.autocast:
            conditions = condition_tensors(solver.model, [self.prior.prompts[int(r)] for r in rows])
            output = solver.model.compute_predictions(tokens, [], conditions)
            ce, _ = solver._compute_cross_entropy(output.logits, tokens, output.mask)
        return tokens, conditions, output, ce

    def loss(self, solver, rows: torch.Tensor) -> tp.Tuple[torch.Tensor, torch.Tensor]:
        """(prior loss, cross-entropy) of the model on `rows` of the prior set."""
        tokens, conditions, output, ce = self.predict(solver, rows)
        if self.config.loss == "ce":
            return ce, ce
        teacher = None
        if self.live_teacher:
            with torch.no_grad(), lora.adapters_off(solver.model), solver.autocast:
                teacher = solver.model.compute_predictions(tokens, [], conditions).logits
        return kl_from_teacher(output.logits, self.prior, rows, output.mask, teacher), ce

    def backward(self, solver, step: int, real_items: int) -> dict:
        """The prior term of one update: `prior.weight` x its mean loss over this update's prior rows, in as many
        micro-batches as the real data (optim.grad_accum_steps), backward into the gradients already there."""
        rows = self.items_for_step(solver, step, real_items)
        parts = [p for p in rows.chunk(max(1, min(solver.grad_accum_steps, len(rows))))]
        loss_total, ce_total = 0.0, 0.0
        for part in parts:
            share = len(part) / len(rows)
            loss, ce = self.loss(solver, part)
            scaled = loss * (self.config.weight * share)
            if solver.scaler is not None:
                scaled = solver.scaler.scale(scaled)
            scaled.backward()
            loss_total += float(loss.detach()) * share
            ce_total += float(ce.detach()) * share
        return {"prior_loss": loss_total, "prior_ce": ce_total}

    @torch.no_grad()
    def validate(self, solver) -> dict:
        """The model's cross-entropy on the whole prior set (every process computes all of it: the same number),
        beside the base's."""
        total = 0.0
        with eval_mode(solver.model):
            for rows in torch.arange(len(self.prior)).split(self.config.batch_size):
                total += float(self.predict(solver, rows)[-1]) * len(rows)
        return {"prior_ce": total / len(self.prior), "prior_ce_base": self.prior.base_ce}


def setup(solver, base_hash: str, base_weights: tp.Callable) -> tp.Optional[PriorTerm]:
    """The run's PriorTerm (None when neither `prior.enabled` nor `early_stop.forgetting_budget` asks for it)."""
    if not wanted(solver.cfg):
        return None
    config = PriorConfig.from_cfg(solver.cfg)
    is_lora = solver.lora_config.enabled
    live_teacher = config.enabled and config.loss == "kl" and is_lora
    store_teacher = config.enabled and config.loss == "kl" and not is_lora
    prior = load_or_generate(solver, config, base_hash, store_teacher, base_weights)
    solver.logger.info("%s", prior.describe())
    if config.enabled:
        teacher = (
            "the same LM with its adapters off"
            if live_teacher
            else f"the base's stored top-{config.teacher_top_k}"
            if store_teacher
            else "none: cross-entropy on the base's tokens"
        )
        solver.logger.info(
            "Prior preservation: loss %s (teacher: %s), %g prior sequence(s) per real segment, weight %g",
            config.loss,
            teacher,
            config.ratio,
            config.weight,
        )
    else:
        solver.logger.info("Prior preservation off; the prior set measures forgetting only (prior_ce in validation)")
    return PriorTerm(config, prior, config.enabled, live_teacher)
