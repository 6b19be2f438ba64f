"""What `make manifests` is asked to do (ManifestOptions), checked before anything is read or written."""

import dataclasses
import math
import re
import typing as tp

from ..errors import UserError
from .audio import TARGET_LUFS

CONVERSION_VERSION = 3  # bump when the conversion changes, so cached audio is rebuilt (2: tempo and key with
# their confidence in source.json, issue 13; 3: the key's tonic against its relative, spelled keys, issue 25)


class DatasetError(UserError, ValueError):
    """The folder cannot become a dataset; the message names the file and the fix."""


@dataclasses.dataclass
class ManifestOptions:
    sample_rate: int = 32000
    channels: int = 1
    segment: float = 30.0  # training segment length in seconds; longer files are cut
    valid: float = 0.2  # fraction of source files held out
    seed: int = 0  # of the train/valid split
    text: tp.Optional[str] = None  # caption for files that have none
    strict: bool = False  # stop at the first bad file instead of skipping it
    describe: bool = True  # add tempo and key to descriptions that lack them
    tempo_range: tp.Optional[str] = None  # "lo-hi" bpm: measured tempos are folded by octaves into it
    min_seconds: float = 1.0  # shorter files are skipped
    min_segment_ratio: float = 0.8  # a remainder shorter than this fraction of a segment is dropped
    loudness: float = TARGET_LUFS  # integrated loudness target (LUFS)
    workers: tp.Optional[int] = None  # processes; default: all cores
    augment: tp.Optional[str] = None  # variants of training files (musicgen_finetune/augment.py), e.g. "default"
    augment_weight: float = 0.5  # sampling weight of each variant segment; originals weigh 1

    def check(self, augmenting: bool = False) -> None:
        """DatasetError naming each setting out of range (see check_options)."""
        check_options(self, augmenting)

    def conversion(self) -> dict:
        """Everything that changes the converted audio: cached audio is reused only if all of it is equal."""
        return {
            "version": CONVERSION_VERSION,
            "sample_rate": self.sample_rate,
            "channels": self.channels,
            "segment": self.segment,
            "min_segment_ratio": self.min_segment_ratio,
            "min_seconds": self.min_seconds,
            "loudness": self.loudness,
        }


def check_options(options: "ManifestOptions", augmenting: bool) -> None:
    """Every setting a user gives (as the Makefile variable that sets it), before anything is read or written."""
    problems = []
    if not (
        isinstance(options.segment, (int, float))
        and math.isfinite(options.segment)
        and options.segment >= options.min_seconds
    ):
        problems.append(
            f"SEGMENT={options.segment:g}: must be a number of seconds >= {options.min_seconds:g} (30 for "
            "musicgen-small; longer tracks are cut into pieces of this length)"
        )
    if not (isinstance(options.valid, (int, float)) and 0 <= options.valid < 1):
        problems.append(
            f"VALID={options.valid}: must be a fraction in [0, 1), the share of files held out for "
            "validation (0.2: one in five)"
        )
    elif options.valid == 0:  # the split would get a file anyway (sources.balance_splits), unannounced
        problems.append(
            "VALID=0: training validates after every epoch (its loss picks the best epoch and stops early), so "
            "at least one file is held out; give a fraction such as VALID=0.1"
        )
    if isinstance(options.seed, bool) or not isinstance(options.seed, int):
        problems.append(f"SPLIT_SEED={options.seed}: must be a whole number (it picks the validation files)")
    if augmenting and not (isinstance(options.augment_weight, (int, float)) and options.augment_weight > 0):
        problems.append(
            f"AUGMENT_WEIGHT={options.augment_weight}: must be > 0 (0.5: a variant is drawn half as "
            "often as an original)"
        )
    if problems:
        raise DatasetError("; ".join(problems) + ".")
    tempo_range_bounds(options.tempo_range)  # a bad TEMPO_RANGE stops the run before anything is converted


def tempo_range_bounds(spec: tp.Optional[str]) -> tp.Optional[tp.Tuple[float, float]]:
    """TEMPO_RANGE "70-140" -> (70.0, 140.0); None for none."""
    if spec in (None, ""):
        return None
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*-\s*(\d+(?:\.\d+)?)\s*(?:bpm)?\s*", str(spec))
    if not match or not 0 < float(match.group(1)) < float(match.group(2)):
        raise DatasetError(
            f"TEMPO_RANGE={spec}: expected lo-hi in bpm with lo < hi, e.g. TEMPO_RANGE=70-140 "
            "(a measured tempo is then halved or doubled into it)."
        )
    return float(match.group(1)), float(match.group(2))
