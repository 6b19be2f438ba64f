"""MusicGen between AudioCraft's snapshot layout and the transformers format, both directions, offline.

    import_hf(hf_folder, out)            transformers folder -> state_dict.bin + compression_state_dict.bin + t5/
    export_hf(audiocraft_folder, out)    AudioCraft folder -> config.json + model.safetensors + processor files
    ensure_audiocraft_layout(folder)     a transformers-only folder converted once into <output>/hf_cache/

Every tensor is converted by name and shape through an explicit table of links (`lm_links`, `encodec_links`,
`t5_links`), checked against the state dicts of the target models built on the meta device: each source tensor
must be used exactly once and each target tensor filled exactly once, or one `UnmappedTensorsError` lists what
did not map on both sides. The name correspondences:

    AudioCraft LM (state_dict.bin)                              transformers MusicgenForConditionalGeneration
    condition_provider.conditioners.description.output_proj.*  enc_to_dec_proj.*
    emb.{k}.weight                                              decoder.model.decoder.embed_tokens.{k}.weight
    transformer.layers.{i}.self_attn.in_proj_weight             ...layers.{i}.self_attn.{q,k,v}_proj.weight (fused)
    transformer.layers.{i}.cross_attention.in_proj_weight       ...layers.{i}.encoder_attn.{q,k,v}_proj.weight
    transformer.layers.{i}.{self_attn,cross_attention}.out_proj  ...layers.{i}.{self_attn,encoder_attn}.out_proj
    transformer.layers.{i}.norm1 / norm_cross / norm2           ...self_attn_layer_norm / encoder_attn_layer_norm /
                                                                   final_layer_norm
    transformer.layers.{i}.linear1 / linear2                    ...layers.{i}.fc1 / fc2
    out_norm.*                                                  decoder.model.decoder.layer_norm.*
    linears.{k}.weight                                          decoder.lm_heads.{k}.weight
    EnCodec (compression_state_dict.bin)                        audio_encoder.*
    {encoder,decoder}.model.{i}.conv.conv.weight_{g,v}          {encoder,decoder}.layers.{j}.conv.parametrizations
                                                                   .weight.original{0,1} (j: see `seanet_layout`)
    decoder.model.{i}.convtr.convtr.*                           decoder.layers.{j}.conv.*
    {..}.model.{i}.lstm.*  /  {..}.model.{i}.block.{1,3}.conv.conv.*   {..}.layers.{j}.lstm.* / .block.{1,3}.conv.*
    quantizer.vq.layers.{q}._codebook.*                         quantizer.layers.{q}.codebook.*
    t5/ (T5EncoderModel.save_pretrained)                        text_encoder.*

Two AudioCraft variants have no transformers module and are represented exactly instead: a SEANet without LSTM
(`seanet.lstm: 0`, the tiny model) is an all-zero 1-layer LSTM in transformers (an LSTM with zero weights outputs
zeros, and the block adds its input back, so it is the identity), converted back to `lstm: 0`; a T5 as wide as the
decoder has no `enc_to_dec_proj` in transformers, which is an identity projection in AudioCraft.

The EnCodec padding mode is taken from the source config (transformers' musicgen 32 kHz EnCodec says `reflect`,
AudioCraft's own 32 kHz EnCodec `constant`; they differ only near the edges of the audio); `pad_mode=` overrides it.
Unsupported variants (stereo, melody/chroma conditioning, patterns other than MusicGen's delay, biases, post-norm,
...) are refused with an `UnsupportedModelError` naming every difference.
"""
import dataclasses
import hashlib
import json
import logging
import typing as tp
import warnings
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from . import model_dir, output_dir
from .files import replaced_when_complete

CONVERTER_VERSION = 1       # part of the cache key: bump when a conversion changes
CACHE_SUBDIR = "hf_cache"
HF_CONFIG = "config.json"
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
IMPORT_INFO = "hf_import.json"
LM_PREFIX, COMPRESSION_PREFIX, T5_PREFIX, BASE_PREFIX = "lm:", "compression:", "t5:", "base:"
OUTPUT_PROJ = "condition_provider.conditioners.description.output_proj"
LM_SOLVER = "solver=finetune/musicgen_small"
COMPRESSION_SOLVER = "solver=compression/encodec_musicgen_32khz"
PAD_MODES = ("constant", "reflect", "replicate", "circular")
MAX_LISTED = 30


class ConversionError(ValueError):
    """A model cannot be converted; the message says why."""


class UnsupportedModelError(ConversionError):
    """The model is a variant the other library (or this converter) cannot represent: stereo, melody, ..."""


class UnmappedTensorsError(ConversionError):
    """Some tensors did not map; the lists name them on both sides."""

    def __init__(self, what: str, unused: tp.Sequence[str] = (), reused: tp.Sequence[str] = (),
                 absent: tp.Sequence[str] = (), unfilled: tp.Sequence[str] = (), unexpected: tp.Sequence[str] = (),
                 twice: tp.Sequence[str] = (), mismatched: tp.Sequence[str] = ()):
        self.unused, self.reused, self.absent = list(unused), list(reused), list(absent)
        self.unfilled, self.unexpected, self.twice, self.mismatched = (list(unfilled), list(unexpected),
                                                                        list(twice), list(mismatched))
        parts = []
        for label, names in (("source tensors not used", self.unused), ("source tensors used twice", self.reused),
                             ("source tensors expected but absent", self.absent),
                             ("target tensors not filled", self.unfilled),
                             ("target tensors the target model does not have", self.unexpected),
                             ("target tensors filled twice", self.twice), ("shape mismatches", self.mismatched)):
            if names:
                shown = ", ".join(names[:MAX_LISTED]) + (f", ... ({len(names) - MAX_LISTED} more)"
                                                         if len(names) > MAX_LISTED else "")
                parts.append(f"{len(names)} {label}: {shown}")
        super().__init__(f"{what}: the tensors do not map one to one.\n  " + "\n  ".join(parts))


