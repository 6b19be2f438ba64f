"""Augmented variants: the audio changes as the caption says, and only on the training side."""

import json

import numpy as np
import pytest

from musicgen_finetune.data import augment
from musicgen_finetune.data.librosa_loader import load_librosa
from musicgen_finetune.data.manifests import DatasetError, ManifestOptions, build_manifests

RATE = 22050


def peak_frequency(audio, rate):
    spectrum = np.abs(np.fft.rfft(audio[0] * np.hanning(audio.shape[-1])))
    return np.fft.rfftfreq(audio.shape[-1], 1 / rate)[spectrum.argmax()]


def test_pitch_shift_by_two_semitones_measures_two_semitones_higher():
    t = np.arange(RATE * 2) / RATE
    tone = (0.3 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)[None]
    shifted = augment.render(tone, RATE, augment.Variant("pitch", 2))
    semitones = 12 * np.log2(peak_frequency(shifted, RATE) / peak_frequency(tone, RATE))
    assert semitones == pytest.approx(2.0, abs=0.1)
    assert shifted.shape == tone.shape


def beat_period(audio, hop=32):
    """The beat period in seconds: the strongest autocorrelation lag of the onset envelope between 0.4 and 0.7 s,
    at a 1.5 ms resolution (librosa's tempo estimate is quantised to a coarse bpm grid)."""
    librosa = load_librosa()

    envelope = librosa.onset.onset_strength(y=audio, sr=RATE, hop_length=hop)
    envelope = envelope - envelope.mean()
    correlation = np.correlate(envelope, envelope, mode="full")[len(envelope) - 1 :]
    low, high = int(0.4 * RATE / hop), int(0.7 * RATE / hop)
    return (low + int(np.argmax(correlation[low:high]))) * hop / RATE


def test_time_stretch_to_095_measures_five_percent_slower():
    clicks = np.zeros(RATE * 10, np.float32)
    for beat in range(20):
        start = int(beat * RATE * 0.5)  # 120 bpm
        clicks[start : start + 200] = np.hanning(200)
    stretched = augment.render(clicks[None], RATE, augment.Variant("tempo", 0.95))
    assert stretched.shape[-1] == pytest.approx(clicks.shape[-1] / 0.95, rel=0.01)
    assert beat_period(clicks) == pytest.approx(0.5, rel=0.01)
    assert beat_period(stretched[0]) / beat_period(clicks) == pytest.approx(1 / 0.95, rel=0.01)


@pytest.mark.parametrize(
    "key, semitones, expected",
    [
        ("F minor", 2, "G minor"),
        ("B major", 1, "C major"),
        ("Eb minor", -1, "D minor"),
        ("c# min", 12, "C# minor"),
        # "Fm"-style minors stay minor (issue 25: once transposed as major, and no test saw it)
        ("Fm", 2, "G minor"),
        ("F#m", -1, "F minor"),
        ("Bbm", 1, "B minor"),
        # either spelling is read; the result is spelled as musicians write keys: flats for Bb/Eb minor and the
        # Db/Eb/Ab/Bb majors, sharps for C#/G# minor and F# major (audio.MAJOR_KEYS / MINOR_KEYS)
        ("A minor", 1, "Bb minor"),
        ("A# minor", 0, "Bb minor"),
        ("D# min", 0, "Eb minor"),
        ("E minor", -1, "Eb minor"),
        ("A minor", -1, "G# minor"),
        ("C minor", 1, "C# minor"),
        ("C major", 1, "Db major"),
        ("G# major", 0, "Ab major"),
        ("D major", 1, "Eb major"),
        ("F major", 1, "F# major"),
        ("Gb major", 0, "F# major"),
        ("E# minor", 0, "F minor"),
        ("F minor", 0.5, None),
        ("not a key", 2, None),
        (None, 2, None),
    ],
)
def test_keys_transpose(key, semitones, expected):
    assert augment.transpose_key(key, semitones) == expected


