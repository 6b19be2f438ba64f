"""LoRA adapters for AudioCraft's MusicGen LM, reaching the fused q/k/v projection that module wrapping cannot.

AudioCraft 1.3.0's `StreamingMultiheadAttention` (modules/transformer.py:138) keeps q, k and v as one raw
`nn.Parameter`, `in_proj_weight` (:203), used whole for self-attention (:367) and sliced `[:dim]`, `[dim:2*dim]`,
`[2*dim:]` for cross-attention (:347-357). Only `out_proj`, the feed-forward `linear1`/`linear2` and the LM's
output heads `linears.{k}` are `nn.Linear`. So adapters are added by swapping classes in place:

- attention modules become `LoRAStreamingMultiheadAttention`, whose class-level property `in_proj_weight` returns
  base + delta. A class property wins over nn.Module's `_parameters` lookup (`__getattr__` only runs when normal
  lookup fails), so upstream's forward sees the adapted weight while `state_dict()`, `load_state_dict()` and
  `parameters()` still see the base parameter under its own name;
- `nn.Linear` targets become `LoRALinear`, whose forward adds `dropout(x) @ A.T @ B.T * alpha / rank`.

Base state-dict keys are unchanged, so pretrained weights load by key after injection (AudioCraft builds the
optimizer, then loads `continue_from`). Adapters get new keys:

    transformer.layers.{i}.{self_attn,cross_attention}.lora_in_proj.{q,k,v}.lora_{A,B}
    transformer.layers.{i}.{self_attn,cross_attention}.out_proj.lora_{A,B}
    transformer.layers.{i}.{linear1,linear2}.lora_{A,B}
    linears.{k}.lora_{A,B}
    condition_provider.conditioners.description.output_proj.lora_{A,B}    (T5's projection into the LM)

`lora_A` is (rank, in_features), kaiming-uniform; `lora_B` is (out_features, rank), zero: at injection the model's
output is bit-identical to the base model's.

Typical use: `inject(lm, config)`, `freeze_base(lm)`, train `adapter_parameters(lm)`, `save_adapters(...)`;
for inference `load_adapters(lm, path)` then `merge(lm)` (the fused delta is otherwise recomputed every forward).
"""

import contextlib
import dataclasses
import hashlib
import json
import math
import re
import typing as tp
from pathlib import Path

import torch
import torch.nn.functional as F
from audiocraft.modules.transformer import StreamingMultiheadAttention, StreamingTransformer
from torch import nn

from .config import hydra_value
from .errors import UserError

ATTENTION_TARGETS = (
    "self_attn.q",
    "self_attn.k",
    "self_attn.v",
    "self_attn.out_proj",
    "cross_attention.q",
    "cross_attention.k",
    "cross_attention.v",
    "cross_attention.out_proj",
)
FEED_FORWARD_TARGETS = ("linear1", "linear2")
OUTPUT_HEADS_TARGET = "linears"
# The text conditioner's projection of T5's output to the LM's width (transformers: enc_to_dec_proj), which PEFT
# scripts for transformers' MusicGen often adapt too. In no preset: it acts before every layer, on the text alone.
TEXT_PROJECTION_TARGET = "description.output_proj"
TEXT_PROJECTION = "condition_provider.conditioners.description.output_proj"
MODEL_TARGETS = (OUTPUT_HEADS_TARGET, TEXT_PROJECTION_TARGET)  # the others are per transformer layer
ALLOWED_TARGETS = ATTENTION_TARGETS + FEED_FORWARD_TARGETS + MODEL_TARGETS
PRESETS: tp.Dict[str, tp.Tuple[str, ...]] = {
    "self_attention": ATTENTION_TARGETS[:4],
    "attention": ATTENTION_TARGETS,
    "attention_ff": ATTENTION_TARGETS + FEED_FORWARD_TARGETS,
    "all": ATTENTION_TARGETS + FEED_FORWARD_TARGETS + (OUTPUT_HEADS_TARGET,),
}
ADAPTER_PARAMETER_NAMES = ("lora_A", "lora_B")
FUSED_PROJECTIONS = ("q", "k", "v")
FORMAT = "musicgen_finetune.lora/1"


