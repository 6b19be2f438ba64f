"""`make bench`: measured numbers, each with the machine it ran on, to output/bench/ (JSON + markdown).

Benchmarks here are measurements, never pass/fail tests. Each section records what it did, so numbers from
different machines are not confused. Sections:

- `make manifests` on generated 808 beats, against AudioCraft's own indexer;
- the LM training step (forward, backward, AdamW) for full fine-tuning and LoRA, with cached tokens (the step
  alone) and uncached ones (the step plus EnCodec encoding and the T5 forward), over batch sizes and segment
  lengths, on musicgen-small's architecture (random weights) and the tiny model; each configuration in a process
  of its own, so that its peak memory is its own and a crash or a timeout is one row's error;
- ratios and goals computed from those rows, and the wall time of `make demo`.
"""
import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import typing as tp
from pathlib import Path

from . import REPO_ROOT, output_dir

GIB = 2 ** 30
# Measuring processes run with glibc's mmap threshold fixed at 1 MiB: by default it grows after large frees, so
# freed activation-sized tensors stay in the heap and peak RSS counts them again (LoRA's per-forward q/k/v weights
# then read as ~1.8 GiB more than is ever allocated at once). With it fixed, RSS follows what is allocated.
MEASUREMENT_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2 ** 20)}


def machine() -> dict:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(meminfo_gib("MemTotal") or 0, 1),
            "python": platform.python_version(), "gpu": None, "gpu_memory_gib": None}
    try:
        import torch
        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / GIB, 1)
    except ImportError:
        pass
    return info


def machine_line(m: dict) -> str:
    gpu = f"{m['gpu']} ({m['gpu_memory_gib']} GiB)" if m.get("gpu") else "none"
    return (f"Machine: {m['cpu']}, {m['cores']} cores, {m.get('ram_gib', '?')} GiB RAM, GPU: {gpu}, "
            f"Python {m['python']}, torch {m.get('torch', '?')}")


def meminfo_gib(field: str) -> tp.Optional[float]:
    """A /proc/meminfo field (MemTotal, MemAvailable) in GiB; None where there is no /proc."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / GIB
    except (OSError, ValueError, IndexError):
        pass
    return None


# -- make manifests ----------------------------------------------------------------------------------------------

def write_folder(folder: Path, files: int, seconds: float) -> None:
    """`files` captioned 808 beats (44.1 kHz stereo wav, as users bring them), rendered once and copied."""
    from .synth808 import write_dataset
    unique = min(files, 16)
    write_dataset(folder, count=unique, seconds=seconds, seed=1)
    entries = json.loads((folder / "metadata.json").read_text())
    for i in range(unique, files):  # copies need distinct content, else they are (rightly) skipped as duplicates
        source = folder / entries[i % unique]["audio"]
        target = folder / f"train/copy_{i:05d}.wav"
        shutil.copy(source, target)
        with open(target, "r+b") as file:  # flip one sample's low byte near the end
            file.seek(-2 - 2 * (i // unique), os.SEEK_END)
            file.write(bytes([i % 251]))
        entries.append({**entries[i % unique], "audio": target.relative_to(folder).as_posix()})
    (folder / "metadata.json").write_text(json.dumps(entries))


def bench_manifests(files: int, seconds: float = 4.0) -> dict:
    """`make manifests` on `files` files, first run and re-run, against AudioCraft's own indexer on the same
    folder. They do different work: ours decodes, checks, converts, normalises, measures tempo and key and cuts
    segments; AudioCraft's only lists files and reads their headers."""
    from .data import ManifestOptions, build_manifests
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "beats"
        write_folder(folder, files, seconds)
        timings = {}
        for run_name in ("first run", "re-run (cached)"):
            start = time.perf_counter()
            build_manifests(folder, "bench", ManifestOptions(segment=30.0), out_root=Path(tmp) / "manifests")
            timings[run_name] = time.perf_counter() - start
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "audiocraft.data.audio_dataset", str(folder), str(Path(tmp) / "ac.jsonl"),
                        "--workers", str(os.cpu_count() or 1)], check=True, capture_output=True)
        timings["audiocraft indexer"] = time.perf_counter() - start
    return {"files": files, "seconds_per_file": seconds,
            "rows": [{"what": name, "wall_s": round(wall, 2), "files_per_s": round(files / wall, 1)}
                     for name, wall in timings.items()]}


def manifests_markdown(manifests: dict) -> tp.List[str]:
    lines = [f"## make manifests: {manifests['files']} files of {manifests['seconds_per_file']:g} s "
             "(44.1 kHz stereo wav)", "", "| run | wall (s) | files/s |", "|---|---|---|"]
    lines += [f"| {r['what']} | {r['wall_s']} | {r['files_per_s']} |" for r in manifests["rows"]]
    return lines + ["", "AudioCraft's indexer (`python -m audiocraft.data.audio_dataset`, its start-up included) "
                    "only lists files and reads their headers; ours also decodes, converts, normalises loudness, "
                    "measures tempo and key and writes segments.", ""]


# -- the training-step matrix ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Architecture:
    """An LM, its compression model and its text encoder, all with random weights (their shapes are public)."""
    lm_overrides: tp.Tuple[str, ...]
    codec_overrides: tp.Tuple[str, ...]  # on solver=compression/encodec_musicgen_32khz
    text_encoder: str                    # "tiny" (tiny_model.write_t5) or "t5-base" (t5-base's shapes)
    dim: int
    layers: int
    codebooks: int
    card: int
    frozen_params: float                 # T5 encoder + compression model, for the CPU memory estimate
    lora_overrides: tp.Tuple[str, ...] = ()

    @property
    def lm_params(self) -> float:
        """Weights of the LM (attention 4 d^2, cross-attention 4 d^2, feed-forward 8 d^2 per layer, the
        embeddings and output heads), for the CPU memory estimate; the measured count goes in each row."""
        return self.layers * 16 * self.dim ** 2 + 2 * self.codebooks * (self.card + 1) * self.dim


