"""One training update of a run, traced: the models and optimizer as the solver builds them from the run's config,
on fake CPU tensors (shapes and dtypes, no memory, no weights), and the update FinetuneSolver runs, with the live
bytes of every tensor counted by part (tracker.LiveBytes).

The update (solver.py `_accumulated_train_step`, upstream solvers/musicgen.py `run_step`): per micro-batch, the
tokens (EnCodec on the audio, no grad, fp32) and the caption embeddings (T5, then its trained projection under
autocast), the LM's forward under autocast, the masked cross-entropy, backward; then clipping, the optimizer step,
EMA's step, and `zero_grad` (to None). With accumulation, the second micro-batch runs with the first one's
gradients alive; later micro-batches repeat the second, so at most two are traced. AudioCraft's GradScaler (fp16)
scales the loss and unscales gradients in place: no memory of its own, left out.

Fake tensors on the CPU, not the GPU: a fake CUDA tensor on a machine without a CUDA driver fails in autograd
(AccumulateGrad asks for the current CUDA stream), and CUDA autocast switches itself off without CUDA. So the trace
runs CPU autocast at the run's CUDA dtype, with a GPU's attention kernel and CUDA's casting rules (gpu.py).
"""

import contextlib
import dataclasses
import math
import typing as tp
import warnings
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
from audiocraft.models import builders as model_builders
from audiocraft.modules import conditioners
from audiocraft.modules.codebooks_patterns import Pattern
from audiocraft.optim import ModuleDictEMA
from audiocraft.solvers import builders as solver_builders
from omegaconf import DictConfig, OmegaConf
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily

from .. import lora
from ..config import compose
from ..errors import UserError
from ..machine import GIB
from ..models import folder as model_dir
from ..models import xp_cfg
from .gpu import gpu_kernels
from .tracker import LiveBytes

CAPTION_TOKENS = 32  # T5 tokens per caption: a long one ("hip hop 808 beat with trap drums, ..., 140 bpm, F minor")
CODEC_SOLVER = "solver=compression/encodec_musicgen_32khz"  # the compression model of every released MusicGen
# T5 encoders by the names AudioCraft's T5Conditioner knows (conditioners.py:374): their published configs.
T5_SHAPES = {
    "t5-small": {"d_model": 512, "d_kv": 64, "d_ff": 2048, "num_layers": 6, "num_heads": 8},
    "t5-base": {"d_model": 768, "d_kv": 64, "d_ff": 3072, "num_layers": 12, "num_heads": 12},
    "t5-large": {"d_model": 1024, "d_kv": 64, "d_ff": 4096, "num_layers": 24, "num_heads": 16},
}
T5_COMMON = {"vocab_size": 32128, "relative_attention_num_buckets": 32, "feed_forward_proj": "relu"}
INPUTS = ("encoded", "cached")  # EnCodec + T5 on the device and run every step | tokens and T5 outputs precomputed


class PlanInputError(UserError, ValueError):
    """The plan cannot know a part of the model (its T5, its compression model); the message says what to give."""


# -- what the run's models are -----------------------------------------------------------------------------------


def resolved_copy(cfg: DictConfig) -> DictConfig:
    """A copy of `cfg` with its interpolations resolved, to change without touching the original."""
    return OmegaConf.create(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False))


@dataclasses.dataclass
class RunModels:
    """What a run trains and runs, by config: the run's composed config, its compression model's and its T5's."""

    cfg: DictConfig
    codec_cfg: DictConfig
    t5_config: tp.Any  # transformers.T5Config, or None when the text conditioner is not T5

    @property
    def kind(self) -> str:
        return "cuda" if self.cfg.device == "cuda" else "cpu"

    @property
    def frame_rate(self) -> float:
        return self.codec_cfg.sample_rate / math.prod(self.codec_cfg.seanet.ratios)


def t5_folder(name: str, root: tp.Optional[Path] = None) -> tp.Optional[Path]:
    """The local folder of the text encoder `name` (one with a config.json): `name` itself, or relative to the
    model folder `root`, or `root`/t5; None when there is none."""
    candidates = [Path(name).expanduser()] + ([root / name, root / model_dir.T5_SUBDIR] if root else [])
    return next((folder.resolve() for folder in candidates if (folder / "config.json").is_file()), None)