class LoraConfigError(UserError, ValueError):
    """A `lora.*` setting is out of range or matches nothing in the model; the message names the key."""


class AdapterMismatchError(UserError, ValueError):
    """Saved adapters do not fit this model: another base model, or other adapted projections."""


class AdapterFileError(UserError, FileNotFoundError):
    """An adapter file lacks the JSON config saved beside it."""


@dataclasses.dataclass
class LoraConfig:
    """Which projections get adapters, and their shape. `targets` may also name a preset of `PRESETS`."""

    enabled: bool = False
    rank: int = 12
    alpha: float = 24.0
    dropout: float = 0.1
    targets: tp.Tuple[str, ...] = ATTENTION_TARGETS
    layers: tp.Optional[tp.List[int]] = None  # transformer layer indices; None = all
    # training only: adapters to start from (ours or a PEFT folder), read by the solver; not part of the shape
    init_from: tp.Optional[str] = None

    def __post_init__(self):
        if isinstance(self.targets, str):
            if self.targets not in PRESETS:
                raise LoraConfigError(
                    f"lora.targets={self.targets!r} is neither a preset ({', '.join(PRESETS)}) nor a "
                    f"list of targets; allowed targets: {', '.join(ALLOWED_TARGETS)}."
                )
            self.targets = PRESETS[self.targets]
        self.targets = tuple(dict.fromkeys(self.targets))  # de-duplicated, order kept
        unknown = [t for t in self.targets if t not in ALLOWED_TARGETS]
        if unknown or not self.targets:
            raise LoraConfigError(
                f"lora.targets has {', '.join(map(repr, unknown)) or 'no target'}; allowed targets: "
                f"{', '.join(ALLOWED_TARGETS)} (or a preset: {', '.join(PRESETS)})."
            )
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise LoraConfigError(f"lora.rank={self.rank!r} must be an integer >= 1 (e.g. 8, 12 or 16).")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise LoraConfigError(
                f"lora.alpha={self.alpha!r} must be a number > 0 (the update is scaled by alpha / "
                "rank; alpha = 2 * rank is a common choice)."
            )
        self.alpha = float(self.alpha)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise LoraConfigError(f"lora.dropout={self.dropout!r} must be in [0, 1) (0 disables it).")
        self.dropout = float(self.dropout)
        if self.layers is not None:
            layers = list(self.layers)
            bad = [i for i in layers if isinstance(i, bool) or not isinstance(i, int) or i < 0]
            if bad or not layers:
                raise LoraConfigError(
                    f"lora.layers={self.layers!r} must be null (all layers) or a non-empty list of "
                    f"layer indices >= 0; bad: {bad or 'empty list'}."
                )
            self.layers = sorted(set(layers))
        if self.init_from is not None and (not isinstance(self.init_from, str) or not self.init_from.strip()):
            raise LoraConfigError(
                f"lora.init_from={self.init_from!r} must be null or the path of an adapters.safetensors (make "
                "export) or of a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors)."
            )

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_dict(cls, values: tp.Any) -> "LoraConfig":
        """From a mapping or an OmegaConf DictConfig (the `lora:` section of a run's config)."""
        try:
            from omegaconf import DictConfig, OmegaConf

            if isinstance(values, DictConfig):
                values = OmegaConf.to_container(values, resolve=True)
        except ImportError:  # omegaconf is only needed for DictConfig input
            pass
        if not isinstance(values, tp.Mapping):
            raise LoraConfigError(f"A LoRA config must be a mapping, got {type(values).__name__}: {values!r}.")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in values if k not in known]
        if unknown:
            raise LoraConfigError(
                f"Unknown LoRA config key(s) {', '.join(map(repr, unknown))}; allowed keys: {', '.join(known)}."
            )
        return cls(**values)

    def to_dict(self) -> tp.Dict[str, tp.Any]:
        return {
            "enabled": self.enabled,
            "rank": self.rank,
            "alpha": self.alpha,
            "dropout": self.dropout,
            "targets": list(self.targets),
            "layers": self.layers,
        }


CONTINUED_KEYS = ("rank", "alpha", "targets", "layers")  # what adapters to continue must share with the run


