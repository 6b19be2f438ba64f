"""The configs of both libraries, each from the other, checked; and the names and shapes of the models they build
(on the meta device: no memory, no weights)."""

import logging
import typing as tp
import warnings
from unittest import mock

import torch
from audiocraft.models import builders
from audiocraft.modules import conditioners
from omegaconf import DictConfig, OmegaConf

from ... import patches
from ...config import hydra_value
from .mapping import ConversionError, UnsupportedModelError

LM_SOLVER = "solver=finetune/musicgen_small"
COMPRESSION_SOLVER = "solver=compression/encodec_musicgen_32khz"
PAD_MODES = ("constant", "reflect", "replicate", "circular")


# ------------------------------------------------------------------------------------- models built on meta


def _shapes(module: torch.nn.Module) -> tp.Dict[str, torch.Size]:
    return {name: tensor.shape for name, tensor in module.state_dict().items()}


def hf_shapes(config) -> tp.Dict[str, torch.Size]:
    """Names and shapes of transformers' MusicgenForConditionalGeneration for `config`, built on meta (no memory)."""
    from transformers import MusicgenForConditionalGeneration

    with torch.device("meta"):
        return _shapes(MusicgenForConditionalGeneration(config))


def t5_shapes(t5_config) -> tp.Dict[str, torch.Size]:
    from transformers import T5EncoderModel

    with torch.device("meta"):
        return _shapes(T5EncoderModel(t5_config))


class _NoT5:
    """Stands in for T5 while building an LM skeleton: the T5 is not part of the LM's state (finetune: false)."""

    @staticmethod
    def from_pretrained(name, *args, **kwargs):
        return torch.nn.Identity()


def audiocraft_lm_shapes(cfg: DictConfig, t5_width: int) -> tp.Dict[str, torch.Size]:
    """Names and shapes of AudioCraft's LM for `cfg` with a T5 of width `t5_width`, built on meta, no T5 loaded."""
    patches.apply()
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    cfg.device, cfg.dtype = "meta", "float32"
    name = f"<t5 of width {t5_width}>"
    t5 = OmegaConf.select(cfg, "conditioners.description.t5")
    if t5 is not None:
        t5.name, t5.autocast_dtype = name, None
    T5Conditioner = conditioners.T5Conditioner
    log = logging.getLogger(conditioners.__name__)
    level = log.level
    log.setLevel(logging.ERROR)  # "T5 has no autocast": there is no T5 here
    try:
        with (
            mock.patch.object(T5Conditioner, "MODELS", [*T5Conditioner.MODELS, name]),
            mock.patch.dict(T5Conditioner.MODELS_DIMS, {name: t5_width}),
            mock.patch.object(conditioners, "T5EncoderModel", _NoT5),
            mock.patch.object(conditioners, "T5Tokenizer", _NoT5),
        ):
            return _shapes(builders.get_lm_model(cfg))
    finally:
        log.setLevel(level)


def audiocraft_compression_shapes(cfg: DictConfig) -> tp.Dict[str, torch.Size]:
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    cfg.device = "meta"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # AudioCraft's SEANet uses the old weight_norm API
        return _shapes(builders.get_compression_model(cfg))


# ------------------------------------------------------------------------------------- configs, both ways


def problems_error(what: str, problems: tp.List[str]) -> UnsupportedModelError:
    return UnsupportedModelError(f"{what} cannot be converted:\n  - " + "\n  - ".join(problems))


def hidden_scale(ffn_dim: int, hidden_size: int) -> tp.Union[int, float]:
    """AudioCraft's transformer_lm.hidden_scale for a feed-forward width (AudioCraft uses int(scale * dim))."""
    if ffn_dim % hidden_size == 0:
        return ffn_dim // hidden_size
    scale = ffn_dim / hidden_size
    if int(scale * hidden_size) != ffn_dim:
        raise UnsupportedModelError(f"ffn_dim {ffn_dim} is not int(scale * {hidden_size}) for any float scale.")
    return scale


