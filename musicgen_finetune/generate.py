"""Text-to-music with a local model folder: `make generate`, and a small Python API for your own scripts.

    from musicgen_finetune.generate import load
    model = load("output/exports/<sig>-best")           # was: MusicGen.get_pretrained("facebook/musicgen-small")
    model.set_generation_params(duration=10)
    wav = model.generate(["hip hop 808 beat, 140 bpm"])  # AudioCraft's own MusicGen, unchanged

`load` takes any folder in the musicgen-small layout (the real one, the tiny one, an export, or a transformers
MusicGen converted once), optionally with LoRA adapters on top (ours, or a PEFT LoRA folder made on transformers'
MusicGen, converted on the fly), and works offline whatever segment length the model was trained on.
"""

import dataclasses
import datetime
import json
import re
import sys
import typing as tp
from pathlib import Path

import torch
from audiocraft.data.audio import audio_write
from audiocraft.models import MusicGen, loaders
from tqdm import tqdm

from . import lora, patches
from .errors import UserError
from .files import write_text_atomically
from .models import xp_cfg
from .models.hf.peft_lora import read_adapter
from .models.open import open_model

MAX_DURATION = 30.0  # one generation window, as musicgen-small; longer audio is extended window by window
LONGEST = 600.0  # seconds; past this, generation by extension drifts and takes very long


class GenerationError(UserError, ValueError):
    """Bad input to generation; the message names the value and the fix."""