def test_description_follows_the_variant():
    info = {"key": "F minor", "bpm": 140, "description": "808 beat, 140 bpm, F minor"}
    up = augment.transformed_info(info, augment.Variant("pitch", 2))
    assert (up["key"], up["description"]) == ("G minor", "808 beat, 140 bpm, G minor")
    slow = augment.transformed_info(info, augment.Variant("tempo", 0.95))
    assert (slow["bpm"], slow["description"]) == (133.0, "808 beat, 133 bpm, F minor")
    assert slow["augmented"] == {"kind": "tempo", "amount": 0.95, "name": "tempo0.95"}


@pytest.mark.parametrize(
    "spec, message",
    [
        ("pitch", "expected <kind>=<values>"),
        ("speed=1.1", "kind one of"),
        ("tempo=3", "between 0.5 and 2"),
        ("pitch=x", "not a number"),
    ],
)
def test_bad_specs_show_the_expected_form(spec, message):
    with pytest.raises(augment.AugmentSpecError, match=message):
        augment.parse(spec)


@pytest.fixture(scope="module")
def augmented(beats, tmp_path_factory):
    out_root = tmp_path_factory.mktemp("aug")
    options = ManifestOptions(segment=1.0, valid=0.25, augment="pitch=2;tempo=0.95;gain_db=-3", augment_weight=0.5)
    return build_manifests(beats, "aug", options, out_root=out_root), options


def lines(out, split):
    return [json.loads(line) for line in (out / split / "data.jsonl").read_text().splitlines() if line]


def sidecar(entry):
    return json.loads(open(entry["path"][:-4] + ".json").read())


def test_variants_are_training_only_with_true_metadata_and_weights(augmented):
    out, _ = augmented
    assert not any("augmented" in sidecar(e) for e in lines(out, "valid"))
    valid_sources = {sidecar(e)["source_file"] for e in lines(out, "valid")}
    train = lines(out, "train")
    originals = {(sidecar(e)["source_file"]): sidecar(e) for e in train if "augmented" not in sidecar(e)}
    variants = [e for e in train if "augmented" in sidecar(e)]
    assert {v["augmented"]["name"] for v in map(sidecar, variants)} == {"pitch+2", "tempo0.95", "gain_db-3"}
    for entry in variants:
        info = sidecar(entry)
        original = originals[info["source_file"]]
        assert info["source_file"] not in valid_sources  # a variant never crosses the split
        assert entry["weight"] == 0.5
        if info["augmented"]["kind"] == "pitch":
            assert info["key"] == augment.transpose_key(original["key"], 2) and info["key"] in info["description"]
        if info["augmented"]["kind"] == "tempo":
            # whole bpm, as every written tempo (issue 13: captions read "142.5 bpm")
            assert isinstance(info["bpm"], int) and abs(info["bpm"] - float(original["bpm"]) * 0.95) <= 0.5
            assert f"{info['bpm']} bpm" in info["description"]
    assert all(e["weight"] == 1.0 for e in train if "augmented" not in sidecar(e))


def test_report_counts_originals_and_variants(augmented):
    out, _ = augmented
    report = json.loads((out / "report.json").read_text())
    train, valid = report["splits"]["train"], report["splits"]["valid"]
    assert valid["variant_segments"] == 0 and train["variant_segments"] > train["original_segments"]
    assert train["segments"] == train["original_segments"] + train["variant_segments"] == len(lines(out, "train"))
    assert {e["variant"] for e in report["augmentation"]["examples"]} == {"pitch+2", "tempo0.95", "gain_db-3"}


def test_audiocraft_samples_variants_by_their_weight(augmented):
    from audiocraft.data.music_dataset import MusicDataset

    out, options = augmented
    dataset = MusicDataset.from_meta(
        str(out / "train"),
        segment_duration=1.0,
        num_samples=10,
        sample_rate=32000,
        channels=1,
        return_info=True,
        sample_on_weight=True,
        sample_on_duration=False,
    )
    probabilities = dataset.sampling_probabilities
    weights = [m.weight for m in dataset.meta]
    original = probabilities[weights.index(1.0)]
    variant = probabilities[weights.index(0.5)]
    assert float(variant / original) == pytest.approx(options.augment_weight)


