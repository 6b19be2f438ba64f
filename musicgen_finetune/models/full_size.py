"""A random-weight MusicGen with musicgen-small's exact released layout, for the full-size smoke run (make smoke-full).

    <out>/state_dict.bin              fp16 LM weights + the released xp.cfg (musicgen_base_32khz at 'small' scale)
    <out>/compression_state_dict.bin  AudioCraft's EnCodec 32 kHz in its released configuration, random weights
    <out>/t5/                         a T5 encoder of t5-base's dimensions (random) and a real sentencepiece tokenizer

The xp.cfg names the text encoder 't5-base' as the released one does; the harness finds the T5 in <out>/t5 first
(models/folder.py), so nothing is downloaded. About 1.4 GB on disk; written once and reused when complete.
"""

import json
import typing as tp
from pathlib import Path

import torch
from audiocraft.models import builders
from omegaconf import DictConfig

import audiocraft

from ..config import compose
from ..files import replaced_when_complete
from . import folder as model_dir
from . import xp_cfg
from .tiny import write_t5

# transformers' T5Config of t5-base (its config.json on the hub), encoder only.
T5_BASE = {
    "vocab_size": 32128,
    "d_model": 768,
    "d_kv": 64,
    "d_ff": 3072,
    "num_layers": 12,
    "num_heads": 12,
    "relative_attention_num_buckets": 32,
    "feed_forward_proj": "relu",
}
RECIPE = 1  # raised whenever what is written changes, so that a folder written before is rewritten
MARKER = "full_size_model.json"


def released_lm_config(t5_name: str = "t5-base") -> DictConfig:
    """musicgen-small's config as released: upstream's base MusicGen solver (config/solver/musicgen/
    musicgen_base_32khz.yaml) with the 'small' model scale (config/model/lm/model_scale/small.yaml)."""
    return compose(
        [
            "solver=musicgen/musicgen_base_32khz",
            "model/lm/model_scale=small",
            f"conditioners.description.t5.name={t5_name}",
        ]
    )


def released_codec_config() -> DictConfig:
    """AudioCraft's EnCodec 32 kHz as MusicGen uses it (config/solver/compression/encodec_musicgen_32khz.yaml):
    SEANet with LSTM, 4 codebooks of 2048 at 50 Hz."""
    return compose(["solver=compression/encodec_musicgen_32khz", "device=cpu"])


def write_t5_base(out: Path, seed: int) -> Path:
    """t5-base's encoder dimensions with random weights, and tiny.py's sentencepiece tokenizer (its ids < 200 are
    valid in t5-base's 32128-word vocabulary)."""
    from transformers import T5Config, T5EncoderModel

    write_t5(out, seed)  # the tokenizer files, and a tiny encoder replaced below
    config = T5Config(**T5_BASE, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(seed)
    T5EncoderModel(config).save_pretrained(out, safe_serialization=True)
    return out


def write_compression_model(out: Path, seed: int) -> None:
    cfg = released_codec_config()
    torch.manual_seed(seed)
    model = builders.get_compression_model(cfg)
    with torch.no_grad():  # the first forward initialises the codebooks (k-means), as the first training batch does
        model(torch.randn(4, 1, 32000) * 0.1)
    model.eval()
    torch.save(xp_cfg.package(cfg, model.state_dict()), out / model_dir.COMPRESSION_FILE)


def write_lm(out: Path, seed: int, t5_dir: Path) -> None:
    cfg = released_lm_config()
    torch.manual_seed(seed)
    lm = xp_cfg.build_lm(cfg, t5=t5_dir)  # built with the local T5; the stored config keeps 't5-base'
    state = {k: v.half() if v.is_floating_point() else v for k, v in lm.state_dict().items()}
    del lm
    torch.save(xp_cfg.package(cfg, state, version=audiocraft.__version__, exported=True), out / model_dir.LM_FILE)


def is_complete(out: Path, seed: int) -> bool:
    marker = out / MARKER
    return marker.is_file() and json.loads(marker.read_text()) == {"seed": seed, "recipe": RECIPE}


def write_full_size_model(out: tp.Union[str, Path], seed: int = 0) -> Path:
    """Write the folder (replacing `out` only once complete), unless it is already there with this recipe."""
    out = Path(out).resolve()
    if is_complete(out, seed):
        return out
    with replaced_when_complete(out) as staging:
        t5_dir = write_t5_base(staging / model_dir.T5_SUBDIR, seed)
        write_compression_model(staging, seed)
        write_lm(staging, seed, t5_dir)
        (staging / "README.md").write_text(
            "musicgen-small's released layout with random weights, written by musicgen_finetune.models.full_size "
            "for make smoke-full. It makes noise, not music.\n"
        )
        (staging / MARKER).write_text(json.dumps({"seed": seed, "recipe": RECIPE}) + "\n")
    return out