class NotAModelFolderError(model_dir.ModelDirError):
    """A folder is neither a transformers MusicGen nor an AudioCraft model folder."""


# ----------------------------------------------------------------------------------------------- the mapping engine

Tensors = tp.List[torch.Tensor]
Shapes = tp.List[tp.Optional[torch.Size]]


def _same(tensors: Tensors, shapes: Shapes) -> Tensors:
    return list(tensors)


@dataclasses.dataclass(frozen=True)
class Rule:
    """Target tensors `targets` = fn(source tensors `sources`, target shapes)."""
    sources: tp.Tuple[str, ...]
    targets: tp.Tuple[str, ...]
    fn: tp.Callable[[Tensors, Shapes], Tensors] = _same


@dataclasses.dataclass(frozen=True)
class Link:
    """The same weights under AudioCraft names `ac` and transformers names `hf`, and how to go each way."""
    ac: tp.Tuple[str, ...]
    hf: tp.Tuple[str, ...]
    to_hf: tp.Callable[[Tensors, Shapes], Tensors] = _same
    to_ac: tp.Callable[[Tensors, Shapes], Tensors] = _same

    def rule(self, direction: str) -> Rule:
        if direction == "to_hf":
            return Rule(self.ac, self.hf, self.to_hf)
        return Rule(self.hf, self.ac, self.to_ac)


def apply_rules(rules: tp.Iterable[Rule], source: tp.Mapping[str, torch.Tensor],
                expected: tp.Mapping[str, tp.Sequence[int]], what: str) -> tp.Dict[str, torch.Tensor]:
    """The target state dict, or an UnmappedTensorsError listing every name that did not map, on both sides."""
    uses: tp.Dict[str, int] = {}
    produced: tp.Dict[str, torch.Tensor] = {}
    absent, unexpected, twice, mismatched = [], [], [], []
    for rule in rules:
        missing = [name for name in rule.sources if name not in source]
        if missing:
            absent += missing
            continue
        for name in rule.sources:
            uses[name] = uses.get(name, 0) + 1
        shapes = [torch.Size(expected[t]) if t in expected else None for t in rule.targets]
        outputs = rule.fn([source[name] for name in rule.sources], shapes)
        for target, tensor in zip(rule.targets, outputs, strict=True):
            if target in produced:
                twice.append(target)
            elif target not in expected:
                unexpected.append(target)
            elif tuple(tensor.shape) != tuple(expected[target]):
                mismatched.append(f"{target} {tuple(tensor.shape)} from {', '.join(rule.sources) or 'nothing'}, "
                                  f"expected {tuple(expected[target])}")
            produced[target] = tensor
    unused = [name for name in source if name not in uses]
    reused = [name for name, count in uses.items() if count > 1]
    unfilled = [name for name in expected if name not in produced]
    if unused or reused or absent or unfilled or unexpected or twice or mismatched:
        raise UnmappedTensorsError(what, unused, reused, absent, unfilled, unexpected, twice, mismatched)
    return {name: produced[name] for name in expected}


def _prefixed(state: tp.Mapping[str, tp.Any], prefix: str) -> tp.Dict[str, tp.Any]:
    return {prefix + key: value for key, value in state.items()}


def _unprefixed(state: tp.Mapping[str, tp.Any], prefix: str) -> tp.Dict[str, tp.Any]:
    return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}


def _values_known(tensors: Tensors) -> bool:
    return not any(t.is_meta for t in tensors)


# ------------------------------------------------------------------------------------------------------ the LM

def _split3(tensors: Tensors, shapes: Shapes) -> Tensors:
    (fused,) = tensors
    if fused.shape[0] % 3:
        return [fused, fused, fused]  # reported as a shape mismatch
    size = fused.shape[0] // 3
    return [fused[i * size:(i + 1) * size].clone() for i in range(3)]


def _cat3(tensors: Tensors, shapes: Shapes) -> Tensors:
    return [torch.cat(tensors, dim=0)]


def _identity_projection(tensors: Tensors, shapes: Shapes) -> Tensors:
    weight_shape, bias_shape = shapes
    if weight_shape is None or bias_shape is None or weight_shape[0] != weight_shape[1]:
        return []
    return [torch.eye(weight_shape[0]), torch.zeros(bias_shape)]


def _drop_identity_projection(tensors: Tensors, shapes: Shapes) -> Tensors:
    weight, bias = tensors
    if _values_known(tensors) and (weight.shape[0] != weight.shape[1] or not torch.equal(
            weight.float(), torch.eye(weight.shape[0])) or bool(bias.float().abs().max() > 0)):
        raise UnsupportedModelError(
            f"The T5 width equals the decoder width ({weight.shape[1]}), so transformers' MusicGen has no "
            f"projection (enc_to_dec_proj), but this model's {OUTPUT_PROJ} is not the identity.")
    return []


