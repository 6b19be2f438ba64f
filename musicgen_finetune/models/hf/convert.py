"""Conversions between AudioCraft's snapshot layout and the transformers format, both directions, offline.

    import_hf(hf_folder, out)            transformers folder -> state_dict.bin + compression_state_dict.bin + t5/
    export_hf(audiocraft_folder, out)    AudioCraft folder -> config.json + model.safetensors + processor files
    ensure_audiocraft_layout(folder)     a transformers-only folder converted once into <output>/hf_cache/

The name and shape mapping is in mapping.py, the configs in configs.py.
"""

import dataclasses
import fcntl
import hashlib
import json
import typing as tp
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

import audiocraft

from ...config import compose
from ...files import replaced_when_complete
from ...paths import output_dir
from .. import folder as model_dir
from .. import xp_cfg
from .configs import (
    COMPRESSION_SOLVER,
    LM_SOLVER,
    PAD_MODES,
    audiocraft_compression_shapes,
    audiocraft_lm_shapes,
    check_audiocraft_compression_cfg,
    check_audiocraft_lm_cfg,
    check_hf_config,
    compression_overrides_from_hf,
    decoder_config_from_audiocraft,
    encodec_config_from_audiocraft,
    hf_shapes,
    lm_overrides_from_hf,
    problems_error,
    seanet_kwargs,
    select,
    t5_shapes,
)
from .mapping import (
    BASE_PREFIX,
    COMPRESSION_PREFIX,
    LM_PREFIX,
    OUTPUT_PROJ,
    T5_PREFIX,
    ConversionError,
    Rule,
    UnmappedTensorsError,
    UnsupportedModelError,
    apply_rules,
    encodec_links,
    lm_links,
    prefixed,
    t5_links,
    unprefixed,
    values_known,
)

CONVERTER_VERSION = 1  # part of the cache key: bump when a conversion changes
CACHE_SUBDIR = "hf_cache"
HF_CONFIG = "config.json"
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
IMPORT_INFO = "hf_import.json"


class NotAModelFolderError(model_dir.ModelDirError):
    """A folder is neither a transformers MusicGen nor an AudioCraft model folder."""


# --------------------------------------------------------------------------------------------------- folders


def hf_weight_files(folder: Path) -> tp.List[Path]:
    return [folder / name for name in HF_WEIGHTS if (folder / name).is_file()]


def is_hf_folder(folder: tp.Union[str, Path]) -> bool:
    """A transformers model folder: config.json and its weights (single file or sharded index)."""
    folder = Path(folder)
    return (folder / HF_CONFIG).is_file() and bool(hf_weight_files(folder))


def is_audiocraft_folder(folder: tp.Union[str, Path]) -> bool:
    folder = Path(folder)
    return (folder / model_dir.LM_FILE).is_file() or (folder / model_dir.COMPRESSION_FILE).is_file()


def _neither(folder: Path, wanted: str) -> NotAModelFolderError:
    if not folder.is_dir():
        return NotAModelFolderError(f"{folder} is not a folder.")
    found = ", ".join(sorted(p.name for p in folder.iterdir())[:12]) or "nothing"
    return NotAModelFolderError(
        f"{folder} is not {wanted}: a transformers MusicGen has {HF_CONFIG} and model.safetensors (or "
        f"pytorch_model.bin), as MusicgenForConditionalGeneration.save_pretrained writes them; an AudioCraft model "
        f"has {model_dir.LM_FILE} and {model_dir.COMPRESSION_FILE}. Found: {found}."
    )


def _read_hf_config(folder: Path):
    from transformers import AutoConfig

    raw = json.loads((folder / HF_CONFIG).read_text())
    if raw.get("model_type") != "musicgen":
        raise UnsupportedModelError(
            f"{folder / HF_CONFIG} has model_type {raw.get('model_type')!r}; only 'musicgen' converts"
            + (
                " (MusicGen-Melody's chroma conditioning is not supported)."
                if raw.get("model_type") == "musicgen_melody"
                else "."
            )
        )
    return AutoConfig.from_pretrained(folder)


