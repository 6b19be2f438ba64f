"""Decoding, checking, converting and measuring one audio file; no torch, so data workers start fast.

Decoding: libsndfile (wav of any bit depth, flac, ogg, mp3), else the ffmpeg binary (m4a, aac, opus, ...).
Resampling: soxr at its highest quality. Loudness: ITU-R BS.1770 (pyloudnorm). Tempo and key: librosa's
algorithmic estimators, no downloaded model.
"""
import io
import shutil
import subprocess
import typing as tp
from pathlib import Path

import numpy as np
import soundfile as sf

from ..errors import UserError

AUDIO_EXTENSIONS = {".wav", ".wave", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".m4a", ".aac", ".mp4", ".aif",
                    ".aiff", ".wma", ".webm"}
TARGET_LUFS = -14.0      # streaming-music loudness; segments are then peak-limited to PEAK_CEILING
PEAK_CEILING = 0.99
SILENCE_DBFS = -60.0     # below this RMS a file is considered silent
LOUDNESS_MIN_SECONDS = 0.4  # BS.1770 needs one 400 ms block
NOTES = ["C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B"]
# Krumhansl-Kessler key profiles (major, minor), tonic first.
MAJOR_PROFILE = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
MINOR_PROFILE = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])


class BadAudio(UserError, ValueError):
    """This file cannot be used; the message is the reason shown to the user."""


def decode(path: Path) -> tp.Tuple[np.ndarray, int]:
    """Audio as float32 [channels, samples] and its sample rate."""
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError):
        data, rate = _decode_with_ffmpeg(path)
    return np.ascontiguousarray(data.T), int(rate)


def _decode_with_ffmpeg(path: Path) -> tp.Tuple[np.ndarray, int]:
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise BadAudio("not readable by libsndfile, and no ffmpeg on PATH to try (run `make setup`)")
    result = subprocess.run([ffmpeg, "-nostdin", "-v", "error", "-i", str(path), "-vn", "-f", "wav",
                             "-acodec", "pcm_f32le", "-"], capture_output=True)
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
    """Tempo in bpm from the onset envelope (librosa), or None if there is no beat to find.

    The estimate is a whole number of envelope frames per beat, so `hop_length` sets its resolution: librosa's
    default 512 samples reads a 140 bpm click track as 143.6 bpm at 22.05 kHz; metrics.py asks for finer frames.
    """
    import librosa
    mono = audio.mean(axis=0)
    onset = librosa.onset.onset_strength(y=mono, sr=rate, hop_length=hop_length)
    if not np.any(onset > 0):
        return None
    tempo = float(np.atleast_1d(librosa.feature.tempo(onset_envelope=onset, sr=rate, hop_length=hop_length))[0])
    return round(tempo, 1) if tempo > 0 else None


def estimate_key(audio: np.ndarray, rate: int) -> tp.Optional[str]:
    """Key ('F minor') by correlating the mean chroma with the Krumhansl-Kessler profiles."""
    import librosa
    mono = audio.mean(axis=0)
    chroma = librosa.feature.chroma_stft(y=mono, sr=rate, n_fft=4096, tuning=0.0).mean(axis=1)
    if not np.any(chroma > 0) or np.allclose(chroma, chroma[0]):
        return None
    scores = []
    for mode, profile in (("major", MAJOR_PROFILE), ("minor", MINOR_PROFILE)):
        for tonic in range(12):
            scores.append((np.corrcoef(chroma, np.roll(profile, tonic))[0, 1], f"{NOTES[tonic]} {mode}"))
    return max(scores)[1]


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