def check_continuable(saved: LoraConfig, config: LoraConfig, source: str) -> None:
    """A run continues adapters `saved` (lora.init_from) only with their shape and scale: the same rank, alpha,
    targets and layers as its own `config`, else LoraConfigError giving the settings that match."""

    def same(key: str) -> bool:
        mine, theirs = getattr(config, key), getattr(saved, key)
        return set(mine) == set(theirs) if key == "targets" else mine == theirs

    differ = [key for key in CONTINUED_KEYS if not same(key)]
    if differ:
        found = ", ".join(
            f"{key} {hydra_value(getattr(saved, key))} (this run: {hydra_value(getattr(config, key))})"
            for key in differ
        )
        matching = " ".join(f"lora.{key}={hydra_value(getattr(saved, key))}" for key in CONTINUED_KEYS)
        raise LoraConfigError(
            f"lora.init_from={source} has {found}: add ARGS='{matching}' to continue it, or leave lora.init_from out "
            "to train new adapters."
        )


def is_adapter_key(name: str) -> bool:
    """Whether a parameter / state-dict key is an adapter tensor (as opposed to a base model tensor)."""
    return name.rsplit(".", 1)[-1] in ADAPTER_PARAMETER_NAMES


def _new_adapter_weights(module: nn.Module, in_features: int, out_features: int, rank: int, like: torch.Tensor) -> None:
    """Register lora_A (rank, in) and lora_B (out, rank) on `module`, on the device and in the dtype of `like`."""
    factory = {"device": like.device, "dtype": like.dtype}
    module.lora_A = nn.Parameter(torch.empty(rank, in_features, **factory))
    module.lora_B = nn.Parameter(torch.zeros(out_features, rank, **factory))
    # As in the LoRA paper and torchtune: A as nn.Linear initialises its weight, B = 0 so the update starts at 0.
    nn.init.kaiming_uniform_(module.lora_A, a=math.sqrt(5))


class FusedProjectionAdapter(nn.Module):
    """The low-rank update (B @ A) * alpha / rank of one of q, k, v inside a fused `in_proj_weight`.

    The fused weight is materialised before upstream's F.linear sees it, so dropout cannot act on each token's
    input as in LoRA's `B(A(dropout(x)))`. Dropout acts on A's input features instead: in training mode a mask
    over A's columns, scaled by 1 / (1 - p), is drawn once per forward (shared by every token of the batch).
    """

    def __init__(
        self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float, like: torch.Tensor
    ):
        super().__init__()
        self.rank, self.alpha, self.dropout = rank, alpha, dropout
        self.scale = alpha / rank
        _new_adapter_weights(self, in_features, out_features, rank, like)

    def delta_weight(self, use_dropout: bool = True) -> torch.Tensor:
        lora_A = self.lora_A
        if use_dropout and self.training and self.dropout > 0:
            keep = torch.empty(lora_A.shape[1], device=lora_A.device, dtype=lora_A.dtype).bernoulli_(1 - self.dropout)
            lora_A = lora_A * (keep / (1 - self.dropout))
        return (self.lora_B @ lora_A) * self.scale

    def extra_repr(self) -> str:
        return (
            f"in={self.lora_A.shape[1]}, out={self.lora_B.shape[0]}, rank={self.rank}, alpha={self.alpha}, "
            f"dropout={self.dropout}"
        )