def load_hf(folder: tp.Union[str, Path]):
    """transformers' MusicGen from a local folder, in float32, refusing missing or unexpected tensors."""
    folder = Path(folder).expanduser().resolve()
    if not is_hf_folder(folder):
        raise _neither(folder, "a transformers MusicGen folder")
    check_hf_config(_read_hf_config(folder))
    from transformers import MusicgenForConditionalGeneration

    model, info = MusicgenForConditionalGeneration.from_pretrained(
        folder, output_loading_info=True, dtype=torch.float32
    )
    bad = {k: v for k, v in info.items() if k != "error_msgs" and v}
    if bad or info.get("error_msgs"):
        raise UnmappedTensorsError(
            f"{folder}",
            unused=bad.get("unexpected_keys", []),
            unfilled=bad.get("missing_keys", []),
            mismatched=[str(m) for m in bad.get("mismatched_keys", [])],
        )
    return model.eval()


def _lstm_is_zero(state: tp.Mapping[str, torch.Tensor]) -> bool:
    lstm = [v for k, v in state.items() if k.startswith("audio_encoder.") and ".lstm." in k]
    return bool(lstm) and values_known(lstm) and all(not bool(v.abs().max() > 0) for v in lstm)


@dataclasses.dataclass
class ImportPlan:
    """What import_hf converts: the rules and the AudioCraft configs they fill."""

    lm_cfg: DictConfig
    compression_cfg: DictConfig
    rules: tp.List[Rule]
    expected: tp.Dict[str, torch.Size]


def plan_import(
    config,
    hf_state: tp.Mapping[str, torch.Tensor],
    guidance_scale: tp.Optional[float] = None,
    pad_mode: tp.Optional[str] = None,
) -> ImportPlan:
    """Configs and rules from a transformers MusicGen config and (possibly meta) state dict to AudioCraft."""
    check_hf_config(config)
    if pad_mode is not None and pad_mode not in PAD_MODES:
        raise ConversionError(f"pad_mode {pad_mode!r}: use one of {', '.join(PAD_MODES)}.")
    dec, text, audio = config.decoder, config.text_encoder, config.audio_encoder
    lstm_layers = 0 if _lstm_is_zero(hf_state) else audio.num_lstm_layers
    lm_cfg = compose(
        [
            LM_SOLVER,
            *lm_overrides_from_hf(config, guidance_scale),
            f"conditioners.description.t5.name={model_dir.T5_SUBDIR}",
        ]
    )
    compression_cfg = compose([COMPRESSION_SOLVER, *compression_overrides_from_hf(audio, lstm_layers, pad_mode)])
    projection = text.hidden_size != dec.hidden_size
    links = (
        lm_links(dec.num_hidden_layers, dec.num_codebooks, projection)
        + encodec_links(
            audio.upsampling_ratios,
            audio.num_residual_layers,
            lstm_layers,
            not audio.use_conv_shortcut,
            audio.num_quantizers,
            audio.num_lstm_layers,
        )
        + t5_links(t5_shapes(text))
    )
    expected = {
        **prefixed(audiocraft_lm_shapes(lm_cfg, text.hidden_size), LM_PREFIX),
        **prefixed(audiocraft_compression_shapes(compression_cfg), COMPRESSION_PREFIX),
        **prefixed(t5_shapes(text), T5_PREFIX),
    }
    return ImportPlan(lm_cfg, compression_cfg, [link.rule("to_ac") for link in links], expected)


