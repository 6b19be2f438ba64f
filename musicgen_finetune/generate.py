"""Text-to-music with a local model folder: `make generate`, and a small Python API for your own scripts.

    from musicgen_finetune.generate import load
    model = load("output/exports/<sig>-best")           # was: MusicGen.get_pretrained("facebook/musicgen-small")
    model.set_generation_params(duration=10)
    wav = model.generate(["hip hop 808 beat, 140 bpm"])  # AudioCraft's own MusicGen, unchanged

`load` takes any folder in the musicgen-small layout (the real one, the tiny one, an export), optionally with
LoRA adapters on top, and works offline whatever segment length the model was trained on.
"""
import json
import re
import typing as tp
from pathlib import Path

import torch
from omegaconf import OmegaConf

from . import environment, model_dir

MAX_DURATION = 30.0      # one generation window, as musicgen-small; longer audio is extended window by window
LONGEST = 600.0          # seconds; past this, generation by extension drifts and takes very long


class GenerationError(ValueError):
    """Bad input to generation; the message names the value and the fix."""


def load(folder: tp.Union[str, Path], adapter: tp.Optional[tp.Union[str, Path]] = None,
         device: tp.Optional[str] = None, t5: tp.Optional[tp.Union[str, Path]] = None):
    """AudioCraft's `MusicGen` for a local model folder (+ LoRA adapters, merged for speed), offline."""
    environment.prepare()
    files = model_dir.check(folder, t5)  # every file and the T5 are checked before anything is built
    adapter_path = Path(adapter).expanduser().resolve() if adapter else None
    if adapter_path is not None and not adapter_path.is_file():
        raise GenerationError(f"ADAPTER={adapter}: {adapter_path} does not exist (make export writes "
                              "adapters.safetensors for LoRA runs).")
    from audiocraft.models import MusicGen, builders, loaders
    from . import lora, patches
    patches.apply()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = OmegaConf.create(OmegaConf.to_container(files.xp_cfg, resolve=False))
    if files.t5 is not None:
        cfg.conditioners.description.t5.name = str(files.t5)
    cfg.device, cfg.dtype = device, "float32"
    lm = builders.get_lm_model(cfg)
    state = patches.safe_load(files.lm)["best_state"]
    lm.load_state_dict({k: v.float() for k, v in state.items()})
    if adapter_path is not None:
        lora.load_adapters(lm, adapter_path)  # refuses adapters trained on another base
        lora.merge(lm)
    lm.cfg = cfg
    lm.eval()
    compression = loaders.load_compression_model(str(files.root), device=device)
    return MusicGen(files.root.name, compression, lm.to(device), max_duration=MAX_DURATION)


def read_prompts(prompts: str) -> tp.List[str]:
    """PROMPTS= is a file (one prompt a line, # comments) or the prompt itself."""
    path = Path(prompts).expanduser()
    if path.is_file():
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        found = [line for line in lines if line and not line.startswith("#")]
        if not found:
            raise GenerationError(f"PROMPTS={prompts}: {path} has no prompt (one per line; # starts a comment).")
        return found
    if not prompts.strip():
        raise GenerationError("PROMPTS is empty: give a prompt text, or a file with one prompt per line.")
    if re.fullmatch(r"\S+\.(txt|csv|lst|prompts)", prompts.strip(), re.IGNORECASE):
        raise GenerationError(f"PROMPTS={prompts}: no such file ({path.resolve()}); give an existing file, or the "
                              "prompt text itself.")
    return [prompts.strip()]


def check_settings(duration: float, top_k: int, top_p: float, temperature: float, cfg_coef: float,
                   batch_size: int) -> None:
    problems = []
    if not 0 < duration <= LONGEST:
        problems.append(f"DURATION={duration}: must be above 0 and at most {LONGEST:g} s (past {MAX_DURATION:g} s "
                        "the audio is extended window by window)")
    if top_k < 0:
        problems.append(f"TOP_K={top_k}: must be >= 0 (0 disables top-k)")
    if not 0 <= top_p <= 1:
        problems.append(f"TOP_P={top_p}: must be in [0, 1] (0 disables top-p)")
    if temperature <= 0:
        problems.append(f"TEMPERATURE={temperature}: must be > 0")
    if cfg_coef < 0:
        problems.append(f"CFG={cfg_coef}: must be >= 0 (3 is MusicGen's default)")
    if batch_size < 1:
        problems.append(f"BATCH={batch_size}: must be >= 1")
    if problems:
        raise GenerationError("; ".join(problems) + ".")


