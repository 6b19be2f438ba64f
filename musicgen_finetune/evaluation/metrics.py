"""Offline metrics for comparing generated beats: per-clip descriptors, tempo adherence, Fréchet distance, CLAP.

    descriptors(audio, rate)       tempo_bpm, low_freq_ratio, onset_density, loudness_lufs of one clip
    bpm_from_text(text)            the bpm a prompt asks for ("808 trap beat, 140 bpm" -> 140.0)
    tempo_error(measured, target)  relative tempo error, forgiving half/double-tempo (octave) readings
    frechet_distance(a, b)         Fréchet distance between Gaussians fitted to two embedding sets [N, D], [M, D]
    summarize(rows)                mean, std and count of each numeric value over clips
    clap_scores(dir, clips, ...)   CLAP text-audio cosine similarity, from a local CLAP folder only

Undefined values are None, never -inf or NaN (so that rows stay valid JSON): a silent clip has no tempo, no
low-frequency ratio and no loudness. Nothing here reaches the network; no torch unless CLAP is asked for.
"""

import json
import math
import typing as tp
import warnings
from pathlib import Path

import numpy as np

from ..data import audio as aa
from ..data.captions import BPM_PATTERN
from ..data.librosa_loader import load_librosa

LOW_FREQ_HZ = 120  # the 808 / sub-bass band: energy below this over all energy is `low_freq_ratio`
TEMPO_FRAME_RATE = 100  # onset-envelope frames per second for tempo (see tempo_hop_length)
SPECTRUM_SEGMENT_SECONDS = 0.25  # Welch segments: 4 Hz bins, fine enough to split the spectrum at 120 Hz
ONSET_LEAD_SECONDS = 0.05  # silence put before the clip, so that a hit at t=0 counts as an onset
OCTAVE_FACTORS = (1.0, 2.0, 0.5)
FRECHET_EPS = 1e-6  # added to both covariance diagonals when their product has no usable square root
IMAGINARY_TOLERANCE = 1e-3  # largest imaginary part of sqrtm's diagonal that is numerical noise
CLAP_MIN_WINDOW_RATIO = 0.5  # a clip's last partial CLAP window is scored if at least this fraction of a window
CLAP_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
CLAP_CONTENTS = (
    "config.json (model_type 'clap') with its weights (model.safetensors or pytorch_model.bin), "
    "preprocessor_config.json, and the RoBERTa tokenizer (vocab.json and merges.txt, or tokenizer.json), "
    "as ClapModel.save_pretrained and ClapProcessor.save_pretrained write them (e.g. a download of "
    "laion/larger_clap_music or laion/clap-htsat-unfused)"
)


class ClapFolderError(ValueError):
    """The CLAP folder cannot be used; the message names it and what it should contain."""


# ----------------------------------------------------------------------------------------------------- descriptors


def as_channels(audio: np.ndarray) -> np.ndarray:
    """Float audio, mono [samples] or [channels, samples], as float32 [channels, samples]; refuses what isn't."""
    audio = np.asarray(audio)
    if audio.ndim == 1:
        audio = audio[None]
    if audio.ndim != 2 or audio.shape[-1] == 0:
        raise ValueError(f"audio of shape {audio.shape}: expected float samples, [samples] or [channels, samples]")
    if audio.shape[0] > 8 and audio.shape[1] <= 8:
        raise ValueError(f"audio of shape {audio.shape} looks like [samples, channels]: pass audio.T")
    if not np.issubdtype(audio.dtype, np.floating):
        raise ValueError(
            f"audio of dtype {audio.dtype}: expected floats in [-1, 1] (divide integer PCM by its "
            f"full scale, e.g. int16 by 32768)"
        )
    if not np.isfinite(audio).all():
        raise ValueError("audio contains NaN or infinite samples: no metric is meaningful for it")
    return np.ascontiguousarray(audio, dtype=np.float32)


