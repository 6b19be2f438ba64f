"""Synthesise a small dataset of hip-hop 808 beats with captions, in our first users' metadata.json layout.

    <out>/metadata.json   [{"audio": "train/beat_000.wav", "text": "...", "bpm": 140, "key": "F minor", ...}]
    <out>/train/*.wav     44.1 kHz stereo 16-bit, like the files people bring (the manifest step converts them)

Each beat: an 808 kick (sine with a pitch glide down to the key's root and a long decay, softly saturated),
a snare or a clap on beats 2 and 4, and a hi-hat pattern (8ths, 16ths or trap rolls), at 130-160 bpm.

`style="chiptune"` writes another style in the same layout, for a "general" base model in the demo: square-wave
arpeggios over a short clicky kick and hats, 100-125 bpm, with almost nothing below 120 Hz.
"""

import json
import typing as tp
from pathlib import Path

import numpy as np
import soundfile as sf

from .audio import NOTES

SAMPLE_RATE = 44100
HAT_PATTERNS = {"eighth-note": [1, 0] * 8, "sixteenth-note": [1] * 16, "trap roll": [1, 0, 1, 1] * 4}


def root_frequency(note: str, octave: int = 1) -> float:
    midi = 12 * (octave + 1) + NOTES.index(note)
    return 440.0 * 2 ** ((midi - 69) / 12)