SHORTEST = 0.5  # seconds: AudioCraft's loudness normalisation (audio_write) fails under one 400 ms block
# MusicGen's own default (audiocraft/models/musicgen.py set_generation_params)
DEFAULT_TOP_K = 250


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How audio is sampled from a model; the defaults of `make generate` and `make eval` (MusicGen's own)."""

    duration: float = 10.0  # seconds of audio per prompt
    top_k: tp.Optional[int] = None  # the k likeliest codes (0: off); None: DEFAULT_TOP_K, or all codes if fewer
    top_p: float = 0.0  # nucleus sampling threshold (0: off)
    temperature: float = 1.0
    cfg_coef: float = 3.0  # classifier-free guidance
    batch_size: int = 4  # prompts generated together

    def check(self, card: tp.Optional[int] = None) -> None:
        """GenerationError naming every value out of range (as the Makefile variable that sets it); `card`: the
        model's codebook size, which top-k may not exceed."""
        problems = []
        if not SHORTEST <= self.duration <= LONGEST:
            problems.append(
                f"DURATION={self.duration:g}: must be at least {SHORTEST:g} s (a clip's loudness is measured over "
                f"400 ms blocks) and at most {LONGEST:g} s (past {MAX_DURATION:g} s the audio is extended window by "
                "window)"
            )
        if self.top_k is not None and self.top_k < 0:
            problems.append(f"TOP_K={self.top_k}: must be >= 0 (0 disables top-k)")
        elif card is not None and self.top_k is not None and self.top_k > card:
            problems.append(
                f"TOP_K={self.top_k} is more than the {card} codes of this model's codebooks; use at "
                f"most {card} (0 disables top-k)"
            )
        if not 0 <= self.top_p <= 1:
            problems.append(f"TOP_P={self.top_p:g}: must be in [0, 1] (0 disables top-p)")
        if self.temperature <= 0:
            problems.append(f"TEMPERATURE={self.temperature:g}: must be > 0")
        if self.cfg_coef < 0:
            problems.append(f"CFG={self.cfg_coef:g}: must be >= 0 (3 is MusicGen's default)")
        if self.batch_size < 1:
            problems.append(f"BATCH={self.batch_size}: must be >= 1")
        if problems:
            raise GenerationError("; ".join(problems) + ".")

    def for_model(self, card: int) -> "Sampling":
        """These settings for a model whose codebooks have `card` codes: the default top-k lowered to `card` when
        it has fewer (said on stderr), a top-k the user gave checked against it (GenerationError)."""
        if self.top_k is not None:
            self.check(card)
            return self
        if card < DEFAULT_TOP_K:
            print(
                f"top-k: {card}, every code of this model's codebooks (the default {DEFAULT_TOP_K} is more than that)",
                file=sys.stderr,
                flush=True,
            )
        return dataclasses.replace(self, top_k=min(DEFAULT_TOP_K, card))

    def generation_params(self) -> dict:
        """What `MusicGen.set_generation_params` takes."""
        return {
            "use_sampling": True,
            "top_k": DEFAULT_TOP_K if self.top_k is None else self.top_k,
            "top_p": self.top_p,
            "temperature": self.temperature,
            "duration": self.duration,
            "cfg_coef": self.cfg_coef,
            "extend_stride": min(18.0, MAX_DURATION / 2),
        }


def load(
    folder: tp.Union[str, Path],
    adapter: tp.Optional[tp.Union[str, Path]] = None,
    device: tp.Optional[str] = None,
    t5: tp.Optional[tp.Union[str, Path]] = None,
) -> MusicGen:
    """AudioCraft's `MusicGen` for a local model folder (+ LoRA adapters, merged for speed), offline.

    Args:
        folder: a model folder in the musicgen-small layout, or a transformers MusicGen folder.
        adapter: an adapters.safetensors written by `make export` for a LoRA run on this base, or a PEFT LoRA
            folder (adapter_config.json + adapter_model.safetensors) made on transformers' MusicGen of this base.
        device: cuda when available, else cpu, by default.
        t5: a local T5 folder (default: found beside the model, as `make train` finds it).
    Returns:
        The MusicGen, in eval mode.
    """
    files = open_model(folder, t5)  # every file and the T5 are checked before anything is built
    adapter_path = Path(adapter).expanduser().resolve() if adapter else None
    if adapter_path is not None and not adapter_path.exists():
        raise GenerationError(
            f"ADAPTER={adapter}: {adapter_path} does not exist (make export writes adapters.safetensors for LoRA "
            "runs, and a PEFT folder in peft/)."
        )
    patches.apply()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    base = patches.safe_load(files.lm)["best_state"]
    lm = xp_cfg.build_lm(files.xp_cfg, base, t5=files.t5)
    if adapter_path is not None:
        found = read_adapter(adapter_path, base)  # refuses adapters trained on another base, or of other shapes
        lora.apply_adapters(lm, found.config, found.tensors, str(found.source), found.adapted)
        lora.merge(lm)
    lm.eval()
    compression = loaders.load_compression_model(str(files.root), device=device)
    model = MusicGen(files.root.name, compression, lm.to(device), max_duration=MAX_DURATION)
    # MusicGen.__init__ sets top_k=250 (models/musicgen.py set_generation_params); torch.topk fails past the codebook
    model.generation_params["top_k"] = min(DEFAULT_TOP_K, int(lm.card))
    return model


def read_prompts(prompts: str, text: bool = False) -> tp.List[str]:
    """PROMPTS= is a file (one prompt a line, # comments), or the prompt itself when it has a space in it; `text`
    (TEXT=): the prompt itself, whatever it looks like. A single word that names no file is refused: it is more
    likely a file name mistyped than a prompt."""
    if text:
        if not prompts.strip():
            raise GenerationError("TEXT is empty: give the prompt text.")
        return [prompts.strip()]
    path = Path(prompts).expanduser()
    if path.is_file():
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        found = [line for line in lines if line and not line.startswith("#")]
        if not found:
            raise GenerationError(f"PROMPTS={prompts}: {path} has no prompt (one per line; # starts a comment).")
        return found
    if not prompts.strip():
        raise GenerationError("PROMPTS is empty: give a prompt text, or a file with one prompt per line.")
    if not re.search(r"\s", prompts.strip()):
        raise GenerationError(
            f"PROMPTS={prompts}: no such file ({path.resolve()}). Give an existing file, a prompt of several words, "
            f"or a one-word prompt as TEXT={prompts}."
        )
    return [prompts.strip()]


def new_samples_folder(parent: Path) -> Path:
    """`parent/<UTC time>/`, created now and empty, so that no run of `make generate` writes over another's."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    parent.mkdir(parents=True, exist_ok=True)
    for suffix in ("", *(f"-{i}" for i in range(1, 1000))):
        folder = parent / f"{stamp}{suffix}"
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise GenerationError(f"no free folder name under {parent}")


def slug(text: str, length: int = 48) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:length] or "prompt"


def generate(
    model_folder: tp.Union[str, Path],
    prompts: str,
    out: tp.Union[str, Path],
    adapter: tp.Optional[str] = None,
    sampling: Sampling = Sampling(),
    seeds: tp.Sequence[int] = (0,),
    progress: bool = True,
    t5: tp.Optional[str] = None,
    text: bool = False,
) -> Path:
    """`make generate`: one wav per prompt and seed in `out`, and generated.json saying what was made with which
    settings. The same model, prompts, seeds and settings give the same audio. `out` must not hold another
    generation's generated.json (nothing is written over); `text`: `prompts` is the prompt itself. Returns `out`."""
    texts = read_prompts(prompts, text)
    out = Path(out).expanduser().resolve()
    if (out / "generated.json").exists():
        raise GenerationError(
            f"OUT={out} already holds the samples of another run (generated.json): give another OUT, or leave OUT "
            "unset for a new folder under output/samples/<model>/."
        )
    sampling.check()  # before reading the model: a wrong value fails at once
    sampling = sampling.for_model(int(open_model(model_folder, t5).xp_cfg.transformer_lm.card))
    model = load(model_folder, adapter, t5=t5)
    items = write_samples(model, texts, out, sampling, seeds, progress)
    manifest = {
        "model": str(Path(model_folder).expanduser().resolve()),
        "adapter": str(Path(adapter).expanduser().resolve()) if adapter else None,
        "sample_rate": model.sample_rate,
        "settings": {**dataclasses.asdict(sampling), "use_sampling": True},
        "items": items,
    }
    write_text_atomically(out / "generated.json", json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return out


def write_samples(
    model: MusicGen,
    texts: tp.Sequence[str],
    out: Path,
    sampling: Sampling = Sampling(),
    seeds: tp.Sequence[int] = (0,),
    progress: bool = True,
    loudness_normalize: bool = True,
) -> tp.List[dict]:
    """Generate with a loaded `model` into `out`: one wav per text and seed; returns a record per wav. Each batch has
    its own seed, so the same texts, seeds and batch size give the same noise whatever the model (reports compare
    models this way). `loudness_normalize=False` keeps the model's own level (only clipped), for measuring it."""
    out.mkdir(parents=True, exist_ok=True)
    model.set_generation_params(**sampling.generation_params())
    size = sampling.batch_size
    batches = [list(texts[i : i + size]) for i in range(0, len(texts), size)]
    write_options = (
        {"strategy": "loudness", "loudness_compressor": True} if loudness_normalize else {"strategy": "clip"}
    )
    items = []
    bar = tqdm(total=len(seeds) * len(texts), desc="generating", unit="clip", disable=not progress)
    for seed in seeds:
        for number, batch in enumerate(batches):
            torch_seed = seed * 100003 + number  # each batch its own stream, so batches never share noise
            torch.manual_seed(torch_seed)
            wavs = model.generate(batch)
            for index, (text, wav) in enumerate(zip(batch, wavs, strict=True)):
                position = number * size + index
                stem = out / f"{position:03d}_{slug(text)}_seed{seed}"
                path = audio_write(stem, wav.cpu(), model.sample_rate, **write_options)
                items.append(
                    {
                        "file": path.name,
                        "prompt": text,
                        "seed": seed,
                        "torch_seed": torch_seed,
                        "index": position,
                        "seconds": round(wav.shape[-1] / model.sample_rate, 3),
                    }
                )
                bar.update()
    bar.close()
    return items