class LoRAStreamingMultiheadAttention(StreamingMultiheadAttention):
    """StreamingMultiheadAttention whose `in_proj_weight` reads as base + LoRA deltas of the adapted q/k/v.

    The base stays the registered parameter `in_proj_weight` (its state-dict key), never modified in place
    by the forward, so autograd, autocast and activation checkpointing see an ordinary out-of-place sum.
    """

    lora_in_proj: nn.ModuleDict
    lora_merged: bool
    lora_active: bool = True  # False inside adapters_off: the base alone

    @property  # type: ignore[override]
    def in_proj_weight(self) -> torch.Tensor:
        cached = self.__dict__.get("_lora_effective_in_proj_weight")
        return cached if cached is not None else self._lora_effective_in_proj_weight()

    def _lora_split_sizes(self) -> tp.List[int]:
        # q has embed_dim rows; k and v share the rest (fewer than embed_dim each when kv_repeat > 1).
        rows = self._parameters["in_proj_weight"].shape[0]
        kv_rows = (rows - self.embed_dim) // 2
        return [self.embed_dim, kv_rows, kv_rows]

    def _lora_deltas(self, use_dropout: bool) -> tp.Dict[str, torch.Tensor]:
        return {name: adapter.delta_weight(use_dropout) for name, adapter in self.lora_in_proj.items()}

    def _lora_effective_in_proj_weight(self) -> torch.Tensor:
        base = self._parameters["in_proj_weight"]
        if self.lora_merged or not self.lora_active:
            return base
        deltas = self._lora_deltas(use_dropout=True)
        slices = base.split(self._lora_split_sizes(), dim=0)
        return torch.cat(
            [part + deltas[name] if name in deltas else part for name, part in zip(FUSED_PROJECTIONS, slices)], dim=0
        )

    def forward(self, query, key, value, *args, **kwargs):
        # Upstream reads in_proj_weight up to four times a forward (its shape, then the q/k/v slices for
        # cross-attention): compute it once, so one dropout mask serves the whole forward. A checkpointed
        # recompute runs this forward again with the same RNG state, hence the same mask.
        self.__dict__["_lora_effective_in_proj_weight"] = self._lora_effective_in_proj_weight()
        try:
            return super().forward(query, key, value, *args, **kwargs)
        finally:
            self.__dict__.pop("_lora_effective_in_proj_weight", None)

    def _lora_merge(self, sign: float) -> None:
        base = self._parameters["in_proj_weight"]
        deltas = self._lora_deltas(use_dropout=False)
        for name, part in zip(FUSED_PROJECTIONS, base.data.split(self._lora_split_sizes(), dim=0)):
            if name in deltas:
                part.add_(deltas[name].to(part.dtype), alpha=sign)  # a view: writes into the base


class LoRALinear(nn.Linear):
    """nn.Linear plus `dropout(x) @ A.T @ B.T * alpha / rank` (LoRA as in the paper, true input dropout)."""

    lora_A: nn.Parameter
    lora_B: nn.Parameter
    lora_merged: bool
    lora_active: bool = True  # False inside adapters_off: the base alone

    def _init_lora(self, rank: int, alpha: float, dropout: float) -> None:
        self.lora_rank, self.lora_alpha = rank, alpha
        self.lora_scale = alpha / rank
        self.lora_dropout = nn.Dropout(dropout)
        self.lora_merged = False
        _new_adapter_weights(self, self.in_features, self.out_features, rank, self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.lora_merged or not self.lora_active:
            return out
        return out + (self.lora_dropout(x) @ self.lora_A.T @ self.lora_B.T) * self.lora_scale

    def _lora_merge(self, sign: float) -> None:
        delta = (self.lora_B @ self.lora_A) * self.lora_scale
        self.weight.data.add_(delta.to(self.weight.dtype), alpha=sign)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lora_rank={self.lora_rank}, lora_alpha={self.lora_alpha}"


def _lora_modules(model: nn.Module) -> tp.List[tp.Tuple[str, nn.Module]]:
    return [
        (name, m) for name, m in model.named_modules() if isinstance(m, (LoRALinear, LoRAStreamingMultiheadAttention))
    ]


def _find_transformer(model: nn.Module) -> tp.Tuple[str, nn.Module]:
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, StreamingTransformer)]
    if len(found) != 1:
        raise ValueError(
            f"LoRA injection expects exactly one AudioCraft StreamingTransformer in "
            f"{type(model).__name__}, found {len(found)}: pass the LMModel (or the transformer)."
        )
    name, transformer = found[0]
    return (name + "." if name else ""), transformer


def _check_custom_attention(attention: nn.Module, path: str) -> None:
    if not attention.custom:
        raise LoraConfigError(
            f"{path} uses torch's nn.MultiheadAttention (transformer_lm.custom=false and memory_efficient=false), "
            "whose projections this LoRA does not adapt. Set transformer_lm.memory_efficient=true (as MusicGen's "
            "released models do) or transformer_lm.custom=true; the state-dict keys change between the two."
        )