def import_hf(
    hf_folder: tp.Union[str, Path], out_folder: tp.Union[str, Path], pad_mode: tp.Optional[str] = None
) -> Path:
    """Write the AudioCraft snapshot layout (state_dict.bin, compression_state_dict.bin, t5/) of a transformers
    MusicGen folder, so that `MODEL=<out>` trains offline with nothing else. `pad_mode` overrides the EnCodec
    padding mode of the transformers config (e.g. 'constant', AudioCraft's own for musicgen's 32 kHz EnCodec)."""
    source = Path(hf_folder).expanduser().resolve()
    out = Path(out_folder).expanduser().resolve()
    if source == out:
        raise ConversionError(f"The output folder must differ from the transformers folder ({source}).")
    model = load_hf(source)
    from transformers import GenerationConfig, T5EncoderModel, T5Tokenizer

    try:
        tokenizer = T5Tokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError) as err:
        raise model_dir.ModelDirError(
            f"{source} has no sentencepiece T5 tokenizer (spiece.model), which AudioCraft's T5 conditioner "
            f"needs: save the processor with AutoProcessor.save_pretrained ({err})."
        ) from err
    guidance = None
    if (source / "generation_config.json").is_file():
        guidance = GenerationConfig.from_pretrained(source).guidance_scale
    state = model.state_dict()
    with replaced_when_complete(out) as staging:
        t5_dir = staging / model_dir.T5_SUBDIR
        plan = plan_import(model.config, state, guidance, pad_mode)
        converted = apply_rules(plan.rules, state, plan.expected, f"{source} -> AudioCraft")
        with torch.device("meta"):
            t5 = T5EncoderModel(model.config.text_encoder)
        t5.load_state_dict(unprefixed(converted, T5_PREFIX), strict=True, assign=True)
        t5.tie_weights()
        t5.save_pretrained(t5_dir, safe_serialization=True)
        tokenizer.save_pretrained(t5_dir)
        # conditioners.description.t5.name is `t5`: found beside the model, wherever the folder is moved
        torch.save(
            xp_cfg.package(
                plan.lm_cfg, unprefixed(converted, LM_PREFIX), version=audiocraft.__version__, exported=True
            ),
            staging / model_dir.LM_FILE,
        )
        torch.save(
            xp_cfg.package(plan.compression_cfg, unprefixed(converted, COMPRESSION_PREFIX)),
            staging / model_dir.COMPRESSION_FILE,
        )
        (staging / IMPORT_INFO).write_text(
            json.dumps(
                {
                    "source": str(source),
                    "converter_version": CONVERTER_VERSION,
                    "key": source_key(source),
                    "pad_mode": select(plan.compression_cfg, "seanet.pad_mode"),
                    "tensors": len(converted),
                },
                indent=2,
            )
            + "\n"
        )
        (staging / "README.md").write_text(
            f"# MusicGen imported from {source}\n\nConverted from the transformers format by "
            "`musicgen_finetune.hf_bridge.import_hf`: state_dict.bin (LM), compression_state_dict.bin (EnCodec) "
            "and t5/ (the model's own T5 encoder and tokenizer), in the facebook/musicgen-small snapshot layout.\n"
            "Train it with `make train MODEL=<this folder> NAME=<dataset>`; export it back with `make export-hf`.\n"
        )
    return out


# ------------------------------------------------------------------------------------------------------ export


@dataclasses.dataclass
class ExportPlan:
    config: tp.Any  # transformers MusicgenConfig
    rules: tp.List[Rule]
    expected: tp.Dict[str, torch.Size]


def plan_export(
    lm_cfg: DictConfig,
    compression_cfg: tp.Optional[DictConfig],
    t5_config,
    lm_state: tp.Mapping[str, torch.Tensor],
    base_config=None,
) -> ExportPlan:
    """The transformers config and the rules from AudioCraft states (`lm:`, `compression:`, `t5:` names; with
    `base_config`, `base:` names for the base's text_encoder.* and audio_encoder.*) to transformers names."""
    from transformers import MusicgenConfig

    check_audiocraft_lm_cfg(lm_cfg)
    decoder = decoder_config_from_audiocraft(lm_cfg)
    proj_weight = lm_state.get(f"{OUTPUT_PROJ}.weight")
    if base_config is not None:
        text_config, audio_config = base_config.text_encoder, base_config.audio_encoder
    else:
        check_audiocraft_compression_cfg(compression_cfg)
        text_config, audio_config = t5_config, encodec_config_from_audiocraft(compression_cfg)
    problems = []
    if proj_weight is not None and proj_weight.shape[1] != text_config.d_model:
        problems.append(
            f"the LM's {OUTPUT_PROJ} takes a T5 of width {proj_weight.shape[1]}, the T5 has {text_config.d_model}"
        )
    if audio_config.codebook_size != decoder.vocab_size:
        problems.append(
            f"the LM's card {decoder.vocab_size} != the EnCodec's codebook size {audio_config.codebook_size}"
        )
    if audio_config.num_quantizers < decoder.num_codebooks:
        problems.append(
            f"the LM models {decoder.num_codebooks} codebooks, the EnCodec has {audio_config.num_quantizers}"
        )
    sample_rate = select(lm_cfg, "sample_rate")
    if sample_rate is not None and int(sample_rate) != audio_config.sampling_rate:
        problems.append(f"the LM's sample_rate {sample_rate} != the EnCodec's {audio_config.sampling_rate}")
    if problems:
        raise problems_error("This model", problems)
    config = MusicgenConfig.from_sub_models_config(text_config, audio_config, decoder)
    links = lm_links(decoder.num_hidden_layers, decoder.num_codebooks, text_config.d_model != decoder.hidden_size)
    rules = [link.rule("to_hf") for link in links]
    if base_config is None:
        encoder = seanet_kwargs(compression_cfg, "encoder")
        rules += [
            link.rule("to_hf")
            for link in encodec_links(
                list(encoder["ratios"]),
                encoder["n_residual_layers"],
                int(encoder["lstm"]),
                bool(encoder["true_skip"]),
                int(select(compression_cfg, "rvq.n_q")),
            )
        ]
        rules += [link.rule("to_hf") for link in t5_links(t5_shapes(text_config))]
    expected = hf_shapes(config)
    if base_config is not None:
        rules += [
            Rule((BASE_PREFIX + name,), (name,))
            for name in expected
            if name.startswith(("text_encoder.", "audio_encoder."))
        ]
    return ExportPlan(config, rules, expected)


