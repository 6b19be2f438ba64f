"""The files of a data folder that become a dataset: found, captioned, de-duplicated, split by source file."""

import collections
import dataclasses
import hashlib
import re
import typing as tp
from pathlib import Path

from .audio import AUDIO_EXTENSIONS
from .captions import Caption, CaptionFileError, read_metadata_files, sidecar_caption
from .options import DatasetError, ManifestOptions

SPLITS = ("train", "valid")
LAYOUT_FOLDERS = {"train": "train", "valid": "valid", "validation": "valid", "val": "valid"}


@dataclasses.dataclass
class Source:
    relative: str
    path: Path
    sha1: str
    split: str
    caption: Caption

    @property
    def folder_name(self) -> str:
        stem = re.sub(r"[^\w.-]+", "_", Path(self.relative).with_suffix("").as_posix().replace("/", "__"))
        return f"{stem[:80]}-{self.sha1[:12]}"


def file_sha1(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def hash_fraction(*parts: tp.Any) -> float:
    digest = hashlib.sha1(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def layout_split(relative: str) -> tp.Optional[str]:
    """'train' or 'valid' for a file under a train/ or valid/ (validation/, val/) top folder."""
    top = relative.split("/", 1)[0].lower() if "/" in relative else ""
    return LAYOUT_FOLDERS.get(top)


def has_split_layout(relatives: tp.Iterable[str]) -> bool:
    """The folder is already split: it has audio under both a train and a valid top folder."""
    return {layout_split(r) for r in relatives} >= set(SPLITS)


def find_audio(folder: Path) -> tp.List[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in AUDIO_EXTENSIONS
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


class Collector:
    """Skipped files, or the first one when STRICT=1."""

    def __init__(self, strict: bool):
        self.strict, self.skipped = strict, []

    def skip(self, file: str, reason: str) -> None:
        if self.strict:
            raise DatasetError(
                f"{file}: {reason}. (STRICT=1 stops at the first bad file; without it, bad files "
                "are skipped and listed in the report.)"
            )
        self.skipped.append({"file": file, "reason": reason})


def collect_sources(folder: Path, options: ManifestOptions, collector: Collector) -> tp.Tuple[tp.List[Source], int]:
    """The files to convert, with caption and split, and the number of audio files found."""
    try:
        index = read_metadata_files(folder)
    except CaptionFileError as err:
        raise DatasetError(str(err)) from err
    for written, reason in index.problems:
        collector.skip(written, reason)
    sources, seen = [], {}
    audio_files = find_audio(folder)
    split_layout = has_split_layout(p.relative_to(folder).as_posix() for p in audio_files)
    for path in audio_files:
        relative = path.relative_to(folder).as_posix()
        caption = index.by_path.get(relative)
        if caption is None or not caption.text:
            try:
                beside = sidecar_caption(path)
            except ValueError as err:
                collector.skip(relative, str(err))
                continue
            if beside is not None:  # a metadata entry without text keeps its fields, the caption comes from beside
                caption = Caption(beside.text, {**beside.fields, **(caption.fields if caption else {})}, beside.source)
        if caption is None or not caption.text:
            if not options.text:
                collector.skip(
                    relative,
                    "no caption: add it to metadata.json, or a .txt beside the file, or give a default with TEXT='...'",
                )
                continue
            caption = Caption(options.text, caption.fields if caption else {}, "TEXT")
        sha1 = file_sha1(path)
        if sha1 in seen:
            collector.skip(relative, f"duplicate of {seen[sha1]} (same content)")
            continue
        seen[sha1] = relative
        split = layout_split(relative) if split_layout else None
        sources.append(Source(relative, path, sha1, split or "", caption))
    if not sources:
        raise DatasetError(no_usable_file(folder, audio_files, collector.skipped))
    assign_splits([s for s in sources if not s.split], options)
    return sources, len(audio_files)


def no_usable_file(folder: Path, audio_files: tp.List[Path], skipped: tp.List[dict]) -> str:
    """Why a folder gave nothing to train on, and what to do."""
    if not audio_files:
        return (
            f"DATA={folder}: no audio file found (looked for {', '.join(sorted(AUDIO_EXTENSIONS))}, in every "
            "sub-folder, hidden ones left out)."
        )
    uncaptioned = [s for s in skipped if s["reason"].startswith("no caption")]
    if len(uncaptioned) == len(audio_files):
        return (
            f"DATA={folder}: none of its {len(audio_files)} audio files has a caption. Give each one in "
            "metadata.json, metadata.jsonl or metadata.csv, or as a .txt or .json beside the audio, or one "
            "caption for every file with TEXT='hip hop 808 beat'."
        )
    reasons = collections.Counter(s["reason"].split(":")[0] for s in skipped)
    return (
        f"DATA={folder}: none of its {len(audio_files)} audio files can be used ("
        + ", ".join(f"{count}: {reason}" for reason, count in reasons.most_common(4))
        + ")."
    )


def assign_splits(sources: tp.List[Source], options: ManifestOptions) -> None:
    """Exactly round(valid x files) source files go to valid, chosen by a seeded hash of their path: the same
    folder and seed always give the same split, and all segments of a file stay on its side."""
    ranked = sorted(sources, key=lambda s: hash_fraction(options.seed, s.relative))
    valid_count = min(len(ranked) - 1, max(1, round(options.valid * len(ranked)))) if len(ranked) > 1 else 0
    for rank, source in enumerate(ranked):
        source.split = "valid" if rank < valid_count else "train"


def balance_splits(sources: tp.List[Source], options: ManifestOptions) -> tp.Optional[str]:
    """A split left empty by chance (tiny datasets) gets the one source closest to the boundary."""
    for empty, other in (("valid", "train"), ("train", "valid")):
        if not any(s.split == empty for s in sources):
            candidates = [s for s in sources if s.split == other]
            if len(candidates) < 2:
                raise DatasetError(
                    f"only {len(sources)} usable file(s): a dataset needs at least 2 (one to "
                    "train on, one to validate on)."
                )
            chosen = min(candidates, key=lambda s: hash_fraction(options.seed, s.relative))
            chosen.split = empty
            return f"every {empty} file was skipped; moved {chosen.relative} there"
    return None