def _plan(model: nn.Module, config: LoraConfig) -> tp.List[tp.Tuple[str, nn.Module, str]]:
    """(path, module, projection) for every projection to adapt, checked before anything is modified."""
    prefix, transformer = _find_transformer(model)
    num_layers = len(transformer.layers)
    layers = config.layers if config.layers is not None else list(range(num_layers))
    out_of_range = [i for i in layers if i >= num_layers]
    if out_of_range:
        raise LoraConfigError(
            f"lora.layers has {out_of_range}, but the model has {num_layers} transformer layers "
            f"(indices 0 to {num_layers - 1})."
        )
    plan: tp.List[tp.Tuple[str, nn.Module, str]] = []
    matched: tp.Dict[str, int] = {target: 0 for target in config.targets}
    for i in layers:
        layer = transformer.layers[i]
        for target in config.targets:
            if target in MODEL_TARGETS:
                continue
            attribute, _, projection = target.partition(".")
            module = getattr(layer, attribute, None)
            if module is None:  # e.g. no cross-attention in an unconditional model
                continue
            path = f"{prefix}layers.{i}.{attribute}"
            if projection:
                _check_custom_attention(module, path)
                if projection == "out_proj":
                    module, path, projection = module.out_proj, f"{path}.out_proj", ""
            if not isinstance(module, (nn.Linear, StreamingMultiheadAttention)):
                raise ValueError(f"{path} is a {type(module).__name__}, not a projection LoRA can adapt.")
            plan.append((path, module, projection))
            matched[target] += 1
    if OUTPUT_HEADS_TARGET in config.targets:
        heads = getattr(model, OUTPUT_HEADS_TARGET, None)
        if isinstance(heads, nn.ModuleList):
            for k, head in enumerate(heads):
                if isinstance(head, nn.Linear):
                    plan.append((f"{OUTPUT_HEADS_TARGET}.{k}", head, ""))
                    matched[OUTPUT_HEADS_TARGET] += 1
    if TEXT_PROJECTION_TARGET in config.targets:
        try:
            projection = model.get_submodule(TEXT_PROJECTION)
        except AttributeError:  # a bare transformer, or no text conditioner
            projection = None
        if isinstance(projection, nn.Linear):
            plan.append((TEXT_PROJECTION, projection, ""))
            matched[TEXT_PROJECTION_TARGET] += 1
    unmatched = [t for t, count in matched.items() if count == 0]
    if unmatched:
        raise LoraConfigError(
            f"LoRA target(s) {', '.join(map(repr, unmatched))} match nothing in this "
            f"{type(model).__name__} (layers {layers}); remove them from lora.targets (a model "
            f"without text conditioning has no cross_attention, `linears` and {TEXT_PROJECTION_TARGET} need the "
            "LMModel)."
        )
    return plan


def inject(model: nn.Module, config: LoraConfig) -> tp.List[str]:
    """Add adapters to `model` (an LMModel, or a bare StreamingTransformer) in place; return the adapted names.

    Names are module paths, with `.q`/`.k`/`.v` for the fused projections: `transformer.layers.0.self_attn.q`,
    `transformer.layers.0.self_attn.out_proj`, `linears.0`. Raises ValueError, before changing anything, if a
    target matches nothing or a layer index is out of range; RuntimeError if the model already has adapters.
    """
    existing = _lora_modules(model)
    if existing:
        raise RuntimeError(
            f"{type(model).__name__} already has LoRA adapters (e.g. {existing[0][0]}); inject once "
            "per model, or build a fresh model."
        )
    attention_class = LoRAStreamingMultiheadAttention
    for _, module, projection in _plan(model, config):
        if projection:  # q, k or v of a fused in_proj_weight
            if not isinstance(module, attention_class):
                module.__class__ = attention_class
                module.lora_in_proj = nn.ModuleDict()
                module.lora_merged = False
            base = module._parameters["in_proj_weight"]
            rows = dict(zip(FUSED_PROJECTIONS, module._lora_split_sizes()))[projection]
            module.lora_in_proj[projection] = FusedProjectionAdapter(
                base.shape[1], rows, config.rank, config.alpha, config.dropout, like=base
            )
            module.lora_in_proj[projection].train(module.training)
        else:
            module.__class__ = LoRALinear
            module._init_lora(config.rank, config.alpha, config.dropout)
            module.lora_dropout.train(module.training)
    return adapted_names(model)