ARCHITECTURES = {
    # musicgen-small: its LM (musicgen_lm at 'small' scale: 24 layers of 1024), AudioCraft's 32 kHz EnCodec
    # (4 codebooks of 2048 at 50 Hz, as in upstream's encodec_musicgen_32khz) and a T5 encoder of t5-base's shapes.
    "musicgen-small": Architecture(
        lm_overrides=("model/lm/model_scale=small", "transformer_lm.card=2048"),
        codec_overrides=(), text_encoder="t5-base", dim=1024, layers=24, codebooks=4, card=2048,
        frozen_params=110e6 + 57e6),
    # the tiny model of tiny_model.py: its LM, its SEANet (the overrides of write_compression_model) and tiny T5
    "tiny": Architecture(
        lm_overrides=("model/lm/model_scale=xsmall", "transformer_lm.card=64"),
        codec_overrides=("seanet.n_filters=4", "seanet.dimension=16", "seanet.lstm=0", "rvq.bins=64", "rvq.n_q=4"),
        text_encoder="tiny", dim=64, layers=2, codebooks=4, card=64, frozen_params=0.1e6,
        lora_overrides=("lora.rank=4", "lora.alpha=8")),
}
MODES = ("full", "lora")
TOKENS = ("cached", "uncached")
CAPTION = "hip hop 808 beat with trap drums, rolling hi hats and a snare, 140 bpm, F minor"
CHECKPOINTING_CONFIG = ("musicgen-small", 4, 30.0)  # the extra rows of --checkpointing: arch, batch, segment
T5_BASE_SHAPES = {"vocab_size": 32128, "d_model": 768, "d_kv": 64, "d_ff": 3072, "num_layers": 12, "num_heads": 12,
                  "relative_attention_num_buckets": 32, "feed_forward_proj": "relu"}


@dataclasses.dataclass
class StepConfig:
    """One measured configuration of the training step."""
    arch: str
    mode: str        # full | lora
    tokens: str      # cached: tokens and T5 outputs precomputed; uncached: EnCodec + T5 in every step
    batch: int
    segment_s: float
    checkpointing: bool = False
    device: str = "cpu"
    warmup: int = 1
    steps: int = 2
    t5: str = ""     # the text encoder's folder; the step writes one when empty
    timeout_s: float = 600.0

    def step_args(self) -> tp.List[str]:
        """Arguments of `python -m musicgen_finetune.bench step` for this configuration."""
        args = [f"--arch={self.arch}", f"--mode={self.mode}", f"--tokens={self.tokens}", f"--batch={self.batch}",
                f"--segment={self.segment_s}", f"--device={self.device}", f"--warmup={self.warmup}",
                f"--steps={self.steps}"]
        return args + (["--checkpointing"] if self.checkpointing else []) + ([f"--t5={self.t5}"] if self.t5 else [])


def step_counts(device: str, quick: bool) -> tp.Tuple[int, int]:
    """(warmup, measured) steps: a GPU step is short, so more of them; a CPU step of musicgen-small is minutes."""
    if device == "cuda":
        return (1, 3) if quick else (3, 10)
    return (1, 1) if quick else (1, 2)


def matrix(device: str, quick: bool, archs: tp.Sequence[str] = (), batches: tp.Sequence[int] = (),
           segments: tp.Sequence[float] = (), checkpointing: tp.Optional[bool] = None,
           timeout_s: tp.Optional[float] = None) -> tp.List[StepConfig]:
    """Every configuration to measure: arch x batch x segment x mode x tokens, then the checkpointing rows
    (musicgen-small, batch 4 x 30 s; by default on a GPU only)."""
    archs = archs or (("tiny",) if quick else ("musicgen-small", "tiny"))
    batches = batches or ((1, 2) if quick else (1, 2, 4))
    segments = segments or ((1.0,) if quick else (10.0, 30.0))
    warmup, steps = step_counts(device, quick)
    timeout_s = timeout_s or (120.0 if quick else 600.0 if device == "cuda" else 1800.0)
    common = {"device": device, "warmup": warmup, "steps": steps, "timeout_s": timeout_s}
    configs = [StepConfig(arch, mode, tokens, batch, float(segment), **common)
               for arch in archs for batch in batches for segment in segments for mode in MODES for tokens in TOKENS]
    if checkpointing if checkpointing is not None else (device == "cuda" and not quick):
        arch, batch, segment = CHECKPOINTING_CONFIG
        configs += [StepConfig(arch, mode, tokens, batch, segment, checkpointing=True, **common)
                    for mode in MODES for tokens in TOKENS]
    return configs


# -- FLOPs and model FLOP utilisation ----------------------------------------------------------------------------

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from the vendors' data sheets, matched in this order as
# substrings of torch.cuda.get_device_name() (more specific names first: "A100" before "A10", "L40S" before "L4").
GPU_PEAK_TFLOPS: tp.Tuple[tp.Tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),       # SXM: "NVIDIA H100 80GB HBM3"
    ("H200", 989.0),       # also GH200
    ("A100", 312.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("RTX 4090", 165.0),   # with fp32 accumulation, as autocast does (330 with fp16 accumulation)
)

FLOPS_FORMULA = (
    "Model FLOPs per step = (4·N + 2·N_wgrad) × positions + attention. N: the LM's weight matrices applied at "
    "each position (embedding lookups, norms and biases left out), counted on the B × S sequence positions the "
    "transformer runs (S = frames, after the codebook delay pattern; positions, not tokens: a frame's K codebook "
    "tokens share one position, so B × frames × K would count K times the FLOPs) except the text side (the T5 output "
    "projection and the cross-attention K/V projections), counted on the B × L caption tokens. 2·N for the "
    "forward, 2·N for the backward to the activations (it flows through frozen weights too), 2·N_wgrad for the "
    "weight gradients: N_wgrad = N in full fine-tuning, so 6·N; for LoRA, the adapters applied per position "
    "(LoRALinear out_proj) plus the fused q/k/v weights of adapted attention, since musicgen_finetune.lora adds "
    "B·A into that weight and autograd then computes the whole weight's gradient (B·A itself is once per step, "
    "not counted). Attention: 3 × B × layers × (2·S²·d for causal self-attention, QKᵀ and AV over the lower "
    "triangle, + 4·S·L·d for cross-attention), 3 for forward and backward. Activation recomputation "
    "(checkpointing), EnCodec and T5 are not model FLOPs. MFU = FLOPs per step / step time / the GPU's dense "
    "bf16 peak.")


def gpu_peak_tflops(name: tp.Optional[str]) -> tp.Optional[float]:
    """The dense bf16 peak of a GPU from its torch.cuda.get_device_name(), or None if it is not in the table."""
    if not name:
        return None
    for key, tflops in GPU_PEAK_TFLOPS:
        if key.lower() in name.lower():
            return tflops
    return None


@dataclasses.dataclass
class MatrixParams:
    """Weight-matrix parameters applied per position, split by side and by whether their gradient is computed."""
    sequence: int = 0
    sequence_wgrad: int = 0
    text: int = 0
    text_wgrad: int = 0