def _generation_config(card: int, frame_rate: float, guidance: float, base: tp.Optional[Path]):
    from transformers import GenerationConfig

    if base is not None and (base / "generation_config.json").is_file():
        config = GenerationConfig.from_pretrained(base)
    else:
        config = GenerationConfig(
            do_sample=True, top_k=250, guidance_scale=guidance, max_length=int(30 * frame_rate)
        )  # musicgen-small: 30 s windows
    config.decoder_start_token_id = config.pad_token_id = config.bos_token_id = card
    return config


def export_hf(
    audiocraft_folder: tp.Union[str, Path],
    out_folder: tp.Union[str, Path],
    base_hf: tp.Optional[tp.Union[str, Path]] = None,
) -> Path:
    """Write a transformers MusicGen folder (config.json, model.safetensors, generation_config.json, processor)
    from an AudioCraft model folder. The decoder is converted from state_dict.bin (LoRA already merged by
    `make export`); the text and audio encoders come from `base_hf` (a transformers MusicGen folder) when given,
    else from the folder's own T5 (t5/ or the one its xp.cfg names) and compression_state_dict.bin."""
    from transformers import (
        AutoProcessor,
        EncodecFeatureExtractor,
        MusicgenForConditionalGeneration,
        MusicgenProcessor,
        T5Config,
        T5EncoderModel,
        T5Tokenizer,
    )

    root = Path(audiocraft_folder).expanduser().resolve()
    out = Path(out_folder).expanduser().resolve()
    if root == out:
        raise ConversionError(f"The output folder must differ from the model folder ({root}).")
    if not is_audiocraft_folder(root):
        raise _neither(root, "an AudioCraft model folder")
    base = Path(base_hf).expanduser().resolve() if base_hf else None
    source: tp.Dict[str, torch.Tensor] = {}
    if base is None:
        files = model_dir.check(root)
        lm_package = model_dir.load_package(files.lm)
        lm_cfg = files.xp_cfg
        compression_package = model_dir.load_package(files.compression)
        compression_cfg = OmegaConf.create(compression_package["xp.cfg"])
        if files.t5 is None:
            raise UnsupportedModelError(
                f"{files.lm} is not conditioned on T5 text (conditioners.description.model "
                f"is {select(lm_cfg, 'conditioners.description.model')!r})."
            )
        t5_config = T5Config.from_pretrained(files.t5)
        t5 = T5EncoderModel.from_pretrained(files.t5, dtype=torch.float32)
        source.update(prefixed(t5.state_dict(), T5_PREFIX))
        source.update(prefixed(compression_package["best_state"], COMPRESSION_PREFIX))
        base_config = None
    else:
        lm_path = root / model_dir.LM_FILE
        if not lm_path.is_file():
            raise model_dir.ModelDirError(f"{root} lacks {model_dir.LM_FILE}.")
        lm_package = model_dir.load_package(lm_path)
        if "xp.cfg" not in lm_package:
            raise model_dir.ModelDirError(f"{lm_path} has no 'xp.cfg': the LM's architecture cannot be known.")
        lm_cfg = OmegaConf.create(lm_package["xp.cfg"])
        base_model = load_hf(base)
        base_config, t5_config, compression_cfg = base_model.config, None, None
        source.update(
            prefixed(
                {k: v for k, v in base_model.state_dict().items() if k.startswith(("text_encoder.", "audio_encoder."))},
                BASE_PREFIX,
            )
        )
    lm_state = {k: v.float() if v.is_floating_point() else v for k, v in lm_package["best_state"].items()}
    source.update(prefixed(lm_state, LM_PREFIX))
    plan = plan_export(lm_cfg, compression_cfg, t5_config, lm_state, base_config)
    converted = apply_rules(plan.rules, source, plan.expected, f"{root} -> transformers")
    converted = {k: v.float() if v.is_floating_point() else v for k, v in converted.items()}
    with torch.device("meta"):
        model = MusicgenForConditionalGeneration(plan.config)
    model.load_state_dict(converted, strict=True, assign=True)
    model.tie_weights()
    audio = plan.config.audio_encoder
    model.generation_config = _generation_config(
        plan.config.decoder.vocab_size,
        audio.frame_rate,
        float(select(lm_cfg, "classifier_free_guidance.inference_coef", 3.0)),
        base,
    )
    if base is not None:
        processor = AutoProcessor.from_pretrained(base)
    else:
        processor = MusicgenProcessor(
            feature_extractor=EncodecFeatureExtractor(
                feature_size=1,
                sampling_rate=audio.sampling_rate,
                padding_side="left",
                padding_value=0.0,
                return_attention_mask=True,
            ),
            tokenizer=T5Tokenizer.from_pretrained(files.t5),
        )
    with replaced_when_complete(out) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        processor.save_pretrained(staging)
        (staging / "README.md").write_text(
            f"# MusicGen exported from {root}\n\nWritten by `musicgen_finetune.hf_bridge.export_hf` in the "
            "transformers format: the decoder converted from the AudioCraft LM, the text and audio encoders "
            + (f"from {base}" if base else "converted from the model's own T5 and EnCodec")
            + ".\n\n"
            "    from transformers import AutoProcessor, MusicgenForConditionalGeneration\n"
            "    model = MusicgenForConditionalGeneration.from_pretrained('<this folder>')\n"
            "    processor = AutoProcessor.from_pretrained('<this folder>')\n"
        )
    return out


