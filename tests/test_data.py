"""`make manifests`: every caption form, every audio format, every bad input, against what AudioCraft reads."""

import json
import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf

from musicgen_finetune.data import manifests as data
from musicgen_finetune.data.audio import estimate_key, estimate_tempo, segment_bounds
from musicgen_finetune.data.captions import with_tempo_and_key
from musicgen_finetune.data.manifests import DatasetError, ManifestOptions, build_manifests

RATE = 44100


def tone(seconds, freq=220.0, rate=RATE, channels=2, amplitude=0.3):
    t = np.arange(int(seconds * rate)) / rate
    mono = amplitude * np.sin(2 * np.pi * freq * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 2 * t))
    return np.stack([mono] * channels, axis=1).astype(np.float32)


def encode(source, target):
    """Real ffmpeg, as users' files were made."""
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(source), str(target)], check=True)


def load_report(out):
    return json.loads((out / "report.json").read_text())


def manifest(out, split):
    lines = (out / split / "data.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line]


def sidecar(entry):
    return json.loads(open(entry["path"][: -len(".wav")] + ".json").read())


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
    """A folder like a real one: many formats, rates, channel counts, names, caption forms, and bad files."""
    folder = tmp_path_factory.mktemp("mixed")
    (folder / "train").mkdir()
    (folder / "more").mkdir()
    sf.write(folder / "train/pcm16 stereo.wav", tone(3), RATE, subtype="PCM_16")
    sf.write(folder / "train/pcm24.wav", tone(3, 330, 48000, 1), 48000, subtype="PCM_24")
    sf.write(folder / "train/float32.wav", tone(3, 440, 22050), 22050, subtype="FLOAT")
    sf.write(folder / "train/long.flac", tone(7.5, 261.6), RATE)  # cut into 2 s segments
    sf.write(folder / "more/ünïcødé name.wav", tone(3, 392), RATE)
    for ext in ("mp3", "ogg", "m4a"):
        encode(folder / "train/pcm16 stereo.wav", folder / f"more/encoded.{ext}")
    # captions: metadata.json for train/, a .txt and a .json sidecar in more/, a csv for the encoded ones
    (folder / "metadata.json").write_text(
        json.dumps(
            [
                {"audio": "train/pcm16 stereo.wav", "text": "stereo beat", "bpm": 90, "genre": "boom bap"},
                {"audio": "train/pcm24.wav", "text": "mono 48k tone", "key": "E minor"},
                {"audio": "train/float32.wav", "text": "float tone"},
                {"audio": "train/long.flac", "text": "a long track"},
                {"audio": "train/missing.wav", "text": "caption without a file"},
                {"audio": "../outside.wav", "text": "escapes the folder"},
            ]
        )
    )
    (folder / "more/ünïcødé name.txt").write_text("unicode caption from a txt\n")
    (folder / "more/metadata.csv").write_text(
        'file_name,text,bpm\nencoded.mp3,"mp3 beat, heavy",100\nencoded.ogg,ogg beat,\nencoded.m4a,m4a beat,\n'
    )
    # bad files, each with a caption so that only the audio is at fault
    bad = {"corrupt.wav": b"RIFF\x00\x00garbage" * 10, "notaudio.mp3": b"this is a text file, not an mp3\n"}
    for name, payload in bad.items():
        (folder / "more" / name).write_bytes(payload)
    sf.write(folder / "more/empty.wav", np.zeros((0, 1), np.float32), RATE)
    sf.write(folder / "more/silent.wav", np.zeros((RATE * 2, 1), np.float32), RATE)
    sf.write(folder / "more/short.wav", tone(0.3), RATE)
    nan = tone(2)
    nan[100] = np.nan
    sf.write(folder / "more/nan.wav", nan, RATE, subtype="FLOAT")
    shutil.copy(folder / "train/pcm24.wav", folder / "train/pcm24_copy.wav")  # after the original in path order
    (folder / "train/pcm24_copy.txt").write_text("the same audio again")
    sf.write(folder / "more/uncaptioned.wav", tone(2), RATE)
    for name in ("corrupt", "notaudio", "empty", "silent", "short", "nan"):
        (folder / "more" / f"{name}.txt").write_text(f"caption of {name}")
    return folder


@pytest.fixture(scope="module")
def mixed(mixed_folder, tmp_path_factory):
    out_root = tmp_path_factory.mktemp("out")
    options = ManifestOptions(segment=2.0, valid=0.25, min_seconds=1.0)
    return build_manifests(mixed_folder, "mixed", options, out_root=out_root), options


def test_every_format_is_converted_to_the_model_format(mixed):
    out, options = mixed
    entries = manifest(out, "train") + manifest(out, "valid")
    sources = {sidecar(e)["source_file"] for e in entries}
    assert sources == {
        "train/pcm16 stereo.wav",
        "train/pcm24.wav",
        "train/float32.wav",
        "train/long.flac",
        "more/ünïcødé name.wav",
        "more/encoded.mp3",
        "more/encoded.ogg",
        "more/encoded.m4a",
    }
    for entry in entries:
        info = sf.info(entry["path"])
        assert (info.samplerate, info.channels) == (options.sample_rate, options.channels) == (entry["sample_rate"], 1)
        assert entry["duration"] == pytest.approx(info.frames / info.samplerate, abs=1e-6)  # the true duration
        assert out.resolve() in __import__("pathlib").Path(entry["path"]).parents  # never the user's file


def test_long_tracks_are_cut_and_short_remainders_dropped(mixed):
    out, _ = mixed
    long = [
        e for e in manifest(out, "train") + manifest(out, "valid") if sidecar(e)["source_file"] == "train/long.flac"
    ]
    assert sorted(e["duration"] for e in long) == pytest.approx([2.0, 2.0, 2.0])  # 7.5 s: the 1.5 s rest < 0.8x2
    assert sorted(sidecar(e)["start"] for e in long) == [0.0, 2.0, 4.0]
    assert len({e["path"].rsplit("/", 1)[0] for e in long}) == 1  # one source, one folder, one split
    assert segment_bounds(100, 10, 3.0, 0.8) == [(0, 30), (30, 60), (60, 90)]
    assert segment_bounds(115, 10, 3.0, 0.8) == [(0, 30), (30, 60), (60, 90), (90, 115)]
    assert segment_bounds(20, 10, 3.0, 0.8) == [(0, 20)]


def test_every_bad_input_is_skipped_with_its_reason(mixed):
    out, _ = mixed
    reasons = {s["file"]: s["reason"] for s in load_report(out)["skipped"]}
    expected = {
        "more/corrupt.wav": "not decodable",
        "more/notaudio.mp3": "not decodable",
        "more/empty.wav": "empty",
        "more/silent.wav": "silent",
        "more/short.wav": "too short",
        "more/nan.wav": "NaN",
        "train/pcm24_copy.wav": "duplicate of train/pcm24.wav",
        "more/uncaptioned.wav": "no caption",
        "train/missing.wav": "does not exist",
        "../outside.wav": "leaves the data folder",
    }
    assert set(reasons) == set(expected)
    for file, words in expected.items():
        assert words in reasons[file], (file, reasons[file])
    report = load_report(out)
    assert report["files_found"] == 16 and report["files_used"] == 8


def test_sidecars_have_every_field_and_the_right_caption(mixed):
    out, _ = mixed
    by_source = {}
    for entry in manifest(out, "train") + manifest(out, "valid"):
        info = sidecar(entry)
        assert set(data.MUSIC_INFO_FIELDS) <= set(info)
        by_source[info["source_file"]] = info
    assert by_source["train/pcm16 stereo.wav"]["description"].startswith("stereo beat, 90 bpm")
    assert by_source["train/pcm16 stereo.wav"]["genre"] == "boom bap"
    assert by_source["train/pcm24.wav"]["key"] == "E minor" and "key" not in by_source["train/pcm24.wav"]["measured"]
    assert by_source["more/ünïcødé name.wav"]["description"].startswith("unicode caption from a txt")
    assert by_source["more/encoded.mp3"]["description"].startswith("mp3 beat, heavy")
    assert by_source["more/encoded.mp3"]["bpm"] == "100"
    assert by_source["more/encoded.ogg"]["caption_source"] == "metadata.csv, line 3"
    # a 440 Hz tone with a 2 Hz tremolo: one note and no backbeat, so neither a key nor a tempo is trusted; the
    # measurement's confidence is recorded, and nothing is added to the caption (this once read "float tone, 120 bpm")
    tone = by_source["train/float32.wav"]
    assert (tone["bpm"], tone["key"], tone["measured"], tone["description"]) == (None, None, [], "float tone")
    assert 0 <= tone["bpm_confidence"] < 0.5 and 0 <= tone["key_confidence"] < 0.5
    assert by_source["train/pcm16 stereo.wav"]["bpm_confidence"] is None  # given by the metadata, not measured
    assert by_source["train/pcm24.wav"]["key_confidence"] is None


def test_music_dataset_yields_the_descriptions(mixed):
    from audiocraft.data.music_dataset import MusicDataset

    out, options = mixed
    dataset = MusicDataset.from_meta(
        str(out / "train"),
        segment_duration=2.0,
        num_samples=6,
        shuffle=False,
        sample_rate=options.sample_rate,
        channels=1,
        return_info=True,
    )
    descriptions = {sidecar({"path": e["path"]})["description"] for e in manifest(out, "train")}
    for index in range(6):
        wav, info = dataset[index]
        assert wav.shape == (1, 2 * options.sample_rate)
        assert info.description in descriptions


def test_segment_plan_is_written_for_training(mixed):
    out, options = mixed
    dset = (out / "dset.yaml").read_text()
    assert f"train: {out / 'train'}" in dset and f"max_sample_rate: {options.sample_rate}" in dset
    plan = load_report(out)["segment_plan"]
    assert plan["segment_duration"] == 2.0 and "full 2 s" in plan["why"]
    fitted = data.segment_plan([10.0] * 9 + [3.0], 30)  # most are short: a length that fits nearly all of them
    assert 3.0 < fitted["segment_duration"] <= 10.0 and fitted["padding_with_special_token"]
    assert data.segment_plan([10.0, 12.0, 15.0], 30)["segment_duration"] == 10.0
    padded = data.segment_plan([30.0] * 8 + [10.0, 12.0], 30)
    assert padded["segment_duration"] == 30 and padded["padding_with_special_token"]  # few short: mask padding
    assert "masked from the loss" in padded["why"]


def test_split_is_seeded_exact_and_by_source(beats, tmp_path):
    first = build_manifests(beats, "a", ManifestOptions(segment=1.0, valid=0.25), out_root=tmp_path)
    again = build_manifests(beats, "b", ManifestOptions(segment=1.0, valid=0.25), out_root=tmp_path)
    other = build_manifests(beats, "c", ManifestOptions(segment=1.0, valid=0.25, seed=7), out_root=tmp_path)

    def valid_sources(out):
        return sorted({sidecar(e)["source_file"] for e in manifest(out, "valid")})

    assert valid_sources(first) == valid_sources(again) != valid_sources(other)
    assert len(valid_sources(first)) == 2  # 25% of 8 files, exactly
    train_sources = {sidecar(e)["source_file"] for e in manifest(first, "train")}
    assert not train_sources & set(valid_sources(first))  # no file has segments on both sides


def test_existing_train_valid_layout_is_respected(tmp_path):
    for split, count in (("train", 3), ("valid", 2)):
        (tmp_path / "in" / split).mkdir(parents=True)
        for i in range(count):
            sf.write(tmp_path / "in" / split / f"{split}{i}.wav", tone(2, 200 + 50 * i + (split == "valid")), RATE)
    out = build_manifests(
        tmp_path / "in", "layout", ManifestOptions(segment=2.0, text="a beat"), out_root=tmp_path / "out"
    )
    assert {sidecar(e)["source_file"].split("/")[0] for e in manifest(out, "valid")} == {"valid"}
    assert len(manifest(out, "valid")) == 2 and len(manifest(out, "train")) == 3
    assert all(sidecar(e)["caption_source"] == "TEXT" for e in manifest(out, "train"))


def test_strict_stops_at_the_first_bad_file(mixed_folder, tmp_path):
    with pytest.raises(DatasetError, match="STRICT=1"):
        build_manifests(mixed_folder, "strict", ManifestOptions(segment=2.0, strict=True), out_root=tmp_path)
    assert not list(tmp_path.iterdir())  # nothing half-written


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("metadata.json", '[{"audio": "a.wav", "text": "x"},\n {"audio": }]', "metadata.json: invalid JSON at line 2"),
        ("metadata.jsonl", '{"file_name": "a.wav", "text": "x"}\nnot json\n', "metadata.jsonl: invalid JSON on line 2"),
        ("metadata.csv", "file_name,text\na.wav,one,two\n", "metadata.csv: line 2 has 3 fields"),
        ("metadata.csv", "name;caption\na.wav;x\n", "line 1 must be a header"),
    ],
)
def test_malformed_caption_files_name_the_line(tmp_path, name, content, message):
    sf.write(tmp_path / "a.wav", tone(2), RATE)
    (tmp_path / name).write_text(content)
    with pytest.raises(DatasetError, match=message):
        build_manifests(tmp_path, "bad", out_root=tmp_path / "out")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_rerun_reuses_converted_audio_and_failure_keeps_the_previous_dataset(beats, tmp_path):
    options = ManifestOptions(segment=1.0, valid=0.25)
    out = build_manifests(beats, "kept", options, out_root=tmp_path)
    before = (out / "train" / "data.jsonl").read_text()
    inode = (out / "train" / "data.jsonl").stat().st_ino
    some_wav = manifest(out, "train")[0]["path"]
    wav_inode = __import__("os").stat(some_wav).st_ino
    again = build_manifests(beats, "kept", options, out_root=tmp_path)
    assert load_report(again)["files_reused"] == load_report(again)["files_used"] == 8
    assert __import__("os").stat(some_wav).st_ino == wav_inode  # the same converted file, linked, not redone
    assert (again / "train" / "data.jsonl").read_text() == before and inode
    broken = tmp_path / "broken"
    shutil.copytree(beats, broken)
    (broken / "metadata.json").write_text("[{")
    with pytest.raises(DatasetError, match="invalid JSON"):
        build_manifests(broken, "kept", options, out_root=tmp_path)
    assert (out / "train" / "data.jsonl").read_text() == before
    assert not (tmp_path / "kept.partial").exists()