def check_hf_config(config) -> None:
    """Refuse transformers MusicGen variants AudioCraft's musicgen_lm + SEANet EnCodec cannot represent."""
    problems = []
    if getattr(config, "model_type", None) != "musicgen":
        kind = getattr(config, "model_type", None)
        raise UnsupportedModelError(
            f"config.json has model_type {kind!r}; only 'musicgen' (text-to-music) converts"
            + (
                " (MusicGen-Melody's chroma conditioning has no equivalent in the harness's AudioCraft config)."
                if kind == "musicgen_melody"
                else "."
            )
        )
    dec, text, audio = config.decoder, config.text_encoder, config.audio_encoder
    if dec.audio_channels != 1 or audio.audio_channels != 1:
        problems.append(
            f"stereo (decoder audio_channels {dec.audio_channels}, EnCodec {audio.audio_channels}): "
            "only mono MusicGen converts"
        )
    if dec.activation_function != "gelu":
        problems.append(f"decoder activation_function {dec.activation_function!r} (AudioCraft's is gelu)")
    if dec.scale_embedding:
        problems.append("decoder scale_embedding: true (AudioCraft does not scale embeddings)")
    if dec.hidden_size % dec.num_attention_heads:
        problems.append(f"hidden_size {dec.hidden_size} is not a multiple of {dec.num_attention_heads} heads")
    if text.model_type != "t5":
        problems.append(f"text encoder {text.model_type!r} (AudioCraft's conditioner is T5)")
    if audio.model_type != "encodec":
        problems.append(f"audio encoder {audio.model_type!r} (AudioCraft's is EnCodec)")
    else:
        if audio.norm_type != "weight_norm":
            problems.append(f"EnCodec norm_type {audio.norm_type!r} (only weight_norm converts)")
        if audio.codebook_dim != audio.hidden_size:
            problems.append(f"EnCodec codebook_dim {audio.codebook_dim} != hidden_size {audio.hidden_size}")
        if audio.pad_mode not in PAD_MODES:
            problems.append(f"EnCodec pad_mode {audio.pad_mode!r}")
        if dec.vocab_size != audio.codebook_size:
            problems.append(f"decoder vocab_size {dec.vocab_size} != EnCodec codebook_size {audio.codebook_size}")
        if dec.num_codebooks > audio.num_quantizers:
            problems.append(f"decoder num_codebooks {dec.num_codebooks} > EnCodec's {audio.num_quantizers} quantizers")
    cross = getattr(dec, "cross_attention_hidden_size", None)
    if text.hidden_size != dec.hidden_size and cross is not None:
        problems.append(
            f"cross_attention_hidden_size {cross} with a T5 of width {text.hidden_size} and a "
            f"decoder of width {dec.hidden_size}"
        )
    try:
        hidden_scale(dec.ffn_dim, dec.hidden_size)
    except UnsupportedModelError as err:
        problems.append(str(err))
    if problems:
        raise problems_error("This transformers MusicGen", problems)


def lm_overrides_from_hf(config, guidance_scale: tp.Optional[float] = None) -> tp.List[str]:
    """`compose` overrides that give AudioCraft's musicgen_lm the architecture of a transformers decoder."""
    dec = config.decoder
    n_q = dec.num_codebooks
    overrides = [
        f"transformer_lm.dim={dec.hidden_size}",
        f"transformer_lm.num_heads={dec.num_attention_heads}",
        f"transformer_lm.num_layers={dec.num_hidden_layers}",
        f"transformer_lm.hidden_scale={hydra_value(hidden_scale(dec.ffn_dim, dec.hidden_size))}",
        f"transformer_lm.n_q={n_q}",
        f"transformer_lm.card={dec.vocab_size}",
        "codebooks_pattern.modeling=delay",
        f"codebooks_pattern.delay.delays={hydra_value(list(range(n_q)))}",
        "codebooks_pattern.delay.flatten_first=0",
        "codebooks_pattern.delay.empty_initial=0",
        f"sample_rate={config.audio_encoder.sampling_rate}",
        "channels=1",
        "conditioners.description.model=t5",
    ]
    if guidance_scale is not None:
        overrides.append(f"classifier_free_guidance.inference_coef={hydra_value(float(guidance_scale))}")
    return overrides


