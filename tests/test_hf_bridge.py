"""AudioCraft <-> transformers conversion (musicgen_finetune/hf_bridge.py), with transformers' own classes as the
oracle: a tiny random MusicgenForConditionalGeneration is imported and must compute what it computed before."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_tool, train, xp_folder
from omegaconf import OmegaConf

from musicgen_finetune import environment
from musicgen_finetune.models import folder as model_dir
from musicgen_finetune.models import xp_cfg
from musicgen_finetune.models.hf import convert as hf_bridge

environment.prepare()

CARD, N_Q, HIDDEN, T5_WIDTH = 64, 4, 64, 32
LOGITS_ATOL = 1e-5  # float32; measured ~7e-7 (same ops, in another order)
AUDIO_ATOL = 1e-6  # float32; the two EnCodecs run the same convolutions: measured 0


def build_hf_model(folder: Path, seed: int = 0) -> Path:
    """A tiny random transformers MusicGen (T5 width 32, EnCodec with 4 x 64 codebooks and a 1-layer LSTM, decoder
    64 wide, 2 layers, 2 heads, ffn 128) + its processor, as save_pretrained writes them."""
    from transformers import (
        EncodecConfig,
        EncodecFeatureExtractor,
        EncodecModel,
        GenerationConfig,
        MusicgenDecoderConfig,
        MusicgenForCausalLM,
        MusicgenForConditionalGeneration,
        MusicgenProcessor,
        T5EncoderModel,
        T5Tokenizer,
    )

    from musicgen_finetune.models.tiny import write_t5

    t5_dir = write_t5(folder.parent / f"{folder.name}-t5", seed=seed + 1, width=T5_WIDTH)
    torch.manual_seed(seed)
    audio = EncodecModel(
        EncodecConfig(
            sampling_rate=32000,
            target_bandwidths=[1.2],
            upsampling_ratios=[8, 5, 4, 4],
            num_filters=4,
            hidden_size=16,
            codebook_size=CARD,
            num_lstm_layers=1,
            use_causal_conv=False,
            use_conv_shortcut=False,
            pad_mode="reflect",
        )
    ).eval()
    assert audio.config.num_quantizers == N_Q
    with torch.no_grad():  # transformers leaves codebooks at zero: fill them from encoded noise, residual by residual
        residual = audio.encoder(torch.randn(4, 1, 32000) * 0.1).transpose(1, 2).reshape(-1, 16)
        for layer in audio.quantizer.layers:
            codebook = residual[torch.randperm(len(residual))[:CARD]].clone()
            layer.codebook.embed.copy_(codebook)
            layer.codebook.embed_avg.copy_(codebook)
            layer.codebook.cluster_size.fill_(1.0)
            residual = residual - codebook[layer.codebook.quantize(residual)]
    decoder = MusicgenForCausalLM(
        MusicgenDecoderConfig(
            vocab_size=CARD,
            hidden_size=HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=2,
            ffn_dim=128,
            num_codebooks=N_Q,
            pad_token_id=CARD,
            bos_token_id=CARD,
            dropout=0.0,
        )
    )
    model = MusicgenForConditionalGeneration(
        text_encoder=T5EncoderModel.from_pretrained(t5_dir), audio_encoder=audio, decoder=decoder
    )
    with torch.no_grad():  # every decoder tensor distinct (layer norms too), so that a swapped name cannot pass
        for parameter in [*model.decoder.parameters(), *model.enc_to_dec_proj.parameters()]:
            parameter.add_(torch.randn_like(parameter) * 0.05)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=CARD,
        pad_token_id=CARD,
        bos_token_id=CARD,
        do_sample=True,
        guidance_scale=3.0,
        max_length=100,
    )
    model.save_pretrained(folder)
    MusicgenProcessor(
        feature_extractor=EncodecFeatureExtractor(feature_size=1, sampling_rate=32000, padding_side="left"),
        tokenizer=T5Tokenizer.from_pretrained(t5_dir, legacy=False),
    ).save_pretrained(folder)
    shutil.rmtree(t5_dir)
    return folder


def hf_state(folder: Path) -> dict:
    from transformers import MusicgenForConditionalGeneration

    return MusicgenForConditionalGeneration.from_pretrained(folder).state_dict()


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory) -> Path:
    return build_hf_model(tmp_path_factory.mktemp("hf") / "tiny-hf-musicgen")


@pytest.fixture(scope="module")
def imported(hf_model, tmp_path_factory) -> Path:
    return hf_bridge.import_hf(hf_model, tmp_path_factory.mktemp("imported") / "tiny-imported")


@pytest.fixture(scope="module")
def exported(imported, tmp_path_factory) -> Path:
    return hf_bridge.export_hf(imported, tmp_path_factory.mktemp("exported") / "tiny-exported")


@pytest.fixture(scope="module")
def both(hf_model, imported):
    """transformers' model and AudioCraft's MusicGen (as `generate.load` builds it) for the same weights."""
    from transformers import AutoProcessor, MusicgenForConditionalGeneration

    from musicgen_finetune.generate import load

    return (
        MusicgenForConditionalGeneration.from_pretrained(hf_model).eval(),
        AutoProcessor.from_pretrained(hf_model),
        load(imported, device="cpu"),
    )


def audiocraft_conditions(lm, texts):
    from audiocraft.modules.conditioners import ConditioningAttributes

    tokenized = lm.condition_provider.tokenize([ConditioningAttributes(text={"description": t}) for t in texts])
    return tokenized["description"], lm.condition_provider(tokenized)


def delayed_sequence(lm, batch: int, steps: int, seed: int = 0):
    """Random codes laid out by AudioCraft's delay pattern (codebook k shifted by k, special token = card): the
    interleaved sequence both decoders read at training time."""
    codes = torch.randint(0, CARD, (batch, N_Q, steps), generator=torch.Generator().manual_seed(seed))
    sequence, _, _ = lm.pattern_provider.get_pattern(steps).build_pattern_sequence(
        codes, lm.special_token_id, keep_only_valid_steps=False
    )
    assert sequence.shape == (batch, N_Q, steps + N_Q) and (sequence == CARD).any()
    return sequence


def test_imported_lm_gives_the_logits_of_the_transformers_decoder(both, imported):
    hf, processor, musicgen = both
    lm = musicgen.lm
    assert model_dir.check(imported).t5 == imported / "t5"
    texts = ["hip hop 808 beat with trap drums and rolling hi hats", "ambient pad"]  # of other lengths: padded
    with torch.no_grad():
        tokens, conditions = audiocraft_conditions(lm, texts)
        inputs = processor(text=texts, padding=True, return_tensors="pt")
        assert torch.equal(tokens["input_ids"], inputs["input_ids"])
        assert torch.equal(tokens["attention_mask"], inputs["attention_mask"])
        # Text conditioning: the same T5 and projection, padded positions zeroed in both.
        hidden = hf.enc_to_dec_proj(hf.text_encoder(**inputs).last_hidden_state) * inputs["attention_mask"][..., None]
        embeds, mask = conditions["description"]
        torch.testing.assert_close(embeds, hidden, rtol=0, atol=1e-6)
        sequence = delayed_sequence(lm, len(texts), steps=12)
        ours = lm(sequence, [], condition_tensors=conditions)  # [B, K, S, card]
        # AudioCraft's cross-attention attends to the (zeroed) T5 padding too: the same call for transformers is
        # without encoder_attention_mask. Same token ids, same conditioning, logits of every step and codebook.
        theirs = hf.decoder(
            input_ids=sequence.reshape(-1, sequence.shape[-1]), encoder_hidden_states=hidden
        ).logits.reshape(ours.shape)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=LOGITS_ATOL)
        # transformers' whole forward (T5, projection, mask) on one prompt (no padding) gives the same logits.
        one = processor(text=texts[:1], return_tensors="pt")
        full = hf(**one, decoder_input_ids=sequence[:1].reshape(N_Q, -1)).logits.reshape(ours[:1].shape)
        torch.testing.assert_close(
            lm(sequence[:1], [], condition_tensors=audiocraft_conditions(lm, texts[:1])[1]),
            full,
            rtol=0,
            atol=LOGITS_ATOL,
        )


def test_imported_encodec_gives_the_same_codes_and_audio(both):
    """The importer keeps transformers' pad_mode (reflect here), so nothing is excluded: codes are equal at every
    frame and the audio decoded from them is equal at every sample."""
    hf, _, musicgen = both
    ours_model = musicgen.compression_model
    assert (ours_model.sample_rate, ours_model.frame_rate, ours_model.num_codebooks, ours_model.cardinality) == (
        32000,
        50,
        N_Q,
        CARD,
    )
    wav = torch.randn(2, 1, 24000, generator=torch.Generator().manual_seed(1)) * 0.1
    with torch.no_grad():
        codes, scale = ours_model.encode(wav)
        assert scale is None
        assert torch.equal(codes, hf.audio_encoder.encode(wav).audio_codes[0])
        assert codes.unique().numel() > 16  # codebooks in use, not one code everywhere
        torch.testing.assert_close(
            ours_model.decode(codes), hf.audio_encoder.decode(codes[None], [None]).audio_values, rtol=0, atol=AUDIO_ATOL
        )


def test_pad_mode_override_differs_only_near_the_edges(hf_model, tmp_path):
    """pad_mode='constant' (what AudioCraft's own musicgen EnCodec uses) against transformers' 'reflect': the
    padding changes the first and last frames, and the LSTMs carry the change on, decaying. Excluded: 0.3 s at each
    edge for codes (15 of 50 frames), 0.1 s (3,200 samples) for audio decoded from the same codes."""
    from audiocraft.models.loaders import load_compression_model
    from transformers import EncodecModel, MusicgenForConditionalGeneration

    folder = hf_bridge.import_hf(hf_model, tmp_path / "constant", pad_mode="constant")
    cfg = OmegaConf.create(torch.load(folder / model_dir.COMPRESSION_FILE, weights_only=True)["xp.cfg"])
    assert cfg.seanet.pad_mode == "constant"
    ours = load_compression_model(str(folder), device="cpu")
    theirs = MusicgenForConditionalGeneration.from_pretrained(hf_model).audio_encoder.eval()
    assert isinstance(theirs, EncodecModel) and theirs.config.pad_mode == "reflect"
    wav = torch.randn(2, 1, 32000, generator=torch.Generator().manual_seed(2)) * 0.1
    with torch.no_grad():
        codes = ours.encode(wav)[0]
        their_codes = theirs.encode(wav).audio_codes[0]
        assert torch.equal(codes[..., 15:35], their_codes[..., 15:35])
        assert not torch.equal(codes[..., :2], their_codes[..., :2])  # the edges do differ
        audio, their_audio = ours.decode(codes), theirs.decode(codes[None], [None]).audio_values
    torch.testing.assert_close(audio[..., 3200:-3200], their_audio[..., 3200:-3200], rtol=0, atol=1e-4)
    assert (audio[..., :100] - their_audio[..., :100]).abs().max() > 1e-3


def test_transformers_round_trip_is_tensor_for_tensor_equal(hf_model, exported):
    """transformers -> AudioCraft -> transformers gives back every tensor, bit for bit."""
    original, back = hf_state(hf_model), hf_state(exported)
    assert original.keys() == back.keys()
    for name, tensor in original.items():
        assert torch.equal(tensor, back[name]), name
    config, again = (json.loads((folder / "config.json").read_text()) for folder in (hf_model, exported))
    for part in ("decoder", "audio_encoder"):
        for key in (
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "ffn_dim",
            "num_codebooks",
            "vocab_size",
            "upsampling_ratios",
            "num_filters",
            "num_lstm_layers",
            "pad_mode",
            "use_conv_shortcut",
            "codebook_size",
            "sampling_rate",
            "target_bandwidths",
        ):
            assert config[part].get(key) == again[part].get(key), (part, key)


def test_exported_folder_loads_offline_and_generates(exported):
    from transformers import AutoProcessor, MusicgenForConditionalGeneration

    model, info = MusicgenForConditionalGeneration.from_pretrained(exported, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    processor = AutoProcessor.from_pretrained(exported)
    assert processor.feature_extractor.sampling_rate == 32000 == model.config.audio_encoder.sampling_rate
    assert model.generation_config.decoder_start_token_id == CARD == model.generation_config.pad_token_id
    inputs = processor(text=["boom bap beat", "lofi chill"], padding=True, return_tensors="pt")
    torch.manual_seed(0)
    audio = model.generate(**inputs, max_new_tokens=8, do_sample=True, guidance_scale=3.0)
    assert audio.shape[:2] == (2, 1) and audio.shape[-1] > 0 and torch.isfinite(audio).all()


def test_audiocraft_round_trip_of_the_tiny_model(tiny_model, tmp_path):
    """AudioCraft -> transformers -> AudioCraft: identical LM, EnCodec and T5 tensors. The tiny EnCodec has no LSTM
    (seanet.lstm: 0), which transformers cannot build: it travels as an all-zero LSTM, an identity block."""
    from transformers import T5EncoderModel

    hf = hf_bridge.export_hf(tiny_model, tmp_path / "hf")
    lstm = {k: v for k, v in hf_state(hf).items() if ".lstm." in k}
    assert lstm and all(not v.any() for v in lstm.values())
    back = hf_bridge.import_hf(hf, tmp_path / "back")
    for name in (model_dir.LM_FILE, model_dir.COMPRESSION_FILE):
        before = torch.load(tiny_model / name, weights_only=True)
        after = torch.load(back / name, weights_only=True)
        assert before["best_state"].keys() == after["best_state"].keys(), name
        for key, tensor in before["best_state"].items():  # fp16 in the tiny model, float32 after the trip
            assert torch.equal(tensor.float(), after["best_state"][key].float()), (name, key)
    lm_before, lm_after = (
        OmegaConf.create(torch.load(f / model_dir.LM_FILE, weights_only=True)["xp.cfg"]) for f in (tiny_model, back)
    )
    assert xp_cfg.architecture_overrides(lm_after, lm_before) == []
    assert lm_after.conditioners.description.t5.name == model_dir.T5_SUBDIR
    c_before, c_after = (
        OmegaConf.create(torch.load(f / model_dir.COMPRESSION_FILE, weights_only=True)["xp.cfg"])
        for f in (tiny_model, back)
    )
    assert c_before.seanet == c_after.seanet and (c_before.rvq.bins, c_before.rvq.n_q) == (
        c_after.rvq.bins,
        c_after.rvq.n_q,
    )
    t5_before, t5_after = (T5EncoderModel.from_pretrained(f / "t5").state_dict() for f in (tiny_model, back))
    assert t5_before.keys() == t5_after.keys()
    assert all(torch.equal(t5_before[k], t5_after[k]) for k in t5_before)
    assert (tiny_model / "t5" / "spiece.model").read_bytes() == (back / "t5" / "spiece.model").read_bytes()
    assert model_dir.check(back).t5 == back / "t5"


MUSICGEN_SMALL = {  # facebook/musicgen-small's config.json, the parts that shape tensors
    "decoder": dict(
        vocab_size=2048,
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        ffn_dim=4096,
        num_codebooks=4,
        pad_token_id=2048,
        bos_token_id=2048,
    ),
    "text_encoder": dict(
        vocab_size=32128,
        d_model=768,
        d_kv=64,
        d_ff=3072,
        num_layers=12,
        num_heads=12,
        relative_attention_num_buckets=32,
    ),
    "audio_encoder": dict(
        sampling_rate=32000,
        target_bandwidths=[2.2],
        upsampling_ratios=[8, 5, 4, 4],
        num_filters=64,
        hidden_size=128,
        codebook_size=2048,
        codebook_dim=128,
        num_lstm_layers=2,
        num_residual_layers=1,
        use_causal_conv=False,
        use_conv_shortcut=False,
        pad_mode="reflect",
        norm_type="weight_norm",
        normalize=False,
        compress=2,
        trim_right_ratio=1.0,
    ),
}


def meta_state(shapes):
    return {name: torch.empty(shape, device="meta") for name, shape in shapes.items()}


def test_musicgen_small_shapes_map_both_ways():
    """Full size, on the meta device (no memory, nothing run): every tensor of musicgen-small maps, both ways."""
    from transformers import EncodecConfig, MusicgenConfig, MusicgenDecoderConfig, T5Config

    from musicgen_finetune.config import compose

    hf_config = MusicgenConfig.from_sub_models_config(
        T5Config(**MUSICGEN_SMALL["text_encoder"]),
        EncodecConfig(**MUSICGEN_SMALL["audio_encoder"]),
        MusicgenDecoderConfig(**MUSICGEN_SMALL["decoder"]),
    )
    assert hf_config.audio_encoder.num_quantizers == 4  # 2200 // (50 * 11)
    hf_shapes = hf_bridge.hf_shapes(hf_config)
    assert len(hf_shapes) == 612
    # transformers -> AudioCraft
    plan = hf_bridge.plan_import(hf_config, meta_state(hf_shapes), guidance_scale=3.0)
    converted = hf_bridge.apply_rules(plan.rules, meta_state(hf_shapes), plan.expected, "musicgen-small")
    assert converted.keys() == plan.expected.keys()
    # ... whose configs are AudioCraft's own musicgen-small (the EnCodec's padding apart: see the module doc)
    small_lm, small_encodec = compose([hf_bridge.LM_SOLVER]), compose([hf_bridge.COMPRESSION_SOLVER])
    assert xp_cfg.architecture_overrides(plan.lm_cfg, small_lm) == []
    assert {k: v for k, v in OmegaConf.to_container(plan.compression_cfg.seanet).items() if k != "pad_mode"} == {
        k: v for k, v in OmegaConf.to_container(small_encodec.seanet).items() if k != "pad_mode"
    }
    assert (small_encodec.seanet.pad_mode, plan.compression_cfg.seanet.pad_mode) == ("constant", "reflect")
    # AudioCraft -> transformers, from AudioCraft's own models built on meta
    lm_shapes = hf_bridge.audiocraft_lm_shapes(small_lm, t5_width=768)
    assert len(lm_shapes) == 300
    source = {
        **hf_bridge.prefixed(meta_state(lm_shapes), hf_bridge.LM_PREFIX),
        **hf_bridge.prefixed(
            meta_state(hf_bridge.audiocraft_compression_shapes(small_encodec)), hf_bridge.COMPRESSION_PREFIX
        ),
        **hf_bridge.prefixed(meta_state(hf_bridge.t5_shapes(hf_config.text_encoder)), hf_bridge.T5_PREFIX),
    }
    export = hf_bridge.plan_export(small_lm, small_encodec, hf_config.text_encoder, meta_state(lm_shapes))
    back = hf_bridge.apply_rules(export.rules, source, export.expected, "musicgen-small")
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v) for k, v in hf_shapes.items()}
    assert export.config.audio_encoder.num_quantizers == 4 and export.config.decoder.ffn_dim == 4096


def test_legacy_weight_norm_names_and_sharded_weights_import_the_same(hf_model, imported, tmp_path):
    """Files written by older transformers name EnCodec's weight norm weight_g/weight_v; big models are sharded."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "legacy"
    shutil.copytree(hf_model, folder)
    state = {
        k.replace("parametrizations.weight.original0", "weight_g").replace(
            "parametrizations.weight.original1", "weight_v"
        ): v
        for k, v in load_file(folder / "model.safetensors").items()
    }
    assert any(k.endswith(".weight_g") for k in state)
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, folder / file, metadata={"format": "pt"})
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(
        json.dumps(
            {
                "metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
                "weight_map": {k: file for file, keys in shards.items() for k in keys},
            }
        )
    )
    out = hf_bridge.import_hf(folder, tmp_path / "out")
    for name in (model_dir.LM_FILE, model_dir.COMPRESSION_FILE):
        ours, reference = (torch.load(f / name, weights_only=True)["best_state"] for f in (out, imported))
        assert ours.keys() == reference.keys() and all(torch.equal(ours[k], reference[k]) for k in ours), name


