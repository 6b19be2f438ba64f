"""A test corpus of beats made from real recorded sounds, built at test time (nothing binary in git, issue 25).

Drums: Hydrogen's TR-808 emulation kit (Debian `hydrogen-data`: recorded samples, 44.1 kHz flac), sequenced here,
kick, a snare or clap on beats 2 and 4, closed hi-hats. Bass, electric piano and pads: a MIDI file written here and
rendered by `fluidsynth` through the FluidR3 GM soundfont (Debian `fluidr3mono-gm-soundfont`). The two are mixed with
numpy and written as 16-bit wav. Every clip's tempo and key is how it was made (`Clip`), never what the code under
test measures.

The keys are mostly minor with the hip-hop loop i-VI-III-VII (A minor: Am F C G), which has exactly the chords of
its relative major's vi-IV-I-V: only where the loop starts and rests, and what the bass does, say which is the tonic.
Some are major (I-V-vi-IV, ...), so that an estimate that always says "minor" fails too. Flat keys are spelled as
musicians write them (Bb minor, Eb major), the spelling the captions must use.
"""

import dataclasses
import os
import shutil
import struct
import subprocess
import typing as tp
from pathlib import Path

import numpy as np

KIT = Path("/usr/share/hydrogen/data/drumkits/TR808EmulationKit")
SOUNDFONT = Path("/usr/share/sounds/sf3/FluidR3Mono_GM.sf3")
PACKAGES = "hydrogen-data fluidr3mono-gm-soundfont fluidsynth sox libsox-fmt-all"
INSTALL = f"apt-get install -y {PACKAGES}"
RATE = 44100
GAP_MS = 4000
MUSIC_LEVEL = 0.6
SECONDS = 8.0  # every clip is cut at its first bar line at or after this (a loop ends on a bar)
PITCH_CLASS = {"C": 0, "Db": 1, "C#": 1, "D": 2, "Eb": 3, "E": 4, "F": 5, "F#": 6, "Gb": 6, "G": 7, "Ab": 8}
PITCH_CLASS.update({"G#": 8, "A": 9, "Bb": 10, "A#": 10, "B": 11})
# Scale degrees (semitones above the tonic) of the chord roots, and each chord's quality.
MINOR_DEGREES = {"i": (0, "m"), "iv": (5, "m"), "v": (7, "m"), "V": (7, ""), "VI": (8, ""), "III": (3, "")}
MINOR_DEGREES["VII"] = (10, "")
MAJOR_DEGREES = {"I": (0, ""), "ii": (2, "m"), "IV": (5, ""), "V": (7, ""), "vi": (9, "m"), "iii": (4, "m")}
# General MIDI programs (0-based): the sounds of a lo-fi / boom-bap beat
FINGER_BASS, SYNTH_BASS, RHODES, WARM_PAD, STRINGS = 33, 38, 4, 89, 48


@dataclasses.dataclass(frozen=True)
class Clip:
    name: str
    key: str  # "Bb minor": tonic as musicians spell it, and the mode
    bpm: int
    chords: tp.Tuple[str, ...]  # Roman numerals, one per `beats_per_chord` beats, looped from the first
    beats_per_chord: int = 4
    bass: str = "roots"  # roots: the chord's root on 1 and the "and" of 2; octaves: root, octave up, root
    keys: int = RHODES  # the chord instrument
    backbeat: str = "snare"  # or clap
    resolve: bool = False  # the loop's last bar returns to the first chord (where a loop rests)

    @property
    def tonic(self) -> int:
        return PITCH_CLASS[self.key.split()[0]]

    @property
    def minor(self) -> bool:
        return self.key.endswith("minor")


# 70-100 bpm with a few faster; minor i-VI-III-VII most, flat keys among them; majors so that "always minor" fails;
# the last three dwell on the relative's chords (III, vi), where the mean chroma alone picks the relative.
CORPUS = (
    Clip("am_90_i-VI-III-VII", "A minor", 90, ("i", "VI", "III", "VII"), 2),
    Clip("bbm_80_i-VI-III-VII", "Bb minor", 80, ("i", "VI", "III", "VII"), 2, "octaves", WARM_PAD, "clap"),
    Clip("ebm_72_i-VI-III-VII", "Eb minor", 72, ("i", "VI", "III", "VII"), 2, resolve=True),
    Clip("fm_140_i-VI-III-VII", "F minor", 140, ("i", "VI", "III", "VII"), 4, "octaves", STRINGS, "clap"),
    Clip("cm_85_i-VI-III-VII", "C minor", 85, ("i", "VI", "III", "VII"), 2, "octaves"),
    Clip("em_76_i-VI-III-VII", "E minor", 76, ("i", "VI", "III", "VII"), 2, keys=WARM_PAD, resolve=True),
    Clip("dm_88_i-VI-III-VII", "D minor", 88, ("i", "VI", "III", "VII"), 2, backbeat="clap"),
    Clip("gm_95_i-iv-VI-V", "G minor", 95, ("i", "iv", "VI", "V"), 2, "octaves"),
    Clip("fsm_100_i-VII-VI-VII", "F# minor", 100, ("i", "VII", "VI", "VII"), 2, keys=WARM_PAD),
    Clip("csm_70_i-i-VI-VII", "C# minor", 70, ("i", "i", "VI", "VII"), 2, "octaves", backbeat="clap"),
    Clip("ebM_92_I-V-vi-IV", "Eb major", 92, ("I", "V", "vi", "IV"), 2),
    Clip("abM_78_I-vi-IV-V", "Ab major", 78, ("I", "vi", "IV", "V"), 2, "octaves", WARM_PAD, "clap"),
    Clip("dM_140_I-V-vi-IV", "D major", 140, ("I", "V", "vi", "IV"), 4, keys=STRINGS),
    Clip("dbM_84_I-IV-vi-V", "Db major", 84, ("I", "IV", "vi", "V"), 2, "octaves", resolve=True),
    Clip("bm_82_i-III-VII-III", "B minor", 82, ("i", "III", "VII", "III"), 2, keys=WARM_PAD),
    Clip("gsm_90_i-VII-III-VI", "G# minor", 90, ("i", "VII", "III", "VI"), 2, "octaves", backbeat="clap"),
    Clip("bbM_86_I-vi-iii-vi", "Bb major", 86, ("I", "vi", "iii", "vi"), 2),
)


