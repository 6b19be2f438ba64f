"""Images for the evaluation report: training loss curves and compact spectrograms, as PNG files.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot): no GUI, no global state, safe in threads.
"""

import itertools
import math
import typing as tp
from pathlib import Path

import matplotlib
import numpy as np
import soundfile as sf
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, MaxNLocator, NullLocator

from ..files import write_atomically

SPECTROGRAM_SIZE = (5.0, 2.0)  # inches; at SPECTROGRAM_DPI, 500 x 200 pixels
SPECTROGRAM_DPI = 100
LOWEST_HZ = 20.0  # the axis starts below the 30-120 Hz 808 band
FLOOR_DB = -80.0  # quieter than this (relative to the loudest bin) is drawn as silence
BAND_808_HZ = (30.0, 120.0)
MAX_FRAMES = 1000  # spectrogram columns: about two per pixel of the default image
LOG_ROWS = 400  # spectrogram rows, log-spaced from LOWEST_HZ: two per pixel
FREQUENCY_TICKS_HZ = [30, 60, 120, 250, 500, 1000, 2000, 4000, 8000, 16000]


def _new_figure(size: tp.Tuple[float, float], dpi: int) -> Figure:
    figure = Figure(figsize=size, dpi=dpi)
    FigureCanvasAgg(figure)
    return figure


def _save_png(figure: Figure, out_png: Path) -> Path:
    """Write through a temporary file, so a reader never sees a half-written image."""
    return write_atomically(out_png, lambda partial: figure.savefig(partial, format="png", dpi=figure.dpi))


def _ce_points(history: tp.Sequence[dict], split: str) -> tp.Tuple[tp.List[int], tp.List[float]]:
    """(epochs, cross-entropies) of one split; epochs count from 1, as dora's history and export.best_epoch do."""
    epochs, values = [], []
    for epoch, metrics in enumerate(history, start=1):
        ce = (metrics or {}).get(split, {}).get("ce")
        if isinstance(ce, (int, float)) and math.isfinite(ce):
            epochs.append(epoch)
            values.append(float(ce))
    return epochs, values


def loss_curves(runs: tp.Sequence[dict], out_png: Path) -> tp.Optional[Path]:
    """Train (dashed) and valid (solid) cross-entropy per epoch of every run, one colour per run, each run's best
    epoch marked. `runs`: [{"label", "history" (dora's history.json), "best_epoch" (1-based or None)}].
    Returns None, writing nothing, when no run has a loss to draw."""
    figure = _new_figure((7.0, 4.0), 100)
    axes = figure.add_subplot()
    colours = itertools.cycle(matplotlib.rcParams["axes.prop_cycle"].by_key()["color"])
    drawn = False
    for run in runs:
        history = run.get("history") or []
        train, valid = _ce_points(history, "train"), _ce_points(history, "valid")
        if not train[0] and not valid[0]:
            continue
        colour, label = next(colours), str(run.get("label") or run.get("model") or "run")
        if train[0]:
            axes.plot(*train, linestyle="--", marker=".", color=colour, label=f"{label} train")
        if valid[0]:
            axes.plot(*valid, linestyle="-", marker="o", markersize=4, color=colour, label=f"{label} valid")
        best = run.get("best_epoch")
        if best is not None:
            axes.axvline(best, color=colour, linestyle=":", linewidth=1)
            if best in valid[0]:
                axes.plot(
                    [best],
                    [valid[1][valid[0].index(best)]],
                    marker="*",
                    markersize=14,
                    color=colour,
                    markeredgecolor="black",
                    linestyle="none",
                    label=f"{label} best (epoch {best})",
                )
        drawn = True
    if not drawn:
        return None
    axes.set_xlabel("epoch")
    axes.set_ylabel("cross-entropy")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    return _save_png(figure, out_png)


def _mono(audio_path: Path) -> tp.Tuple[np.ndarray, int]:
    try:
        data, rate = sf.read(str(audio_path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as error:
        raise ValueError(
            f"{audio_path}: cannot read it as audio ({error}); spectrograms need a file libsndfile "
            "reads (wav, flac, ogg)."
        ) from error
    if not len(data):
        raise ValueError(f"{audio_path}: the file holds no samples; regenerate it.")
    return data.mean(axis=1), int(rate)


def _log_magnitude(mono: np.ndarray, rate: int) -> tp.Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(times s, frequencies Hz from LOWEST_HZ, dB [frequency, time]). The window is long enough (about 8 Hz per
    bin) to separate the low notes of an 808; no more frames and rows are kept than an image can show."""
    n_fft = 1 << max(8, math.ceil(math.log2(rate / 8)))
    hop = max(n_fft // 8, math.ceil(len(mono) / MAX_FRAMES))
    padded = np.pad(mono, (n_fft // 2, n_fft // 2 + max(0, n_fft - len(mono))))
    frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft)[::hop]
    magnitude = np.abs(np.fft.rfft(frames * np.hanning(n_fft).astype(np.float32), axis=1)).T
    frequencies = np.fft.rfftfreq(n_fft, 1 / rate)
    # Log-spaced rows: every bin at the low end, the mean power of each group of bins higher up (a mean, so that
    # noise stays flat however many bins a row holds).
    first = int(np.searchsorted(frequencies, LOWEST_HZ))
    starts = np.unique(np.geomspace(first, len(frequencies), LOG_ROWS, endpoint=False).astype(int)) - first
    sizes = np.diff(np.append(starts, len(frequencies) - first))[:, None]
    power = np.add.reduceat(magnitude[first:] ** 2, starts, axis=0) / sizes
    centres = np.add.reduceat(frequencies[first:], starts) / sizes[:, 0]
    db = 10 * np.log10(np.maximum(power, 1e-20) / max(float(power.max()), 1e-20))
    return np.arange(frames.shape[0]) * hop / rate, centres, np.maximum(db, FLOOR_DB)


def spectrogram(
    audio_path: Path, out_png: Path, size: tp.Tuple[float, float] = SPECTROGRAM_SIZE, dpi: int = SPECTROGRAM_DPI
) -> Path:
    """Log-magnitude spectrogram of the mono mix on a log-frequency axis, the 808 band (30-120 Hz) between dotted
    lines; compact and title-free, `size` inches at `dpi` (500 x 200 pixels by default)."""
    mono, rate = _mono(Path(audio_path))
    times, frequencies, db = _log_magnitude(mono, rate)
    figure = _new_figure(size, dpi)
    axes = figure.add_axes((0.08, 0.17, 0.89, 0.81))
    axes.pcolormesh(times, frequencies, db, shading="nearest", cmap="magma", vmin=FLOOR_DB, vmax=0, rasterized=True)
    axes.set_yscale("log")
    axes.set_ylim(LOWEST_HZ, rate / 2)
    ticks = [hz for hz in FREQUENCY_TICKS_HZ if hz < rate / 2]
    axes.yaxis.set_major_locator(FixedLocator(ticks))
    axes.yaxis.set_minor_locator(NullLocator())
    axes.set_yticklabels([f"{hz // 1000}k" if hz >= 1000 else str(hz) for hz in ticks])
    for hz in BAND_808_HZ:
        axes.axhline(hz, color="white", linestyle=":", linewidth=0.8, alpha=0.7)
    axes.tick_params(labelsize=7, length=2, pad=1)
    axes.set_xlabel("s", fontsize=7, labelpad=0)
    axes.set_ylabel("Hz", fontsize=7, labelpad=0)
    return _save_png(figure, out_png)
