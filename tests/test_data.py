"""Synthetic 808 beats and the minimal manifest step: what AudioCraft's MusicDataset reads."""
import json

import librosa
import numpy as np
import pytest
import soundfile as sf

from musicgen_finetune import data, synth808


def test_beats_have_the_captioned_tempo_and_808_weight(beats):
    entries = json.loads((beats / "metadata.json").read_text())
    assert len(entries) == 12 and all(e["text"] and e["audio"].startswith("train/") for e in entries)
    for entry in entries[:4]:
        audio, rate = sf.read(beats / entry["audio"])
        assert rate == synth808.SAMPLE_RATE and audio.shape[1] == 2
        mono = audio.mean(axis=1)
        onset = librosa.onset.onset_strength(y=mono, sr=rate)
        tempo = float(librosa.feature.tempo(onset_envelope=onset, sr=rate, start_bpm=entry["bpm"])[0])
        assert any(abs(tempo * f - entry["bpm"]) / entry["bpm"] < 0.05 for f in (0.5, 1, 2)), (tempo, entry)
        spectrum = np.abs(np.fft.rfft(mono)) ** 2
        freqs = np.fft.rfftfreq(len(mono), 1 / rate)
        assert spectrum[freqs < 150].sum() / spectrum.sum() > 0.4  # the 808 dominates
        assert f"{entry['bpm']} bpm" in entry["text"] and entry["key"] in entry["text"]


def test_synthesis_is_deterministic(tmp_path):
    first = synth808.write_dataset(tmp_path / "a", count=2, seconds=1.0, seed=1)
    second = synth808.write_dataset(tmp_path / "b", count=2, seconds=1.0, seed=1)
    assert (first / "metadata.json").read_text() == (second / "metadata.json").read_text()
    assert (first / "train/beat_001.wav").read_bytes() == (second / "train/beat_001.wav").read_bytes()


def test_manifests_hold_model_rate_audio_with_complete_sidecars(dataset, beats):
    from audiocraft.data.audio_dataset import load_audio_meta
    captions = {e["audio"]: e["text"] for e in json.loads((beats / "metadata.json").read_text())}
    total = 0
    for split in ("train", "valid"):
        metas = load_audio_meta(dataset / split / "data.jsonl")
        assert metas
        total += len(metas)
        for meta in metas:
            info = sf.info(meta.path)
            assert (info.samplerate, info.channels, meta.sample_rate) == (32000, 1, 32000)
            assert meta.duration == pytest.approx(3.0, abs=0.01) == pytest.approx(info.duration, abs=0.01)
            sidecar = json.loads(open(meta.path[:-4] + ".json").read())
            assert set(data.MUSIC_INFO_FIELDS) <= set(sidecar)
            assert sidecar["description"] in captions.values() and sidecar["bpm"] and sidecar["key"]
    assert total == len(captions)
    report = json.loads((dataset / "report.json").read_text())
    assert report["splits"]["train"]["files"] + report["splits"]["valid"]["files"] == total


def test_music_dataset_reads_the_captions(dataset):
    from audiocraft.data.music_dataset import MusicDataset
    music = MusicDataset.from_meta(str(dataset / "train"), segment_duration=1.0, num_samples=4, sample_rate=32000,
                                   channels=1, return_info=True)
    wav, info = music[0]
    assert wav.shape == (1, 32000) and "808" in info.description


def test_split_is_stable_when_files_are_added():
    names = [f"train/beat_{i:03d}.wav" for i in range(50)]
    before = {n: data.is_valid_split(n, 0.2) for n in names}
    assert {n: data.is_valid_split(n, 0.2) for n in names + ["train/new.wav"] if n in before} == before
    assert 0 < sum(before.values()) < len(names)


def test_missing_metadata_is_named(tmp_path):
    with pytest.raises(data.DatasetError, match=str(tmp_path / "metadata.json")):
        data.build_manifests(tmp_path, "x", out_root=tmp_path / "out")


def test_missing_audio_is_named_and_nothing_is_left_behind(beats, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "metadata.json").write_text(json.dumps([{"audio": "gone.wav", "text": "x"}]))
    with pytest.raises(data.DatasetError, match="gone.wav does not exist"):
        data.build_manifests(folder, "x", out_root=tmp_path / "out")
    assert not (tmp_path / "out" / "x").exists()


def test_failure_keeps_the_previous_dataset(beats, tmp_path):
    out = data.build_manifests(beats, "kept", out_root=tmp_path / "out", valid_fraction=0.3)
    before = (out / "train" / "data.jsonl").read_text()
    broken = tmp_path / "broken"
    shutil_copy = __import__("shutil").copytree
    shutil_copy(beats, broken)
    (broken / "train" / "beat_005.wav").write_bytes(b"not audio")
    with pytest.raises(data.DatasetError, match="beat_005.wav could not be decoded"):
        data.build_manifests(broken, "kept", out_root=tmp_path / "out", valid_fraction=0.3)
    assert (out / "train" / "data.jsonl").read_text() == before
    assert not (tmp_path / "out" / "kept.partial").exists()