def compression_overrides_from_hf(audio, lstm_layers: int, pad_mode: tp.Optional[str] = None) -> tp.List[str]:
    """`compose` overrides that give AudioCraft's SEANet EnCodec the architecture of a transformers EncodecModel."""
    return [
        f"sample_rate={audio.sampling_rate}",
        "channels=1",
        f"encodec.causal={hydra_value(bool(audio.use_causal_conv))}",
        f"encodec.renormalize={hydra_value(bool(audio.normalize))}",
        f"seanet.dimension={audio.hidden_size}",
        f"seanet.n_filters={audio.num_filters}",
        f"seanet.n_residual_layers={audio.num_residual_layers}",
        f"seanet.ratios={hydra_value(list(audio.upsampling_ratios))}",
        "seanet.activation=ELU",
        "seanet.norm=weight_norm",
        f"seanet.kernel_size={audio.kernel_size}",
        f"seanet.last_kernel_size={audio.last_kernel_size}",
        f"seanet.residual_kernel_size={audio.residual_kernel_size}",
        f"seanet.dilation_base={audio.dilation_growth_rate}",
        f"seanet.pad_mode={pad_mode or audio.pad_mode}",
        f"seanet.true_skip={hydra_value(not audio.use_conv_shortcut)}",
        f"seanet.compress={audio.compress}",
        f"seanet.lstm={lstm_layers}",
        "seanet.disable_norm_outer_blocks=0",
        f"seanet.decoder.trim_right_ratio={hydra_value(float(audio.trim_right_ratio))}",
        f"rvq.bins={audio.codebook_size}",
        f"rvq.n_q={audio.num_quantizers}",
    ]


def select(cfg: DictConfig, key: str, default: tp.Any = None) -> tp.Any:
    value = OmegaConf.select(cfg, key, default=default)
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def check_audiocraft_lm_cfg(cfg: DictConfig) -> None:
    """Refuse AudioCraft LMs that transformers' MusicgenForCausalLM cannot represent (names every difference)."""
    problems = []
    expected = {
        "lm_model": "transformer_lm",
        "channels": 1,
        "transformer_lm.norm_first": True,
        "transformer_lm.norm": "layer_norm",
        "transformer_lm.bias_ff": False,
        "transformer_lm.bias_attn": False,
        "transformer_lm.bias_proj": False,
        "transformer_lm.layer_scale": None,
        "transformer_lm.positional_embedding": "sin",
        "transformer_lm.activation": "gelu",
        "transformer_lm.qk_layer_norm": False,
        "transformer_lm.qk_layer_norm_cross": False,
        "transformer_lm.kv_repeat": 1,
        "transformer_lm.causal": True,
        "transformer_lm.past_context": None,
        "codebooks_pattern.modeling": "delay",
        "conditioners.description.model": "t5",
        "conditioners.description.t5.finetune": False,
        "fuser.cross": ["description"],
        "fuser.sum": [],
        "fuser.prepend": [],
        "fuser.input_interpolate": [],
        "fuser.cross_attention_pos_emb": False,
    }
    for key, wanted in expected.items():
        value = select(cfg, key, default=wanted)
        if value != wanted:
            why = (
                "a T5 fine-tuned inside the LM is not supported"
                if key.endswith("t5.finetune")
                else f"transformers' MusicGen needs {wanted!r}"
            )
            problems.append(f"{key}: {value!r} ({why})")
    for key, wanted in (("transformer_lm.max_period", 10000), ("transformer_lm.positional_scale", 1.0)):
        value = select(cfg, key, default=wanted)
        if value is not None and value != wanted:
            problems.append(f"{key}: {value!r} (transformers' MusicGen needs {wanted!r})")
    if not (select(cfg, "transformer_lm.custom", False) or select(cfg, "transformer_lm.memory_efficient", False)):
        problems.append(
            "transformer_lm.custom and memory_efficient are both false (torch MHA key names; the "
            "released MusicGen checkpoints use memory_efficient: true)"
        )
    n_q = select(cfg, "transformer_lm.n_q")
    delays = select(cfg, "codebooks_pattern.delay.delays")
    if select(cfg, "codebooks_pattern.modeling") == "delay" and (
        delays != list(range(n_q or 0))
        or select(cfg, "codebooks_pattern.delay.flatten_first", 0) != 0
        or select(cfg, "codebooks_pattern.delay.empty_initial", 0) != 0
    ):
        problems.append(
            f"codebooks_pattern.delay: delays {delays}, flatten_first "
            f"{select(cfg, 'codebooks_pattern.delay.flatten_first', 0)}, empty_initial "
            f"{select(cfg, 'codebooks_pattern.delay.empty_initial', 0)} (transformers' MusicGen "
            f"always delays codebook k by k steps: delays {list(range(n_q or 0))}, 0, 0)"
        )
    others = sorted(k for k in (select(cfg, "conditioners", {}) or {}) if k not in ("description", "args"))
    if others:
        problems.append(
            f"conditioners {others} besides the text description (melody/chroma, ... conditioning "
            "has no equivalent in transformers' MusicgenForConditionalGeneration)"
        )
    dim, heads = select(cfg, "transformer_lm.dim"), select(cfg, "transformer_lm.num_heads")
    if dim and heads and dim % heads:
        problems.append(f"transformer_lm.dim {dim} is not a multiple of num_heads {heads}")
    if problems:
        raise problems_error("This AudioCraft LM", problems)


