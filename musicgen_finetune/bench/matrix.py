"""What `make bench` measures: the training-step configurations (StepConfig) over architectures, modes, tokens,
batches and segments, and the CPU memory estimate that keeps a configuration larger than RAM from running."""

import dataclasses
import typing as tp

from ..machine import GIB, meminfo_gib
from ..models.full_size import T5_BASE

# -- the training-step matrix ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Architecture:
    """An LM, its compression model and its text encoder, all with random weights (their shapes are public)."""

    lm_overrides: tp.Tuple[str, ...]
    codec_overrides: tp.Tuple[str, ...]  # on solver=compression/encodec_musicgen_32khz
    text_encoder: str  # "tiny" (tiny_model.write_t5) or "t5-base" (t5-base's shapes)
    dim: int
    layers: int
    codebooks: int
    card: int
    frozen_params: float  # T5 encoder + compression model, for the CPU memory estimate
    lora_overrides: tp.Tuple[str, ...] = ()

    @property
    def lm_params(self) -> float:
        """Weights of the LM (attention 4 d^2, cross-attention 4 d^2, feed-forward 8 d^2 per layer, the
        embeddings and output heads), for the CPU memory estimate; the measured count goes in each row."""
        return self.layers * 16 * self.dim**2 + 2 * self.codebooks * (self.card + 1) * self.dim


ARCHITECTURES = {
    # musicgen-small: its LM (musicgen_lm at 'small' scale: 24 layers of 1024), AudioCraft's 32 kHz EnCodec
    # (4 codebooks of 2048 at 50 Hz, as in upstream's encodec_musicgen_32khz) and a T5 encoder of t5-base's shapes.
    "musicgen-small": Architecture(
        lm_overrides=("model/lm/model_scale=small", "transformer_lm.card=2048"),
        codec_overrides=(),
        text_encoder="t5-base",
        dim=1024,
        layers=24,
        codebooks=4,
        card=2048,
        frozen_params=110e6 + 57e6,
    ),
    # the tiny model of tiny_model.py: its LM, its SEANet (the overrides of write_compression_model) and tiny T5
    "tiny": Architecture(
        lm_overrides=("model/lm/model_scale=xsmall", "transformer_lm.card=64"),
        codec_overrides=("seanet.n_filters=4", "seanet.dimension=16", "seanet.lstm=0", "rvq.bins=64", "rvq.n_q=4"),
        text_encoder="tiny",
        dim=64,
        layers=2,
        codebooks=4,
        card=64,
        frozen_params=0.1e6,
        lora_overrides=("lora.rank=4", "lora.alpha=8"),
    ),
}
MODES = ("full", "lora")
TOKENS = ("cached", "uncached")
CAPTION = "hip hop 808 beat with trap drums, rolling hi hats and a snare, 140 bpm, F minor"
CHECKPOINTING_CONFIG = ("musicgen-small", 4, 30.0)  # the extra rows of --checkpointing: arch, batch, segment
T5_BASE_SHAPES = T5_BASE  # models/full_size.py: transformers' T5Config of t5-base


@dataclasses.dataclass
class StepConfig:
    """One measured configuration of the training step."""

    arch: str
    mode: str  # full | lora
    tokens: str  # cached: tokens and T5 outputs precomputed; uncached: EnCodec + T5 in every step
    batch: int
    segment_s: float
    checkpointing: bool = False
    device: str = "cpu"
    warmup: int = 1
    steps: int = 2
    t5: str = ""  # the text encoder's folder; the step writes one when empty
    timeout_s: float = 600.0

    def step_args(self) -> tp.List[str]:
        """Arguments of `python -m musicgen_finetune.bench step` for this configuration."""
        args = [
            f"--arch={self.arch}",
            f"--mode={self.mode}",
            f"--tokens={self.tokens}",
            f"--batch={self.batch}",
            f"--segment={self.segment_s}",
            f"--device={self.device}",
            f"--warmup={self.warmup}",
            f"--steps={self.steps}",
        ]
        return args + (["--checkpointing"] if self.checkpointing else []) + ([f"--t5={self.t5}"] if self.t5 else [])