def slug(text: str, length: int = 48) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:length] or "prompt"


def generate(model_folder: tp.Union[str, Path], prompts: str, out: tp.Union[str, Path],
             adapter: tp.Optional[str] = None, duration: float = 10.0, seeds: tp.Sequence[int] = (0,),
             top_k: int = 250, top_p: float = 0.0, temperature: float = 1.0, cfg_coef: float = 3.0,
             batch_size: int = 4, progress: bool = True, t5: tp.Optional[str] = None) -> Path:
    """One wav per prompt and seed in `out`, and generated.json saying what was made with which settings.
    The same model, prompts, seed and batch size give the same audio."""
    texts = read_prompts(prompts)
    check_settings(duration, top_k, top_p, temperature, cfg_coef, batch_size)
    card = int(model_dir.check(model_folder, t5).xp_cfg.transformer_lm.card)
    if top_k > card:
        raise GenerationError(f"TOP_K={top_k} is more than the {card} codes of this model's codebooks; "
                              f"use at most {card} (0 disables top-k).")
    model = load(model_folder, adapter, t5=t5)
    out = Path(out).expanduser().resolve()
    settings, items = write_samples(model, texts, out, duration, seeds, top_k, top_p, temperature, cfg_coef,
                                    batch_size, progress)
    manifest = {"model": str(Path(model_folder).expanduser().resolve()),
                "adapter": str(Path(adapter).expanduser().resolve()) if adapter else None,
                "sample_rate": model.sample_rate, "settings": settings, "items": items}
    (out / "generated.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return out


def write_samples(model, texts: tp.Sequence[str], out: Path, duration: float = 10.0, seeds: tp.Sequence[int] = (0,),
                  top_k: int = 250, top_p: float = 0.0, temperature: float = 1.0, cfg_coef: float = 3.0,
                  batch_size: int = 4, progress: bool = True,
                  loudness_normalize: bool = True) -> tp.Tuple[dict, tp.List[dict]]:
    """Generate with a loaded `model` into `out`: one wav per text and seed. Each batch has its own seed, so the
    same texts, seeds and batch size give the same noise whatever the model (reports compare models this way).
    `loudness_normalize=False` keeps the model's own level (only clipped), for loudness measurements."""
    from audiocraft.data.audio import audio_write
    from tqdm import tqdm
    out.mkdir(parents=True, exist_ok=True)
    settings = {"duration": duration, "top_k": top_k, "top_p": top_p, "temperature": temperature,
                "cfg_coef": cfg_coef, "batch_size": batch_size, "use_sampling": True,
                "loudness_normalize": loudness_normalize}
    model.set_generation_params(use_sampling=True, top_k=top_k, top_p=top_p, temperature=temperature,
                                duration=duration, cfg_coef=cfg_coef, extend_stride=min(18.0, MAX_DURATION / 2))
    batches = [list(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)]
    items = []
    bar = tqdm(total=len(seeds) * len(texts), desc="generating", unit="clip", disable=not progress)
    for seed in seeds:
        for number, batch in enumerate(batches):
            torch_seed = seed * 100003 + number  # each batch its own stream, so batches never share noise
            torch.manual_seed(torch_seed)
            wavs = model.generate(batch)
            for index, (text, wav) in enumerate(zip(batch, wavs, strict=True)):
                position = number * batch_size + index
                stem = out / f"{position:03d}_{slug(text)}_seed{seed}"
                write_options = ({"strategy": "loudness", "loudness_compressor": True} if loudness_normalize
                                 else {"strategy": "clip"})
                path = audio_write(stem, wav.cpu(), model.sample_rate, **write_options)
                items.append({"file": path.name, "prompt": text, "seed": seed, "torch_seed": torch_seed,
                              "index": position,
                              "seconds": round(wav.shape[-1] / model.sample_rate, 3)})
                bar.update()
    bar.close()
    return settings, items
