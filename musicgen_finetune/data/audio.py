"""Decoding, checking, converting and measuring one audio file; no torch, so data workers start fast.

Decoding: libsndfile (wav of any bit depth, flac, ogg, mp3), else the ffmpeg binary (m4a, aac, opus, ...).
Resampling: soxr at its highest quality. Loudness: ITU-R BS.1770 (pyloudnorm). Tempo and key: librosa's
features, no downloaded model; `measure_tempo` and `measure_key` also say how far each reading can be trusted, so
that captions only carry the ones that can (issue 13: doubled tempos of slow beats, keys of drum loops).
"""

import dataclasses
import io
import math
import shutil
import subprocess
import typing as tp
from pathlib import Path

import numpy as np
import soundfile as sf

from ..errors import UserError
from .librosa_loader import load_librosa

AUDIO_EXTENSIONS = {
    ".wav",
    ".wave",
    ".flac",
    ".mp3",
    ".ogg",
    ".oga",
    ".opus",
    ".m4a",
    ".aac",
    ".mp4",
    ".aif",
    ".aiff",
    ".wma",
    ".webm",
}
TARGET_LUFS = -14.0  # streaming-music loudness; segments are then peak-limited to PEAK_CEILING
PEAK_CEILING = 0.99
SILENCE_DBFS = -60.0  # below this RMS a file is considered silent
LOUDNESS_MIN_SECONDS = 0.4  # BS.1770 needs one 400 ms block
NOTES = ["C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B"]  # pitch classes, one name each
# Keys as musicians spell them, tonic first (issue 25: "Bb minor", never "A# minor"): of the two names of a tonic,
# the one whose key signature has fewer accidentals (Db major: 5 flats, C# major: 7 sharps; Bb minor: 5 flats,
# A# minor: 7 sharps; C# minor: 4 sharps, Db minor: 8 flats, a "theoretical" key). Where both have six (F# or Gb
# major, D# or Eb minor), the name in common use: F# major, Eb minor.
MAJOR_KEYS = ["C", "Db", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B"]
MINOR_KEYS = ["C", "C#", "D", "Eb", "E", "F", "F#", "G", "G#", "A", "Bb", "B"]
# Krumhansl-Kessler key profiles (major, minor), tonic first.
MAJOR_PROFILE = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
MINOR_PROFILE = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])

# A measured tempo or key is written only with a confidence of at least CONFIDENT. A confidence is that of its
# weakest criterion, each scaled linearly so that 0 -> 0, its threshold -> CONFIDENT and twice it (a perfect key
# correlation, 1) -> 1: 0.5 means "just passes every threshold".
CONFIDENT = 0.5
TEMPO_FRAME_RATE = 125.0  # onset frames per second: 8 ms, read to a fraction of a frame (parabolic peak)
TEMPO_BPM_LIMITS = (50.0, 220.0)  # beats searched for; TEMPO_RANGE folds a reading into the user's range
# Snare wires and claps are noise bursts: in 2-8 kHz, 808 kicks (their saturated harmonics) are ~15 dB weaker and
# a bar of closed hi-hats (mostly above 8 kHz) ~5 dB weaker than the backbeat (synth808, measured).
BACKBEAT_BAND_HZ = (2000.0, 8000.0)
PEAK_FRACTION = 0.8  # the snare band's period is its first autocorrelation peak within 80% of the highest:
# its multiples repeat it and score as high, so the first is the one that is no multiple
COMB_TIE = 0.02  # periods that repeat this close to the best are ties, and the shortest is taken
MAX_LAG_FRACTION = 0.5  # a period is only read over at least half the clip, or the autocorrelation is noise
# Thresholds, between what synthetic clips measured (102 synth808 beats at 70-170 bpm, 4 and 8 s, 44.1 kHz; tonal
# clips at 32 and 44.1 kHz): each sits about halfway, so neither side is near it.
PULSE_MIN = 0.25  # onset autocorrelation at the beat: 808 beats 0.33-0.85, white noise 0.02-0.06
BACKBEAT_MIN = 0.4  # snare-band alternation A(2 beats) - A(1 beat): 808 beats 0.64-0.99, click track 0.1
KEY_MIN_CORRELATION = 0.7  # Krumhansl-Kessler: triads, progressions 0.79-0.92; one sine 0.62, drums, noise <= 0.42
KEY_MIN_MARGIN = 0.12  # over the best key but its relative: triads 0.19-0.37; one note 0.01, drums, noise <= 0.09
# Which of a key and its relative is the tonic (A minor or C major: the same notes; i-VI-III-VII is vi-IV-I-V):
# the chord the clip starts on. Measured on the real-recording corpus (tests/real_audio.py: 14 beats, 808 kit and
# GM soundfont instruments) and the synthetic tonal clips: the tonic triad fits the first second better than the
# relative's by 0.28-0.67; drums and noise, whose start is no chord, 0.05-0.08.
KEY_MIN_RELATIVE = 0.15
START_SECONDS = 1.0  # the opening chord: a loop's first chord lasts 2 beats at 70-140 bpm, at least 0.86 s
# The tonic triad must be the chord the clip opens with: within this of the best of the 24 triads there (a lone
# opening note fits every triad holding it equally, so ties count). A loop opening on another chord (F#m-E-D-E:
# its mean chroma reads as E major, its relative C# minor) settles nothing.
START_TIE = 0.05
# The chroma's band: the 808 kick rings under 100 Hz at one pitch whatever the key (Hydrogen's 808_Kick_Long at
# G#1, 52 Hz, for 1 s), and hi-hats above 5 kHz are noise to it; the bass's harmonics and the chords lie inside.
# On the corpus, 100 Hz-5 kHz raised the keys' correlation from 0.53-0.91 to 0.66-0.93.
KEY_BAND_HZ = (100.0, 5000.0)