def test_no_audio_and_bad_names_are_explained(tmp_path):
    with pytest.raises(DatasetError, match="is not a folder"):
        build_manifests(tmp_path / "nope", "x", out_root=tmp_path)
    with pytest.raises(DatasetError, match="no audio file found"):
        build_manifests(tmp_path, "x", out_root=tmp_path / "out")
    with pytest.raises(DatasetError, match="NAME="):
        build_manifests(tmp_path, "../escape", out_root=tmp_path / "out")


def test_tempo_and_key_estimates():
    rate = 22050
    clicks = np.zeros(rate * 8, np.float32)
    for beat in range(int(8 * 120 / 60)):
        start = int(beat * rate * 60 / 120)
        clicks[start : start + 200] = np.hanning(200)
    tempo = estimate_tempo(clicks[None], rate)
    assert tempo == pytest.approx(120, rel=0.04)
    t = np.arange(rate * 4) / rate
    a_minor = sum(np.sin(2 * np.pi * f * t) for f in (220.0, 261.63, 329.63)).astype(np.float32)  # A C E
    assert estimate_key(a_minor[None] * 0.2, rate) == "A minor"
    assert estimate_tempo(np.zeros((1, rate), np.float32), rate) is None


def test_make_manifests_command_prints_the_summary_and_strict_fails(beats, workdir, tmp_path):
    from conftest import run_tool

    folder = tmp_path / "beats"
    shutil.copytree(beats, folder)
    (folder / "train" / "beat_002.wav").write_bytes(b"broken")
    result = run_tool(["tools/manifests.py", "--data", str(folder), "--name", "cli", "--segment", "1"], workdir)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "8 audio files found, 7 used" in result.stdout
    assert "skipped   train/beat_002.wav: not decodable audio" in result.stdout
    assert "segments  1 s: every segment is a full 1 s" in result.stdout
    strict = run_tool(["tools/manifests.py", "--data", str(folder), "--name", "cli2", "--strict"], workdir)
    assert strict.returncode == 2 and "error: train/beat_002.wav: not decodable audio" in strict.stderr
    assert not (workdir / "manifests" / "cli2").exists()