def training_flops(params: MatrixParams, batch: int, positions: int, text_tokens: int, layers: int,
                   dim: int) -> float:
    """Model FLOPs of one training step (forward + backward), as FLOPS_FORMULA states."""
    matmuls = batch * (positions * (4 * params.sequence + 2 * params.sequence_wgrad)
                       + text_tokens * (4 * params.text + 2 * params.text_wgrad))
    attention = 3 * batch * layers * (2 * positions ** 2 * dim + 4 * positions * text_tokens * dim)
    return float(matmuls + attention)


def mfu(flops_per_step: float, step_s: float, peak_tflops: tp.Optional[float]) -> tp.Optional[float]:
    """Model FLOP utilisation: the share of the GPU's peak that the model's FLOPs used; None without a peak."""
    if not peak_tflops or step_s <= 0:
        return None
    return flops_per_step / step_s / (peak_tflops * 1e12)


def matrix_params(lm) -> MatrixParams:
    """MatrixParams of a (possibly LoRA-injected) MusicGen LM, from its parameter names."""
    named = dict(lm.named_parameters())
    fused_adapted = {name.split(".lora_in_proj.")[0] for name, p in named.items()
                     if ".lora_in_proj." in name and p.requires_grad}
    counts = MatrixParams()
    for name, param in named.items():
        if param.ndim < 2 or name.startswith("emb.") or ".lora_in_proj." in name:
            continue  # embedding lookups; fused adapters' B·A is computed once per step, not per position
        module = name.rsplit(".", 1)[0]
        wgrad = param.requires_grad or (name.endswith("in_proj_weight") and module in fused_adapted)
        text_share = 0.0
        if name.startswith("condition_provider."):
            text_share = 1.0
        elif name.endswith("cross_attention.in_proj_weight"):
            text_share = (param.shape[0] - param.shape[1]) / param.shape[0]  # K and V rows; Q is on the sequence
        text = round(param.numel() * text_share)
        counts.text += text
        counts.sequence += param.numel() - text
        if wgrad:
            counts.text_wgrad += text
            counts.sequence_wgrad += param.numel() - text
    return counts


# -- the CPU memory estimate -------------------------------------------------------------------------------------

# Fitted to peak RSS measured on musicgen-small (batch 1 x 2 s and 1 x 10 s, full and LoRA, torch 2.9 on the CPU).
PROCESS_BASE_GIB = 1.0          # interpreter, torch, AudioCraft and transformers, resident
ACTIVATION_BYTES = 4 * 32       # per position, layer and model width: fp32 tensors kept for the backward
CODEC_ACTIVATION_BYTES = 4 * 256  # per input sample: SEANet's widest convolutions at the full sample rate
LORA_FUSED_COPIES = 3           # fused q/k/v weights rebuilt with B·A every forward and kept for the backward


def estimated_peak_gib(config: StepConfig) -> float:
    """Peak memory of a configuration on the CPU (fp32), from parameter counts and activations."""
    arch = ARCHITECTURES[config.arch]
    weights = 4 * arch.lm_params * (4 if config.mode == "full" else 1)  # + gradients and AdamW's two moments
    if config.mode == "lora":  # self- and cross-attention in every layer: 3 d^2 each
        weights += 4 * 2 * arch.layers * 3 * arch.dim ** 2 * LORA_FUSED_COPIES
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


# -- one configuration, measured in this process -----------------------------------------------------------------

def write_text_encoder(kind: str, out: Path) -> Path:
    """A T5 encoder folder: the tiny model's, or t5-base's shapes with random weights (no download)."""
    import torch
    from transformers import T5Config, T5EncoderModel
    from .tiny_model import write_t5
    write_t5(out, seed=0)  # the tokenizer (ids < 200, within either vocabulary) and the tiny encoder
    if kind == "t5-base":
        config = T5Config(**T5_BASE_SHAPES, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0,
                          eos_token_id=1)
        torch.manual_seed(0)
        T5EncoderModel(config).save_pretrained(out, safe_serialization=True)
    return out


def compose_lm_config(config: StepConfig, t5: Path):
    from .config import compose
    arch = ARCHITECTURES[config.arch]
    preset = "finetune/musicgen_small_lora" if config.mode == "lora" else "finetune/musicgen_small"
    overrides = [f"solver={preset}", f"device={config.device}", f"conditioners.description.t5.name={t5}",
                 "conditioners.description.t5.word_dropout=0",  # the same caption length every step
                 *arch.lm_overrides, *(arch.lora_overrides if config.mode == "lora" else ())]
    if config.checkpointing:
        overrides.append("transformer_lm.checkpointing=torch")
    return compose(overrides)


def compose_codec_config(config: StepConfig):
    from .config import compose
    return compose(["solver=compression/encodec_musicgen_32khz", f"device={config.device}", "rvq.kmeans_init=false",
                    *ARCHITECTURES[config.arch].codec_overrides])


def build_lm(config: StepConfig, t5: Path):
    """The LM (LoRA-injected and base frozen in lora mode), its trainable parameters and their counts."""
    import torch
    from audiocraft.models import builders
    from . import lora
    cfg = compose_lm_config(config, t5)
    torch.manual_seed(0)
    lm = builders.get_lm_model(cfg).to(config.device)
    lm.train()
    if config.mode == "lora":
        lora.inject(lm, lora.LoraConfig.from_dict(cfg.lora))
        trainable, total = lora.freeze_base(lm)
        params = list(lora.adapter_parameters(lm).values())
    else:
        params = list(lm.parameters())
        trainable = total = sum(p.numel() for p in params)
    return lm, params, trainable, total


class Precision:
    """bf16 autocast on a GPU that has it, else fp16 autocast with loss scaling; fp32 on the CPU."""

    def __init__(self, device: str):
        import torch
        self.dtype = None
        self.scaler = None
        self.label = "fp32"
        if device == "cuda":
            if torch.cuda.is_bf16_supported():
                self.dtype, self.label = torch.bfloat16, "bf16 autocast"
            else:
                self.dtype, self.label = torch.float16, "fp16 autocast + GradScaler"
                self.scaler = torch.amp.GradScaler("cuda")

    def autocast(self):
        import torch
        return torch.autocast("cuda", dtype=self.dtype) if self.dtype else contextlib.nullcontext()

    def backward_and_step(self, loss, optimizer, params, max_norm: float = 1.0) -> None:
        """As the solver does: backward, gradient clipping, optimizer step."""
        import torch
        if self.scaler is None:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, max_norm)
            optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, max_norm)
            self.scaler.step(optimizer)
            self.scaler.update()
        optimizer.zero_grad(set_to_none=True)


def description_conditioner(lm):
    return lm.condition_provider.conditioners["description"]


def drop_text_encoder(lm) -> None:
    """With a text-encoder cache, training never loads T5: free it (upstream keeps it outside the parameters)."""
    description_conditioner(lm).__dict__.pop("t5", None)