def lm_links(num_layers: int, num_codebooks: int, projection: bool) -> tp.List[Link]:
    """The AudioCraft LM (`lm:` names) <-> transformers decoder and projection."""
    dec = "decoder.model.decoder"
    links = []
    if projection:
        links += [Link((f"{LM_PREFIX}{OUTPUT_PROJ}.{p}",), (f"enc_to_dec_proj.{p}",)) for p in ("weight", "bias")]
    else:
        links.append(Link((f"{LM_PREFIX}{OUTPUT_PROJ}.weight", f"{LM_PREFIX}{OUTPUT_PROJ}.bias"), (),
                          to_hf=_drop_identity_projection, to_ac=_identity_projection))
    for k in range(num_codebooks):
        links.append(Link((f"{LM_PREFIX}emb.{k}.weight",), (f"{dec}.embed_tokens.{k}.weight",)))
        links.append(Link((f"{LM_PREFIX}linears.{k}.weight",), (f"decoder.lm_heads.{k}.weight",)))
    for i in range(num_layers):
        ac, hf = f"{LM_PREFIX}transformer.layers.{i}", f"{dec}.layers.{i}"
        for ac_attn, hf_attn in (("self_attn", "self_attn"), ("cross_attention", "encoder_attn")):
            links.append(Link((f"{ac}.{ac_attn}.in_proj_weight",),
                              tuple(f"{hf}.{hf_attn}.{p}_proj.weight" for p in "qkv"), _split3, _cat3))
            links.append(Link((f"{ac}.{ac_attn}.out_proj.weight",), (f"{hf}.{hf_attn}.out_proj.weight",)))
        for ac_name, hf_name in (("norm1", "self_attn_layer_norm"), ("norm_cross", "encoder_attn_layer_norm"),
                                 ("norm2", "final_layer_norm")):
            links += [Link((f"{ac}.{ac_name}.{p}",), (f"{hf}.{hf_name}.{p}",)) for p in ("weight", "bias")]
        links += [Link((f"{ac}.linear{n}.weight",), (f"{hf}.fc{n}.weight",)) for n in (1, 2)]
    links += [Link((f"{LM_PREFIX}out_norm.{p}",), (f"{dec}.layer_norm.{p}",)) for p in ("weight", "bias")]
    return links


# --------------------------------------------------------------------------------------------------- EnCodec

def seanet_layout(part: str, num_ratios: int, num_residual_layers: int, lstm: bool) -> tp.List[str]:
    """The kinds of SEANet's sequential layers, in order, as both libraries build them ('elu' has no weights).
    AudioCraft leaves the LSTM out when it has 0 layers, transformers always has one: indices shift after it."""
    layers = ["conv"]
    if part == "encoder":
        for _ in range(num_ratios):
            layers += ["res"] * num_residual_layers + ["elu", "conv"]
        layers += (["lstm"] if lstm else []) + ["elu", "conv"]
    else:
        layers += ["lstm"] if lstm else []
        for _ in range(num_ratios):
            layers += ["elu", "convtr"] + ["res"] * num_residual_layers
        layers += ["elu", "conv"]
    return layers


def _weight_norm_links(ac: str, hf: str) -> tp.List[Link]:
    return [Link((f"{ac}.weight_g",), (f"{hf}.parametrizations.weight.original0",)),
            Link((f"{ac}.weight_v",), (f"{hf}.parametrizations.weight.original1",)),
            Link((f"{ac}.bias",), (f"{hf}.bias",))]


LSTM_TENSORS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")


def _zero_lstm(tensors: Tensors, shapes: Shapes) -> Tensors:
    return [torch.zeros(shape) for shape in shapes if shape is not None]


def _drop_zero_lstm(tensors: Tensors, shapes: Shapes) -> Tensors:
    if _values_known(tensors) and any(bool(t.abs().max() > 0) for t in tensors):
        raise ConversionError("An LSTM that AudioCraft does not have (seanet.lstm: 0) has non-zero weights.")
    return []


def encodec_links(ratios: tp.Sequence[int], num_residual_layers: int, lstm_layers: int, true_skip: bool,
                  num_quantizers: int, hf_lstm_layers: int = 1) -> tp.List[Link]:
    """AudioCraft's EnCodec (`compression:` names) <-> transformers' EncodecModel (`audio_encoder.` names).
    With `lstm_layers == 0`, transformers' mandatory LSTM (`hf_lstm_layers` layers) is all zero: an identity."""
    ac_root, hf_root = f"{COMPRESSION_PREFIX}", "audio_encoder."
    links = []
    for part in ("encoder", "decoder"):
        ac_layers = [(i, kind) for i, kind in enumerate(seanet_layout(part, len(ratios), num_residual_layers,
                                                                      lstm_layers > 0)) if kind != "elu"]
        hf_layers = [(j, kind) for j, kind in enumerate(seanet_layout(part, len(ratios), num_residual_layers,
                                                                      True)) if kind != "elu"]
        ac_iter = iter(ac_layers)
        for j, kind in hf_layers:
            hf = f"{hf_root}{part}.layers.{j}"
            if kind == "lstm" and lstm_layers == 0:
                links.append(Link((), tuple(f"{hf}.lstm.{t}_l{n}" for n in range(hf_lstm_layers)
                                            for t in LSTM_TENSORS), _zero_lstm, _drop_zero_lstm))
                continue
            i, ac_kind = next(ac_iter)
            assert ac_kind == kind, (part, i, j, ac_kind, kind)
            ac = f"{ac_root}{part}.model.{i}"
            if kind == "conv":
                links += _weight_norm_links(f"{ac}.conv.conv", f"{hf}.conv")
            elif kind == "convtr":
                links += _weight_norm_links(f"{ac}.convtr.convtr", f"{hf}.conv")
            elif kind == "res":
                for b in (1, 3):
                    links += _weight_norm_links(f"{ac}.block.{b}.conv.conv", f"{hf}.block.{b}.conv")
                if not true_skip:
                    links += _weight_norm_links(f"{ac}.shortcut.conv.conv", f"{hf}.shortcut.conv")
            elif kind == "lstm":
                links += [Link((f"{ac}.lstm.{t}_l{n}",), (f"{hf}.lstm.{t}_l{n}",))
                          for n in range(lstm_layers) for t in LSTM_TENSORS]
    for q in range(num_quantizers):
        links += [Link((f"{ac_root}quantizer.vq.layers.{q}._codebook.{t}",),
                       (f"{hf_root}quantizer.layers.{q}.codebook.{t}",))
                  for t in ("inited", "cluster_size", "embed", "embed_avg")]
    return links


