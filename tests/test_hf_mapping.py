"""mapping.py's engine and its special rules on small tensors, in this process (make mutate runs these per mutant):
the one-to-one accounting and its message, the fused q/k/v split, the identity projection and the all-zero LSTM that
one library has and the other does not, and EnCodec's shortcut convolutions against both libraries' own modules."""

import pytest
import torch

from musicgen_finetune.models.hf import mapping
from musicgen_finetune.models.hf.mapping import Rule, UnmappedTensorsError, apply_rules


def tensors(**shapes):
    return {name: torch.zeros(shape) for name, shape in shapes.items()}


def unmapped(rules, source, expected) -> UnmappedTensorsError:
    with pytest.raises(UnmappedTensorsError) as error:
        apply_rules(rules, source, expected, "test")
    return error.value


def test_a_one_to_one_mapping_is_returned_in_the_targets_order():
    source = {"a": torch.ones(2), "b": torch.full((3,), 2.0)}
    rules = [Rule(("b",), ("B",)), Rule(("a",), ("A",))]
    out = apply_rules(rules, source, {"A": (2,), "B": (3,)}, "test")
    assert list(out) == ["A", "B"] and torch.equal(out["A"], source["a"]) and torch.equal(out["B"], source["b"])


@pytest.mark.parametrize(
    "rules, source, expected, field, names",
    [
        # each way of failing, alone, is refused and named
        ([Rule(("a",), ("A",))], tensors(a=2, extra=1), {"A": (2,)}, "unused", ["extra"]),
        ([Rule(("a",), ("A",)), Rule(("a",), ("B",))], tensors(a=2), {"A": (2,), "B": (2,)}, "reused", ["a"]),
        ([Rule(("a",), ("A",)), Rule(("x",), ("X",)), Rule(("y", "z"), ("Y",))], tensors(a=2), {"A": (2,)},
         "absent", ["x", "y", "z"]),
        ([Rule(("a",), ("A",))], tensors(a=2), {"A": (2,), "B": (1,)}, "unfilled", ["B"]),
        ([Rule(("a", "b"), ("A", "Z"))], tensors(a=2, b=2), {"A": (2,)}, "unexpected", ["Z"]),
        ([Rule(("a",), ("A",)), Rule(("b",), ("A",))], tensors(a=2, b=2), {"A": (2,)}, "twice", ["A"]),
        ([Rule(("a",), ("A",))], tensors(a=3), {"A": (2,)}, "mismatched", ["A (3,) from a, expected (2,)"]),
        ([Rule((), ("A",), lambda t, s: [torch.zeros(1)])], {}, {"A": (2,)}, "mismatched",
         ["A (1,) from nothing, expected (2,)"]),
    ],
    ids=["unused", "reused", "absent", "unfilled", "unexpected", "twice", "mismatched", "mismatched-from-nothing"],
)  # fmt: skip
def test_every_way_a_mapping_is_not_one_to_one_is_refused_alone(rules, source, expected, field, names):
    error = unmapped(rules, source, expected)
    assert getattr(error, field) == names
    others = {"unused", "reused", "absent", "unfilled", "unexpected", "twice", "mismatched"} - {field}
    # a rule whose sources are absent is skipped, so its targets are also unfilled; nothing else is reported
    assert {f for f in others if getattr(error, f)} <= ({"unfilled"} if field == "absent" else set())


def test_a_source_used_three_times_is_reused_once_in_the_list():
    rules = [Rule(("a",), (target,)) for target in "ABC"]
    assert unmapped(rules, tensors(a=2), {t: (2,) for t in "ABC"}).reused == ["a"]


def test_a_rule_sees_the_shape_of_each_expected_target_and_none_for_others():
    seen = []

    def record(sources, shapes):
        seen.append(shapes)
        return [sources[0], sources[0]]

    error = unmapped([Rule(("a",), ("A", "NOT_THERE"), record)], tensors(a=(2, 3)), {"A": (2, 3)})
    assert seen == [[torch.Size([2, 3]), None]] and error.unexpected == ["NOT_THERE"]


def test_a_rule_giving_fewer_tensors_than_targets_is_a_programming_error():
    with pytest.raises(ValueError):
        apply_rules([Rule(("a",), ("A", "B"), lambda t, s: [t[0]])], tensors(a=2), {"A": (2,), "B": (2,)}, "test")


def test_the_message_lists_each_kind_with_its_count_and_at_most_thirty_names():
    names = [f"n{i}" for i in range(32)]
    error = UnmappedTensorsError("model.bin -> transformers", unused=names, twice=["T"], mismatched=["M (1,)"])
    assert str(error) == (
        "model.bin -> transformers: the tensors do not map one to one.\n"
        f"  32 source tensors not used: {', '.join(names[:30])}, ... (2 more)\n"
        "  1 target tensors filled twice: T\n"
        "  1 shape mismatches: M (1,)"
    )
    exactly = UnmappedTensorsError("w", reused=names[:30], absent=["x"], unfilled=["u"], unexpected=["e"])
    assert str(exactly) == (
        "w: the tensors do not map one to one.\n"
        f"  30 source tensors used twice: {', '.join(names[:30])}\n"
        "  1 source tensors expected but absent: x\n"
        "  1 target tensors not filled: u\n"
        "  1 target tensors the target model does not have: e"
    )


