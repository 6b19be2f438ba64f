"""Augmented variants of training audio whose captions stay true (`make manifests AUGMENT=...`).

A spec lists the variants to render, one per value: `pitch=-2,-1,1,2;tempo=0.95,1.05;gain_db=-3,3` makes 8
variants of every training file (4 pitch shifts in semitones, 2 time stretches, 2 gains), never combinations.
Pitch shift and time stretch are librosa's (phase vocoder, soxr resampling). A variant's key is transposed by its
semitones and its bpm scaled by its tempo factor (to whole bpm), and its description is rewritten from them.
"""

import dataclasses
import re
import typing as tp

import numpy as np

from ..errors import UserError
from .audio import key_name, whole_bpm
from .captions import BPM_PATTERN, KEY_FIELD, KEY_PATTERN, as_number
from .librosa_loader import load_librosa

PRESETS = {"default": "pitch=-2,-1,1,2;tempo=0.95,1.05"}
KINDS = ("pitch", "tempo", "gain_db")
NATURALS = {"C": 0, "D": 2, "E": 4, "F": 5, "G": 7, "A": 9, "B": 11}


class AugmentSpecError(UserError, ValueError):
    """AUGMENT= cannot be read; the message shows the expected form."""


@dataclasses.dataclass(frozen=True)
class Variant:
    kind: str  # pitch, tempo or gain_db
    amount: float  # semitones, time factor (0.95: 5% slower), or decibels

    @property
    def name(self) -> str:
        return f"{self.kind}{self.amount:+g}" if self.kind != "tempo" else f"tempo{self.amount:g}"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "amount": self.amount, "name": self.name}


def parse(spec: tp.Optional[str]) -> tp.List[Variant]:
    """`pitch=-2,2;tempo=0.95` (or a preset name) -> variants, in a fixed order."""
    if not spec:
        return []
    spec = PRESETS.get(spec.strip(), spec)
    variants = []
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        kind, _, values = part.partition("=")
        kind = kind.strip()
        if kind not in KINDS or not values.strip():
            raise AugmentSpecError(
                f"AUGMENT part {part!r}: expected <kind>=<values> with kind one of "
                f"{', '.join(KINDS)}, e.g. {PRESETS['default']!r} (or AUGMENT=default)."
            )
        for value in values.split(","):
            try:
                amount = float(value)
            except ValueError:
                raise AugmentSpecError(f"AUGMENT {kind}={values}: {value!r} is not a number.") from None
            if kind == "tempo" and not 0.5 <= amount <= 2.0:
                raise AugmentSpecError(f"AUGMENT tempo={value}: use factors between 0.5 and 2 (0.95 = 5% slower).")
            if kind == "pitch" and (abs(amount) > 12 or amount == 0 or amount != int(amount)):
                raise AugmentSpecError(
                    f"AUGMENT pitch={value}: use whole, non-zero semitones within an octave "
                    "(a key can only be transposed by whole semitones)."
                )
            if (kind, amount) in (("tempo", 1.0), ("gain_db", 0.0)):
                raise AugmentSpecError(f"AUGMENT {kind}={value} would copy the file unchanged.")
            variants.append(Variant(kind, amount))
    return list(dict.fromkeys(variants))


def render(audio: np.ndarray, rate: int, variant: Variant) -> np.ndarray:
    """The variant of `audio` [channels, samples], peak-limited like the originals."""
    librosa = load_librosa()

    if variant.kind == "pitch":
        out = librosa.effects.pitch_shift(audio, sr=rate, n_steps=variant.amount, res_type="soxr_hq")
    elif variant.kind == "tempo":
        out = librosa.effects.time_stretch(audio, rate=variant.amount)
    else:
        out = audio * np.float32(10 ** (variant.amount / 20))
    peak = float(np.abs(out).max())
    if peak > 0.99:
        out = out * np.float32(0.99 / peak)
    return np.ascontiguousarray(out, dtype=np.float32)


def transpose_key(key: tp.Optional[str], semitones: float) -> tp.Optional[str]:
    """'F minor' + 2 -> 'G minor', 'A minor' + 1 -> 'Bb minor' (audio.MAJOR_KEYS / MINOR_KEYS spelling); keys that
    cannot be read, or fractional shifts, give None (unknown)."""
    if not key or semitones != int(semitones):
        return None
    match = KEY_FIELD.fullmatch(str(key).strip())
    if not match:
        return None
    letter, accidental, mode = match.groups()
    # either spelling is read ("A# minor", "Bb minor", "Fm", "E#"), the result spelled as musicians write it
    tonic = NATURALS[letter.upper()] + {"#": 1, "b": -1, "B": -1}.get(accidental, 0)
    mode = "minor" if mode.lower() in ("m", "min", "minor") else "major"
    return key_name(tonic + int(semitones), mode)


def transformed_info(info: dict, variant: Variant) -> dict:
    """The MusicInfo of a variant: key and bpm transformed, the description rewritten to match."""
    out = dict(info)
    description = str(info.get("description") or "")
    if variant.kind == "pitch":
        out["key"] = transpose_key(info.get("key"), variant.amount)
        # every key the caption names moves with the audio; a key that cannot be read is dropped, not kept false
        description = KEY_PATTERN.sub(lambda m: transpose_key(m.group(0), variant.amount) or "", description)
        description = re.sub(r"(,\s*)+(?=,|$)", "", description).strip(" ,")
    elif variant.kind == "tempo":
        # whole bpm, as every written tempo: a caption says "143 bpm", never "142.5 bpm" (issue 13)
        bpm = as_number(info.get("bpm"))
        out["bpm"] = whole_bpm(bpm * variant.amount) if bpm else None
        description = BPM_PATTERN.sub(lambda m: f"{whole_bpm(float(m.group(1)) * variant.amount)} bpm", description)
    out["description"] = description
    out["augmented"] = variant.to_dict()
    return out