def cached_inputs(lm, codes, captions: tp.List[str], precision: Precision) -> tp.Callable:
    """Tokens and T5 outputs precomputed (as the token and text-encoder caches give them): a step only projects
    the T5 outputs into the LM, with the LM's own (trainable in full mode) projection."""
    import torch
    conditioner = description_conditioner(lm)
    inputs = conditioner.tokenize(captions)
    with torch.no_grad():
        hidden = conditioner.t5(**inputs).last_hidden_state
    mask = inputs["attention_mask"]
    drop_text_encoder(lm)

    def batch():
        with precision.autocast():
            embeds = conditioner.output_proj(hidden.to(conditioner.output_proj.weight)) * mask.unsqueeze(-1)
        return codes, {"description": (embeds, mask)}
    return batch


def uncached_inputs(lm, codec, wav, captions: tp.List[str], precision: Precision) -> tp.Callable:
    """Audio re-encoded every step, as the solver does without a cache: EnCodec (no grad, fp32) on the batch's
    waveforms, then the caption tokenised and through T5 and its projection (under autocast)."""
    import torch
    conditioner = description_conditioner(lm)

    def batch():
        with torch.no_grad():
            codes, _ = codec.encode(wav)
        with precision.autocast():
            embeds, mask = conditioner(conditioner.tokenize(captions))
        return codes, {"description": (embeds, mask)}
    return batch


class PeakMemory:
    """Peak memory over the measured steps: GPU max allocated on CUDA, process peak RSS (VmHWM) on the CPU."""

    def __init__(self, device: str):
        self.device = device
        self.kind = "GPU max allocated" if device == "cuda" else "process peak RSS"

    def reset(self) -> None:
        import gc
        import torch
        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            return
        try:  # Linux >= 4.0: reset the RSS high-water mark to the current RSS
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.kind = "process peak RSS since start"

    def peak_gib(self) -> tp.Tuple[float, tp.Optional[float]]:
        """(peak, GPU peak reserved or None)."""
        import torch
        if self.device == "cuda":
            return torch.cuda.max_memory_allocated() / GIB, torch.cuda.max_memory_reserved() / GIB
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / GIB, None
        except OSError:
            pass
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, None


def check_step_config(config: StepConfig) -> None:
    if config.arch not in ARCHITECTURES:
        raise ValueError(f"arch={config.arch!r}: choose one of {', '.join(ARCHITECTURES)}.")
    if config.mode not in MODES or config.tokens not in TOKENS:
        raise ValueError(f"mode={config.mode!r}, tokens={config.tokens!r}: choose a mode of {MODES} and tokens of "
                         f"{TOKENS}.")
    if config.batch < 1 or config.segment_s <= 0 or config.steps < 1 or config.warmup < 0:
        raise ValueError(f"batch={config.batch}, segment={config.segment_s} s, steps={config.steps}, warmup="
                         f"{config.warmup}: batch and steps must be >= 1, the segment > 0 s and warmup >= 0.")
    if config.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise RuntimeError("device=cuda but torch sees no CUDA GPU: run on a GPU machine or use device=cpu.")


def record_shapes(lm) -> dict:
    """The sequence length and caption length the transformer actually runs (filled by the first step)."""
    shapes = {}

    def hook(module, args, kwargs):
        shapes["positions"] = args[0].shape[1]
        source = kwargs.get("cross_attention_src")
        shapes["text_tokens"] = source.shape[1] if source is not None else 0
    lm.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    return shapes


@dataclasses.dataclass
class TrainingSetup:
    """What a measured step needs, built before the clock starts."""
    lm: tp.Any
    params: list
    optimizer: tp.Any
    precision: Precision
    inputs: tp.Callable  # () -> (codes, condition tensors): the batch as a step sees it
    frame_rate: float
    trainable: int
    total: int


def training_setup(config: StepConfig) -> TrainingSetup:
    """The LM, its optimizer and the batch's inputs (cached or uncached), on the configuration's device."""
    import torch
    from audiocraft.models import builders
    from . import patches
    patches.apply()
    device = config.device
    lm, params, trainable, total = build_lm(config, Path(config.t5))
    precision = Precision(device)
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.01, fused=device == "cuda")
    codec_cfg = compose_codec_config(config)
    frame_rate = codec_cfg.sample_rate / math.prod(codec_cfg.seanet.ratios)
    captions = [CAPTION] * config.batch
    generator = torch.Generator().manual_seed(0)
    if config.tokens == "cached":
        frames = math.ceil(config.segment_s * frame_rate)
        codes = torch.randint(0, lm.card, (config.batch, lm.num_codebooks, frames), generator=generator)
        inputs = cached_inputs(lm, codes.to(device), captions, precision)
    else:
        torch.manual_seed(0)
        codec = builders.get_compression_model(codec_cfg).to(device).eval()
        wav = 0.1 * torch.randn(config.batch, codec.channels, round(config.segment_s * codec.sample_rate),
                                generator=generator)
        inputs = uncached_inputs(lm, codec, wav.to(device), captions, precision)
    return TrainingSetup(lm, params, optimizer, precision, inputs, frame_rate, trainable, total)


def timed_steps(setup: TrainingSetup, count: int, device: str) -> tp.Tuple[tp.List[float], tp.Any]:
    """Wall time of `count` training steps (the batch's inputs, forward, backward, clipping, AdamW), and the last
    step's codes."""
    import torch
    import torch.nn.functional as F
    times = []
    for _ in range(count):
        start = time.perf_counter()
        codes, conditions = setup.inputs()
        with setup.precision.autocast():
            output = setup.lm.compute_predictions(codes, [], conditions)
            loss = F.cross_entropy(output.logits[output.mask].float(), codes[output.mask])
        setup.precision.backward_and_step(loss, setup.optimizer, setup.params)
        if device == "cuda":
            torch.cuda.synchronize()  # CUDA runs asynchronously: the step ends when its kernels do
        times.append(time.perf_counter() - start)
    return times, codes