def descriptors(audio: np.ndarray, sample_rate: int) -> dict:
    """What a clip sounds like, in numbers a report can average over clips.

    tempo_bpm: bpm (librosa on the onset envelope), None without a beat. low_freq_ratio: energy below
    LOW_FREQ_HZ over all energy, 0..1, None for silence. onset_density: onsets per second (0.0 for silence).
    loudness_lufs: integrated loudness (ITU-R BS.1770, channel energies summed), None for silence.
    Tempo, onsets and spectrum use the mono mix; loudness uses every channel.
    """
    audio = as_channels(audio)
    if sample_rate <= 0:
        raise ValueError(f"sample_rate {sample_rate}: expected a positive number of samples per second")
    mono = audio.mean(axis=0)
    with warnings.catch_warnings():  # a clip shorter than librosa's 2048-sample FFT is still measured
        warnings.filterwarnings("ignore", message="n_fft=.* is too large", category=UserWarning)
        return {
            "tempo_bpm": aa.estimate_tempo(mono[None], sample_rate, hop_length=tempo_hop_length(sample_rate)),
            "low_freq_ratio": low_freq_ratio(mono, sample_rate),
            "onset_density": onset_density(mono, sample_rate),
            "loudness_lufs": loudness_lufs(audio, sample_rate),
        }


