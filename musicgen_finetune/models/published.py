"""The LM tensors of the published facebook/musicgen-small `state_dict.bin`, written out from the architecture, not
read from a model AudioCraft builds: the full-size smoke run (make smoke-full) checks the model it writes, the trained
checkpoint and every export against this list.

musicgen-small is AudioCraft's `musicgen_lm` at 'small' scale (config/model/lm/musicgen_lm.yaml,
config/model/lm/model_scale/small.yaml): 24 layers of width 1024, 16 heads, feed-forward 4096, no biases in the
projections (bias_proj, bias_ff, bias_attn: false), 4 codebooks of 2048 codes, cross-attention on a t5-base text
encoder (width 768). Where each name comes from, in AudioCraft 1.3.0:
- models/lm.py:152 `emb`: one ScaledEmbedding per codebook, card + 1 rows (the extra one is the special token);
- models/lm.py:169 `linears`: one Linear(dim, card, bias=bias_proj) per codebook; models/lm.py:155 `out_norm`
  (norm_first: a LayerNorm with weight and bias);
- modules/transformer.py: each StreamingTransformerLayer with `custom=True` (memory_efficient) keeps q, k and v as one
  raw `in_proj_weight` [3 dim, dim] in both self_attn and cross_attention (~194-207), `out_proj` a Linear without
  bias, `linear1` [dim_feedforward, dim] and `linear2` [dim, dim_feedforward] without bias, LayerNorms norm1, norm2
  and norm_cross (cross_attention: true) with weight and bias;
- modules/conditioners.py T5Conditioner: `output_proj` = Linear(768, dim) with bias; the T5 itself is not in the
  state dict (kept out of the module tree).
"""

import typing as tp

DIM = 1024
LAYERS = 24
FEEDFORWARD = 4 * DIM
CODEBOOKS = 4
CARD = 2048
T5_WIDTH = 768  # t5-base's d_model
# The published checkpoint's count of LM parameters (sum of its best_state's numel): the check on this list.
PARAMETERS = 420_371_456


def layer_tensors(i: int) -> tp.Dict[str, tp.Tuple[int, ...]]:
    prefix = f"transformer.layers.{i}."
    shapes: tp.Dict[str, tp.Tuple[int, ...]] = {}
    for attention in ("self_attn", "cross_attention"):
        shapes[f"{prefix}{attention}.in_proj_weight"] = (3 * DIM, DIM)
        shapes[f"{prefix}{attention}.out_proj.weight"] = (DIM, DIM)
    shapes[f"{prefix}linear1.weight"] = (FEEDFORWARD, DIM)
    shapes[f"{prefix}linear2.weight"] = (DIM, FEEDFORWARD)
    for norm in ("norm1", "norm2", "norm_cross"):
        shapes[f"{prefix}{norm}.weight"] = (DIM,)
        shapes[f"{prefix}{norm}.bias"] = (DIM,)
    return shapes


def lm_tensors() -> tp.Dict[str, tp.Tuple[int, ...]]:
    """Every tensor of musicgen-small's LM state dict, by name, with its shape."""
    shapes: tp.Dict[str, tp.Tuple[int, ...]] = {
        "condition_provider.conditioners.description.output_proj.weight": (DIM, T5_WIDTH),
        "condition_provider.conditioners.description.output_proj.bias": (DIM,),
    }
    for k in range(CODEBOOKS):
        shapes[f"emb.{k}.weight"] = (CARD + 1, DIM)
    for i in range(LAYERS):
        shapes.update(layer_tensors(i))
    shapes["out_norm.weight"] = (DIM,)
    shapes["out_norm.bias"] = (DIM,)
    for k in range(CODEBOOKS):
        shapes[f"linears.{k}.weight"] = (CARD, DIM)
    return shapes


def count(shapes: tp.Mapping[str, tp.Sequence[int]]) -> int:
    total = 0
    for shape in shapes.values():
        n = 1
        for size in shape:
            n *= size
        total += n
    return total


def differences(
    shapes: tp.Mapping[str, tp.Sequence[int]], expected: tp.Optional[tp.Mapping[str, tp.Sequence[int]]] = None
) -> tp.List[str]:
    """What differs between `shapes` (name -> shape of some state dict) and the published list: one line each, at
    most the first 10 of each kind; empty when they are the same."""
    expected = lm_tensors() if expected is None else expected
    lines = []
    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected]
    mismatched = [
        f"{k} {list(shapes[k])} (published {list(expected[k])})"
        for k in expected
        if k in shapes and tuple(shapes[k]) != tuple(expected[k])
    ]
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape", mismatched)):
        if keys:
            lines.append(f"{len(keys)} {label}: {', '.join(keys[:10])}{' ...' if len(keys) > 10 else ''}")
    return lines


def shapes_of(state: tp.Mapping[str, tp.Any]) -> tp.Dict[str, tp.Tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}