def seanet_kwargs(cfg: DictConfig, part: str) -> dict:
    seanet = select(cfg, "seanet")
    overrides = seanet.pop(part, {}) or {}
    seanet.pop("encoder" if part == "decoder" else "decoder", None)
    return {**seanet, **overrides}


def check_audiocraft_compression_cfg(cfg: DictConfig) -> None:
    problems = []
    if (
        select(cfg, "compression_model") != "encodec"
        or select(cfg, "encodec.autoencoder") != "seanet"
        or select(cfg, "encodec.quantizer") != "rvq"
    ):
        problems.append(
            f"compression model {select(cfg, 'compression_model')} / "
            f"{select(cfg, 'encodec.autoencoder')} / {select(cfg, 'encodec.quantizer')} "
            "(only encodec / seanet / rvq)"
        )
    else:
        encoder, decoder = seanet_kwargs(cfg, "encoder"), seanet_kwargs(cfg, "decoder")
        decoder_only = ("trim_right_ratio", "final_activation", "final_activation_params")
        for key in sorted(set(encoder) | set(decoder)):
            if key not in decoder_only and encoder.get(key) != decoder.get(key):
                problems.append(
                    f"seanet.{key} differs between encoder ({encoder.get(key)!r}) and decoder ({decoder.get(key)!r})"
                )
        wanted = {"channels": 1, "activation": "ELU", "norm": "weight_norm", "disable_norm_outer_blocks": 0}
        for key, value in wanted.items():
            if encoder.get(key) != value:
                problems.append(f"seanet.{key}: {encoder.get(key)!r} (transformers' EnCodec needs {value!r})")
        if (encoder.get("activation_params") or {}).get("alpha", 1.0) != 1.0:
            problems.append(f"seanet.activation_params {encoder.get('activation_params')} (ELU alpha 1 only)")
        if encoder.get("norm_params"):
            problems.append(f"seanet.norm_params {encoder.get('norm_params')} (none in transformers)")
        if decoder.get("final_activation") is not None:
            problems.append(f"seanet.decoder.final_activation {decoder.get('final_activation')!r}")
        if encoder.get("pad_mode") not in PAD_MODES:
            problems.append(f"seanet.pad_mode {encoder.get('pad_mode')!r}")
        bins = select(cfg, "rvq.bins")
        if not bins or bins & (bins - 1):
            problems.append(f"rvq.bins {bins} is not a power of 2 (transformers' EnCodec requires it)")
    if problems:
        raise problems_error("This AudioCraft EnCodec", problems)


