"""Captions in the forms people have them, for every audio file of a folder.

In order of precedence, for `<folder>/<sub>/a.wav`:
1. an entry of a metadata file: `metadata.json` (our first users' list of {"audio": "train/a.wav", "text": ...}),
   or the Hugging Face audiofolder convention `metadata.jsonl` / `metadata.csv` with `file_name` and `text`
   columns; a metadata file may sit in any sub-folder, its paths relative to it; extra keys (bpm, key, genre,
   moods, instrument, artist, title) are kept;
2. an AudioCraft sidecar `a.json` beside the audio (MusicInfo fields, the caption in "description");
3. a plain-text caption `a.txt` beside the audio;
4. the TEXT= default caption.

And the caption grammar: what in a caption is a tempo (`BPM_PATTERN`) or a key (`KEY_PATTERN`), and
`with_tempo_and_key`, which adds what a caption lacks.
"""

import csv
import dataclasses
import json
import re
import typing as tp
from pathlib import Path, PurePosixPath

from ..errors import UserError
from .audio import whole_bpm

METADATA_NAMES = ("metadata.json", "metadata.jsonl", "metadata.csv")
PATH_KEYS = ("audio", "file_name", "path", "file")
TEXT_KEYS = ("text", "description", "caption")
# MusicInfo fields kept from a caption source (description is the caption itself).
INFO_FIELDS = ("title", "artist", "key", "bpm", "genre", "moods", "keywords", "instrument")


# The caption grammar: what in a caption or a metadata field is a tempo or a key.
# A key is a capital note letter and a mode: "F minor", "C# major", "Bb min", "Fm" (not "a minor feel").
KEY_PATTERN = re.compile(r"\b([A-G])([#b]?)\s*((?i:major|minor|maj|min)\b|m\b)")
KEY_FIELD = re.compile(r"([A-G])([#b]?)\s*(major|minor|maj|min|m)", re.IGNORECASE)  # a metadata key field
BPM_PATTERN = re.compile(r"(\d+(?:\.\d+)?)\s*bpm", re.IGNORECASE)


def as_number(value: tp.Any) -> tp.Optional[float]:
    """140, "140", "140 bpm" -> 140.0; anything else -> None."""
    match = re.match(r"\s*(\d+(?:\.\d+)?)", str(value)) if value not in (None, "") else None
    return float(match.group(1)) if match else None


def with_tempo_and_key(caption: str, bpm: tp.Any, key: tp.Any) -> str:
    """'hip hop 808 beat' -> 'hip hop 808 beat, 140 bpm, F minor', adding only what the caption does not say
    (a caption that names any tempo or key keeps its own); tempos as whole bpm."""
    parts = [caption.rstrip(" ,.")]
    tempo = as_number(bpm)
    if tempo and not BPM_PATTERN.search(caption):
        parts.append(f"{whole_bpm(tempo)} bpm")
    if key and not KEY_PATTERN.search(caption):
        parts.append(str(key))
    return ", ".join(parts)


class CaptionFileError(UserError, ValueError):
    """A metadata file cannot be read; the message names the file and the line or entry."""


@dataclasses.dataclass
class Caption:
    text: tp.Optional[str]
    fields: dict  # MusicInfo fields given with the caption (bpm, key, genre, ...)
    source: str  # where it came from, for the report


@dataclasses.dataclass
class CaptionIndex:
    """Captions of metadata files by audio path relative to the data folder, and entries that point nowhere."""

    by_path: tp.Dict[str, Caption]
    problems: tp.List[tp.Tuple[str, str]]  # (path as written, reason)


def _entry_caption(entry: dict, where: str) -> Caption:
    text = next((entry[k] for k in TEXT_KEYS if entry.get(k)), None)
    if text is not None and not isinstance(text, str):
        raise CaptionFileError(f"{where}: the caption must be a string, got {type(text).__name__}.")
    fields = {k: entry[k] for k in INFO_FIELDS if entry.get(k) not in (None, "", [])}
    return Caption(text=text.strip() if text else None, fields=fields, source=where)