def test_a_t5_as_wide_as_the_decoder_has_no_projection_in_transformers():
    """transformers builds enc_to_dec_proj only when the widths differ; AudioCraft always has output_proj."""
    proj = f"{hf_bridge.LM_PREFIX}{hf_bridge.OUTPUT_PROJ}"
    links = hf_bridge.lm_links(num_layers=0, num_codebooks=0, projection=False)
    hf = {
        "decoder.model.decoder.layer_norm.weight": torch.rand(8),
        "decoder.model.decoder.layer_norm.bias": torch.rand(8),
    }
    ac_shapes = {f"{proj}.weight": (8, 8), f"{proj}.bias": (8,), "lm:out_norm.weight": (8,), "lm:out_norm.bias": (8,)}
    ac = hf_bridge.apply_rules([link.rule("to_ac") for link in links], hf, ac_shapes, "test")
    assert torch.equal(ac[f"{proj}.weight"], torch.eye(8)) and not ac[f"{proj}.bias"].any()
    back = hf_bridge.apply_rules([link.rule("to_hf") for link in links], ac, {k: (8,) for k in hf}, "test")
    assert all(torch.equal(back[k], hf[k]) for k in hf)
    ac[f"{proj}.weight"] = ac[f"{proj}.weight"] * 2
    with pytest.raises(hf_bridge.UnsupportedModelError, match="not the identity"):
        hf_bridge.apply_rules([link.rule("to_hf") for link in links], ac, {k: (8,) for k in hf}, "test")