def target_bandwidth(num_quantizers: int, sample_rate: int, hop_length: int, codebook_size: int) -> float:
    """The one target bandwidth (kbps) for which transformers' EncodecConfig allocates `num_quantizers`
    (`num_quantizers = int(1000 * bandwidth // (frame_rate * log2(codebook_size)))`)."""
    import math

    frame_rate = math.ceil(sample_rate / hop_length)
    bits = math.ceil(math.log2(codebook_size))
    bandwidth = num_quantizers * frame_rate * bits / 1000
    for nudge in (0.0, 1e-9, 1e-6):
        candidate = bandwidth + nudge
        if (
            int(1000 * candidate // (frame_rate * bits)) == num_quantizers
            and int(max(1, math.floor(candidate * 1000 / (bits * frame_rate)))) == num_quantizers
        ):
            return candidate
    raise ConversionError(f"No target bandwidth gives {num_quantizers} quantizers.")


def encodec_config_from_audiocraft(cfg: DictConfig):
    """transformers' EncodecConfig for an AudioCraft SEANet EnCodec config."""
    from transformers import EncodecConfig

    encoder, decoder = seanet_kwargs(cfg, "encoder"), seanet_kwargs(cfg, "decoder")
    ratios = list(encoder["ratios"])
    sample_rate = int(select(cfg, "encodec.sample_rate", select(cfg, "sample_rate")))
    bins, n_q = int(select(cfg, "rvq.bins")), int(select(cfg, "rvq.n_q"))
    hop = 1
    for r in ratios:
        hop *= r
    return EncodecConfig(
        target_bandwidths=[target_bandwidth(n_q, sample_rate, hop, bins)],
        sampling_rate=sample_rate,
        audio_channels=1,
        normalize=bool(select(cfg, "encodec.renormalize", False)),
        chunk_length_s=None,
        overlap=None,
        hidden_size=encoder["dimension"],
        num_filters=encoder["n_filters"],
        num_residual_layers=encoder["n_residual_layers"],
        upsampling_ratios=ratios,
        norm_type="weight_norm",
        kernel_size=encoder["kernel_size"],
        last_kernel_size=encoder["last_kernel_size"],
        residual_kernel_size=encoder["residual_kernel_size"],
        dilation_growth_rate=encoder["dilation_base"],
        use_causal_conv=bool(encoder["causal"]),
        pad_mode=encoder["pad_mode"],
        compress=encoder["compress"],
        num_lstm_layers=max(1, int(encoder["lstm"])),
        trim_right_ratio=float(decoder.get("trim_right_ratio", 1.0)),
        codebook_size=bins,
        codebook_dim=encoder["dimension"],
        use_conv_shortcut=not encoder["true_skip"],
    )


def decoder_config_from_audiocraft(cfg: DictConfig):
    from transformers import MusicgenDecoderConfig

    lm = select(cfg, "transformer_lm")
    card = int(lm["card"])
    return MusicgenDecoderConfig(
        vocab_size=card,
        hidden_size=lm["dim"],
        num_hidden_layers=lm["num_layers"],
        num_attention_heads=lm["num_heads"],
        ffn_dim=int(lm["hidden_scale"] * lm["dim"]),
        num_codebooks=lm["n_q"],
        audio_channels=1,
        activation_function="gelu",
        scale_embedding=False,
        dropout=float(lm.get("dropout") or 0.0),
        attention_dropout=float(lm.get("attention_dropout") or 0.0),
        pad_token_id=card,
        bos_token_id=card,
        tie_word_embeddings=False,
    )