def step_measurement(config: StepConfig) -> dict:
    """Time, peak memory and model FLOPs of training steps, in this process."""
    check_step_config(config)
    if not config.t5:
        with tempfile.TemporaryDirectory() as tmp:
            text_encoder = write_text_encoder(ARCHITECTURES[config.arch].text_encoder, Path(tmp) / "t5")
            return step_measurement(dataclasses.replace(config, t5=str(text_encoder)))
    arch = ARCHITECTURES[config.arch]
    setup = training_setup(config)
    shapes = record_shapes(setup.lm)
    memory = PeakMemory(config.device)
    memory.reset()
    times, codes = timed_steps(setup, config.warmup + config.steps, config.device)
    peak, reserved = memory.peak_gib()
    counts = matrix_params(setup.lm)
    flops = training_flops(counts, config.batch, shapes["positions"], shapes["text_tokens"], arch.layers, arch.dim)
    return {"trainable": setup.trainable, "total": setup.total, "precision": setup.precision.label,
            "optimizer": "AdamW (fused)" if config.device == "cuda" else "AdamW",
            "frame_rate": setup.frame_rate, "frames": codes.shape[-1], "codebooks": setup.lm.num_codebooks,
            "positions": shapes["positions"], "text_tokens": shapes["text_tokens"],
            "step_times_s": [round(t, 6) for t in times[config.warmup:]],
            "peak_gib": round(peak, 3), "peak_reserved_gib": round(reserved, 3) if reserved is not None else None,
            "memory": memory.kind, "matrix_params": dataclasses.asdict(counts), "flops_per_step": flops}


# -- each configuration in a process of its own ------------------------------------------------------------------

def describe_failure(err: BaseException) -> str:
    """One line for a row's `error`: out of memory named as such, else the exception's type and first line."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    if isinstance(err, MemoryError) or "out of memory" in text.lower() or "can't allocate memory" in text.lower():
        return f"out of memory ({text[:200]})" if text else "out of memory"
    return f"{type(err).__name__}: {text[:300]}"


def describe_exit(code: int, stderr: str = "") -> str:
    """Why a measuring process ended without a result: a signal (SIGKILL is usually the OOM killer) or a code."""
    if code < 0:
        import signal
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    tail = lines[-1][:300] if lines else "no output"
    if "out of memory" in stderr.lower():
        return f"out of memory ({tail})"
    return f"exited with code {code}: {tail}"


def measure_in_subprocess(config: StepConfig) -> dict:
    """A fresh interpreter for one configuration (`bench step`): its imports, its memory, its CUDA context."""
    try:
        result = subprocess.run([sys.executable, "-m", "musicgen_finetune.bench", "step", *config.step_args()],
                                capture_output=True, text=True, timeout=config.timeout_s, cwd=REPO_ROOT,
                                env={**os.environ, **MEASUREMENT_ENV})
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {config.timeout_s:g} s"}
    last = (result.stdout.strip().splitlines() or [""])[-1]
    try:
        measured = json.loads(last)
    except json.JSONDecodeError:
        measured = None
    if isinstance(measured, dict) and (result.returncode == 0 or measured.get("error")):
        return measured
    return {"error": describe_exit(result.returncode, result.stderr)}


def measure_into(config: StepConfig, sender) -> None:
    """A forked child's work: measure, send the result (or the failure) to the server."""
    try:
        result = step_measurement(config)
    except BaseException as err:  # noqa: BLE001 - every failure becomes the row's error
        result = {"error": describe_failure(err)}
    sender.send(result)
    sender.close()


def measure_forked(config: StepConfig) -> dict:
    """One configuration in a child forked from this (already importing) process, killed at its timeout."""
    import multiprocessing
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=measure_into, args=(config, sender), daemon=True)
    child.start()
    sender.close()  # the child holds the only sending end: its death reads as end of file
    if not receiver.poll(config.timeout_s):
        child.kill()
        child.join()
        return {"error": f"timed out after {config.timeout_s:g} s"}
    try:
        result = receiver.recv()
    except EOFError:  # died without an answer: killed (the OOM killer) or crashed
        result = None
    child.join(30)
    if child.is_alive():
        child.kill()
        child.join()
    return result or {"error": describe_exit(child.exitcode or 0)}


def serve() -> None:
    """`bench serve`: import the training stack once, then measure each configuration (a JSON line on stdin) in a
    forked child and answer with a JSON line; saves each configuration the ~6 s of imports of a new process.
    Children write their own output to stderr: stdout carries the answers only."""
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # forking must find CUDA uninitialised
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    import torch  # noqa: F401 - imported once, here, for every child
    from audiocraft.models import builders  # noqa: F401
    from transformers import T5EncoderModel  # noqa: F401
    from . import lora, patches  # noqa: F401
    for line in sys.stdin:
        if line.strip():
            answers.write(json.dumps(measure_forked(StepConfig(**json.loads(line)))) + "\n")
            answers.flush()


class ForkServer:
    """The parent's side of `bench serve`: one process for all configurations, forking one child for each."""

    def __init__(self):
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen([sys.executable, "-m", "musicgen_finetune.bench", "serve"], cwd=REPO_ROOT,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                        text=True, env={**os.environ, **MEASUREMENT_ENV})

    def measure(self, config: StepConfig) -> dict:
        try:
            self.process.stdin.write(json.dumps(dataclasses.asdict(config)) + "\n")
            self.process.stdin.flush()
            answer = self.process.stdout.readline()
        except (BrokenPipeError, OSError):
            answer = ""
        if answer:
            return json.loads(answer)
        self.stderr.seek(0)
        return {"error": "the bench server ended: " + describe_exit(self.process.wait(), self.stderr.read())}

    def close(self) -> None:
        if self.process.stdin:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.stderr.close()


def config_fields(config: StepConfig) -> dict:
    fields = dataclasses.asdict(config)
    fields.pop("t5")
    return fields


def significant(value: float, digits: int = 6) -> float:
    """Rounded to `digits` significant digits (a CPU's TFLOP/s and a GPU's tokens/s differ by 10^6)."""
    return float(f"{value:.{digits}g}")


def make_row(config: StepConfig, measured: dict, device_name: str, peak_tflops: tp.Optional[float]) -> dict:
    """A row of bench.json: the configuration, what was measured and what follows from it; with `error` set,
    the measured fields are null."""
    arch = ARCHITECTURES[config.arch]
    frame_rate = measured.get("frame_rate") or 50.0
    frames = measured.get("frames") or math.ceil(config.segment_s * frame_rate)
    tokens = config.batch * frames * arch.codebooks
    row = {**config_fields(config), "device_name": device_name, "error": measured.get("error"),
           "estimate_gib": round(estimated_peak_gib(config), 1) if config.device == "cpu" else None,
           "tokens_per_step": tokens, "audio_s_per_step": config.batch * config.segment_s}
    metrics = ("trainable", "total", "precision", "optimizer", "frame_rate", "frames", "codebooks", "positions",
               "text_tokens", "step_times_s", "step_s", "audio_s_per_s", "tokens_per_s", "peak_gib",
               "peak_reserved_gib", "memory", "matrix_params", "flops_per_step", "tflops_per_s", "peak_tflops",
               "mfu", "mfu_note")
    row.update({key: None for key in metrics})
    if row["error"]:
        return row
    row.update({key: measured[key] for key in measured if key in metrics})
    step_s = sum(measured["step_times_s"]) / len(measured["step_times_s"])
    row.update(step_s=significant(step_s), audio_s_per_s=significant(row["audio_s_per_step"] / step_s),
               tokens_per_s=significant(tokens / step_s),
               tflops_per_s=significant(measured["flops_per_step"] / step_s / 1e12))
    if config.device != "cuda":
        row["mfu_note"] = "no MFU on the CPU"
    elif peak_tflops is None:
        row["mfu_note"] = (f"unknown GPU {device_name!r}: add its dense bf16 peak to bench.GPU_PEAK_TFLOPS "
                           "for an MFU")
    else:
        row.update(peak_tflops=peak_tflops, mfu=significant(mfu(measured["flops_per_step"], step_s, peak_tflops), 4))
    return row