def t5_links(t5_keys: tp.Iterable[str]) -> tp.List[Link]:
    """A T5EncoderModel's own names (`t5:`) <-> `text_encoder.` in transformers' MusicGen."""
    return [Link((T5_PREFIX + key,), ("text_encoder." + key,)) for key in t5_keys]


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
    from unittest import mock
    from audiocraft.models import builders
    from audiocraft.modules import conditioners
    from . import patches
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
        with mock.patch.object(T5Conditioner, "MODELS", [*T5Conditioner.MODELS, name]), \
                mock.patch.dict(T5Conditioner.MODELS_DIMS, {name: t5_width}), \
                mock.patch.object(conditioners, "T5EncoderModel", _NoT5), \
                mock.patch.object(conditioners, "T5Tokenizer", _NoT5):
            return _shapes(builders.get_lm_model(cfg))
    finally:
        log.setLevel(level)


def audiocraft_compression_shapes(cfg: DictConfig) -> tp.Dict[str, torch.Size]:
    from audiocraft.models import builders
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    cfg.device = "meta"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # AudioCraft's SEANet uses the old weight_norm API
        return _shapes(builders.get_compression_model(cfg))


# ------------------------------------------------------------------------------------- configs, both ways

def _hydra(value: tp.Any) -> str:
    return model_dir.hydra_value(value)


def _problems_error(what: str, problems: tp.List[str]) -> UnsupportedModelError:
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
            + (" (MusicGen-Melody's chroma conditioning has no equivalent in the harness's AudioCraft config)."
               if kind == "musicgen_melody" else "."))
    dec, text, audio = config.decoder, config.text_encoder, config.audio_encoder
    if dec.audio_channels != 1 or audio.audio_channels != 1:
        problems.append(f"stereo (decoder audio_channels {dec.audio_channels}, EnCodec {audio.audio_channels}): "
                        "only mono MusicGen converts")
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
            problems.append(f"decoder num_codebooks {dec.num_codebooks} > EnCodec's {audio.num_quantizers} "
                            "quantizers")
    cross = getattr(dec, "cross_attention_hidden_size", None)
    if text.hidden_size != dec.hidden_size and cross is not None:
        problems.append(f"cross_attention_hidden_size {cross} with a T5 of width {text.hidden_size} and a "
                        f"decoder of width {dec.hidden_size}")
    try:
        hidden_scale(dec.ffn_dim, dec.hidden_size)
    except UnsupportedModelError as err:
        problems.append(str(err))
    if problems:
        raise _problems_error("This transformers MusicGen", problems)


def lm_overrides_from_hf(config, guidance_scale: tp.Optional[float] = None) -> tp.List[str]:
    """`compose` overrides that give AudioCraft's musicgen_lm the architecture of a transformers decoder."""
    dec = config.decoder
    n_q = dec.num_codebooks
    overrides = [
        f"transformer_lm.dim={dec.hidden_size}", f"transformer_lm.num_heads={dec.num_attention_heads}",
        f"transformer_lm.num_layers={dec.num_hidden_layers}",
        f"transformer_lm.hidden_scale={_hydra(hidden_scale(dec.ffn_dim, dec.hidden_size))}",
        f"transformer_lm.n_q={n_q}", f"transformer_lm.card={dec.vocab_size}",
        "codebooks_pattern.modeling=delay", f"codebooks_pattern.delay.delays={_hydra(list(range(n_q)))}",
        "codebooks_pattern.delay.flatten_first=0", "codebooks_pattern.delay.empty_initial=0",
        f"sample_rate={config.audio_encoder.sampling_rate}", "channels=1", "conditioners.description.model=t5",
    ]
    if guidance_scale is not None:
        overrides.append(f"classifier_free_guidance.inference_coef={_hydra(float(guidance_scale))}")
    return overrides


def compression_overrides_from_hf(audio, lstm_layers: int, pad_mode: tp.Optional[str] = None) -> tp.List[str]:
    """`compose` overrides that give AudioCraft's SEANet EnCodec the architecture of a transformers EncodecModel."""
    return [
        f"sample_rate={audio.sampling_rate}", "channels=1", f"encodec.causal={_hydra(bool(audio.use_causal_conv))}",
        f"encodec.renormalize={_hydra(bool(audio.normalize))}",
        f"seanet.dimension={audio.hidden_size}", f"seanet.n_filters={audio.num_filters}",
        f"seanet.n_residual_layers={audio.num_residual_layers}",
        f"seanet.ratios={_hydra(list(audio.upsampling_ratios))}", "seanet.activation=ELU", "seanet.norm=weight_norm",
        f"seanet.kernel_size={audio.kernel_size}", f"seanet.last_kernel_size={audio.last_kernel_size}",
        f"seanet.residual_kernel_size={audio.residual_kernel_size}",
        f"seanet.dilation_base={audio.dilation_growth_rate}", f"seanet.pad_mode={pad_mode or audio.pad_mode}",
        f"seanet.true_skip={_hydra(not audio.use_conv_shortcut)}", f"seanet.compress={audio.compress}",
        f"seanet.lstm={lstm_layers}", "seanet.disable_norm_outer_blocks=0",
        f"seanet.decoder.trim_right_ratio={_hydra(float(audio.trim_right_ratio))}",
        f"rvq.bins={audio.codebook_size}", f"rvq.n_q={audio.num_quantizers}",
    ]