def adapted_names(model: nn.Module) -> tp.List[str]:
    """The adapted projections of `model` in module order (what `inject` returns); [] without adapters."""
    names = []
    for path, module in _lora_modules(model):
        if isinstance(module, LoRALinear):
            names.append(path)
        else:
            names.extend(
                f"{path}.{projection}" for projection in FUSED_PROJECTIONS if projection in module.lora_in_proj
            )
    return names


def adapter_parameters(model: nn.Module) -> tp.Dict[str, nn.Parameter]:
    """Adapter parameters by name (what the optimizer should train)."""
    return {name: p for name, p in model.named_parameters() if is_adapter_key(name)}


def adapter_state_dict(model: nn.Module) -> tp.Dict[str, torch.Tensor]:
    """Only the adapter tensors of `model.state_dict()`."""
    return {name: t for name, t in model.state_dict().items() if is_adapter_key(name)}


def freeze_base(model: nn.Module) -> tp.Tuple[int, int]:
    """Make only adapters trainable (requires_grad); return (trainable, total) parameter counts."""
    trainable = total = 0
    for name, param in model.named_parameters():
        param.requires_grad_(is_adapter_key(name))
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    if trainable == 0:
        raise ValueError(
            f"{type(model).__name__} has no LoRA adapters: call inject(model, config) first, or "
            "freezing it would leave nothing to train."
        )
    return trainable, total


@torch.no_grad()
def merge(model: nn.Module) -> None:
    """Add each adapter's update into its base weight; the forward then skips adapters. Idempotent.

    Dropout-free, as in eval mode. After merge, `state_dict()`'s base keys hold the merged weights (a plain
    fine-tuned model for export); `unmerge` subtracts the same updates back (equal to the original base up to
    float rounding, ~1e-7 relative in float32).
    """
    for _, module in _lora_modules(model):
        if not module.lora_merged:
            module._lora_merge(+1.0)
            module.lora_merged = True


@torch.no_grad()
def unmerge(model: nn.Module) -> None:
    """Undo `merge`: subtract each adapter's update from its base weight and use adapters again. Idempotent."""
    for _, module in _lora_modules(model):
        if module.lora_merged:
            module._lora_merge(-1.0)
            module.lora_merged = False


@contextlib.contextmanager
def adapters_off(model: nn.Module) -> tp.Iterator[None]:
    """The base model alone while inside: every adapter is skipped (no dropout drawn either), the base weights are
    not touched, so the logits are exactly the base's. The teacher of prior preservation (prior.py) for LoRA runs."""
    if is_merged(model):
        raise ValueError("adapters_off on a model whose adapters are merged into its weights: unmerge it first.")
    modules = [module for _, module in _lora_modules(model)]
    for module in modules:
        module.lora_active = False
    try:
        yield
    finally:
        for module in modules:
            module.lora_active = True


def is_merged(model: nn.Module) -> bool:
    return any(module.lora_merged for _, module in _lora_modules(model))