def _read_entries(path: Path) -> tp.List[tp.Tuple[dict, str]]:
    """(entry, 'file, line/entry N') pairs of one metadata file."""
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix == ".json":
        try:
            entries = json.loads(text)
        except json.JSONDecodeError as err:
            raise CaptionFileError(
                f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}."
            ) from err
        if isinstance(entries, dict):  # {"a.wav": "caption", ...} is a common hand-written form
            entries = [{"audio": k, **(v if isinstance(v, dict) else {"text": v})} for k, v in entries.items()]
        if not isinstance(entries, list):
            raise CaptionFileError(f'{path}: expected a list of {{"audio": ..., "text": ...}} objects.')
        return [(e, f"{path.name}, entry {i}") for i, e in enumerate(entries)]
    if path.suffix == ".jsonl":
        entries = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entries.append((json.loads(line), f"{path.name}, line {number}"))
            except json.JSONDecodeError as err:
                raise CaptionFileError(f"{path}: invalid JSON on line {number}: {err.msg}.") from err
        return entries
    rows = list(csv.reader(text.splitlines()))
    if not rows:
        return []
    header = [h.strip() for h in rows[0]]
    if not any(k in header for k in PATH_KEYS):
        raise CaptionFileError(
            f"{path}: line 1 must be a header naming the file column "
            f"({' or '.join(PATH_KEYS)}) and the caption column (text); found {header}."
        )
    entries = []
    for number, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise CaptionFileError(
                f"{path}: line {number} has {len(row)} fields, the header has {len(header)} "
                "(quote captions that contain commas)."
            )
        entries.append((dict(zip(header, row, strict=True)), f"{path.name}, line {number}"))
    return entries


def relative_inside(folder: Path, written: str, base: Path) -> tp.Optional[str]:
    """`written` (relative to `base`) as a posix path relative to `folder`, or None if it leaves `folder`."""
    if PurePosixPath(written).is_absolute() or Path(written).is_absolute():
        return None
    resolved = (base / written).resolve()
    try:
        return resolved.relative_to(folder.resolve()).as_posix()
    except ValueError:
        return None


def read_metadata_files(folder: Path) -> CaptionIndex:
    index = CaptionIndex(by_path={}, problems=[])
    # the root's files first, and metadata.json before .jsonl before .csv: the first caption of a file wins
    metadata_files = sorted(
        (p for name in METADATA_NAMES for p in folder.rglob(name) if p.is_file()),
        key=lambda p: (len(p.relative_to(folder).parts), METADATA_NAMES.index(p.name), p),
    )
    for path in metadata_files:
        for entry, where in _read_entries(path):
            if not isinstance(entry, dict):
                raise CaptionFileError(f"{path}: {where.split(', ')[1]} is not an object.")
            written = next((entry[k] for k in PATH_KEYS if entry.get(k)), None)
            if not isinstance(written, str):
                raise CaptionFileError(
                    f"{path}: {where.split(', ')[1]} has no file path (one of {', '.join(PATH_KEYS)})."
                )
            relative = relative_inside(folder, written, path.parent)
            if relative is None:
                index.problems.append((written, f"{where}: path leaves the data folder; paths must be inside it"))
            elif not (folder / relative).is_file():
                index.problems.append((written, f"{where}: caption for a file that does not exist"))
            elif relative not in index.by_path:
                index.by_path[relative] = _entry_caption(entry, where)
    return index


def sidecar_caption(audio: Path) -> tp.Optional[Caption]:
    """The caption beside an audio file (.json sidecar, else .txt), or None. Raises ValueError if unreadable."""
    sidecar = audio.with_suffix(".json")
    if sidecar.is_file():
        try:
            info = json.loads(sidecar.read_text(encoding="utf-8-sig"))
        except json.JSONDecodeError as err:
            raise ValueError(f"sidecar {sidecar.name} is not valid JSON (line {err.lineno}: {err.msg})") from err
        if not isinstance(info, dict):
            raise ValueError(f"sidecar {sidecar.name} is not a JSON object")
        return _entry_caption(info, sidecar.name)
    text_file = audio.with_suffix(".txt")
    if text_file.is_file():
        text = text_file.read_text(encoding="utf-8-sig").strip()
        return Caption(text=text or None, fields={}, source=text_file.name)
    return None