def t5_config_for(name: str, root: tp.Optional[Path] = None):
    """The T5Config of the text encoder `name`: a known hub name's published shapes, or a local folder's
    config.json (read, never its weights)."""
    from transformers import T5Config

    short = name.split("/")[-1].replace("flan-", "")
    if short in T5_SHAPES:
        return T5Config(**T5_COMMON, **T5_SHAPES[short], dropout_rate=0.0)
    folder = t5_folder(name, root)
    if folder is None:
        raise PlanInputError(
            f"The text encoder {name!r} is neither one of {', '.join(T5_SHAPES)} nor a folder with a config.json: "
            f"put the T5 folder at <model>/{model_dir.T5_SUBDIR}."
        )
    return T5Config.from_pretrained(folder, dropout_rate=0.0)


def compression_config(cfg: DictConfig) -> DictConfig:
    """The compression model's config: the xp.cfg of `compression_model_checkpoint` when it is a local model
    folder or file (read, weights memory-mapped and never touched), else AudioCraft's 32 kHz EnCodec."""
    checkpoint = str(cfg.get("compression_model_checkpoint") or "")
    path = Path(checkpoint[len(model_dir.PRETRAINED_PREFIX) :]) if checkpoint.startswith("//pretrained/") else None
    if path is not None and path.is_dir():
        path = path / model_dir.COMPRESSION_FILE
    if path is not None and path.is_file():
        codec_cfg = OmegaConf.create(model_dir.load_package(path)["xp.cfg"])
    else:
        codec_cfg = compose([CODEC_SOLVER])
    codec_cfg.device = "cpu"
    return codec_cfg


def run_models(cfg: DictConfig, root: tp.Optional[Path] = None) -> RunModels:
    """RunModels for a run's composed config (`root`: the model folder its T5 may be relative to)."""
    description = OmegaConf.select(cfg, "conditioners.description") or {}
    t5 = t5_config_for(str(description.t5.name), root) if description.get("model") == "t5" else None
    return RunModels(cfg, compression_config(cfg), t5)


# -- building them on fake tensors -------------------------------------------------------------------------------


class _NoTokenizer:
    @staticmethod
    def from_pretrained(*args, **kwargs):
        return None  # the plan feeds token ids: the tokenizer is never called


def _materialize(module: torch.nn.Module, fake: tp.Optional[FakeTensorMode]) -> torch.nn.Module:
    """Parameters and buffers of a module built on the meta device as (fake) CPU tensors of the same shapes."""
    with fake or contextlib.nullcontext():
        for child in module.modules():
            for name, p in child._parameters.items():
                if p is not None:
                    empty = torch.empty(p.shape, dtype=p.dtype)
                    child._parameters[name] = torch.nn.Parameter(empty, requires_grad=p.requires_grad)
            for name, b in child._buffers.items():
                if b is not None:
                    child._buffers[name] = torch.empty(b.shape, dtype=b.dtype)
    return module


def _realized_indexes(fake: FakeTensorMode, valid_steps: dict):
    """Upstream's pattern index builders fill numpy arrays from tensors (codebooks_patterns.py:138-149 and
    :201-217), which fake tensors cannot do: they run on real tensors, their (small) results become fake. The
    reverted valid-step masks are kept by shape [K, T]: the loss selects the valid steps with them. (A pattern
    caches its builders' results per instance, codebooks_patterns.py:53, so these run once per length.)"""

    def wrap(method, name):
        def run(self, *args, **kwargs):
            with unset_fake_temporarily():
                result = method(self, *args, **kwargs)
            if name == "_build_reverted_sequence_scatter_indexes":
                valid_steps[tuple(result[1].shape)] = result[1]
            return tuple(fake.from_tensor(t) for t in result)

        return run

    return [
        mock.patch.object(Pattern, name, wrap(getattr(Pattern, name), name))
        for name in ("_build_pattern_sequence_scatter_indexes", "_build_reverted_sequence_scatter_indexes")
    ]


