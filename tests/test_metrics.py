"""Offline metrics on synthetic signals whose answers are known by construction or by hand."""

import json
import math

import numpy as np
import pytest

from musicgen_finetune.evaluation.metrics import (
    ClapFolderError,
    bpm_from_text,
    clap_scores,
    descriptors,
    frechet_distance,
    summarize,
    tempo_error,
)

RATE = 32000  # MusicGen's


def clicks(per_second: float, seconds: float, rate: int = RATE, start: float = 0.0) -> np.ndarray:
    """Short Hann-shaped clicks, one every 1/per_second s from `start`; returns the track."""
    audio = np.zeros(int(round(seconds * rate)), np.float32)
    for k in range(int(math.floor((seconds - start) * per_second + 1e-9))):
        at = int(round((start + k / per_second) * rate))
        audio[at : at + 200] += np.hanning(200)[: len(audio) - at]
    return audio


def sine(freq: float, seconds: float, amplitude: float = 1.0, rate: int = RATE) -> np.ndarray:
    return (amplitude * np.sin(2 * np.pi * freq * np.arange(int(seconds * rate)) / rate)).astype(np.float32)


def hats(seconds: float, rate: int = RATE, seed: int = 0) -> np.ndarray:
    """Hi-hat-like: white noise with nothing below 5 kHz, in decaying 16th-note bursts at 140 bpm."""
    rng = np.random.default_rng(seed)
    spectrum = np.fft.rfft(rng.standard_normal(int(seconds * rate)))
    spectrum[np.fft.rfftfreq(int(seconds * rate), 1 / rate) < 5000] = 0
    noise = np.fft.irfft(spectrum, int(seconds * rate))
    step = int(rate * 60 / 140 / 4)
    envelope = np.exp(-np.arange(step) / (0.01 * rate))
    envelope = np.tile(envelope, len(noise) // step + 1)[: len(noise)]
    return (0.3 * noise / noise.std() * envelope).astype(np.float32)


# ------------------------------------------------------------------------------------------------------ tempo


@pytest.mark.parametrize("bpm", [140, 90])
def test_click_track_tempo(bpm):
    measured = descriptors(clicks(bpm / 60, 8.0, start=0.1), RATE)["tempo_bpm"]
    assert measured == pytest.approx(bpm, rel=0.02)


def test_tempo_resolution_at_22k():
    """librosa's default hop reads this as 143.6 bpm (2.5% off): the finer envelope must be in use."""
    assert descriptors(clicks(140 / 60, 8.0, rate=22050, start=0.1), 22050)["tempo_bpm"] == pytest.approx(140, rel=0.01)


@pytest.mark.parametrize(
    "text, bpm",
    [
        ("808 trap beat, 140 bpm", 140.0),
        ("hard drill beat 140BPM, dark", 140.0),
        ("lofi groove at 95 bpm", 95.0),
        ("boom bap, 92.5 Bpm, C minor", 92.5),
        ("808 trap beat, dark", None),
        ("", None),
        ("0 bpm", None),
    ],
)
def test_bpm_from_text(text, bpm):
    assert bpm_from_text(text) == bpm


@pytest.mark.parametrize(
    "measured, target, error",
    [
        (140, 140, 0.0),
        (70, 140, 0.0),
        (280, 140, 0.0),  # exact, half and double tempo
        (147, 140, 0.05),
        (133, 140, 0.05),
        (73.5, 140, 0.05),  # 5% off, also at half tempo (73.5 * 2 = 147)
        (100, 140, 40 / 140),  # |100-140|=40, |200-140|=60, |50-140|=90
        (90, 60, 0.25),
    ],
)  # |90-60|=30, |180-60|=120, |45-60|=15
def test_tempo_error(measured, target, error):
    assert tempo_error(measured, target) == pytest.approx(error)


def test_tempo_error_refusals():
    with pytest.raises(ValueError, match="target tempo"):
        tempo_error(140, 0)
    with pytest.raises(ValueError, match="measured tempo"):
        tempo_error(None, 140)


# ------------------------------------------------------------------------------------------- spectrum and onsets


def test_low_freq_ratio():
    seconds = 2.0
    hat = hats(seconds)
    sub = sine(50, seconds, amplitude=0.5)
    alone = descriptors(hat, RATE)["low_freq_ratio"]
    with_sub = descriptors(hat + sub, RATE)["low_freq_ratio"]
    expected = np.mean(sub.astype(np.float64) ** 2) / (
        np.mean(sub.astype(np.float64) ** 2) + np.mean(hat.astype(np.float64) ** 2)
    )  # sine and noise share no frequencies: their powers add
    assert alone < 0.01
    assert with_sub == pytest.approx(expected, abs=0.02)
    assert with_sub > 0.5
    assert descriptors(sine(50, seconds), RATE)["low_freq_ratio"] == pytest.approx(1.0, abs=0.01)
    assert descriptors(sine(2000, seconds), RATE)["low_freq_ratio"] == pytest.approx(0.0, abs=0.01)
    assert descriptors(sine(200, seconds), RATE)["low_freq_ratio"] < 0.01  # above the 120 Hz split


@pytest.mark.parametrize("per_second", [2.0, 4.0, 8.0])
def test_onset_density(per_second):
    # 5 s of clicks from t=0: 5 * per_second clicks, the one at t=0 included
    assert descriptors(clicks(per_second, 5.0), RATE)["onset_density"] == pytest.approx(per_second)


# ----------------------------------------------------------------------------------------------------- loudness


def test_loudness():
    full = descriptors(sine(997, 2.0), RATE)["loudness_lufs"]
    half = descriptors(sine(997, 2.0, amplitude=0.5), RATE)["loudness_lufs"]
    assert full == pytest.approx(-3.01, abs=0.05)  # BS.1770: a full-scale 997 Hz sine on one channel
    assert full - half == pytest.approx(20 * math.log10(2), abs=0.01)  # 6.02 dB
    stereo = descriptors(np.stack([sine(997, 2.0), sine(997, 2.0)]), RATE)["loudness_lufs"]
    assert stereo - full == pytest.approx(10 * math.log10(2), abs=0.01)  # channel energies add: +3.01 dB


def test_short_and_silent_clips_do_not_crash():
    short = descriptors(sine(997, 0.1, amplitude=0.5), RATE)  # under BS.1770's 400 ms block
    assert short["loudness_lufs"] == pytest.approx(
        descriptors(sine(997, 2.0, amplitude=0.5), RATE)["loudness_lufs"], abs=0.1
    )
    silent = descriptors(np.zeros((2, RATE), np.float32), RATE)
    assert silent == {"tempo_bpm": None, "low_freq_ratio": None, "onset_density": 0.0, "loudness_lufs": None}
    json.dumps(silent, allow_nan=False)  # None, never -inf: rows stay valid JSON
    assert descriptors(np.zeros(3, np.float32), RATE)["loudness_lufs"] is None


def test_bad_audio_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="audio.T"):
        descriptors(np.zeros((RATE, 2), np.float32), RATE)
    with pytest.raises(ValueError, match="NaN"):
        descriptors(np.full(RATE, np.nan, np.float32), RATE)
    with pytest.raises(ValueError, match="32768"):
        descriptors(np.zeros(RATE, np.int16), RATE)