def _select(cfg: DictConfig, key: str, default: tp.Any = None) -> tp.Any:
    value = OmegaConf.select(cfg, key, default=default)
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def check_audiocraft_lm_cfg(cfg: DictConfig) -> None:
    """Refuse AudioCraft LMs that transformers' MusicgenForCausalLM cannot represent (names every difference)."""
    problems = []
    expected = {"lm_model": "transformer_lm", "channels": 1, "transformer_lm.norm_first": True,
                "transformer_lm.norm": "layer_norm", "transformer_lm.bias_ff": False,
                "transformer_lm.bias_attn": False, "transformer_lm.bias_proj": False,
                "transformer_lm.layer_scale": None, "transformer_lm.positional_embedding": "sin",
                "transformer_lm.activation": "gelu", "transformer_lm.qk_layer_norm": False,
                "transformer_lm.qk_layer_norm_cross": False, "transformer_lm.kv_repeat": 1,
                "transformer_lm.causal": True, "transformer_lm.past_context": None,
                "codebooks_pattern.modeling": "delay", "conditioners.description.model": "t5",
                "conditioners.description.t5.finetune": False, "fuser.cross": ["description"],
                "fuser.sum": [], "fuser.prepend": [], "fuser.input_interpolate": [],
                "fuser.cross_attention_pos_emb": False}
    for key, wanted in expected.items():
        value = _select(cfg, key, default=wanted)
        if value != wanted:
            why = ("a T5 fine-tuned inside the LM is not supported" if key.endswith("t5.finetune")
                   else f"transformers' MusicGen needs {wanted!r}")
            problems.append(f"{key}: {value!r} ({why})")
    for key, wanted in (("transformer_lm.max_period", 10000), ("transformer_lm.positional_scale", 1.0)):
        value = _select(cfg, key, default=wanted)
        if value is not None and value != wanted:
            problems.append(f"{key}: {value!r} (transformers' MusicGen needs {wanted!r})")
    if not (_select(cfg, "transformer_lm.custom", False) or _select(cfg, "transformer_lm.memory_efficient", False)):
        problems.append("transformer_lm.custom and memory_efficient are both false (torch MHA key names; the "
                        "released MusicGen checkpoints use memory_efficient: true)")
    n_q = _select(cfg, "transformer_lm.n_q")
    delays = _select(cfg, "codebooks_pattern.delay.delays")
    if _select(cfg, "codebooks_pattern.modeling") == "delay" and (
            delays != list(range(n_q or 0)) or _select(cfg, "codebooks_pattern.delay.flatten_first", 0) != 0
            or _select(cfg, "codebooks_pattern.delay.empty_initial", 0) != 0):
        problems.append(f"codebooks_pattern.delay: delays {delays}, flatten_first "
                        f"{_select(cfg, 'codebooks_pattern.delay.flatten_first', 0)}, empty_initial "
                        f"{_select(cfg, 'codebooks_pattern.delay.empty_initial', 0)} (transformers' MusicGen "
                        f"always delays codebook k by k steps: delays {list(range(n_q or 0))}, 0, 0)")
    others = sorted(k for k in (_select(cfg, "conditioners", {}) or {}) if k not in ("description", "args"))
    if others:
        problems.append(f"conditioners {others} besides the text description (melody/chroma, ... conditioning "
                        "has no equivalent in transformers' MusicgenForConditionalGeneration)")
    dim, heads = _select(cfg, "transformer_lm.dim"), _select(cfg, "transformer_lm.num_heads")
    if dim and heads and dim % heads:
        problems.append(f"transformer_lm.dim {dim} is not a multiple of num_heads {heads}")
    if problems:
        raise _problems_error("This AudioCraft LM", problems)


def _seanet_kwargs(cfg: DictConfig, part: str) -> dict:
    seanet = _select(cfg, "seanet")
    overrides = seanet.pop(part, {}) or {}
    seanet.pop("encoder" if part == "decoder" else "decoder", None)
    return {**seanet, **overrides}


def check_audiocraft_compression_cfg(cfg: DictConfig) -> None:
    problems = []
    if _select(cfg, "compression_model") != "encodec" or _select(cfg, "encodec.autoencoder") != "seanet" \
            or _select(cfg, "encodec.quantizer") != "rvq":
        problems.append(f"compression model {_select(cfg, 'compression_model')} / "
                        f"{_select(cfg, 'encodec.autoencoder')} / {_select(cfg, 'encodec.quantizer')} "
                        "(only encodec / seanet / rvq)")
    else:
        encoder, decoder = _seanet_kwargs(cfg, "encoder"), _seanet_kwargs(cfg, "decoder")
        decoder_only = ("trim_right_ratio", "final_activation", "final_activation_params")
        for key in sorted(set(encoder) | set(decoder)):
            if key not in decoder_only and encoder.get(key) != decoder.get(key):
                problems.append(f"seanet.{key} differs between encoder ({encoder.get(key)!r}) and decoder "
                                f"({decoder.get(key)!r})")
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
        bins = _select(cfg, "rvq.bins")
        if not bins or bins & (bins - 1):
            problems.append(f"rvq.bins {bins} is not a power of 2 (transformers' EnCodec requires it)")
    if problems:
        raise _problems_error("This AudioCraft EnCodec", problems)