def test_a_folder_of_neither_format_is_refused(tmp_path):
    folder = tmp_path / "neither"
    folder.mkdir()
    (folder / "notes.txt").write_text("not a model")
    with pytest.raises(hf_bridge.NotAModelFolderError, match="notes.txt"):
        hf_bridge.import_hf(folder, tmp_path / "out")
    with pytest.raises(hf_bridge.NotAModelFolderError, match="state_dict.bin"):
        hf_bridge.export_hf(folder, tmp_path / "out")
    assert hf_bridge.ensure_audiocraft_layout(folder) == folder  # left for model_dir.check to report
    with pytest.raises(model_dir.ModelDirError):
        model_dir.check(hf_bridge.ensure_audiocraft_layout(folder))


def test_a_mapping_failure_lists_the_unmapped_names_on_both_sides(tiny_model, tmp_path):
    model = tmp_path / "odd"
    shutil.copytree(tiny_model, model)
    package = torch.load(model / model_dir.LM_FILE, weights_only=True)
    package["best_state"]["transformer.layers.0.extra.weight"] = torch.zeros(3)
    del package["best_state"]["linears.2.weight"]
    package["best_state"]["emb.1.weight"] = torch.zeros(5, 64)
    torch.save(package, model / model_dir.LM_FILE)
    with pytest.raises(hf_bridge.UnmappedTensorsError) as error:
        hf_bridge.export_hf(model, tmp_path / "out")
    assert error.value.unused == ["lm:transformer.layers.0.extra.weight"]
    assert error.value.absent == ["lm:linears.2.weight"]
    assert error.value.unfilled == ["decoder.lm_heads.2.weight"]
    assert [m.split(" ")[0] for m in error.value.mismatched] == ["decoder.model.decoder.embed_tokens.1.weight"]
    message = str(error.value)
    for name in (
        "lm:transformer.layers.0.extra.weight",
        "decoder.lm_heads.2.weight",
        "lm:linears.2.weight",
        "embed_tokens.1.weight (5, 64) from lm:emb.1.weight, expected (65, 64)",
    ):
        assert name in message
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_unsupported_variants_are_refused_by_name(hf_model, tiny_model):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(hf_model)
    config.decoder.audio_channels = 2
    with pytest.raises(hf_bridge.UnsupportedModelError, match="stereo"):
        hf_bridge.check_hf_config(config)
    config.model_type = "musicgen_melody"
    with pytest.raises(hf_bridge.UnsupportedModelError, match="Melody"):
        hf_bridge.check_hf_config(config)
    cfg = OmegaConf.create(torch.load(tiny_model / model_dir.LM_FILE, weights_only=True)["xp.cfg"])
    hf_bridge.check_audiocraft_lm_cfg(cfg)
    cfg.codebooks_pattern.modeling = "parallel"
    cfg.fuser.sum = ["self_wav"]
    cfg.conditioners.self_wav = {"model": "chroma_stem"}
    with pytest.raises(hf_bridge.UnsupportedModelError) as error:
        hf_bridge.check_audiocraft_lm_cfg(cfg)
    for words in ("codebooks_pattern.modeling: 'parallel'", "fuser.sum", "conditioners ['self_wav']"):
        assert words in str(error.value)
    cfg.codebooks_pattern.modeling = "delay"
    cfg.codebooks_pattern.delay.delays = [0, 0, 0, 0]
    with pytest.raises(hf_bridge.UnsupportedModelError, match="delays"):
        hf_bridge.check_audiocraft_lm_cfg(cfg)