class BadAudio(UserError, ValueError):
    """This file cannot be used; the message is the reason shown to the user."""


def decode(path: Path) -> tp.Tuple[np.ndarray, int]:
    """Audio as float32 [channels, samples] and its sample rate."""
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError):
        data, rate = _decode_with_ffmpeg(path)
    return np.ascontiguousarray(data.T), int(rate)


def duration_seconds(path: Path) -> float:
    """A file's duration from its header when libsndfile reads it (wav, flac, ogg, mp3), else by decoding it;
    0 for a file that cannot be decoded (its conversion reports why)."""
    try:
        return float(sf.info(str(path)).duration)
    except (sf.LibsndfileError, RuntimeError, TypeError):
        try:
            audio, rate = decode(path)
        except BadAudio:
            return 0.0
        return audio.shape[-1] / rate


def _decode_with_ffmpeg(path: Path) -> tp.Tuple[np.ndarray, int]:
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise BadAudio("not readable by libsndfile, and no ffmpeg on PATH to try (run `make setup`)")
    result = subprocess.run(
        [ffmpeg, "-nostdin", "-v", "error", "-i", str(path), "-vn", "-f", "wav", "-acodec", "pcm_f32le", "-"],
        capture_output=True,
    )
    if result.returncode != 0 or not result.stdout:
        reason = result.stderr.decode(errors="replace").strip().splitlines()
        raise BadAudio(f"not decodable audio ({reason[-1] if reason else 'ffmpeg found no audio stream'})")
    data, rate = sf.read(io.BytesIO(result.stdout), dtype="float32", always_2d=True)
    return data, rate


def check(audio: np.ndarray, rate: int, min_seconds: float) -> None:
    """Raise BadAudio for audio nobody should train on."""
    if audio.size == 0:
        raise BadAudio("empty: no audio samples")
    if not np.isfinite(audio).all():
        raise BadAudio("contains NaN or infinite samples")
    seconds = audio.shape[-1] / rate
    if seconds < min_seconds:
        raise BadAudio(f"too short: {seconds:.2f} s, under the {min_seconds:g} s minimum")
    rms = float(np.sqrt(np.mean(np.square(audio, dtype=np.float64))))
    if rms == 0 or 20 * np.log10(rms) < SILENCE_DBFS:
        raise BadAudio(f"silent: RMS below {SILENCE_DBFS:g} dBFS")


def convert(audio: np.ndarray, rate: int, target_rate: int, target_channels: int) -> np.ndarray:
    """Mix or duplicate channels, then resample (soxr, very high quality)."""
    if audio.shape[0] != target_channels:
        if target_channels == 1:
            audio = audio.mean(axis=0, keepdims=True)
        elif audio.shape[0] == 1:
            audio = np.repeat(audio, target_channels, axis=0)
        else:
            raise BadAudio(f"has {audio.shape[0]} channels; cannot make {target_channels} from them")
    if rate != target_rate:
        import soxr

        audio = soxr.resample(audio.T, rate, target_rate, quality="VHQ").T
    return np.ascontiguousarray(audio, dtype=np.float32)