def bench_training(configs: tp.List[StepConfig], isolation: str, on_row: tp.Callable[[dict], None]) -> dict:
    """Measure every configuration, each in a process of its own; a failure or a skip is that row's error."""
    m = machine()
    device_name = m["gpu"] if configs and configs[0].device == "cuda" else m["cpu"]
    peak = gpu_peak_tflops(m["gpu"])
    rows = []
    with tempfile.TemporaryDirectory(prefix="musicgen_ft_bench_") as tmp:
        text_encoders = {}
        server = ForkServer() if isolation == "fork" else None
        try:
            for config in configs:
                kind = ARCHITECTURES[config.arch].text_encoder
                if kind not in text_encoders:  # written once, read by every configuration of that size
                    text_encoders[kind] = str(write_text_encoder(kind, Path(tmp) / kind))
                config = dataclasses.replace(config, t5=text_encoders[kind])
                skip = memory_skip_reason(config)
                if skip:
                    measured = {"error": skip}
                elif server:
                    measured = server.measure(config)
                else:
                    measured = measure_in_subprocess(config)
                rows.append(make_row(config, measured, device_name, peak))
                on_row(rows[-1])
        finally:
            if server:
                server.close()
    return {"device": configs[0].device if configs else None, "isolation": isolation,
            "flops_formula": FLOPS_FORMULA, "rows": rows}


# -- ratios and goals --------------------------------------------------------------------------------------------

def row_key(row: dict, **changes) -> tuple:
    values = {**row, **changes}
    return tuple(values[k] for k in ("arch", "mode", "tokens", "batch", "segment_s", "checkpointing"))


def successful_rows(rows: tp.List[dict]) -> tp.Dict[tuple, dict]:
    return {row_key(row): row for row in rows if not row["error"]}


def cache_speedups(rows: tp.List[dict]) -> tp.List[dict]:
    """Uncached step time / cached step time, for every configuration measured both ways (an epoch is the same
    number of steps, so this is also the ratio of epoch times)."""
    done = successful_rows(rows)
    ratios = []
    for cached in done.values():
        uncached = done.get(row_key(cached, tokens="uncached"))
        if cached["tokens"] == "cached" and uncached:
            ratios.append({**{k: cached[k] for k in ("arch", "mode", "batch", "segment_s", "checkpointing")},
                           "uncached_step_s": uncached["step_s"], "cached_step_s": cached["step_s"],
                           "speedup": round(uncached["step_s"] / cached["step_s"], 3)})
    return ratios


def lora_memory_ratios(rows: tp.List[dict]) -> tp.List[dict]:
    """LoRA peak memory / full fine-tuning peak memory at the same configuration."""
    done = successful_rows(rows)
    ratios = []
    for full in done.values():
        low_rank = done.get(row_key(full, mode="lora"))
        if full["mode"] == "full" and low_rank:
            ratios.append({**{k: full[k] for k in ("arch", "tokens", "batch", "segment_s", "checkpointing")},
                           "full_peak_gib": full["peak_gib"], "lora_peak_gib": low_rank["peak_gib"],
                           "ratio": round(low_rank["peak_gib"] / full["peak_gib"], 3)})
    return ratios


def headline(rows: tp.List[dict]) -> tp.Optional[dict]:
    """The configuration the goals are judged on: the largest arch, batch and segment measured (cached, full and
    LoRA both measured, no checkpointing)."""
    done = successful_rows(rows)
    candidates = [row for row in done.values()
                  if row["mode"] == "full" and row["tokens"] == "cached" and not row["checkpointing"]
                  and row_key(row, mode="lora") in done and row_key(row, tokens="uncached") in done]
    order = list(ARCHITECTURES)
    return min(candidates, key=lambda r: (order.index(r["arch"]), -r["batch"], -r["segment_s"]), default=None)


def goal(name: str, value: tp.Optional[float], text: str, met: tp.Optional[bool], note: str = "") -> dict:
    return {"goal": name, "value": value, "measured": text, "met": met, "note": note}


def goals(rows: tp.List[dict], device: tp.Optional[str]) -> tp.List[dict]:
    """Each goal with its measured value, from the rows of this run."""
    results = []
    top = headline(rows)
    where = f"{top['arch']} batch {top['batch']} x {top['segment_s']:g} s" if top else ""
    speedups = {(r["arch"], r["mode"], r["batch"], r["segment_s"], r["checkpointing"]): r
                for r in cache_speedups(rows)}
    memory = {(r["arch"], r["tokens"], r["batch"], r["segment_s"], r["checkpointing"]): r
              for r in lora_memory_ratios(rows)}
    for mode in MODES:
        ratio = speedups.get((top["arch"], mode, top["batch"], top["segment_s"], False)) if top else None
        results.append(goal(f"cached epoch >= 2x faster than uncached ({mode})", ratio and ratio["speedup"],
                            f"{ratio['speedup']:.2f}x, {where}" if ratio else "not measured",
                            ratio["speedup"] >= 2 if ratio else None))
    ratio = memory.get((top["arch"], "cached", top["batch"], top["segment_s"], False)) if top else None
    results.append(goal("LoRA / full peak memory <= 0.5", ratio and ratio["ratio"],
                        f"{ratio['ratio']:.2f}, {where}, cached" if ratio else "not measured",
                        ratio["ratio"] <= 0.5 if ratio else None,
                        "process RSS includes ~1 GiB of interpreter and libraries" if device == "cpu" else ""))
    results += gpu_goals(rows, device)
    return results