def test_fused_attention_splits_into_q_k_v_and_back():
    fused = torch.arange(12.0).reshape(6, 2)
    q, k, v = mapping._split3([fused], [None] * 3)
    assert all(torch.equal(a, b) for a, b in zip((q, k, v), torch.chunk(fused, 3)))
    assert torch.equal(mapping._cat3([q, k, v], [None])[0], fused)
    odd = torch.zeros(7, 2)  # not three equal parts: passed on whole, for apply_rules to report the shapes
    assert all(t.shape == (7, 2) for t in mapping._split3([odd], [None] * 3))


def test_the_identity_projection_is_made_only_for_a_square_known_shape():
    weight, bias = mapping._identity_projection([], [torch.Size([4, 4]), torch.Size([4])])
    assert torch.equal(weight, torch.eye(4)) and torch.equal(bias, torch.zeros(4))
    for shapes in ([torch.Size([4, 3]), torch.Size([4])], [None, torch.Size([4])], [torch.Size([4, 4]), None]):
        assert mapping._identity_projection([], shapes) == []


def test_only_an_identity_projection_is_dropped():
    assert mapping._drop_identity_projection([torch.eye(4), torch.zeros(4)], [None]) == []
    meta = [torch.empty(4, 3, device="meta"), torch.empty(4, device="meta")]
    assert mapping._drop_identity_projection(meta, []) == []  # shapes only (plans on the meta device)
    for weight, bias in [
        (torch.eye(4) * 2, torch.zeros(4)),
        (torch.eye(4), torch.full((4,), 0.5)),  # a small bias is still a bias
        (torch.eye(4)[:3], torch.zeros(3)),
    ]:
        with pytest.raises(
            mapping.UnsupportedModelError, match=r"T5 width equals the decoder width .* not the identity"
        ):
            mapping._drop_identity_projection([weight, bias], [])


def test_only_an_all_zero_lstm_is_dropped():
    assert mapping._drop_zero_lstm([torch.zeros(4, 2), torch.zeros(4)], []) == []
    assert mapping._drop_zero_lstm([torch.empty(4, 2, device="meta")], []) == []
    made = mapping._zero_lstm([], [torch.Size([4, 2]), None, torch.Size([4])])
    assert [tuple(t.shape) for t in made] == [(4, 2), (4,)] and not any(t.any() for t in made)
    for value in (0.5, -2.0):
        with pytest.raises(mapping.ConversionError) as refused:
            mapping._drop_zero_lstm([torch.zeros(4), torch.full((2,), value)], [])
        assert str(refused.value) == "An LSTM that AudioCraft does not have (seanet.lstm: 0) has non-zero weights."


def test_encodec_shortcut_convolutions_map_between_both_libraries_modules():
    """A SEANet with convolution shortcuts (true_skip false; transformers' use_conv_shortcut): the links name
    exactly the tensors of AudioCraft's own encoder and decoder and of transformers' EncodecModel."""
    from audiocraft.modules.seanet import SEANetDecoder, SEANetEncoder
    from transformers import EncodecConfig, EncodecModel

    settings = dict(
        channels=1, dimension=8, n_filters=2, n_residual_layers=1, ratios=[4, 2], lstm=1, norm="weight_norm"
    )
    ac = {
        **{f"{mapping.COMPRESSION_PREFIX}encoder.{k}": v for k, v in SEANetEncoder(**settings, true_skip=False)
           .state_dict().items()},
        **{f"{mapping.COMPRESSION_PREFIX}decoder.{k}": v for k, v in SEANetDecoder(**settings, true_skip=False)
           .state_dict().items()},
    }  # fmt: skip
    config = EncodecConfig(
        audio_channels=1,
        hidden_size=8,
        num_filters=2,
        num_residual_layers=1,
        upsampling_ratios=[4, 2],  # AudioCraft's ratios, in the decoder's order in both
        num_lstm_layers=1,
        use_conv_shortcut=True,
        norm_type="weight_norm",
    )
    with torch.device("meta"):
        hf = {f"audio_encoder.{k}": v for k, v in EncodecModel(config).state_dict().items()}
    hf = {k: v for k, v in hf.items() if k.startswith(("audio_encoder.encoder.", "audio_encoder.decoder."))}
    links = mapping.encodec_links([4, 2], 1, lstm_layers=1, true_skip=False, num_quantizers=0)
    out = apply_rules([link.rule("to_hf") for link in links], ac, {k: tuple(v.shape) for k, v in hf.items()}, "test")
    assert sum(".shortcut." in k for k in out) == 2 * 2 * 3  # encoder and decoder, 2 blocks, weight_g, weight_v, bias
    back = apply_rules([link.rule("to_ac") for link in links], out, {k: tuple(v.shape) for k, v in ac.items()}, "test")
    assert all(torch.equal(back[k], ac[k]) for k in ac)