def normalize_loudness(audio: np.ndarray, rate: int, target_lufs: float = TARGET_LUFS) -> np.ndarray:
    """Bring integrated loudness to `target_lufs`, never letting a peak exceed PEAK_CEILING."""
    if audio.shape[-1] / rate >= LOUDNESS_MIN_SECONDS:
        import pyloudnorm

        loudness = pyloudnorm.Meter(rate).integrated_loudness(audio.T)
        if np.isfinite(loudness):
            audio = audio * np.float32(10 ** ((target_lufs - loudness) / 20))
    peak = float(np.abs(audio).max())
    if peak > PEAK_CEILING:
        audio = audio * np.float32(PEAK_CEILING / peak)
    return audio


def estimate_tempo(audio: np.ndarray, rate: int, hop_length: int = 512) -> tp.Optional[float]:
    """Tempo in bpm from the onset envelope (librosa), or None if there is no beat to find: the strongest
    periodicity, whatever its octave (metrics.py compares clips with it). Captions use `measure_tempo`.

    The estimate is a whole number of envelope frames per beat, so `hop_length` sets its resolution: librosa's
    default 512 samples reads a 140 bpm click track as 143.6 bpm at 22.05 kHz; metrics.py asks for finer frames.
    """
    librosa = load_librosa()

    mono = audio.mean(axis=0)
    onset = librosa.onset.onset_strength(y=mono, sr=rate, hop_length=hop_length)
    if not np.any(onset > 0):
        return None
    tempo = float(np.atleast_1d(librosa.feature.tempo(onset_envelope=onset, sr=rate, hop_length=hop_length))[0])
    return round(tempo, 1) if tempo > 0 else None


def whole_bpm(bpm: float) -> int:
    """A tempo as written anywhere (sidecar, description, variants): whole bpm, halves rounded up (142.5 -> 143).
    Rounded to 6 decimals first, as a product such as 150 x 0.95 is 142.49999999999997 in floating point."""
    return int(math.floor(round(float(bpm), 6) + 0.5))


def strength(value: float, threshold: float, full: tp.Optional[float] = None) -> float:
    """0..1: 0 -> 0, `threshold` -> CONFIDENT, `full` (default twice the threshold) and above -> 1, linear between,
    so that one scale reads the same for every criterion."""
    full = 2 * threshold if full is None else full
    if value < threshold:
        return float(max(0.0, CONFIDENT * value / threshold))
    return float(min(1.0, CONFIDENT + (1 - CONFIDENT) * (value - threshold) / (full - threshold)))


@dataclasses.dataclass
class TempoEstimate:
    """What the audio says about its tempo, kept in the conversion cache; TEMPO_RANGE is applied later."""

    bpm: tp.Optional[float]  # unrounded; None when no beat was found
    pulse: float  # onset autocorrelation at the beat (without a backbeat: mean over its multiples)
    backbeat: float  # snare-band alternation that settles the octave; 0: none, the octave is a guess

    @property
    def confidence(self) -> float:
        if self.bpm is None:
            return 0.0
        return min(strength(self.pulse, PULSE_MIN), strength(self.backbeat, BACKBEAT_MIN))


def resolve_tempo(
    estimate: TempoEstimate, tempo_range: tp.Optional[tp.Tuple[float, float]] = None
) -> tp.Tuple[tp.Optional[int], float]:
    """(whole bpm or None, confidence): the tempo to write, or None where it cannot be trusted.

    A range (TEMPO_RANGE) settles the octave when exactly one octave of the reading lies in it, and overrides the
    audio's choice (the user knows their music: half-time trap reads as 70 from its snare); when several lie in it,
    the audio's own octave is taken only if the backbeat settled it. No octave in the range: the reading is wrong.
    """
    if estimate.bpm is None:
        return None, 0.0
    if tempo_range is None:
        confidence = estimate.confidence
        return (whole_bpm(estimate.bpm) if confidence >= CONFIDENT else None), confidence
    low, high = tempo_range
    octaves = [estimate.bpm * 2.0**k for k in range(-4, 5) if low <= whole_bpm(estimate.bpm * 2.0**k) <= high]
    if estimate.bpm in octaves and estimate.confidence >= CONFIDENT:
        return whole_bpm(estimate.bpm), estimate.confidence
    if len(octaves) != 1:
        return None, estimate.confidence if octaves else 0.0
    confidence = strength(estimate.pulse, PULSE_MIN)
    return (whole_bpm(octaves[0]) if confidence >= CONFIDENT else None), confidence