def target_bandwidth(num_quantizers: int, sample_rate: int, hop_length: int, codebook_size: int) -> float:
    """The one target bandwidth (kbps) for which transformers' EncodecConfig allocates `num_quantizers`
    (`num_quantizers = int(1000 * bandwidth // (frame_rate * log2(codebook_size)))`)."""
    import math
    frame_rate = math.ceil(sample_rate / hop_length)
    bits = math.ceil(math.log2(codebook_size))
    bandwidth = num_quantizers * frame_rate * bits / 1000
    for nudge in (0.0, 1e-9, 1e-6):
        candidate = bandwidth + nudge
        if int(1000 * candidate // (frame_rate * bits)) == num_quantizers and \
                int(max(1, math.floor(candidate * 1000 / (bits * frame_rate)))) == num_quantizers:
            return candidate
    raise ConversionError(f"No target bandwidth gives {num_quantizers} quantizers.")


def encodec_config_from_audiocraft(cfg: DictConfig):
    """transformers' EncodecConfig for an AudioCraft SEANet EnCodec config."""
    from transformers import EncodecConfig
    encoder, decoder = _seanet_kwargs(cfg, "encoder"), _seanet_kwargs(cfg, "decoder")
    ratios = list(encoder["ratios"])
    sample_rate = int(_select(cfg, "encodec.sample_rate", _select(cfg, "sample_rate")))
    bins, n_q = int(_select(cfg, "rvq.bins")), int(_select(cfg, "rvq.n_q"))
    hop = 1
    for r in ratios:
        hop *= r
    return EncodecConfig(
        target_bandwidths=[target_bandwidth(n_q, sample_rate, hop, bins)], sampling_rate=sample_rate,
        audio_channels=1, normalize=bool(_select(cfg, "encodec.renormalize", False)), chunk_length_s=None,
        overlap=None, hidden_size=encoder["dimension"], num_filters=encoder["n_filters"],
        num_residual_layers=encoder["n_residual_layers"], upsampling_ratios=ratios, norm_type="weight_norm",
        kernel_size=encoder["kernel_size"], last_kernel_size=encoder["last_kernel_size"],
        residual_kernel_size=encoder["residual_kernel_size"], dilation_growth_rate=encoder["dilation_base"],
        use_causal_conv=bool(encoder["causal"]), pad_mode=encoder["pad_mode"], compress=encoder["compress"],
        num_lstm_layers=max(1, int(encoder["lstm"])), trim_right_ratio=float(decoder.get("trim_right_ratio", 1.0)),
        codebook_size=bins, codebook_dim=encoder["dimension"], use_conv_shortcut=not encoder["true_skip"])


def decoder_config_from_audiocraft(cfg: DictConfig):
    from transformers import MusicgenDecoderConfig
    lm = _select(cfg, "transformer_lm")
    card = int(lm["card"])
    return MusicgenDecoderConfig(
        vocab_size=card, hidden_size=lm["dim"], num_hidden_layers=lm["num_layers"],
        num_attention_heads=lm["num_heads"], ffn_dim=int(lm["hidden_scale"] * lm["dim"]),
        num_codebooks=lm["n_q"], audio_channels=1, activation_function="gelu", scale_embedding=False,
        dropout=float(lm.get("dropout") or 0.0), attention_dropout=float(lm.get("attention_dropout") or 0.0),
        pad_token_id=card, bos_token_id=card, tie_word_embeddings=False)


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
        f"has {model_dir.LM_FILE} and {model_dir.COMPRESSION_FILE}. Found: {found}.")


def _read_hf_config(folder: Path):
    from transformers import AutoConfig
    raw = json.loads((folder / HF_CONFIG).read_text())
    if raw.get("model_type") != "musicgen":
        raise UnsupportedModelError(
            f"{folder / HF_CONFIG} has model_type {raw.get('model_type')!r}; only 'musicgen' converts"
            + (" (MusicGen-Melody's chroma conditioning is not supported)."
               if raw.get("model_type") == "musicgen_melody" else "."))
    return AutoConfig.from_pretrained(folder)


def load_hf(folder: tp.Union[str, Path]):
    """transformers' MusicGen from a local folder, in float32, refusing missing or unexpected tensors."""
    folder = Path(folder).expanduser().resolve()
    if not is_hf_folder(folder):
        raise _neither(folder, "a transformers MusicGen folder")
    check_hf_config(_read_hf_config(folder))
    from transformers import MusicgenForConditionalGeneration
    model, info = MusicgenForConditionalGeneration.from_pretrained(folder, output_loading_info=True,
                                                                   dtype=torch.float32)
    bad = {k: v for k, v in info.items() if k != "error_msgs" and v}
    if bad or info.get("error_msgs"):
        raise UnmappedTensorsError(f"{folder}", unused=bad.get("unexpected_keys", []),
                                   unfilled=bad.get("missing_keys", []),
                                   mismatched=[str(m) for m in bad.get("mismatched_keys", [])])
    return model.eval()


def _lstm_is_zero(state: tp.Mapping[str, torch.Tensor]) -> bool:
    lstm = [v for k, v in state.items() if k.startswith("audio_encoder.") and ".lstm." in k]
    return bool(lstm) and _values_known(lstm) and all(not bool(v.abs().max() > 0) for v in lstm)


@dataclasses.dataclass
class ImportPlan:
    """What import_hf converts: the rules and the AudioCraft configs they fill."""
    lm_cfg: DictConfig
    compression_cfg: DictConfig
    rules: tp.List[Rule]
    expected: tp.Dict[str, torch.Size]