def test_transformers_folder_is_converted_once_into_the_cache(hf_model, tiny_model, tmp_path):
    from musicgen_finetune import output_dir

    assert hf_bridge.ensure_audiocraft_layout(tiny_model) == tiny_model
    source = tmp_path / "my-musicgen"
    shutil.copytree(hf_model, source)
    cached = hf_bridge.ensure_audiocraft_layout(source)
    assert cached.parent == output_dir() / "hf_cache" and cached.name.startswith("my-musicgen-")
    assert model_dir.check(cached).t5 == cached / "t5"
    stamp = (cached / model_dir.LM_FILE).stat().st_mtime_ns
    assert hf_bridge.ensure_audiocraft_layout(source) == cached
    assert (cached / model_dir.LM_FILE).stat().st_mtime_ns == stamp  # reused, not converted again
    config = json.loads((source / "config.json").read_text())
    config["decoder"]["dropout"] = 0.2
    (source / "config.json").write_text(json.dumps(config))
    assert hf_bridge.ensure_audiocraft_layout(source) != cached  # another source, another conversion


def test_import_tool(hf_model, workdir, tmp_path):
    out = tmp_path / "imported"
    log = workdir / "import_tool_network.log"
    result = run_tool(
        ["tools/import_hf.py", "--hf", str(hf_model), "--out", str(out)],
        workdir,
        extra_env={"NETWORK_GUARD_LOG": str(log)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert not log.exists() or log.read_text() == ""
    assert f"Imported to {out}" in result.stdout and "make train MODEL=" in result.stdout
    assert model_dir.check(out).t5 == out / "t5"
    bad = run_tool(["tools/import_hf.py", "--hf", str(tmp_path), "--out", str(tmp_path / "x")], workdir)
    assert bad.returncode != 0 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr


def test_export_tool(tiny_model, hf_model, workdir, tmp_path):
    """--base-hf: the tiny AudioCraft LM (T5 width 32, 4 x 64 codebooks) with the text and audio encoders of the
    tiny transformers model, which have the same shapes."""
    from transformers import MusicgenForConditionalGeneration

    out = tmp_path / "exported"
    log = workdir / "export_tool_network.log"
    result = run_tool(
        ["tools/export_hf.py", "--model", str(tiny_model), "--out", str(out), "--base-hf", str(hf_model)],
        workdir,
        extra_env={"NETWORK_GUARD_LOG": str(log)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Exported to {out}" in result.stdout
    assert not log.exists() or log.read_text() == ""
    state, base = MusicgenForConditionalGeneration.from_pretrained(out).state_dict(), hf_state(hf_model)
    for name, tensor in base.items():
        if name.startswith(("text_encoder.", "audio_encoder.")):
            assert torch.equal(state[name], tensor), name
    lm = torch.load(tiny_model / model_dir.LM_FILE, weights_only=True)["best_state"]
    assert torch.equal(state["decoder.lm_heads.0.weight"], lm["linears.0.weight"].float())


def test_imported_transformers_model_trains_and_exports_back(hf_model, workdir, dataset, tmp_path):
    """The transformers folder itself as MODEL (converted through the cache), trained by the real dora run, then
    exported (`make export`) and converted back to transformers, which loads it."""
    from transformers import MusicgenForConditionalGeneration

    from musicgen_finetune.export import export

    result = train(workdir, hf_model, args="optim.epochs=1")  # MODEL= the transformers folder itself
    model = hf_bridge.ensure_audiocraft_layout(hf_model)  # where make train converted it
    assert result.returncode == 0, result.stderr[-5000:]
    tensors = len(torch.load(model / model_dir.LM_FILE, weights_only=True)["best_state"])
    assert f"{tensors} of {tensors} tensors matched" in result.stderr + result.stdout
    trained = export(str(xp_folder(result)), tmp_path / "trained", which="last")
    back = hf_bridge.export_hf(trained, tmp_path / "trained-hf")
    state = MusicgenForConditionalGeneration.from_pretrained(back).state_dict()
    lm = torch.load(trained / model_dir.LM_FILE, weights_only=True)["best_state"]
    assert torch.equal(state["decoder.lm_heads.3.weight"], lm["linears.3.weight"].float())
    assert not torch.equal(state["decoder.lm_heads.3.weight"], hf_state(hf_model)["decoder.lm_heads.3.weight"])