def measure_tempo(audio: np.ndarray, rate: int) -> TempoEstimate:
    """The beat of `audio` [channels, samples], with how steady it is and whether its octave is settled.

    librosa's tempo picks the strongest periodicity, which in hip-hop is often the hi-hats' 8ths: 85 bpm read as
    170 (issue 13). The backbeat settles it: a snare or clap on beats 2 and 4 repeats every 2 beats and never after
    1 beat, while the rest of the kit marks every beat. Without that, the octave is left unsettled (backbeat 0).
    """
    mono = audio.mean(axis=0)
    everything, backbeat_band, fps = onset_envelopes(mono, rate)
    max_lag = int(len(everything) * MAX_LAG_FRACTION)
    if not np.any(everything > 0) or max_lag < 3:
        return TempoEstimate(None, 0.0, 0.0)
    all_onsets = autocorrelation(everything, max_lag)
    shortest, longest = 60 * fps / TEMPO_BPM_LIMITS[1], 60 * fps / TEMPO_BPM_LIMITS[0]
    reading = backbeat_reading(all_onsets, backbeat_band, shortest, longest, fps)
    if reading is not None:
        return reading
    beat, pulse = steadiest_period(all_onsets, shortest, longest)
    if beat is None:
        return TempoEstimate(None, 0.0, 0.0)
    return TempoEstimate(60 * fps / refined_peak(all_onsets, beat)[0], pulse, 0.0)


def backbeat_reading(
    all_onsets: np.ndarray, band: np.ndarray, shortest: float, longest: float, fps: float
) -> tp.Optional[TempoEstimate]:
    """The tempo from a backbeat, or None without one: the snare band's period is 2 beats when that band does not
    repeat after half of it (alternation) while all onsets do (pulse; a click track repeats in every band)."""
    if not np.any(band > 0):
        return None
    snare_band = autocorrelation(band, len(all_onsets) - 1)
    snare = first_strong_peak(snare_band, 2 * shortest, 2 * longest)
    if snare is None:
        return None
    period, repeat = refined_peak(snare_band, snare)
    alternation = repeat - refined_peak(snare_band, period / 2)[1]
    pulse = refined_peak(all_onsets, period / 2)[1]
    if alternation < BACKBEAT_MIN or pulse < PULSE_MIN:
        return None
    return TempoEstimate(2 * 60 * fps / period, pulse, alternation)


def onset_envelopes(mono: np.ndarray, rate: int) -> tp.Tuple[np.ndarray, np.ndarray, float]:
    """(all onsets, backbeat-band onsets, frames per second). All onsets: librosa's log-mel flux, where quiet hits
    count as much as loud ones. The backbeat band: the rise of its linear power, so that its loudest hits, snares
    and claps, dominate the hi-hats that leak into it."""
    librosa = load_librosa()

    hop = max(1, int(round(rate / TEMPO_FRAME_RATE)))
    mel = librosa.feature.melspectrogram(y=mono, sr=rate, n_fft=2048, hop_length=hop, n_mels=128)
    everything = librosa.onset.onset_strength(S=librosa.power_to_db(mel, ref=np.max), sr=rate, hop_length=hop)
    centres = librosa.mel_frequencies(n_mels=mel.shape[0] + 2, fmax=rate / 2)[1:-1]
    power = mel[(centres >= BACKBEAT_BAND_HZ[0]) & (centres < BACKBEAT_BAND_HZ[1])].sum(axis=0)
    backbeat_band = np.maximum(0.0, np.diff(power, prepend=power[:1]))
    return everything, backbeat_band, rate / hop


def autocorrelation(envelope: np.ndarray, max_lag: int) -> np.ndarray:
    """Autocorrelation of the centred envelope up to `max_lag` frames, each lag averaged over its overlap (so a
    long lag is not penalised for overlapping less) and divided by lag 0: 1 means the envelope repeats exactly."""
    librosa = load_librosa()

    centred = envelope.astype(np.float64) - envelope.mean()
    raw = librosa.autocorrelate(centred, max_size=max_lag + 1)
    raw = raw / (len(centred) - np.arange(len(raw)))
    return raw / raw[0] if raw[0] > 0 else np.zeros_like(raw)