@dataclasses.dataclass
class MemoryTrace:
    """One traced update: the peak of live bytes, its parts, and the shapes the transformer ran."""

    peak_gib: float
    parts_gib: tp.Dict[str, float]
    phase: str  # the part being allocated when the peak was reached
    positions: int  # sequence positions the transformer ran (frames + the delay pattern's steps)
    text_tokens: int


class Trainee:
    """The run's LM (LoRA injected when enabled, base frozen), its optimizer, EMA, compression model and T5, built
    as the solver builds them, on fake CPU tensors (`fake=False`: real ones, for the real-vs-fake check).

    Args:
        models: the run's configs.
        checkpointing: activation checkpointing on or off (None: as the config says).
        inputs: "encoded" (EnCodec and T5 on the device, run every step: the solver's first epoch, when the
            caches fill) or "cached" (tokens and T5 outputs precomputed, neither model on the device).
        fake: fake tensors (the plan) or real CPU tensors (the check).
    """

    def __init__(
        self, models: RunModels, checkpointing: tp.Optional[bool] = None, inputs: str = "encoded", fake: bool = True
    ):
        if inputs not in INPUTS:
            raise ValueError(f"inputs={inputs!r}: one of {INPUTS}")
        cfg = resolved_copy(models.cfg)
        if checkpointing is not None:
            cfg.transformer_lm.checkpointing = "torch" if checkpointing else "none"
        self.models, self.cfg, self.inputs = models, cfg, inputs
        self.kind = models.kind
        self.valid_steps: tp.Dict[tuple, torch.Tensor] = {}  # [K, T] -> the pattern's valid steps (real)
        self.checkpointing = cfg.transformer_lm.checkpointing != "none"
        self.fake = FakeTensorMode(allow_non_fake_inputs=True) if fake else None
        self.autocast_dtype = (
            (torch.float16 if cfg.autocast_dtype == "float16" else torch.bfloat16) if cfg.autocast else None
        )
        with self._fake(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(0)
            self.lm = self._build_lm()
            self.params = self._trainable()
            self.optimizer = self._build_optimizer()
            self.ema = self._build_ema()
        self.codec = self._build_codec() if inputs == "encoded" else None
        self.conditioner = self.lm.condition_provider.conditioners["description"]
        if inputs == "cached" and "t5" in self.conditioner.__dict__:
            self.conditioner.__dict__.pop("t5")  # not on the device: its outputs come from the cache

    def _fake(self):
        return self.fake if self.fake is not None else contextlib.nullcontext()

    def _build_lm(self):
        t5 = self.models.t5_config
        name = "<planned T5>"
        cfg = resolved_copy(self.cfg)
        if t5 is not None:
            cfg.conditioners.description.t5.name = name
        T5 = conditioners.T5Conditioner
        stand_in = mock.Mock(from_pretrained=lambda *a, **k: _t5_encoder(t5))
        with (
            mock.patch.object(T5, "MODELS", [*T5.MODELS, name]),
            mock.patch.dict(T5.MODELS_DIMS, {name: t5.d_model if t5 is not None else 0}),
            mock.patch.object(conditioners, "T5EncoderModel", stand_in),
            mock.patch.object(conditioners, "T5Tokenizer", _NoTokenizer),
        ):
            lm = xp_cfg.build_lm(cfg, device="cpu")
        if self.cfg.get("lora") and self.cfg.lora.enabled:
            lora.inject(lm, lora.LoraConfig.from_dict(self.cfg.lora))
            lora.freeze_base(lm)
        return lm.train()

    @property
    def lora(self) -> bool:
        return bool(self.cfg.get("lora") and self.cfg.lora.enabled)

    def _trainable(self) -> tp.List[torch.nn.Parameter]:
        if self.lora:
            return list(lora.adapter_parameters(self.lm).values())
        return [p for p in self.lm.parameters() if p.requires_grad]

    def _build_optimizer(self):
        """As the solver builds it (upstream solvers/builders.py get_optimizer over the trained parameters), its
        state created by one step on zero gradients: a plan is of an update after the first."""
        optimizer = solver_builders.get_optimizer(self.params, self.cfg.optim)
        for group in optimizer.param_groups:
            if self.kind == "cuda" and not group.get("fused") and group.get("foreach") is None:
                group["foreach"] = True  # torch's choice on CUDA (optim/optimizer.py _default_to_fused_or_foreach)
        for p in self.params:
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return optimizer

    def _build_ema(self) -> tp.Optional[ModuleDictEMA]:
        """Upstream's EMA (solvers/builders.py get_ema) when it lives on the training device; for LoRA it averages
        the adapters only (solver.py AdapterView)."""
        ema = self.cfg.optim.get("ema") or {}
        if not ema.get("use") or str(ema.get("device") or self.cfg.device) != self.cfg.device:
            return None
        if self.lora:
            source = torch.nn.ModuleDict({"lora_adapters": torch.nn.ParameterList(self.params)})
        else:
            source = torch.nn.ModuleDict({"model": self.lm})
        return ModuleDictEMA(source, decay=ema.get("decay", 0.99), device=None)

    def _build_codec(self):
        cfg = resolved_copy(self.models.codec_cfg)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SEANet's weight_norm deprecation
            if self.fake is None:
                cfg.device = "cpu"
                torch.manual_seed(0)
                return model_builders.get_compression_model(cfg).eval()
            cfg.device = "meta"  # initialised on meta (free), then fake CPU tensors of the same shapes
            return _materialize(model_builders.get_compression_model(cfg).eval(), self.fake)

    # -- the update ----------------------------------------------------------------------------------------------

    def resident(self) -> tp.Dict[str, tp.List[torch.Tensor]]:
        """What is on the device before the update, by part."""
        parts = {
            "parameters": [*self.lm.parameters(), *self.lm.buffers()],
            "optimizer": [v for state in self.optimizer.state.values() for v in state.values()],
            "ema": [v for module in (self.ema.state.values() if self.ema else ()) for v in module.values()],
            "frozen_models": [],
        }
        if self.codec is not None:
            parts["frozen_models"] += [*self.codec.parameters(), *self.codec.buffers()]
        t5 = self.conditioner.__dict__.get("t5")
        if t5 is not None:
            parts["frozen_models"] += [*t5.parameters(), *t5.buffers()]
        return parts

    def trace(self, micro_batch: int, segment_s: float, accum_steps: int = 1) -> MemoryTrace:
        """Trace one update of `accum_steps` micro-batches of `micro_batch` segments of `segment_s` seconds."""
        tracker = LiveBytes()
        for part, tensors in self.resident().items():
            tracker.register(tensors, part)
        shapes: tp.Dict[str, int] = {}
        handles = self._hooks(tracker, shapes)
        patches = _realized_indexes(self.fake, self.valid_steps) if self.fake is not None else []
        try:
            with contextlib.ExitStack() as stack:
                for patch in patches:
                    stack.enter_context(patch)
                stack.enter_context(warnings.catch_warnings())
                warnings.simplefilter("ignore")  # xformers' unbind reads data pointers of fake tensors
                stack.enter_context(self._fake())
                stack.enter_context(gpu_kernels(self.kind))
                stack.enter_context(tracker)
                self._update(tracker, micro_batch, segment_s, accum_steps)
        finally:
            for handle in handles:
                handle.remove()
        return MemoryTrace(
            tracker.peak / GIB,
            tracker.peak_parts_gib(),
            tracker.phase_at_peak,
            shapes.get("positions", 0),
            shapes.get("text_tokens", 0),
        )

    def _hooks(self, tracker: LiveBytes, shapes: dict) -> list:
        """Gradients counted as such once accumulated; the output heads start the logits part; a transformer
        layer run again in backward (checkpointing) allocates activations; the shapes the transformer ran."""
        handles = [
            p.register_post_accumulate_grad_hook(lambda p: tracker.relabel(p.grad, "gradients"))
            for p in self.lm.parameters()
            if p.requires_grad
        ]
        handles.append(
            self.lm.linears[0].register_forward_pre_hook(lambda *a: setattr(tracker, "label", "logits_loss"))
        )
        handles.append(
            self.conditioner.output_proj.register_forward_pre_hook(lambda *a: setattr(tracker, "label", "activations"))
        )
        labels: tp.List[str] = []

        def enter(*args):
            labels.append(tracker.label)
            tracker.label = "activations"

        def leave(*args):
            tracker.label = labels.pop()

        for layer in self.lm.transformer.layers:  # always_call: checkpointing's recompute stops a layer early
            handles += [layer.register_forward_pre_hook(enter), layer.register_forward_hook(leave, always_call=True)]

        def record(module, args, kwargs):
            shapes["positions"] = args[0].shape[1]
            source = kwargs.get("cross_attention_src")
            shapes["text_tokens"] = source.shape[1] if source is not None else 0

        handles.append(self.lm.transformer.register_forward_pre_hook(record, with_kwargs=True))
        return handles

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cpu", dtype=self.autocast_dtype)

    def _batch(self, tracker: LiveBytes, micro_batch: int, segment_s: float):
        """A micro-batch's tokens and condition tensors, as the solver's _prepare_tokens_and_attributes makes them
        (solvers/musicgen.py:246): EnCodec without grad, then T5 and its projection under autocast."""
        codec_cfg, lm = self.models.codec_cfg, self.lm
        mask = torch.ones(micro_batch, CAPTION_TOKENS, dtype=torch.long)
        if self.codec is None:
            frames = math.ceil(segment_s * self.models.frame_rate)
            codes = torch.randint(0, lm.card, (micro_batch, lm.num_codebooks, frames))
            hidden = torch.randn(micro_batch, CAPTION_TOKENS, self.conditioner.output_proj.in_features)
            with self._autocast(), tracker.phase("activations"):
                proj = self.conditioner.output_proj
                embeds = proj(hidden.to(proj.weight)) * mask.unsqueeze(-1)
            return codes, {"description": (embeds, mask)}
        audio = torch.randn(micro_batch, codec_cfg.channels, round(segment_s * codec_cfg.sample_rate))
        with tracker.phase("frozen_models"):
            with torch.no_grad():
                codes, _ = self.codec.encode(audio)
            tokens = {"input_ids": torch.randint(0, 32, (micro_batch, CAPTION_TOKENS)), "attention_mask": mask}
            with self._autocast():
                conditions = lm.condition_provider({"description": tokens})
        return codes, conditions

    def _update(self, tracker: LiveBytes, micro_batch: int, segment_s: float, accum_steps: int) -> None:
        for _ in range(min(accum_steps, 2)):
            codes, conditions = self._batch(tracker, micro_batch, segment_s)
            with tracker.phase("activations"), self._autocast():
                output = self.lm.compute_predictions(codes, [], conditions)
                ce = masked_cross_entropy(output, codes, self.valid_steps, self.fake)
                loss = ce / accum_steps
            del output, conditions
            loss.backward()
            del loss, ce
        if self.cfg.optim.max_norm:
            torch.nn.utils.clip_grad_norm_(self.lm.parameters(), self.cfg.optim.max_norm)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.step()
        self.optimizer.zero_grad()


def _t5_encoder(config):
    from transformers import T5EncoderModel

    return T5EncoderModel(config)


def masked_cross_entropy(output, targets: torch.Tensor, valid_steps: dict, fake) -> torch.Tensor:
    """Upstream's `_compute_cross_entropy` (solvers/musicgen.py:212) over full segments (padding mask all true):
    per codebook, the logits and targets of the valid steps, then the mean over codebooks. Its boolean indexing
    `logits_k[mask_k]` needs the mask's values, which a fake tensor has not: the valid steps are selected by
    their indices instead (the same selected copies; backward scatters into the same zeros)."""
    logits = output.logits
    B, K, T = targets.shape
    if fake is not None:
        with unset_fake_temporarily():
            mask = valid_steps[(K, T)][None].expand(B, -1, -1)
            index = [mask[:, k].reshape(-1).nonzero().squeeze(1) for k in range(K)]
        index = [fake.from_tensor(i) for i in index]
    else:
        index = [output.mask[:, k].reshape(-1).nonzero().squeeze(1) for k in range(K)]
    ce = torch.zeros([])
    for k in range(K):
        logits_k = logits[:, k, ...].contiguous().view(-1, logits.size(-1))
        targets_k = targets[:, k, ...].contiguous().view(-1)
        ce = ce + F.cross_entropy(logits_k.index_select(0, index[k]), targets_k.index_select(0, index[k]))
    return ce / K