def plan_import(config, hf_state: tp.Mapping[str, torch.Tensor], guidance_scale: tp.Optional[float] = None,
                pad_mode: tp.Optional[str] = None) -> ImportPlan:
    """Configs and rules from a transformers MusicGen config and (possibly meta) state dict to AudioCraft."""
    from .config import compose
    check_hf_config(config)
    if pad_mode is not None and pad_mode not in PAD_MODES:
        raise ConversionError(f"pad_mode {pad_mode!r}: use one of {', '.join(PAD_MODES)}.")
    dec, text, audio = config.decoder, config.text_encoder, config.audio_encoder
    lstm_layers = 0 if _lstm_is_zero(hf_state) else audio.num_lstm_layers
    lm_cfg = compose([LM_SOLVER, *lm_overrides_from_hf(config, guidance_scale),
                      f"conditioners.description.t5.name={model_dir.T5_SUBDIR}"])
    compression_cfg = compose([COMPRESSION_SOLVER, *compression_overrides_from_hf(audio, lstm_layers, pad_mode)])
    projection = text.hidden_size != dec.hidden_size
    links = (lm_links(dec.num_hidden_layers, dec.num_codebooks, projection)
             + encodec_links(audio.upsampling_ratios, audio.num_residual_layers, lstm_layers,
                             not audio.use_conv_shortcut, audio.num_quantizers, audio.num_lstm_layers)
             + t5_links(t5_shapes(text)))
    expected = {**_prefixed(audiocraft_lm_shapes(lm_cfg, text.hidden_size), LM_PREFIX),
                **_prefixed(audiocraft_compression_shapes(compression_cfg), COMPRESSION_PREFIX),
                **_prefixed(t5_shapes(text), T5_PREFIX)}
    return ImportPlan(lm_cfg, compression_cfg, [link.rule("to_ac") for link in links], expected)


def _package(cfg: DictConfig, state: dict, **extra) -> dict:
    from .tiny_model import _plain_cfg
    return {"best_state": state, "xp.cfg": _plain_cfg(cfg), **extra}


def import_hf(hf_folder: tp.Union[str, Path], out_folder: tp.Union[str, Path],
              pad_mode: tp.Optional[str] = None) -> Path:
    """Write the AudioCraft snapshot layout (state_dict.bin, compression_state_dict.bin, t5/) of a transformers
    MusicGen folder, so that `MODEL=<out>` trains offline with nothing else. `pad_mode` overrides the EnCodec
    padding mode of the transformers config (e.g. 'constant', AudioCraft's own for musicgen's 32 kHz EnCodec)."""
    source = Path(hf_folder).expanduser().resolve()
    out = Path(out_folder).expanduser().resolve()
    if source == out:
        raise ConversionError(f"The output folder must differ from the transformers folder ({source}).")
    model = load_hf(source)
    import audiocraft
    from transformers import GenerationConfig, T5EncoderModel, T5Tokenizer
    try:
        tokenizer = T5Tokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError) as err:
        raise model_dir.ModelDirError(
            f"{source} has no sentencepiece T5 tokenizer (spiece.model), which AudioCraft's T5 conditioner "
            f"needs: save the processor with AutoProcessor.save_pretrained ({err}).") from err
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
        t5.load_state_dict(_unprefixed(converted, T5_PREFIX), strict=True, assign=True)
        t5.tie_weights()
        t5.save_pretrained(t5_dir, safe_serialization=True)
        tokenizer.save_pretrained(t5_dir)
        # conditioners.description.t5.name is `t5`: found beside the model, wherever the folder is moved
        torch.save(_package(plan.lm_cfg, _unprefixed(converted, LM_PREFIX), version=audiocraft.__version__,
                            exported=True), staging / model_dir.LM_FILE)
        torch.save(_package(plan.compression_cfg, _unprefixed(converted, COMPRESSION_PREFIX)),
                   staging / model_dir.COMPRESSION_FILE)
        (staging / IMPORT_INFO).write_text(json.dumps({
            "source": str(source), "converter_version": CONVERTER_VERSION, "key": source_key(source),
            "pad_mode": _select(plan.compression_cfg, "seanet.pad_mode"), "tensors": len(converted)}, indent=2) + "\n")
        (staging / "README.md").write_text(
            f"# MusicGen imported from {source}\n\nConverted from the transformers format by "
            "`musicgen_finetune.hf_bridge.import_hf`: state_dict.bin (LM), compression_state_dict.bin (EnCodec) "
            "and t5/ (the model's own T5 encoder and tokenizer), in the facebook/musicgen-small snapshot layout.\n"
            "Train it with `make train MODEL=<this folder> NAME=<dataset>`; export it back with `make export-hf`.\n")
    return out


# ------------------------------------------------------------------------------------------------------ export

@dataclasses.dataclass
class ExportPlan:
    config: tp.Any              # transformers MusicgenConfig
    rules: tp.List[Rule]
    expected: tp.Dict[str, torch.Size]