def steadiest_period(curve: np.ndarray, low: float, high: float) -> tp.Tuple[tp.Optional[int], float]:
    """(lag, score): the lag between `low` and `high` whose multiples repeat best (mean autocorrelation over them),
    the shortest of those within COMB_TIE of the best. Where every 16th has an onset, each 16th-multiple peaks about
    as high: 3 16ths (a 4/3 error) once won a first-peak rule; it does not repeat at its multiples as the beat does.
    Each multiple k is looked for within k/2 frames, as a whole-frame lag drifts from the true period by that."""
    start, stop = max(1, math.ceil(low)), min(len(curve) - 2, math.floor(high))
    scores = {}
    for lag in range(start, stop + 1):
        heights = [
            curve[max(1, k * lag - k // 2) : k * lag + k // 2 + 1].max()
            for k in range(1, (len(curve) - 1) // lag + 1)
            if k * lag + k // 2 < len(curve)
        ]
        scores[lag] = float(np.mean(heights))
    if not scores:
        return None, 0.0
    best = max(scores.values())
    lag = min(lag for lag, score in scores.items() if score >= best - COMB_TIE)
    return lag, scores[lag]


def first_strong_peak(curve: np.ndarray, low: float, high: float) -> tp.Optional[int]:
    """The first local maximum between lags `low` and `high` within PEAK_FRACTION of the highest there."""
    start, stop = max(1, math.ceil(low)), min(len(curve) - 2, math.floor(high))
    if stop <= start:
        return None
    top = float(curve[start : stop + 1].max())
    if top <= 0:
        return None
    for lag in range(start, stop + 1):
        if curve[lag] >= max(curve[lag - 1], curve[lag + 1]) and curve[lag] >= PEAK_FRACTION * top:
            return lag
    return None


def refined_peak(curve: np.ndarray, lag: float, width: int = 2) -> tp.Tuple[float, float]:
    """(lag, height) of the highest point within `width` frames of `lag`, the lag placed between frames by a
    parabola through its neighbours: a whole frame is 1% of a 170 bpm beat, the parabola brings it under 0.1%."""
    centre = int(round(lag))
    start, stop = max(1, centre - width), min(len(curve) - 2, centre + width)
    if stop < start:
        return float(lag), 0.0
    best = start + int(np.argmax(curve[start : stop + 1]))
    before, at, after = curve[best - 1], curve[best], curve[best + 1]
    curvature = before - 2 * at + after
    offset = 0.5 * (before - after) / curvature if curvature < 0 else 0.0
    return best + float(offset), float(at)


def key_name(tonic: int, mode: str) -> str:
    """'Bb minor' for (10, 'minor'): the tonic spelled as in MAJOR_KEYS / MINOR_KEYS."""
    return f"{(MINOR_KEYS if mode == 'minor' else MAJOR_KEYS)[tonic % 12]} {mode}"


@dataclasses.dataclass
class KeyEstimate:
    """The key, how well its notes fit and how clearly its tonic wins over its relative's; kept in the cache."""

    key: tp.Optional[str]  # 'Bb minor'; None without pitched content
    correlation: float  # of the mean chroma with the Krumhansl-Kessler profile of the key or its relative (the best)
    margin: float  # over the best key that is not the key or its relative (they share their notes)
    relative: float  # how much better the opening chord is the key's tonic triad than its relative's; 0: neither

    @property
    def confidence(self) -> float:
        if self.key is None:
            return 0.0
        return min(
            strength(self.correlation, KEY_MIN_CORRELATION, full=1.0),
            strength(self.margin, KEY_MIN_MARGIN),
            strength(self.relative, KEY_MIN_RELATIVE),
        )

    @property
    def trusted(self) -> tp.Optional[str]:
        """The key to write, or None: one note, a drum loop or noise fits several keys about equally, and a loop
        that does not open on its tonic leaves a key and its relative undecided."""
        return self.key if self.confidence >= CONFIDENT else None


def measure_key(audio: np.ndarray, rate: int) -> KeyEstimate:
    """The notes, then the tonic. Notes: the mean chroma within KEY_BAND_HZ, correlated with the 24
    Krumhansl-Kessler profiles; the best key's margin is over the best key other than its relative, which shares
    its notes and so always scores close. (Separating the harmonic part, HPSS, changed nothing on the corpus and
    cost the synthetic square-wave arpeggio its key: its 136 ms notes count as percussive.)

    Tonic: the profiles alone do not settle a key against its relative. The hip-hop loop i-VI-III-VII in A minor
    (Am F C G) has the chords of C major's vi-IV-I-V, and its mean chroma read as the relative major on 7 of 12
    real-recording beats (issue 25). A loop opens on its tonic chord, so the tonic is the one of the two whose triad
    fits the first START_SECONDS of sound, where that triad is the opening chord (START_TIE); otherwise `relative`
    is 0 and the key is not written, though its confidence is still recorded.
    """
    librosa = load_librosa()

    mono = audio.mean(axis=0)
    n_fft = 4096
    power = np.abs(librosa.stft(mono, n_fft=n_fft, hop_length=n_fft // 4)) ** 2
    frequencies = librosa.fft_frequencies(sr=rate, n_fft=n_fft)
    power *= ((frequencies >= KEY_BAND_HZ[0]) & (frequencies < KEY_BAND_HZ[1]))[:, None]
    frames = librosa.feature.chroma_stft(S=power, sr=rate, n_fft=n_fft, tuning=0.0)  # each frame's max is 1
    chroma = frames.mean(axis=1)
    if not np.any(chroma > 0) or np.allclose(chroma, chroma[0]):
        return KeyEstimate(None, 0.0, 0.0, 0.0)
    scores = {}
    for mode, profile in (("major", MAJOR_PROFILE), ("minor", MINOR_PROFILE)):
        for tonic in range(12):
            scores[(tonic, mode)] = float(np.corrcoef(chroma, np.roll(profile, tonic))[0, 1])
    (tonic, mode), best = max(scores.items(), key=lambda item: item[1])
    major = tonic if mode == "major" else (tonic + 3) % 12  # the pair: a major key and its relative minor
    pair = ((major, "major"), ((major + 9) % 12, "minor"))
    runner_up = max(score for key, score in scores.items() if key not in pair)
    triads = opening_triads(frames, power.sum(axis=0), rate / (n_fft // 4))
    (tonic, mode), other = sorted(pair, key=lambda key: triads[key], reverse=True)
    opens_on_it = max(triads.values()) - triads[(tonic, mode)] <= START_TIE
    relative = triads[(tonic, mode)] - triads[other] if opens_on_it else 0.0
    return KeyEstimate(key_name(tonic, mode), best, best - runner_up, float(relative))


def opening_triads(frames: np.ndarray, energy: np.ndarray, fps: float) -> tp.Dict[tp.Tuple[int, str], float]:
    """How well each major and minor triad fits the first START_SECONDS from where the sound starts (the first
    frame with 5% of the loudest frame's energy): correlation of the mean chroma there with the triad's notes."""
    first = int(np.argmax(energy >= 0.05 * energy.max()))
    opening = frames[:, first : first + max(1, int(round(START_SECONDS * fps)))].mean(axis=1)
    triads = {}
    for root in range(12):
        for mode, third in (("major", 4), ("minor", 3)):
            notes = np.zeros(12)
            notes[[root, (root + third) % 12, (root + 7) % 12]] = 1.0
            triads[(root, mode)] = float(np.corrcoef(opening, notes)[0, 1]) if np.ptp(opening) > 0 else 0.0
    return triads


def estimate_key(audio: np.ndarray, rate: int) -> tp.Optional[str]:
    """Key ('F minor') when `measure_key` is confident of it, else None."""
    return measure_key(audio, rate).trusted


def segment_bounds(samples: int, rate: int, segment_seconds: float, min_ratio: float) -> tp.List[tp.Tuple[int, int]]:
    """Cut points: whole segments, plus the remainder if it is at least `min_ratio` of a segment.
    A clip no longer than one segment stays whole."""
    length = int(round(segment_seconds * rate))
    if samples <= length:
        return [(0, samples)]
    bounds = [(start, start + length) for start in range(0, samples - length + 1, length)]
    remainder = samples - bounds[-1][1]
    if remainder >= min_ratio * length:
        bounds.append((bounds[-1][1], samples))
    return bounds