def tempo_hop_length(sample_rate: int) -> int:
    """Samples per onset-envelope frame for TEMPO_FRAME_RATE. librosa's tempo is a whole number of frames per
    beat: its default 512-sample hop reads 140 bpm as 143.6 at 22.05 kHz; 100 frames/s is within about 1% at any
    rate, and 200 would halve that for 4x the time (1.3 s for a 30 s clip)."""
    return max(1, int(sample_rate // TEMPO_FRAME_RATE))


def low_freq_ratio(mono: np.ndarray, sample_rate: int, cutoff_hz: float = LOW_FREQ_HZ) -> tp.Optional[float]:
    """Fraction of the power spectrum (Welch, mean removed) below `cutoff_hz`; None when there is no energy."""
    from scipy.signal import welch

    segment = max(1, min(len(mono), int(round(SPECTRUM_SEGMENT_SECONDS * sample_rate))))
    freqs, power = welch(mono.astype(np.float64), fs=sample_rate, nperseg=segment)
    total = float(power.sum())
    if not total > 0:
        return None
    return float(power[freqs < cutoff_hz].sum() / total)


def onset_density(mono: np.ndarray, sample_rate: int) -> float:
    """Onsets per second (librosa's onset detection), a hit at the very start counted as it is after silence."""
    librosa = load_librosa()

    lead = np.zeros(int(round(ONSET_LEAD_SECONDS * sample_rate)), np.float32)
    onsets = librosa.onset.onset_detect(y=np.concatenate([lead, mono]), sr=sample_rate, units="frames")
    return len(onsets) / (len(mono) / sample_rate)


def loudness_lufs(audio: np.ndarray, sample_rate: int) -> tp.Optional[float]:
    """Integrated loudness in LUFS, None for silence (below BS.1770's -70 LUFS absolute gate).

    BS.1770 gates 400 ms blocks; a clip shorter than one block is measured as one block of its own length
    (same K-weighting and gate), rather than failing or being padded quieter with silence.
    """
    import pyloudnorm

    audio = as_channels(audio)
    seconds = audio.shape[-1] / sample_rate
    # a hair under the clip's length: pyloudnorm refuses a block longer than the audio, even by a rounding error
    block = aa.LOUDNESS_MIN_SECONDS if seconds >= aa.LOUDNESS_MIN_SECONDS else seconds / (1 + 1e-9)
    loudness = float(pyloudnorm.Meter(sample_rate, block_size=block).integrated_loudness(audio.T.astype(np.float64)))
    return loudness if math.isfinite(loudness) else None


# ----------------------------------------------------------------------------------------------------------- tempo


def bpm_from_text(text: str) -> tp.Optional[float]:
    """The first '<number> bpm' of a prompt ("808 trap beat, 140 bpm", "140BPM", "at 95 bpm"), else None.
    The same pattern that writes and rewrites bpm into captions (data.describe, augment)."""
    match = BPM_PATTERN.search(text or "")
    bpm = float(match.group(1)) if match else None
    return bpm if bpm else None


def tempo_error(measured: float, target: float) -> float:
    """|measured - target| / target, the smallest over measured, 2x measured and measured / 2: a half- or
    double-tempo reading is the usual tempo-estimator mistake, not a wrong tempo (0.0 = exact, 0.1 = 10% off)."""
    if target is None or not math.isfinite(target) or target <= 0:
        raise ValueError(f"target tempo {target!r}: expected a positive bpm (a prompt without bpm has no target)")
    if measured is None or not math.isfinite(measured):
        raise ValueError(
            f"measured tempo {measured!r}: expected a bpm (a clip without a beat has no tempo error; skip it)"
        )
    return min(abs(measured * factor - target) / target for factor in OCTAVE_FACTORS)


# ------------------------------------------------------------------------------------------------ Fréchet distance


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 sqrt(S_a S_b)) between Gaussians fitted to the rows of a and b
    (sample covariance, ddof=1), as FID and FAD compute it; 0 for the same distribution."""
    a, b = _embeddings(a, "a"), _embeddings(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"embeddings of different sizes: a has {a.shape[1]} dims per row, b {b.shape[1]}; "
            f"compare embeddings of the same model and layer"
        )
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    trace_sqrt = float(np.trace(_sqrtm_product(cov_a, cov_b)))
    distance = float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt)
    return max(distance, 0.0)  # rounding can take identical sets a hair below 0


def _embeddings(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"embeddings {name} of shape {x.shape}: expected [rows, dims], one row per sample/frame")
    if x.shape[0] < 2:
        raise ValueError(
            f"embeddings {name} have {x.shape[0]} row(s): a covariance needs at least 2 (use "
            f"per-frame embeddings or more clips)"
        )
    if not np.isfinite(x).all():
        raise ValueError(f"embeddings {name} contain NaN or infinite values")
    return x


def _sqrtm_product(cov_a: np.ndarray, cov_b: np.ndarray) -> np.ndarray:
    """sqrt(cov_a @ cov_b), real. A singular product (fewer rows than dims, constant dims) makes sqrtm inaccurate,
    infinite or complex; then FRECHET_EPS on both diagonals regularizes it, as the reference FID code does."""
    from scipy import linalg

    with warnings.catch_warnings():
        warnings.simplefilter("error", linalg.LinAlgWarning)  # scipy's "Matrix is singular": regularize instead
        try:
            root = linalg.sqrtm(cov_a @ cov_b)
        except linalg.LinAlgWarning:
            root = np.full_like(cov_a, np.nan)
    if not np.isfinite(root).all() or _imaginary(root) > IMAGINARY_TOLERANCE:
        offset = np.eye(cov_a.shape[0]) * FRECHET_EPS
        root = linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    if not np.isfinite(root).all() or _imaginary(root) > IMAGINARY_TOLERANCE:
        raise ValueError(
            f"the covariance product has no usable square root (imaginary part "
            f"{_imaginary(root):.3g}): too few rows for the dims, or degenerate embeddings"
        )
    return np.real(root)


def _imaginary(matrix: np.ndarray) -> float:
    return float(np.max(np.abs(np.imag(np.diagonal(matrix))))) if np.iscomplexobj(matrix) else 0.0


# -------------------------------------------------------------------------------------------------------- summary


def summarize(rows: tp.Sequence[dict]) -> dict:
    """{key: {"mean", "std", "count"}} for every key whose values are numbers (or None) in the rows.

    None, NaN and infinities are left out of mean and count (a silent clip has no tempo); "std" is the sample
    standard deviation, None under 2 values; "mean" is None when no value counts. Keys holding anything else
    (text, paths, bools) are not summarized. Keys keep their first-seen order.
    """
    keys: tp.Dict[str, None] = {}
    for row in rows:
        keys.update(dict.fromkeys(row))
    summary = {}
    for key in keys:
        values = [row[key] for row in rows if key in row]
        if not all(value is None or _is_number(value) for value in values):
            continue
        finite = [float(v) for v in values if v is not None and math.isfinite(v)]
        summary[key] = {
            "mean": float(np.mean(finite)) if finite else None,
            "std": float(np.std(finite, ddof=1)) if len(finite) > 1 else None,
            "count": len(finite),
        }
    return summary


def _is_number(value: tp.Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


# ----------------------------------------------------------------------------------------------------------- CLAP


def clap_scores(
    clap_dir: Path,
    clips: tp.Sequence[np.ndarray],
    sample_rate: int,
    texts: tp.Sequence[str],
    device: tp.Optional[str] = None,
) -> tp.List[float]:
    """Cosine similarity, in [-1, 1], of each clip's CLAP audio embedding with its text's CLAP text embedding.

    The model is loaded from the local folder `clap_dir` on each call (pass all clips at once), on `device`
    (default: cuda if available). Clips are mixed to mono and resampled to the processor's rate; a clip longer
    than CLAP's window (10 s for LAION's) is embedded window by window and the normalized embeddings averaged, so
    that all of it counts and the score is deterministic (the feature extractor would crop at random).
    """
    if len(clips) != len(texts):
        raise ValueError(f"{len(clips)} clips but {len(texts)} texts: one text per clip")
    if not clips:
        return []
    import torch

    model, processor = load_clap(clap_dir, device)
    text_embeddings = {text: _clap_text_embedding(model, processor, text) for text in dict.fromkeys(texts)}
    scores = []
    for clip, text in zip(clips, texts):
        audio_embedding = _clap_audio_embedding(model, processor, clip, sample_rate)
        score = torch.dot(audio_embedding, text_embeddings[text]).clamp(-1.0, 1.0)
        scores.append(float(score))
    return scores


def load_clap(clap_dir: Path, device: tp.Optional[str] = None) -> tp.Tuple[tp.Any, tp.Any]:
    """transformers' ClapModel (eval mode, on `device`) and ClapProcessor from a local folder, never the hub."""
    folder = Path(clap_dir).expanduser()
    _check_clap_folder(folder)
    import torch
    from transformers import ClapModel, ClapProcessor

    try:
        model = ClapModel.from_pretrained(folder, local_files_only=True)
        processor = ClapProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ClapFolderError(
            f"{folder}: cannot be loaded as a CLAP model ({err}). It should contain {CLAP_CONTENTS}."
        ) from err
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), processor