# ---------------------------------------------------------------------------------------------- Fréchet distance


def test_frechet_identical_is_zero():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((500, 8)) @ rng.standard_normal((8, 8))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(a, a[::-1].copy()) == pytest.approx(0.0, abs=1e-6)  # row order does not matter


def test_frechet_1d_closed_form():
    rng = np.random.default_rng(1)
    a, b = rng.normal(1.0, 2.0, (400, 1)), rng.normal(-0.5, 0.5, (300, 1))
    mu1, mu2, s1, s2 = a.mean(), b.mean(), a.std(ddof=1), b.std(ddof=1)
    assert frechet_distance(a, b) == pytest.approx((mu1 - mu2) ** 2 + (s1 - s2) ** 2, rel=1e-9)
    a, b = rng.normal(1.0, 2.0, (20000, 1)), rng.normal(-0.5, 0.5, (20000, 1))
    assert frechet_distance(a, b) == pytest.approx(1.5**2 + 1.5**2, rel=0.03)  # the population values


def test_frechet_mean_shift():
    rng = np.random.default_rng(2)
    dims, shift = 6, 0.5
    a = rng.standard_normal((20000, dims))
    b = rng.standard_normal((20000, dims)) + shift
    assert frechet_distance(a, b) == pytest.approx(dims * shift**2, rel=0.05)  # 1.5
    assert frechet_distance(a, a + shift) == pytest.approx(dims * shift**2, rel=1e-6)  # same samples, shifted


def test_frechet_singular_covariance_is_finite():
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((5, 16)), rng.standard_normal((7, 16))  # fewer rows than dims: singular
    distance = frechet_distance(a, b)
    assert math.isfinite(distance) and distance > 0
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-4)
    constant = np.ones((10, 4))  # zero covariance
    assert frechet_distance(constant, constant + 1) == pytest.approx(4.0, abs=1e-3)


def test_frechet_refusals():
    rng = np.random.default_rng(4)
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(rng.standard_normal((1, 4)), rng.standard_normal((10, 4)))
    with pytest.raises(ValueError, match="4 dims per row, b 5"):
        frechet_distance(rng.standard_normal((10, 4)), rng.standard_normal((10, 5)))
    with pytest.raises(ValueError, match=r"\[rows, dims\]"):
        frechet_distance(rng.standard_normal(10), rng.standard_normal(10))


# ------------------------------------------------------------------------------------------------------- summary