def test_descriptions_keep_what_the_caption_says():
    assert with_tempo_and_key("trap beat in F minor", 140, "C minor") == "trap beat in F minor, 140 bpm"
    assert with_tempo_and_key("trap beat, 90 bpm", 140.4, None) == "trap beat, 90 bpm"
    assert with_tempo_and_key("trap beat", "fast", "C minor") == "trap beat, C minor"  # a bpm that is no number


def test_training_reads_whole_segments_and_masks_padding(mixed):
    """Upstream seeks up to 20% into a segment (min_segment_ratio 0.8) and pads the rest with zeros."""
    out, _ = mixed
    dset = (out / "dset.yaml").read_text()
    assert "min_segment_ratio: 1.0" in dset and "padding_with_special_token: true" in dset


@pytest.mark.parametrize("case", ["near silence", "+inf", "-inf", "nan"])
def test_near_silent_and_non_finite_audio_is_refused(case):
    """Silence is quiet audio, not only digital zero: noise 100 dB down is silent; infinities and NaN are refused."""
    from musicgen_finetune.data import audio as aa

    rate = 32000
    audio = np.random.default_rng(0).standard_normal((1, 2 * rate)).astype(np.float32)
    if case == "near silence":
        audio *= 1e-5  # RMS -100 dBFS, far below the -60 dBFS threshold, and not one zero sample
        assert np.all(audio != 0)
    else:
        audio[0, rate] = {"+inf": np.inf, "-inf": -np.inf, "nan": np.nan}[case]
    with pytest.raises(aa.BadAudio, match="silent" if case == "near silence" else "NaN or infinite"):
        aa.check(audio, rate, min_seconds=1.0)
    aa.check(np.random.default_rng(0).standard_normal((1, 2 * rate)).astype(np.float32) * 0.1, rate, 1.0)