def missing() -> tp.Optional[str]:
    """Why the corpus cannot be built here (naming what to install), or None."""
    absent = [str(p) for p in (KIT / "808_Kick_Long.flac", SOUNDFONT) if not p.is_file()]
    absent += [tool for tool in ("fluidsynth",) if shutil.which(tool) is None]
    if not absent:
        return None
    return f"real-recording corpus needs {', '.join(absent)}: Debian packages {PACKAGES} (`{INSTALL}` as root)"


def skip_or_fail(pytest) -> None:
    """Skip the real-audio tests where the packages are absent, but fail under REQUIRE_REAL_AUDIO=1 (CI)."""
    reason = missing()
    if reason is None:
        return
    if os.environ.get("REQUIRE_REAL_AUDIO") == "1":
        pytest.fail(f"REQUIRE_REAL_AUDIO=1 but the {reason}")
    pytest.skip(reason)


def chord_notes(clip: Clip, numeral: str) -> tp.Tuple[int, tp.List[int]]:
    """(root pitch class, the triad's pitch classes) of a Roman numeral in the clip's key."""
    degree, quality = (MINOR_DEGREES if clip.minor else MAJOR_DEGREES)[numeral]
    root = (clip.tonic + degree) % 12
    return root, [root, (root + (3 if quality == "m" else 4)) % 12, (root + 7) % 12]


def voiced(pitch_classes: tp.Iterable[int], low: int = 55) -> tp.List[int]:
    """Each pitch class in the octave from `low` (G3 to F#4): close voicings that move little between chords."""
    return sorted(low + (pc - low) % 12 for pc in pitch_classes)