def test_summarize():
    rows = [
        {"file": "a.wav", "tempo_bpm": 140.0, "loudness_lufs": -10.0, "onset_density": 4},
        {"file": "b.wav", "tempo_bpm": None, "loudness_lufs": float("-inf"), "onset_density": 2},
        {"file": "c.wav", "tempo_bpm": 70.0, "loudness_lufs": -14.0, "onset_density": 0, "flag": True},
    ]
    summary = summarize(rows)
    assert list(summary) == ["tempo_bpm", "loudness_lufs", "onset_density"]  # no text, no bools
    assert summary["tempo_bpm"] == {"mean": 105.0, "std": pytest.approx(math.sqrt(2 * 35**2)), "count": 2}
    assert summary["loudness_lufs"] == {"mean": -12.0, "std": pytest.approx(math.sqrt(8)), "count": 2}
    assert summary["onset_density"] == {"mean": 2.0, "std": pytest.approx(2.0), "count": 3}
    assert summarize([{"tempo_bpm": None}]) == {"tempo_bpm": {"mean": None, "std": None, "count": 0}}
    assert summarize([]) == {}


# ---------------------------------------------------------------------------------------------------------- CLAP


@pytest.fixture(scope="module")
def tiny_clap(tmp_path_factory):
    """A random 2-layer CLAP with a 16 kHz, 1 s feature extractor and a character-level RoBERTa tokenizer."""
    import torch
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel, ClapProcessor, RobertaTokenizer

    out = tmp_path_factory.mktemp("clap")
    tokens = ["<s>", "<pad>", "</s>", "<unk>", "<mask>", "\u0120"] + list("abcdefghijklmnopqrstuvwxyz0123456789,")
    (out / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}))
    (out / "merges.txt").write_text("#version: 0.2\n")
    extractor = ClapFeatureExtractor(
        feature_size=16,
        sampling_rate=16000,
        hop_length=160,
        max_length_s=1,
        fft_window_size=400,
        frequency_max=8000,
        truncation="rand_trunc",
    )
    ClapProcessor(
        feature_extractor=extractor, tokenizer=RobertaTokenizer(str(out / "vocab.json"), str(out / "merges.txt"))
    ).save_pretrained(out)
    config = ClapConfig(
        text_config=dict(
            vocab_size=len(tokens),
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=40,
        ),
        audio_config=dict(
            spec_size=64,
            num_mel_bins=16,
            window_size=4,
            depths=[1, 1],
            num_attention_heads=[1, 2],
            patch_embeds_hidden_size=8,
            hidden_size=16,
        ),
        projection_dim=8,
    )
    torch.manual_seed(0)
    ClapModel(config).save_pretrained(out)
    return out


def test_clap_scores(tiny_clap):
    clips = [hats(2.5, seed=1) + sine(50, 2.5, 0.5), hats(0.7, seed=2), sine(440, 1.2, 0.3)]
    texts = ["808 trap beat, 140 bpm", "hi hats", "808 trap beat, 140 bpm"]
    scores = clap_scores(tiny_clap, clips, RATE, texts, device="cpu")
    assert len(scores) == 3
    assert all(math.isfinite(s) and -1 <= s <= 1 for s in scores)
    assert clap_scores(tiny_clap, clips, RATE, texts, device="cpu") == scores  # deterministic
    assert clap_scores(tiny_clap, clips[:1], RATE, texts[:1], device="cpu") == scores[:1]  # clip i with text i
    assert len(set(scores)) == 3


def test_clap_score_is_the_cosine_of_the_model_embeddings(tiny_clap):
    """A clip at the processor's rate and within one window: the score is CLAP's cosine, computed directly."""
    import torch
    from transformers import ClapModel, ClapProcessor

    model = ClapModel.from_pretrained(tiny_clap).eval()
    processor = ClapProcessor.from_pretrained(tiny_clap)
    clip, text = sine(60, 0.8, 0.5, rate=16000) + hats(0.8, rate=16000), "dark 808 beat"
    with torch.inference_mode():
        audio = model.get_audio_features(
            **processor.feature_extractor([clip], sampling_rate=16000, return_tensors="pt")
        )
        words = model.get_text_features(**processor.tokenizer([text], return_tensors="pt"))
    expected = float(torch.nn.functional.cosine_similarity(audio, words)[0])
    assert clap_scores(tiny_clap, [clip], 16000, [text], device="cpu")[0] == pytest.approx(expected, abs=1e-5)


def test_clap_folder_errors(tmp_path, tiny_clap):
    with pytest.raises(ClapFolderError, match=f"{tmp_path / 'nope'}: not a folder.*config.json"):
        clap_scores(tmp_path / "nope", [sine(50, 1.0)], RATE, ["x"])
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(
        ClapFolderError,
        match=f"{tmp_path}: not a CLAP model folder.*model_type 't5'.*"
        r"preprocessor_config.json",
    ):
        clap_scores(tmp_path, [sine(50, 1.0)], RATE, ["x"])
    with pytest.raises(ValueError, match="2 clips but 1 texts"):
        clap_scores(tiny_clap, [sine(50, 1.0)] * 2, RATE, ["x"])
    assert clap_scores(tiny_clap, [], RATE, []) == []