def gpu_goals(rows: tp.List[dict], device: tp.Optional[str]) -> tp.List[dict]:
    """Memory and MFU goals for musicgen-small at batch 4 x 30 s (cached tokens, no checkpointing), GPU only."""
    arch, batch, segment = CHECKPOINTING_CONFIG
    done = {row_key(row): row for row in rows}
    specs = [("full", "peak_gib", 16.0, "full fine-tuning peak < 16 GiB"),
             ("lora", "peak_gib", 10.0, "LoRA peak < 10 GiB"),
             ("full", "mfu", 0.35, "MFU >= 35%")]
    results = []
    for mode, field, threshold, name in specs:
        row = done.get((arch, mode, "cached", batch, segment, False))
        label = f"{name} ({arch}, batch {batch} x {segment:g} s, cached)"
        if device != "cuda":
            results.append(goal(label, None, "not measured: no GPU", None))
        elif row is None or row["error"] or row[field] is None:
            reason = (row["error"] or row["mfu_note"]) if row else "configuration not in this run"
            results.append(goal(label, None, f"not measured: {reason}", None))
        elif field == "mfu":
            results.append(goal(label, row["mfu"], f"{100 * row['mfu']:.1f}%", row["mfu"] >= threshold))
        else:
            results.append(goal(label, row[field], f"{row[field]:.2f} GiB", row[field] < threshold))
    return results


# -- make demo ---------------------------------------------------------------------------------------------------

def demo_path_overrides(makefile: Path, out: Path) -> tp.List[str]:
    """`VAR=<out>/...` for every `DEMO_* ?= output/...` of the Makefile, so that no demo path stays in the
    repository's output/ (the variables are read, not listed here: the demo gains steps and paths)."""
    import re
    pattern = re.compile(r"^(DEMO_\w+)\s*\?=\s*output/(\S+)\s*$", re.MULTILINE)
    return [f"{name}={out / rest}" for name, rest in pattern.findall(makefile.read_text())]


def folder_state(roots: tp.Sequence[Path]) -> tp.Dict[str, float]:
    """Modification times of these folders and of their sub-folders two levels down (a new entry shows)."""
    state = {}
    for root in roots:
        for folder in [root, *root.glob("*/"), *root.glob("*/*/")]:
            with contextlib.suppress(OSError):
                state[str(folder)] = folder.stat().st_mtime
    return state


def bench_demo(timeout_s: float = 1800) -> dict:
    """`make demo` end to end, every output in a temporary folder (the user's output/ and manifests/ untouched)."""
    watched = [REPO_ROOT / "output", REPO_ROOT / "manifests"]
    before = folder_state(watched)
    with tempfile.TemporaryDirectory(prefix="musicgen_ft_bench_demo_") as tmp:
        out = Path(tmp) / "output"
        command = ["make", "demo", f"OUTPUT={out}", *demo_path_overrides(REPO_ROOT / "Makefile", out)]
        env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
        env.update(MUSICGEN_FT_OUTPUT=str(out), MUSICGEN_FT_MANIFESTS=str(Path(tmp) / "manifests"),
                   AUDIOCRAFT_DORA_DIR=str(out))
        start = time.perf_counter()
        try:
            result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                                    timeout=timeout_s)
            error = None if result.returncode == 0 else describe_exit(result.returncode, result.stderr)
        except subprocess.TimeoutExpired:
            error = f"timed out after {timeout_s:g} s"
        except FileNotFoundError:
            error = "`make` is not installed: install it (apt-get install make) or run with --no-demo"
        wall = time.perf_counter() - start
    after = folder_state(watched)
    changed = sorted(path for path, mtime in after.items() if before.get(path) != mtime)
    warning = (f"the repository's {', '.join(changed[:5])} changed while the demo ran (a demo path the bench "
               "does not redirect, or another process)") if changed else None
    return {"command": "make demo " + " ".join(command[2:]).replace(str(out), "<tmp>"),
            "wall_s": None if error else round(wall, 1), "error": error, "warning": warning}


# -- the report --------------------------------------------------------------------------------------------------

