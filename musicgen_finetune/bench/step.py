"""One configuration measured in this process: the LM training step (the batch's inputs, forward, backward,
clipping, AdamW), its wall time, peak memory and model FLOPs."""

import contextlib
import dataclasses
import math
import tempfile
import time
import typing as tp
from pathlib import Path

from .. import lora, patches
from ..config import compose
from ..machine import GIB
from ..models.tiny import write_t5
from .flops import matrix_params, training_flops
from .matrix import ARCHITECTURES, CAPTION, MODES, T5_BASE_SHAPES, TOKENS, StepConfig

# -- one configuration, measured in this process -----------------------------------------------------------------


def write_text_encoder(kind: str, out: Path) -> Path:
    """A T5 encoder folder: the tiny model's, or t5-base's shapes with random weights (no download)."""
    import torch
    from transformers import T5Config, T5EncoderModel

    write_t5(out, seed=0)  # the tokenizer (ids < 200, within either vocabulary) and the tiny encoder
    if kind == "t5-base":
        config = T5Config(**T5_BASE_SHAPES, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
        torch.manual_seed(0)
        T5EncoderModel(config).save_pretrained(out, safe_serialization=True)
    return out


def compose_lm_config(config: StepConfig, t5: Path):
    arch = ARCHITECTURES[config.arch]
    preset = "finetune/musicgen_small_lora" if config.mode == "lora" else "finetune/musicgen_small"
    overrides = [
        f"solver={preset}",
        f"device={config.device}",
        f"conditioners.description.t5.name={t5}",
        "conditioners.description.t5.word_dropout=0",  # the same caption length every step
        *arch.lm_overrides,
        *(arch.lora_overrides if config.mode == "lora" else ()),
    ]
    if config.checkpointing:
        overrides.append("transformer_lm.checkpointing=torch")
    return compose(overrides)


def compose_codec_config(config: StepConfig):
    return compose(
        [
            "solver=compression/encodec_musicgen_32khz",
            f"device={config.device}",
            "rvq.kmeans_init=false",
            *ARCHITECTURES[config.arch].codec_overrides,
        ]
    )


def build_lm(config: StepConfig, t5: Path):
    """The LM (LoRA-injected and base frozen in lora mode), its trainable parameters and their counts."""
    import torch
    from audiocraft.models import builders

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
        raise ValueError(
            f"mode={config.mode!r}, tokens={config.tokens!r}: choose a mode of {MODES} and tokens of {TOKENS}."
        )
    if config.batch < 1 or config.segment_s <= 0 or config.steps < 1 or config.warmup < 0:
        raise ValueError(
            f"batch={config.batch}, segment={config.segment_s} s, steps={config.steps}, warmup="
            f"{config.warmup}: batch and steps must be >= 1, the segment > 0 s and warmup >= 0."
        )
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
        wav = 0.1 * torch.randn(
            config.batch, codec.channels, round(config.segment_s * codec.sample_rate), generator=generator
        )
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
    return {
        "trainable": setup.trainable,
        "total": setup.total,
        "precision": setup.precision.label,
        "optimizer": "AdamW (fused)" if config.device == "cuda" else "AdamW",
        "frame_rate": setup.frame_rate,
        "frames": codes.shape[-1],
        "codebooks": setup.lm.num_codebooks,
        "positions": shapes["positions"],
        "text_tokens": shapes["text_tokens"],
        "step_times_s": [round(t, 6) for t in times[config.warmup :]],
        "peak_gib": round(peak, 3),
        "peak_reserved_gib": round(reserved, 3) if reserved is not None else None,
        "memory": memory.kind,
        "matrix_params": dataclasses.asdict(counts),
        "flops_per_step": flops,
    }