def test_long_tracks_are_cut_at_the_training_length_when_it_is_shorter(tmp_path):
    """Mostly short clips and one long track: training runs on a length shorter than SEGMENT, and the long track
    is cut at that length too, so every manifest row is a whole segment, read from its start (min_segment_ratio
    1: no random seek, one token-cache entry per row)."""
    import soundfile as sf
    from omegaconf import OmegaConf

    rate, rng = 16000, np.random.default_rng(3)
    folder = tmp_path / "clips"
    folder.mkdir()
    lengths = [3.5, 4.0, 4.5, 3.2, 3.8, 4.2, 3.6, 20.0]  # seconds; the last one is the long track
    for index, seconds in enumerate(lengths):
        noise = rng.standard_normal(int(seconds * rate)).astype(np.float32) * 0.2
        sf.write(folder / f"clip{index}.wav", noise, rate)
    out = build_manifests(folder, "cut", ManifestOptions(segment=10.0, valid=0.25, text="noise"))
    plan = OmegaConf.load(out / "dset.yaml")
    length = float(plan.dataset.segment_duration)
    assert length < 10.0 and plan.dataset.min_segment_ratio == 1.0
    rows = [
        json.loads(line)
        for split in ("train", "valid")
        for line in (out / split / "data.jsonl").read_text().splitlines()
    ]
    assert all(row["duration"] <= length + 1e-3 for row in rows)
    long_track = [row for row in rows if "clip7" in row["path"]]
    assert len(long_track) == int(20.0 // length) and all(abs(r["duration"] - length) < 1e-3 for r in long_track)