# --------------------------------------------------------------------------------------------------- the cache


def source_key(folder: Path) -> str:
    """What identifies a transformers folder's content cheaply: config.json's bytes, the weights' and tokenizer's
    names, sizes and modification times, and the converter version."""
    digest = hashlib.sha256(f"musicgen_finetune.hf_bridge v{CONVERTER_VERSION}\n".encode())
    digest.update((folder / HF_CONFIG).read_bytes())
    names = {p.name for p in hf_weight_files(folder)}
    for index in [p for p in hf_weight_files(folder) if p.name.endswith(".index.json")]:
        names.update(json.loads(index.read_text()).get("weight_map", {}).values())
    names.update(
        n for n in ("generation_config.json", "spiece.model", "tokenizer_config.json") if (folder / n).is_file()
    )
    for name in sorted(names):
        stat = (folder / name).stat()
        digest.update(f"{name} {stat.st_size} {stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def cache_folder(folder: tp.Union[str, Path]) -> Path:
    folder = Path(folder).expanduser().resolve()
    return output_dir() / CACHE_SUBDIR / f"{folder.name}-{source_key(folder)}"


def ensure_audiocraft_layout(folder: tp.Union[str, Path]) -> Path:
    """The folder itself unless it is a transformers MusicGen only (no state_dict.bin / compression_state_dict.bin);
    then its conversion, made once into <output>/hf_cache/<name>-<key> and reused while the source is unchanged.
    Anything else is returned as is, for `model_dir.check` to say what is missing."""
    root = Path(folder).expanduser().resolve()
    if not root.is_dir() or is_audiocraft_folder(root) or not is_hf_folder(root):
        return root
    cached = cache_folder(root)
    if (cached / IMPORT_INFO).is_file():
        return cached
    cached.parent.mkdir(parents=True, exist_ok=True)
    with open(cached.with_name(cached.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process converting the same folder: wait for it
        if not (cached / IMPORT_INFO).is_file():
            print(f"Converting the transformers MusicGen {root} to AudioCraft's layout, once: {cached}", flush=True)
            import_hf(root, cached)
    return cached