def step_counts(device: str, quick: bool) -> tp.Tuple[int, int]:
    """(warmup, measured) steps: a GPU step is short, so more of them; a CPU step of musicgen-small is minutes."""
    if device == "cuda":
        return (1, 3) if quick else (3, 10)
    return (1, 1) if quick else (1, 2)


def matrix(
    device: str,
    quick: bool,
    archs: tp.Sequence[str] = (),
    batches: tp.Sequence[int] = (),
    segments: tp.Sequence[float] = (),
    checkpointing: tp.Optional[bool] = None,
    timeout_s: tp.Optional[float] = None,
) -> tp.List[StepConfig]:
    """Every configuration to measure: arch x batch x segment x mode x tokens, then the checkpointing rows
    (musicgen-small, batch 4 x 30 s; by default on a GPU only)."""
    archs = archs or (("tiny",) if quick else ("musicgen-small", "tiny"))
    batches = batches or ((1, 2) if quick else (1, 2, 4))
    segments = segments or ((1.0,) if quick else (10.0, 30.0))
    warmup, steps = step_counts(device, quick)
    timeout_s = timeout_s or (120.0 if quick else 600.0 if device == "cuda" else 1800.0)
    common = {"device": device, "warmup": warmup, "steps": steps, "timeout_s": timeout_s}
    configs = [
        StepConfig(arch, mode, tokens, batch, float(segment), **common)
        for arch in archs
        for batch in batches
        for segment in segments
        for mode in MODES
        for tokens in TOKENS
    ]
    if checkpointing if checkpointing is not None else (device == "cuda" and not quick):
        arch, batch, segment = CHECKPOINTING_CONFIG
        configs += [
            StepConfig(arch, mode, tokens, batch, segment, checkpointing=True, **common)
            for mode in MODES
            for tokens in TOKENS
        ]
    return configs


# -- the CPU memory estimate -------------------------------------------------------------------------------------

# Fitted to peak RSS measured on musicgen-small (batch 1 x 2 s and 1 x 10 s, full and LoRA, torch 2.9 on the CPU).
PROCESS_BASE_GIB = 1.0  # interpreter, torch, AudioCraft and transformers, resident
ACTIVATION_BYTES = 4 * 32  # per position, layer and model width: fp32 tensors kept for the backward
CODEC_ACTIVATION_BYTES = 4 * 256  # per input sample: SEANet's widest convolutions at the full sample rate
LORA_FUSED_COPIES = 3  # fused q/k/v weights rebuilt with B·A every forward and kept for the backward


def estimated_peak_gib(config: StepConfig) -> float:
    """Peak memory of a configuration on the CPU (fp32), from parameter counts and activations."""
    arch = ARCHITECTURES[config.arch]
    weights = 4 * arch.lm_params * (4 if config.mode == "full" else 1)  # + gradients and AdamW's two moments
    if config.mode == "lora":  # self- and cross-attention in every layer: 3 d^2 each
        weights += 4 * 2 * arch.layers * 3 * arch.dim**2 * LORA_FUSED_COPIES
    positions = config.batch * config.segment_s * 50
    layers_kept = 1 if config.checkpointing else arch.layers
    activations = positions * (layers_kept * arch.dim * ACTIVATION_BYTES + 3 * 4 * arch.codebooks * arch.card)
    uncached = 0.0
    if config.tokens == "uncached":
        uncached = 4 * arch.frozen_params + config.batch * config.segment_s * 32000 * CODEC_ACTIVATION_BYTES
    return PROCESS_BASE_GIB + (weights + activations + uncached) / GIB


def memory_skip_reason(config: StepConfig) -> tp.Optional[str]:
    """Why a CPU configuration is not run: its estimate is above the RAM available now (else it gets OOM-killed)."""
    if config.device != "cpu":
        return None
    available = meminfo_gib("MemAvailable")
    needed = estimated_peak_gib(config)
    if available is None or needed <= 0.9 * available:
        return None
    return f"skipped: needs ~{needed:.1f} GiB (estimate), {available:.1f} GiB available"