def numerals(clip: Clip, bars: int) -> tp.List[str]:
    """The chord of every `beats_per_chord` beats over `bars` bars, looping; the last bar back on the first chord
    where the clip resolves."""
    count = bars * 4 // clip.beats_per_chord
    sequence = [clip.chords[i % len(clip.chords)] for i in range(count)]
    if clip.resolve:
        for i in range(count - 4 // clip.beats_per_chord, count):
            sequence[i] = clip.chords[0]
    return sequence


def bars_of(clip: Clip) -> int:
    return int(np.ceil(SECONDS * clip.bpm / 60 / 4))


def clip_samples(clip: Clip) -> int:
    return int(round(bars_of(clip) * 4 * 60 / clip.bpm * RATE))


def starts_ms(clips: tp.Sequence[Clip]) -> tp.List[int]:
    """Where each clip starts in the one MIDI file that holds them all (fluidsynth loads the soundfont once, ~2 s):
    whole 10 ms, so that a start is a whole number of samples, and GAP_MS of silence after each for its release
    and reverb to die away."""
    starts, at = [], 0
    for clip in clips:
        starts.append(at)
        at += int(np.ceil(clip_samples(clip) / RATE * 100)) * 10 + GAP_MS
    return starts


def midi_file(clips: tp.Sequence[Clip]) -> bytes:
    """A standard MIDI file (format 0) holding every clip, one after the other at STARTS_MS: 60 bpm and 1000
    ticks a beat, so that a tick is a millisecond whatever each clip's tempo. Bass on channel 0, chords on 1."""
    events: tp.List[tp.Tuple[int, int, bytes]] = []  # (tick, 0 for offs and set-up before 1 for ons, bytes)
    events.append((0, 0, bytes([0xFF, 0x51, 3]) + (1_000_000).to_bytes(3, "big")))
    for clip, offset in zip(clips, starts_ms(clips)):
        beat_ms = 60_000 / clip.bpm

        def note(channel, pitch, start_beats, beats, velocity, offset=offset, beat_ms=beat_ms) -> None:
            start = offset + int(round(start_beats * beat_ms))
            stop = offset + int(round((start_beats + beats) * beat_ms))
            events.append((start, 1, bytes([0x90 | channel, pitch, velocity])))
            events.append((stop, 0, bytes([0x80 | channel, pitch, 0])))

        events.append((offset, 0, bytes([0xC0, SYNTH_BASS if clip.bass == "octaves" else FINGER_BASS])))
        events.append((offset, 0, bytes([0xC1, clip.keys])))
        length = clip.beats_per_chord
        for index, numeral in enumerate(numerals(clip, bars_of(clip))):
            root, triad = chord_notes(clip, numeral)
            start = index * length
            for pitch in voiced(triad):
                note(1, pitch, start, length - 0.05, 70)
            bass = 36 + (root - 36) % 12  # C2-B2
            if clip.bass == "octaves":  # 808-style: the root, the octave above on the "and" of 2, the root on 4
                hits = [(0.0, 1.0, bass), (1.5, 0.45, bass + 12)] + ([(3.0, 0.5, bass)] if length > 2 else [])
            else:  # the root on 1 and the "and" of 2, held through 3-4
                hits = [(0.0, 1.4, bass), (1.5, 0.45, bass)] + ([(2.0, 1.9, bass)] if length > 2 else [])
            for at, beats, pitch in hits:
                note(0, pitch, start + at, beats, 100)
    events.sort(key=lambda e: (e[0], e[1]))
    track, previous = bytearray(), 0
    for tick, _, data in events:
        track += variable_length(tick - previous) + data
        previous = tick
    track += variable_length(0) + bytes([0xFF, 0x2F, 0])
    header = b"MThd" + struct.pack(">IHHH", 6, 0, 1, 1000)
    return header + b"MTrk" + struct.pack(">I", len(track)) + bytes(track)


def variable_length(value: int) -> bytes:
    """MIDI's variable-length quantity: 7 bits a byte, most significant first, the high bit on all but the last."""
    out = [value & 0x7F]
    value >>= 7
    while value:
        out.append(0x80 | (value & 0x7F))
        value >>= 7
    return bytes(reversed(out))


def sample(name: str) -> np.ndarray:
    import soundfile as sf

    audio, rate = sf.read(str(KIT / name), dtype="float32", always_2d=True)
    assert rate == RATE, (name, rate)
    return audio.mean(axis=1)


def drums(clip: Clip, length: int) -> np.ndarray:
    """16 steps a bar: kick on 1 and the "and" of 2 (and 3's "a" on odd bars), the backbeat on 2 and 4, closed
    hats on every 8th (16ths at the faster tempos would be a trap beat's; kept to 8ths for one kind of beat)."""
    kick, hat = sample("808_Kick_Long.flac"), sample("808_Hat_Closed.flac")
    backbeat = sample("808_Clap.flac" if clip.backbeat == "clap" else "808_Snare_1.flac")
    track = np.zeros(length + RATE, np.float32)
    step = RATE * 60 / clip.bpm / 4

    def place(sound: np.ndarray, at: float, gain: float) -> None:
        start = int(round(at))
        track[start : start + len(sound)] += gain * sound[: len(track) - start]

    for bar in range(bars_of(clip)):
        first = bar * 16 * step
        for index in (0, 6) if bar % 2 == 0 else (0, 6, 11):
            place(kick, first + index * step, 0.9)
        for index in (4, 12):
            place(backbeat, first + index * step, 0.8)
        for index in range(0, 16, 2):
            place(hat, first + index * step, 0.35 if index % 4 else 0.5)
    return track[:length]


def build(folder: Path) -> tp.Dict[str, tp.Tuple[Clip, Path]]:
    """Every clip of CORPUS as `folder/<name>.wav` (44.1 kHz, 16-bit, mono; reused when already there): the MIDI
    rendered by fluidsynth in one run, each clip cut from it and its drums mixed in. name -> (clip, wav)."""
    import soundfile as sf

    folder.mkdir(parents=True, exist_ok=True)
    out = {clip.name: (clip, folder / f"{clip.name}.wav") for clip in CORPUS}
    if all(path.is_file() for _, path in out.values()):
        return out
    midi, rendered = folder / "corpus.mid", folder / "corpus.music.wav"
    midi.write_bytes(midi_file(CORPUS))
    subprocess.run(
        ["fluidsynth", "-ni", "-g", "0.6", "-r", str(RATE), "-F", str(rendered), str(SOUNDFONT), str(midi)],
        check=True,
        capture_output=True,
    )
    music, rate = sf.read(str(rendered), dtype="float32", always_2d=True)
    assert rate == RATE
    music = music.mean(axis=1)
    for clip, start_ms in zip(CORPUS, starts_ms(CORPUS)):
        start, length = start_ms * RATE // 1000, clip_samples(clip)
        part = np.pad(music[start : start + length], (0, max(0, start + length - len(music))))
        kit = drums(clip, length)
        # as a mixed beat: the instruments as loud (RMS) as the kit, whose 808 kick would otherwise bury the bass
        mix = kit + MUSIC_LEVEL * part * np.sqrt(np.mean(kit**2) / max(np.mean(part**2), 1e-12))
        sf.write(str(out[clip.name][1]), 0.9 * mix / np.abs(mix).max(), RATE, subtype="PCM_16")
    midi.unlink()
    rendered.unlink()
    return out