def plan_export(lm_cfg: DictConfig, compression_cfg: tp.Optional[DictConfig], t5_config,
                lm_state: tp.Mapping[str, torch.Tensor], base_config=None) -> ExportPlan:
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
        problems.append(f"the LM's {OUTPUT_PROJ} takes a T5 of width {proj_weight.shape[1]}, the T5 has "
                        f"{text_config.d_model}")
    if audio_config.codebook_size != decoder.vocab_size:
        problems.append(f"the LM's card {decoder.vocab_size} != the EnCodec's codebook size "
                        f"{audio_config.codebook_size}")
    if audio_config.num_quantizers < decoder.num_codebooks:
        problems.append(f"the LM models {decoder.num_codebooks} codebooks, the EnCodec has "
                        f"{audio_config.num_quantizers}")
    sample_rate = _select(lm_cfg, "sample_rate")
    if sample_rate is not None and int(sample_rate) != audio_config.sampling_rate:
        problems.append(f"the LM's sample_rate {sample_rate} != the EnCodec's {audio_config.sampling_rate}")
    if problems:
        raise _problems_error("This model", problems)
    config = MusicgenConfig.from_sub_models_config(text_config, audio_config, decoder)
    links = lm_links(decoder.num_hidden_layers, decoder.num_codebooks, text_config.d_model != decoder.hidden_size)
    rules = [link.rule("to_hf") for link in links]
    if base_config is None:
        encoder = _seanet_kwargs(compression_cfg, "encoder")
        rules += [link.rule("to_hf") for link in encodec_links(
            list(encoder["ratios"]), encoder["n_residual_layers"], int(encoder["lstm"]), bool(encoder["true_skip"]),
            int(_select(compression_cfg, "rvq.n_q")))]
        rules += [link.rule("to_hf") for link in t5_links(t5_shapes(text_config))]
    expected = hf_shapes(config)
    if base_config is not None:
        rules += [Rule((BASE_PREFIX + name,), (name,)) for name in expected
                  if name.startswith(("text_encoder.", "audio_encoder."))]
    return ExportPlan(config, rules, expected)


def _generation_config(card: int, frame_rate: float, guidance: float, base: tp.Optional[Path]):
    from transformers import GenerationConfig
    if base is not None and (base / "generation_config.json").is_file():
        config = GenerationConfig.from_pretrained(base)
    else:
        config = GenerationConfig(do_sample=True, top_k=250, guidance_scale=guidance,
                                  max_length=int(30 * frame_rate))  # musicgen-small: 30 s windows
    config.decoder_start_token_id = config.pad_token_id = config.bos_token_id = card
    return config


def export_hf(audiocraft_folder: tp.Union[str, Path], out_folder: tp.Union[str, Path],
              base_hf: tp.Optional[tp.Union[str, Path]] = None) -> Path:
    """Write a transformers MusicGen folder (config.json, model.safetensors, generation_config.json, processor)
    from an AudioCraft model folder. The decoder is converted from state_dict.bin (LoRA already merged by
    `make export`); the text and audio encoders come from `base_hf` (a transformers MusicGen folder) when given,
    else from the folder's own T5 (t5/ or the one its xp.cfg names) and compression_state_dict.bin."""
    from transformers import EncodecFeatureExtractor, MusicgenForConditionalGeneration, MusicgenProcessor, \
        T5Config, T5EncoderModel, T5Tokenizer, AutoProcessor
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
            raise UnsupportedModelError(f"{files.lm} is not conditioned on T5 text (conditioners.description.model "
                                        f"is {_select(lm_cfg, 'conditioners.description.model')!r}).")
        t5_config = T5Config.from_pretrained(files.t5)
        t5 = T5EncoderModel.from_pretrained(files.t5, dtype=torch.float32)
        source.update(_prefixed(t5.state_dict(), T5_PREFIX))
        source.update(_prefixed(compression_package["best_state"], COMPRESSION_PREFIX))
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
        source.update(_prefixed({k: v for k, v in base_model.state_dict().items()
                                 if k.startswith(("text_encoder.", "audio_encoder."))}, BASE_PREFIX))
    lm_state = {k: v.float() if v.is_floating_point() else v for k, v in lm_package["best_state"].items()}
    source.update(_prefixed(lm_state, LM_PREFIX))
    plan = plan_export(lm_cfg, compression_cfg, t5_config, lm_state, base_config)
    converted = apply_rules(plan.rules, source, plan.expected, f"{root} -> transformers")
    converted = {k: v.float() if v.is_floating_point() else v for k, v in converted.items()}
    with torch.device("meta"):
        model = MusicgenForConditionalGeneration(plan.config)
    model.load_state_dict(converted, strict=True, assign=True)
    model.tie_weights()
    audio = plan.config.audio_encoder
    model.generation_config = _generation_config(
        plan.config.decoder.vocab_size, audio.frame_rate,
        float(_select(lm_cfg, "classifier_free_guidance.inference_coef", 3.0)), base)
    if base is not None:
        processor = AutoProcessor.from_pretrained(base)
    else:
        processor = MusicgenProcessor(
            feature_extractor=EncodecFeatureExtractor(feature_size=1, sampling_rate=audio.sampling_rate,
                                                      padding_side="left", padding_value=0.0,
                                                      return_attention_mask=True),
            tokenizer=T5Tokenizer.from_pretrained(files.t5))
    with replaced_when_complete(out) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        processor.save_pretrained(staging)
        (staging / "README.md").write_text(
            f"# MusicGen exported from {root}\n\nWritten by `musicgen_finetune.hf_bridge.export_hf` in the "
            "transformers format: the decoder converted from the AudioCraft LM, the text and audio encoders "
            + (f"from {base}" if base else "converted from the model's own T5 and EnCodec") + ".\n\n"
            "    from transformers import AutoProcessor, MusicgenForConditionalGeneration\n"
            "    model = MusicgenForConditionalGeneration.from_pretrained('<this folder>')\n"
            "    processor = AutoProcessor.from_pretrained('<this folder>')\n")
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
    names.update(n for n in ("generation_config.json", "spiece.model", "tokenizer_config.json")
                 if (folder / n).is_file())
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
    import fcntl
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
