"""How every tensor maps between AudioCraft's snapshot layout and the transformers format, both directions.

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
import typing as tp

import torch

from ...errors import UserError

LM_PREFIX, COMPRESSION_PREFIX, T5_PREFIX, BASE_PREFIX = "lm:", "compression:", "t5:", "base:"
OUTPUT_PROJ = "condition_provider.conditioners.description.output_proj"
MAX_LISTED = 30


class ConversionError(UserError, ValueError):
    """A model cannot be converted; the message says why."""


class UnsupportedModelError(ConversionError):
    """The model is a variant the other library (or this converter) cannot represent: stereo, melody, ..."""


class UnmappedTensorsError(ConversionError):
    """Some tensors did not map; the lists name them on both sides."""

    def __init__(
        self,
        what: str,
        unused: tp.Sequence[str] = (),
        reused: tp.Sequence[str] = (),
        absent: tp.Sequence[str] = (),
        unfilled: tp.Sequence[str] = (),
        unexpected: tp.Sequence[str] = (),
        twice: tp.Sequence[str] = (),
        mismatched: tp.Sequence[str] = (),
    ):
        self.unused, self.reused, self.absent = list(unused), list(reused), list(absent)
        self.unfilled, self.unexpected, self.twice, self.mismatched = (
            list(unfilled),
            list(unexpected),
            list(twice),
            list(mismatched),
        )
        parts = []
        for label, names in (
            ("source tensors not used", self.unused),
            ("source tensors used twice", self.reused),
            ("source tensors expected but absent", self.absent),
            ("target tensors not filled", self.unfilled),
            ("target tensors the target model does not have", self.unexpected),
            ("target tensors filled twice", self.twice),
            ("shape mismatches", self.mismatched),
        ):
            if names:
                shown = ", ".join(names[:MAX_LISTED]) + (
                    f", ... ({len(names) - MAX_LISTED} more)" if len(names) > MAX_LISTED else ""
                )
                parts.append(f"{len(names)} {label}: {shown}")
        super().__init__(f"{what}: the tensors do not map one to one.\n  " + "\n  ".join(parts))


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


def apply_rules(
    rules: tp.Iterable[Rule],
    source: tp.Mapping[str, torch.Tensor],
    expected: tp.Mapping[str, tp.Sequence[int]],
    what: str,
) -> tp.Dict[str, torch.Tensor]:
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
                mismatched.append(
                    f"{target} {tuple(tensor.shape)} from {', '.join(rule.sources) or 'nothing'}, "
                    f"expected {tuple(expected[target])}"
                )
            produced[target] = tensor
    unused = [name for name in source if name not in uses]
    reused = [name for name, count in uses.items() if count > 1]
    unfilled = [name for name in expected if name not in produced]
    if unused or reused or absent or unfilled or unexpected or twice or mismatched:
        raise UnmappedTensorsError(what, unused, reused, absent, unfilled, unexpected, twice, mismatched)
    return {name: produced[name] for name in expected}


def prefixed(state: tp.Mapping[str, tp.Any], prefix: str) -> tp.Dict[str, tp.Any]:
    return {prefix + key: value for key, value in state.items()}


def unprefixed(state: tp.Mapping[str, tp.Any], prefix: str) -> tp.Dict[str, tp.Any]:
    return {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}


def values_known(tensors: Tensors) -> bool:
    return not any(t.is_meta for t in tensors)


# ------------------------------------------------------------------------------------------------------ the LM


def _split3(tensors: Tensors, shapes: Shapes) -> Tensors:
    (fused,) = tensors
    if fused.shape[0] % 3:
        return [fused, fused, fused]  # reported as a shape mismatch
    size = fused.shape[0] // 3
    return [fused[i * size : (i + 1) * size].clone() for i in range(3)]


def _cat3(tensors: Tensors, shapes: Shapes) -> Tensors:
    return [torch.cat(tensors, dim=0)]


def _identity_projection(tensors: Tensors, shapes: Shapes) -> Tensors:
    weight_shape, bias_shape = shapes
    if weight_shape is None or bias_shape is None or weight_shape[0] != weight_shape[1]:
        return []
    return [torch.eye(weight_shape[0]), torch.zeros(bias_shape)]


def _drop_identity_projection(tensors: Tensors, shapes: Shapes) -> Tensors:
    weight, bias = tensors
    if values_known(tensors) and (
        weight.shape[0] != weight.shape[1]
        or not torch.equal(weight.float(), torch.eye(weight.shape[0]))
        or bool(bias.float().abs().max() > 0)
    ):
        raise UnsupportedModelError(
            f"The T5 width equals the decoder width ({weight.shape[1]}), so transformers' MusicGen has no "
            f"projection (enc_to_dec_proj), but this model's {OUTPUT_PROJ} is not the identity."
        )
    return []


def lm_links(num_layers: int, num_codebooks: int, projection: bool) -> tp.List[Link]:
    """The AudioCraft LM (`lm:` names) <-> transformers decoder and projection."""
    dec = "decoder.model.decoder"
    links = []
    if projection:
        links += [Link((f"{LM_PREFIX}{OUTPUT_PROJ}.{p}",), (f"enc_to_dec_proj.{p}",)) for p in ("weight", "bias")]
    else:
        links.append(
            Link(
                (f"{LM_PREFIX}{OUTPUT_PROJ}.weight", f"{LM_PREFIX}{OUTPUT_PROJ}.bias"),
                (),
                to_hf=_drop_identity_projection,
                to_ac=_identity_projection,
            )
        )
    for k in range(num_codebooks):
        links.append(Link((f"{LM_PREFIX}emb.{k}.weight",), (f"{dec}.embed_tokens.{k}.weight",)))
        links.append(Link((f"{LM_PREFIX}linears.{k}.weight",), (f"decoder.lm_heads.{k}.weight",)))
    for i in range(num_layers):
        ac, hf = f"{LM_PREFIX}transformer.layers.{i}", f"{dec}.layers.{i}"
        for ac_attn, hf_attn in (("self_attn", "self_attn"), ("cross_attention", "encoder_attn")):
            links.append(
                Link(
                    (f"{ac}.{ac_attn}.in_proj_weight",),
                    tuple(f"{hf}.{hf_attn}.{p}_proj.weight" for p in "qkv"),
                    _split3,
                    _cat3,
                )
            )
            links.append(Link((f"{ac}.{ac_attn}.out_proj.weight",), (f"{hf}.{hf_attn}.out_proj.weight",)))
        for ac_name, hf_name in (
            ("norm1", "self_attn_layer_norm"),
            ("norm_cross", "encoder_attn_layer_norm"),
            ("norm2", "final_layer_norm"),
        ):
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
    return [
        Link((f"{ac}.weight_g",), (f"{hf}.parametrizations.weight.original0",)),
        Link((f"{ac}.weight_v",), (f"{hf}.parametrizations.weight.original1",)),
        Link((f"{ac}.bias",), (f"{hf}.bias",)),
    ]


LSTM_TENSORS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")


def _zero_lstm(tensors: Tensors, shapes: Shapes) -> Tensors:
    return [torch.zeros(shape) for shape in shapes if shape is not None]


def _drop_zero_lstm(tensors: Tensors, shapes: Shapes) -> Tensors:
    if values_known(tensors) and any(bool(t.abs().max() > 0) for t in tensors):
        raise ConversionError("An LSTM that AudioCraft does not have (seanet.lstm: 0) has non-zero weights.")
    return []


def encodec_links(
    ratios: tp.Sequence[int],
    num_residual_layers: int,
    lstm_layers: int,
    true_skip: bool,
    num_quantizers: int,
    hf_lstm_layers: int = 1,
) -> tp.List[Link]:
    """AudioCraft's EnCodec (`compression:` names) <-> transformers' EncodecModel (`audio_encoder.` names).
    With `lstm_layers == 0`, transformers' mandatory LSTM (`hf_lstm_layers` layers) is all zero: an identity."""
    ac_root, hf_root = f"{COMPRESSION_PREFIX}", "audio_encoder."
    links = []
    for part in ("encoder", "decoder"):
        ac_layers = [
            (i, kind)
            for i, kind in enumerate(seanet_layout(part, len(ratios), num_residual_layers, lstm_layers > 0))
            if kind != "elu"
        ]
        hf_layers = [
            (j, kind)
            for j, kind in enumerate(seanet_layout(part, len(ratios), num_residual_layers, True))
            if kind != "elu"
        ]
        ac_iter = iter(ac_layers)
        for j, kind in hf_layers:
            hf = f"{hf_root}{part}.layers.{j}"
            if kind == "lstm" and lstm_layers == 0:
                links.append(
                    Link(
                        (),
                        tuple(f"{hf}.lstm.{t}_l{n}" for n in range(hf_lstm_layers) for t in LSTM_TENSORS),
                        _zero_lstm,
                        _drop_zero_lstm,
                    )
                )
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
                links += [
                    Link((f"{ac}.lstm.{t}_l{n}",), (f"{hf}.lstm.{t}_l{n}",))
                    for n in range(lstm_layers)
                    for t in LSTM_TENSORS
                ]
    for q in range(num_quantizers):
        links += [
            Link((f"{ac_root}quantizer.vq.layers.{q}._codebook.{t}",), (f"{hf_root}quantizer.layers.{q}.codebook.{t}",))
            for t in ("inited", "cluster_size", "embed", "embed_avg")
        ]
    return links


def t5_links(t5_keys: tp.Iterable[str]) -> tp.List[Link]:
    """A T5EncoderModel's own names (`t5:`) <-> `text_encoder.` in transformers' MusicGen."""
    return [Link((T5_PREFIX + key,), ("text_encoder." + key,)) for key in t5_keys]