def kick_808(freq: float, decay_s: float, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(int(SAMPLE_RATE * decay_s * 3)) / SAMPLE_RATE
    glide = freq * (1 + 2.5 * np.exp(-t / 0.03))  # pitch falls to the root within ~50 ms
    phase = 2 * np.pi * np.cumsum(glide) / SAMPLE_RATE
    body = np.sin(phase) * np.exp(-t / decay_s)
    click = rng.standard_normal(len(t)) * np.exp(-t / 0.002) * 0.3
    return np.tanh(1.8 * (body + click)) * 0.9


def snare(rng: np.random.Generator) -> np.ndarray:
    t = np.arange(int(SAMPLE_RATE * 0.25)) / SAMPLE_RATE
    noise = np.diff(rng.standard_normal(len(t) + 1)) * np.exp(-t / 0.06)
    tone = np.sin(2 * np.pi * 185 * t) * np.exp(-t / 0.04)
    return 0.35 * noise + 0.4 * tone


def clap(rng: np.random.Generator) -> np.ndarray:
    t = np.arange(int(SAMPLE_RATE * 0.3)) / SAMPLE_RATE
    envelope = sum(np.exp(-np.clip(t - d, 0, None) / 0.008) * (t >= d) for d in (0.0, 0.011, 0.023))
    envelope += 0.5 * np.exp(-np.clip(t - 0.03, 0, None) / 0.08) * (t >= 0.03)
    return 0.4 * np.diff(rng.standard_normal(len(t) + 1)) * envelope


def hat(rng: np.random.Generator, open_hat: bool = False) -> np.ndarray:
    t = np.arange(int(SAMPLE_RATE * (0.2 if open_hat else 0.05))) / SAMPLE_RATE
    noise = np.diff(np.diff(rng.standard_normal(len(t) + 2)))  # twice differenced: mostly above 8 kHz
    return 0.12 * noise * np.exp(-t / (0.06 if open_hat else 0.012))


def place(track: np.ndarray, sound: np.ndarray, start: int, gain: float = 1.0) -> None:
    end = min(len(track), start + len(sound))
    if start < end:
        track[start:end] += gain * sound[: end - start]


def render_beat(bpm: float, key: str, seconds: float, rng: np.random.Generator) -> tp.Tuple[np.ndarray, dict]:
    step = int(round(SAMPLE_RATE * 60 / bpm / 4))  # a 16th note
    n = int(SAMPLE_RATE * seconds)
    drums, bass = np.zeros(n), np.zeros(n)
    hat_name = str(rng.choice(list(HAT_PATTERNS)))
    backbeat_name = str(rng.choice(["snare", "clap"]))
    kick_steps = sorted({0, 10} | {int(s) for s in rng.choice([3, 6, 7, 11, 14], size=2, replace=False)})
    kick = kick_808(root_frequency(key.split()[0]), decay_s=float(rng.uniform(0.25, 0.45)), rng=rng)
    backbeat = snare(rng) if backbeat_name == "snare" else clap(rng)
    for bar_start in range(0, n, 16 * step):
        for s in kick_steps:
            place(bass, kick, bar_start + s * step)
        for s in (4, 12):
            place(drums, backbeat, bar_start + s * step)
        for s, on in enumerate(HAT_PATTERNS[hat_name]):
            if on:
                place(drums, hat(rng, open_hat=(s == 14)), bar_start + s * step, gain=float(rng.uniform(0.6, 1.0)))
    pan = float(rng.uniform(0.35, 0.65))
    stereo = np.stack([bass + drums * (1 - pan) * 2, bass + drums * pan * 2], axis=1)
    stereo *= 0.8 / max(np.abs(stereo).max(), 1e-6)
    info = {"bpm": int(round(bpm)), "key": key, "hats": hat_name, "backbeat": backbeat_name}
    return stereo.astype(np.float32), info


def caption(info: dict, rng: np.random.Generator) -> str:
    opener = str(
        rng.choice(
            [
                "hip hop 808 beat with trap drums",
                "dark trap beat with heavy 808 bass",
                "hard hip hop instrumental with booming 808s",
            ]
        )
    )
    return f"{opener}, {info['hats']} hi hats and a {info['backbeat']}, {info['bpm']} bpm, {info['key']}"


def render_chiptune(bpm: float, key: str, seconds: float, rng: np.random.Generator) -> tp.Tuple[np.ndarray, dict]:
    step = int(round(SAMPLE_RATE * 60 / bpm / 4))
    n = int(SAMPLE_RATE * seconds)
    track = np.zeros(n)
    root = root_frequency(key.split()[0], octave=4)
    chord = [0, 4, 7, 12] if key.endswith("major") else [0, 3, 7, 12]
    t = np.arange(step) / SAMPLE_RATE
    click = np.diff(rng.standard_normal(int(SAMPLE_RATE * 0.03) + 1)) * np.exp(
        -np.arange(int(SAMPLE_RATE * 0.03)) / (SAMPLE_RATE * 0.004)
    )
    for index, start in enumerate(range(0, n, step)):
        note = root * 2 ** (chord[index % 4] / 12)
        place(track, 0.18 * np.sign(np.sin(2 * np.pi * note * t)) * np.exp(-t / 0.12), start)
        if index % 4 == 0:
            place(track, 0.5 * click, start)
        if index % 2 == 1:
            place(track, hat(rng), start, gain=0.8)
    stereo = np.stack([track, track], axis=1)
    stereo *= 0.8 / max(np.abs(stereo).max(), 1e-6)
    return stereo.astype(np.float32), {"bpm": int(round(bpm)), "key": key}


STYLES = {
    # style: (render, bpm range, caption opener, metadata)
    "808": (
        render_beat,
        (130, 160),
        None,
        {"genre": "hip hop", "moods": ["dark", "energetic"], "instrument": "808, drum machine"},
    ),
    "chiptune": (
        render_chiptune,
        (100, 125),
        "chiptune arpeggios with a clicky kick",
        {"genre": "chiptune", "moods": ["bright", "playful"], "instrument": "square wave synth"},
    ),
}


def write_dataset(
    out: tp.Union[str, Path], count: int = 16, seconds: float = 4.0, seed: int = 808, style: str = "808"
) -> Path:
    """Write `count` clips of `style` and their metadata.json into `out` (an existing dataset there is replaced)."""
    if style not in STYLES:
        raise ValueError(f"style={style!r}: choose one of {', '.join(STYLES)}.")
    render, (low, high), opener, metadata = STYLES[style]
    out = Path(out).resolve()
    rng = np.random.default_rng(seed)
    (out / "train").mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(count):
        bpm = float(rng.uniform(low, high))
        key = f"{rng.choice(NOTES)} {rng.choice(['minor', 'major'], p=[0.8, 0.2])}"
        audio, info = render(bpm, key, seconds, rng)
        relative = f"train/{'beat' if style == '808' else style}_{i:03d}.wav"
        sf.write(out / relative, audio, SAMPLE_RATE, subtype="PCM_16")
        text = caption(info, rng) if opener is None else f"{opener}, {info['bpm']} bpm, {info['key']}"
        entries.append({"audio": relative, "text": text, "bpm": info["bpm"], "key": info["key"], **metadata})
    (out / "metadata.json").write_text(json.dumps(entries, indent=2) + "\n")
    return out