def test_rerun_reuses_rendered_variants(beats, augmented):
    out, options = augmented
    again = build_manifests(beats, "aug", options, out_root=out.parent)
    report = json.loads((again / "report.json").read_text())
    assert report["files_reused"] == report["files_used"]


def test_bad_spec_stops_before_anything_is_written(beats, tmp_path):
    with pytest.raises(DatasetError, match="AUGMENT"):
        build_manifests(beats, "x", ManifestOptions(augment="pitch=up"), out_root=tmp_path)
    assert not list(tmp_path.iterdir())


def test_only_keys_move_and_unreadable_values_do_not_crash():
    info = {"key": "F minor", "bpm": "140 bpm", "description": "dark beat with a minor feel, 140 bpm, F minor"}
    up = augment.transformed_info(info, augment.Variant("pitch", 2))
    assert up["description"] == "dark beat with a minor feel, 140 bpm, G minor"  # "a minor feel" is no key
    slow = augment.transformed_info({"bpm": "fast", "description": "beat"}, augment.Variant("tempo", 0.95))
    assert slow["bpm"] is None and slow["description"] == "beat"
    with pytest.raises(augment.AugmentSpecError, match="whole"):
        augment.parse("pitch=0.5")
    with pytest.raises(augment.AugmentSpecError, match="unchanged"):
        augment.parse("tempo=1")


@pytest.mark.parametrize(
    "key, semitones, expected", [("Am", 2, "B minor"), ("Em", -2, "D minor"), ("Gmaj", 2, "A major")]
)
def test_short_key_names_transpose(key, semitones, expected):
    assert augment.transpose_key(key, semitones) == expected


@pytest.mark.parametrize(
    "description, expected",
    [
        ("808 beat, F minor, 140 bpm", "808 beat, 140 bpm"),
        ("808 beat, 140 bpm, F minor", "808 beat, 140 bpm"),
        ("F minor, 808 beat", "808 beat"),
    ],
)
def test_a_key_that_cannot_move_is_dropped_from_the_caption_with_its_comma(description, expected):
    """A fractional shift leaves no key to name: the caption loses it rather than keep a false one."""
    out = augment.transformed_info({"key": "F minor", "description": description}, augment.Variant("pitch", 0.5))
    assert out["key"] is None and out["description"] == expected


def test_a_variant_of_a_clip_without_a_caption_has_none():
    assert augment.transformed_info({"key": "F minor"}, augment.Variant("pitch", 2))["description"] == ""


def test_gain_variants_scale_and_stay_under_the_peak_ceiling():
    t = np.arange(4000) / 8000
    audio = np.asfortranarray(0.25 * np.stack([np.sin(2 * np.pi * 220 * t), np.cos(2 * np.pi * 220 * t)]))
    for gain_db in (6, -6):
        out = augment.render(audio, 8000, augment.Variant("gain_db", gain_db))
        assert out.dtype == np.float32 and out.flags.c_contiguous
        np.testing.assert_allclose(out, audio * 10 ** (gain_db / 20), rtol=1e-6)
    loud = augment.render(audio, 8000, augment.Variant("gain_db", 12))  # 0.25 x 3.98 = 0.995: limited to 0.99
    assert abs(float(np.abs(loud).max()) - 0.99) < 1e-6
    np.testing.assert_allclose(loud, audio / np.abs(audio).max() * 0.99, rtol=1e-5)


def test_a_key_written_in_capitals_keeps_its_flat():
    """`EB MAJOR` (a tag written in capitals) is E-flat major, not E major: the flat read in either case."""
    assert augment.transpose_key("EB MAJOR", 0) == "Eb major"
    assert augment.transpose_key("EB major", 2) == "F major"
    assert augment.transpose_key("E major", 2) == "F# major"