def fmt(value: tp.Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def training_table(rows: tp.List[dict]) -> tp.List[str]:
    lines = ["| model | mode | tokens | batch x segment | checkpointing | precision | step (s) | audio s/s | "
             "tokens/s | peak (GiB) | MFU | error |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mfu_text = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        lines.append(f"| {r['arch']} | {r['mode']} | {r['tokens']} | {r['batch']} x {r['segment_s']:g} s | "
                     f"{'torch' if r['checkpointing'] else 'none'} | {r['precision'] or '-'} | "
                     f"{fmt(r['step_s'], 4)} | {fmt(r['audio_s_per_s'])} | {fmt(r['tokens_per_s'])} | "
                     f"{fmt(r['peak_gib'])} | {mfu_text} | {r['error'] or ''} |")
    return lines


def training_markdown(section: dict) -> tp.List[str]:
    rows = section["rows"]
    first = next((r for r in rows if not r["error"]), rows[0] if rows else None)
    if first is None:
        return []
    memory = first["memory"] or ("GPU max allocated" if section["device"] == "cuda" else "process peak RSS")
    steps = f"{first['warmup']} warm-up + {first['steps']} measured steps"
    lines = [f"## LM training step on {first['device_name']} ({section['device']})", "",
             f"One step: the batch's inputs, forward, backward, gradient clipping, AdamW; {steps}, averaged; "
             f"each configuration in its own process ({section['isolation']}). Random weights in musicgen-small's "
             "shapes (LM, 32 kHz EnCodec, T5 of t5-base's shapes) and the tiny model's. *cached*: tokens and T5 "
             "outputs precomputed; *uncached*: EnCodec encodes the batch's audio and T5 runs on its captions in "
             f"every step. Tokens = batch x frames x codebooks ({fmt(first['frame_rate'])} Hz). Peak memory: "
             f"{memory}, over the steps"
             + (" (glibc's mmap threshold fixed at 1 MiB, so that RSS follows what is allocated)."
                if section["device"] != "cuda" else "."), ""]
    lines += training_table(rows) + ["", FLOPS_FORMULA, ""]
    return lines


def ratios_markdown(ratios: dict) -> tp.List[str]:
    lines = ["## Ratios (same run)", "", "Cached vs uncached step time (= epoch time):", "",
             "| model | mode | batch x segment | checkpointing | uncached (s) | cached (s) | speedup |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['arch']} | {r['mode']} | {r['batch']} x {r['segment_s']:g} s | "
              f"{'torch' if r['checkpointing'] else 'none'} | {fmt(r['uncached_step_s'], 4)} | "
              f"{fmt(r['cached_step_s'], 4)} | {r['speedup']:.2f}x |" for r in ratios["cache_speedup"]]
    lines += ["", "LoRA / full peak memory:", "",
              "| model | tokens | batch x segment | checkpointing | full (GiB) | LoRA (GiB) | LoRA / full |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['arch']} | {r['tokens']} | {r['batch']} x {r['segment_s']:g} s | "
              f"{'torch' if r['checkpointing'] else 'none'} | {fmt(r['full_peak_gib'])} | "
              f"{fmt(r['lora_peak_gib'])} | {r['ratio']:.2f} |" for r in ratios["lora_memory"]]
    return lines + [""]


def goals_markdown(goal_list: tp.List[dict]) -> tp.List[str]:
    lines = ["## Goals", ""]
    for g in goal_list:
        verdict = "" if g["met"] is None else ": **met**" if g["met"] else ": **not met**"
        lines.append(f"- {g['goal']}: {g['measured']}{verdict}" + (f" ({g['note']})" if g["note"] else ""))
    return lines + [""]


def markdown(results: dict) -> str:
    lines = [f"# Benchmark ({time.strftime('%Y-%m-%d', time.gmtime(results['time']))}"
             f"{', quick' if results.get('quick') else ''})", "", machine_line(results["machine"]), ""]
    if results.get("training"):
        lines += training_markdown(results["training"])
    if results.get("ratios"):
        lines += ratios_markdown(results["ratios"])
    if results.get("goals"):
        lines += goals_markdown(results["goals"])
    demo = results.get("demo")
    if demo:
        result = f"{demo['wall_s']} s end to end" if demo["wall_s"] is not None else demo["error"]
        lines += ["## make demo", "", f"`{demo['command']}`: {result}"
                  + (f" (warning: {demo['warning']})" if demo.get("warning") else ""), ""]
    if results.get("manifests"):
        lines += manifests_markdown(results["manifests"])
    return "\n".join(lines)


# -- make bench --------------------------------------------------------------------------------------------------

def parse_options(argv: tp.Optional[tp.Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="make bench", description="Speed measurements to output/bench/ "
                                     "(bench.json, bench.md), each with the machine it ran on.")
    parser.add_argument("--quick", action="store_true",
                        help="tiny model only, batch 1 and 2 x 1 s, 20 files for manifests, no demo (seconds)")
    parser.add_argument("--out", type=Path, help="folder for bench.json and bench.md (default: <output>/bench)")
    parser.add_argument("--no-demo", action="store_true", help="do not time `make demo`")
    parser.add_argument("--no-manifests", action="store_true", help="skip the manifests section")
    parser.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=None,
                        help="add activation-checkpointing rows (musicgen-small, batch 4 x 30 s); default: on a GPU")
    parser.add_argument("--arch", action="append", choices=list(ARCHITECTURES), help="only this model (repeatable)")
    parser.add_argument("--batches", help="comma-separated batch sizes (default 1,2,4; quick: 1,2)")
    parser.add_argument("--segments", help="comma-separated segment lengths in s (default 10,30; quick: 1)")
    parser.add_argument("--timeout", type=float, help="seconds per configuration (default: GPU 600, CPU 1800, "
                        "quick 120)")
    parser.add_argument("--isolation", choices=["fork", "process"],
                        help="fork: children of one process that imported once (default on the CPU); process: a "
                             "new interpreter per configuration (default on a GPU)")
    return parser.parse_args(argv)


def numbers(text: tp.Optional[str], kind: type) -> tp.Tuple:
    try:
        return tuple(kind(x) for x in text.split(",")) if text else ()
    except ValueError:
        raise SystemExit(f"{text!r} is not a comma-separated list of numbers (e.g. 1,2,4).")


def write_results(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "bench.md").write_text(markdown(results) + "\n")


def progress(row: dict) -> None:
    config = f"{row['arch']} {row['mode']} {row['tokens']} batch {row['batch']} x {row['segment_s']:g} s" + \
             (" checkpointing" if row["checkpointing"] else "")
    result = row["error"] or f"{row['step_s']:.4g} s/step, {row['peak_gib']:.3g} GiB peak"
    print(f"  {config}: {result}", flush=True)


def run(options: argparse.Namespace) -> Path:
    import torch
    out = options.out or output_dir() / "bench"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results: tp.Dict[str, tp.Any] = {"machine": machine(), "time": time.time(), "quick": options.quick}
    if not options.no_manifests:
        print("make manifests ...", flush=True)
        results["manifests"] = bench_manifests(files=20 if options.quick else 1000)
    configs = matrix(device, options.quick, options.arch or (), numbers(options.batches, int),
                     numbers(options.segments, float), options.checkpointing, options.timeout)
    isolation = options.isolation or ("fork" if device == "cpu" else "process")
    print(f"Training steps: {len(configs)} configurations on {device} ({isolation}) ...", flush=True)
    partial = {**results, "training": {"device": device, "isolation": isolation, "rows": []}}

    def on_row(row: dict) -> None:  # a bench stopped midway still leaves its rows
        progress(row)
        partial["training"]["rows"].append(row)
        write_results(partial, out)
    results["training"] = bench_training(configs, isolation, on_row)
    rows = results["training"]["rows"]
    results["ratios"] = {"cache_speedup": cache_speedups(rows), "lora_memory": lora_memory_ratios(rows)}
    results["goals"] = goals(rows, device)
    if not (options.quick or options.no_demo):
        print("make demo ...", flush=True)
        results["demo"] = bench_demo()
    write_results(results, out)
    print(markdown(results))
    return out


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> Path:
    return run(parse_options(argv))


def step_main(argv: tp.Sequence[str]) -> int:
    """`python -m musicgen_finetune.bench step ...`: one configuration, its measurement as a JSON line."""
    parser = argparse.ArgumentParser(prog="python -m musicgen_finetune.bench step")
    parser.add_argument("--arch", choices=list(ARCHITECTURES), required=True)
    parser.add_argument("--mode", choices=MODES, required=True)
    parser.add_argument("--tokens", choices=TOKENS, default="cached")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--segment", type=float, default=2.0)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--t5", default="", help="a T5 folder (default: one written for the step)")
    opts = parser.parse_args(argv)
    config = StepConfig(opts.arch, opts.mode, opts.tokens, opts.batch, opts.segment, opts.checkpointing,
                        opts.device, opts.warmup, opts.steps, opts.t5)
    try:
        print(json.dumps(step_measurement(config)), flush=True)
        return 0
    except Exception as err:  # noqa: BLE001 - the caller makes it the row's error
        print(json.dumps({"error": describe_failure(err)}), flush=True)
        return 1


if __name__ == "__main__":
    from . import environment
    environment.prepare()
    if sys.argv[1:2] == ["step"]:
        sys.exit(step_main(sys.argv[2:]))
    if sys.argv[1:2] == ["serve"]:
        serve()
        sys.exit(0)
    main(sys.argv[1:])