def base_model_hash(state_dict_or_model: tp.Union[nn.Module, tp.Mapping[str, torch.Tensor]]) -> str:
    """sha256 over the base (non-adapter) tensors: for each key in sorted order, its name, shape and bytes.

    Floating-point tensors are hashed as little-endian float32 values, so the fp16 `best_state` of a snapshot and
    the float32 model loaded from it hash the same; other tensors (integer buffers) as their own dtype. A model
    with merged adapters is refused: its base keys do not hold the base any more.
    """
    if isinstance(state_dict_or_model, nn.Module):
        if is_merged(state_dict_or_model):
            raise ValueError(
                "The model's adapters are merged into its base weights, so its base cannot be hashed; "
                "call lora.unmerge(model) first."
            )
        state = state_dict_or_model.state_dict()
    else:
        state = state_dict_or_model
    digest = hashlib.sha256()
    for name in sorted(k for k in state if not is_adapter_key(k)):
        tensor = state[name].detach().to("cpu")
        if tensor.is_floating_point():
            tensor = tensor.to(torch.float32)
        array = tensor.contiguous().numpy()
        array = array.astype(array.dtype.newbyteorder("<"), copy=False)
        digest.update(f"{name}|{tuple(tensor.shape)}|{array.dtype.str}\n".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def config_path(path: tp.Union[str, Path]) -> Path:
    """The JSON config saved beside an adapter file: `<path>.json` (adapters.safetensors.json)."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def save_adapters(
    model: nn.Module, path: tp.Union[str, Path], config: LoraConfig, base_hash: tp.Optional[str] = None
) -> Path:
    """Write the adapter tensors to `path` (safetensors) and their config to `<path>.json`; return `path`.

    The JSON holds rank, alpha, dropout, targets, layers, the adapted names and `base_hash` (the base model's
    `base_model_hash`, computed from `model` when not given) so that `load_adapters` refuses another base.
    """
    from safetensors.torch import save_file

    tensors = {name: t.detach().to("cpu").contiguous() for name, t in adapter_state_dict(model).items()}
    if not tensors:
        raise ValueError(f"{type(model).__name__} has no LoRA adapters to save to {path}; call inject() first.")
    if is_merged(model):
        raise ValueError(
            f"The adapters are merged into the base weights; call lora.unmerge(model) before saving them to {path}."
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "format": FORMAT,
        **config.to_dict(),
        "enabled": True,
        "base_hash": base_hash or base_model_hash(model),
        "adapted": adapted_names(model),
    }
    save_file(tensors, str(path), metadata={"format": FORMAT})
    config_path(path).write_text(json.dumps(metadata, indent=2) + "\n")
    return path


def read_adapters(path: tp.Union[str, Path]) -> tp.Tuple[LoraConfig, dict, tp.Dict[str, torch.Tensor]]:
    """An adapter file `save_adapters` wrote: its config, the JSON beside it (with `base_hash` and `adapted`), and
    its tensors by name."""
    from safetensors.torch import load_file

    path = Path(path)
    meta_path = config_path(path)
    try:
        metadata = json.loads(meta_path.read_text())
    except (OSError, ValueError) as err:
        raise AdapterFileError(
            f"{meta_path} is missing or not JSON ({err}); save_adapters writes it beside "
            f"{path.name}, and load_adapters needs it to know which projections to adapt."
        ) from err
    if metadata.get("format") != FORMAT:
        raise AdapterMismatchError(f"{meta_path} has format {metadata.get('format')!r}, expected {FORMAT!r}.")
    config = LoraConfig.from_dict({k: metadata[k] for k in ("rank", "alpha", "dropout", "targets", "layers")})
    config.enabled = True
    return config, metadata, load_file(str(path), device="cpu")


def apply_adapters(
    model: nn.Module,
    config: LoraConfig,
    tensors: tp.Mapping[str, torch.Tensor],
    source: str,
    adapted: tp.Optional[tp.Sequence[str]] = None,
) -> None:
    """Inject adapters per `config` (unless `model` has them already) and copy `tensors` into them, every one
    accounted for: AdapterMismatchError when a tensor is missing, unexpected or of another shape, or when the
    adapted projections differ from `adapted` (the names the adapters were saved with, when known)."""
    names = adapted_names(model) or inject(model, config)
    if adapted is not None and names != list(adapted):
        raise AdapterMismatchError(
            f"{source} adapts {len(adapted)} projections ({', '.join(adapted[:3])}, ...), but the model has "
            f"adapters on {len(names)} ({', '.join(names[:3])}, ...)."
        )
    params = adapter_parameters(model)
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    mismatched = [k for k in set(params) & set(tensors) if params[k].shape != tensors[k].shape]
    if missing or unexpected or mismatched:
        raise AdapterMismatchError(
            f"{source} does not fit the injected adapters: missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}, shape mismatch {sorted(mismatched)[:3]}."
        )
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(tensors[name])


def load_adapters(
    model: nn.Module, path: tp.Union[str, Path], expected_base_hash: tp.Optional[str] = None
) -> LoraConfig:
    """Inject adapters into `model` per `<path>.json` and load their tensors from `path`; return their config.

    Refuses (AdapterMismatchError) when the adapters were trained on another base: the saved base hash must
    equal `base_model_hash(model)` and, when given, `expected_base_hash`. A model that already has adapters
    must have exactly the saved ones; their values are replaced.
    """
    config, metadata, tensors = read_adapters(path)
    saved_hash = metadata["base_hash"]
    for label, actual in (("this model's base", base_model_hash(model)), ("expected_base_hash", expected_base_hash)):
        if actual is not None and actual != saved_hash:
            raise AdapterMismatchError(
                f"{path} was trained on base model {saved_hash}, but {label} is {actual}. Load it onto the base "
                "model it was trained from (the same snapshot), or retrain the adapters on this one."
            )
    apply_adapters(model, config, tensors, str(path), metadata["adapted"])
    return config


def adapter_tensor_names(adapted: str) -> tp.Tuple[str, str]:
    """The state-dict keys of lora_A and lora_B for an adapted name (`adapted_names`): `...self_attn.q` ->
    `...self_attn.lora_in_proj.q.lora_A`, `linears.0` -> `linears.0.lora_A`."""
    head, _, last = adapted.rpartition(".")
    module = f"{head}.lora_in_proj.{last}" if last in FUSED_PROJECTIONS else adapted
    return f"{module}.lora_A", f"{module}.lora_B"


def adapter_shapes(config: LoraConfig, base: tp.Mapping[str, tp.Any]) -> tp.Dict[str, tp.Tuple[int, ...]]:
    """The adapter tensors `inject(lm, config)` gives an LMModel whose base tensors are `base` (a state dict, or
    names to shapes), by name and shape, without building it; LoraConfigError where `inject` would raise one."""
    shape = {name: tuple(getattr(value, "shape", value)) for name, value in base.items()}
    num_layers = 1 + max((int(n.split(".")[2]) for n in shape if n.startswith("transformer.layers.")), default=-1)
    layers = config.layers if config.layers is not None else list(range(num_layers))
    if any(i >= num_layers for i in layers):
        raise LoraConfigError(f"lora.layers={layers}, but the model has {num_layers} transformer layers.")
    heads = sum(1 for n in shape if re.fullmatch(rf"{OUTPUT_HEADS_TARGET}\.\d+\.weight", n))
    candidates = [TEXT_PROJECTION, *(f"{OUTPUT_HEADS_TARGET}.{k}" for k in range(heads))]
    candidates += [f"transformer.layers.{i}.{t}" for i in layers for t in config.targets if t not in MODEL_TARGETS]
    modules: tp.Dict[str, tp.Tuple[int, int]] = {}  # adapted name -> (in, out)
    for name in (n for n in candidates if _target_of(n) in config.targets):
        head, _, last = name.rpartition(".")
        fused, weight = shape.get(f"{head}.in_proj_weight"), shape.get(f"{name}.weight")
        if last in FUSED_PROJECTIONS and fused is not None:  # rows as _lora_split_sizes splits them
            modules[name] = (fused[1], fused[1] if last == "q" else (fused[0] - fused[1]) // 2)
        elif last not in FUSED_PROJECTIONS and weight is not None:
            modules[name] = (weight[1], weight[0])
    unmatched = [t for t in config.targets if not any(_target_of(name) == t for name in modules)]
    if unmatched:
        raise LoraConfigError(f"LoRA target(s) {', '.join(map(repr, unmatched))} match nothing in this model.")
    shapes = {}
    for name, (in_features, out_features) in modules.items():
        lora_a, lora_b = adapter_tensor_names(name)
        shapes[lora_a], shapes[lora_b] = (config.rank, in_features), (out_features, config.rank)
    return shapes


def _target_of(adapted: str) -> str:
    """The lora.targets entry an adapted name comes from: `transformer.layers.3.self_attn.q` -> `self_attn.q`."""
    if adapted == TEXT_PROJECTION:
        return TEXT_PROJECTION_TARGET
    if adapted.startswith(f"{OUTPUT_HEADS_TARGET}."):
        return OUTPUT_HEADS_TARGET
    return adapted.split(".", 3)[3]