def _check_clap_folder(folder: Path) -> None:
    """Name what is missing before transformers does, in words a user can act on."""
    if not folder.is_dir():
        raise ClapFolderError(f"{folder}: not a folder. A CLAP model folder contains {CLAP_CONTENTS}.")
    config = folder / "config.json"
    try:
        model_type = json.loads(config.read_text()).get("model_type") if config.is_file() else None
    except (ValueError, OSError, AttributeError):
        model_type = None
    missing = []
    if model_type != "clap":
        missing.append(
            "config.json of a CLAP model" + (f" (this one is model_type {model_type!r})" if model_type else "")
        )
    if not any((folder / name).is_file() for name in CLAP_WEIGHTS):
        missing.append("the weights (model.safetensors or pytorch_model.bin)")
    if not (folder / "preprocessor_config.json").is_file():
        missing.append("preprocessor_config.json")
    if not (
        (folder / "tokenizer.json").is_file()
        or ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file())
    ):
        missing.append("the tokenizer (vocab.json and merges.txt, or tokenizer.json)")
    if missing:
        raise ClapFolderError(
            f"{folder}: not a CLAP model folder, it lacks {'; '.join(missing)}. It should contain {CLAP_CONTENTS}."
        )


def _clap_text_embedding(model, processor, text: str):
    """Unit-norm text embedding of one text (alone, so that padding never depends on the other texts)."""
    import torch

    limit = model.config.text_config.max_position_embeddings - 2  # RoBERTa positions start after the padding id
    tokens = processor.tokenizer(
        [text], truncation=True, max_length=min(limit, processor.tokenizer.model_max_length), return_tensors="pt"
    ).to(model.device)
    with torch.inference_mode():
        embedding = model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    return torch.nn.functional.normalize(embedding[0].float(), dim=-1)


def _clap_audio_embedding(model, processor, clip: np.ndarray, sample_rate: int):
    """Unit-norm mean of the unit-norm embeddings of the clip's consecutive CLAP windows, each extracted alone."""
    import torch

    extractor = processor.feature_extractor
    rate = int(extractor.sampling_rate)
    mono = aa.convert(as_channels(clip), sample_rate, rate, 1)[0]
    windows = aa.segment_bounds(len(mono), rate, float(extractor.max_length_s), CLAP_MIN_WINDOW_RATIO)
    embeddings = []
    for start, end in windows:
        features = extractor([mono[start:end]], sampling_rate=rate, return_tensors="pt")
        with torch.inference_mode():
            embedding = model.get_audio_features(
                input_features=features["input_features"].to(model.device),
                is_longer=features["is_longer"].to(model.device),
            )
        embeddings.append(torch.nn.functional.normalize(embedding[0].float(), dim=-1))
    return torch.nn.functional.normalize(torch.stack(embeddings).mean(dim=0), dim=-1)
