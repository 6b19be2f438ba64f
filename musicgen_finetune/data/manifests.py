"""From a folder of captioned audio to an AudioCraft dataset (`make manifests`).

    manifests/<name>/{train,valid}/data.jsonl   AudioCraft manifests (one AudioMeta per line, absolute paths, the
                                                true duration and sample rate of each written file)
    manifests/<name>/audio/<source>-<hash>/     converted segments (wav) and their MusicInfo sidecars (.json, every
                                                field present); source.json caches the conversion for re-runs
    manifests/<name>/dset.yaml                  what `make train NAME=<name>` passes to dora (paths, segment plan)
    manifests/<name>/report.json                files found, used, skipped with reasons, splits, distributions

The user's files are only read. The whole folder is replaced only once the new one is complete.
"""

import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import typing as tp
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm import tqdm

from ..errors import UserError
from ..files import replaced_when_complete
from ..paths import manifests_root
from . import audio as aa
from . import augment
from .audio import AUDIO_EXTENSIONS, TARGET_LUFS, segment_bounds
from .captions import Caption, CaptionFileError, read_metadata_files, sidecar_caption, with_tempo_and_key

# MusicDataset (data/music_dataset.py ~105) raises KeyError for a sidecar missing any of these.
MUSIC_INFO_FIELDS = ("title", "artist", "key", "bpm", "genre", "moods", "description", "name", "instrument")
SPLITS = ("train", "valid")
LAYOUT_FOLDERS = {"train": "train", "valid": "valid", "validation": "valid", "val": "valid"}
CONVERSION_VERSION = 2  # bump when the conversion changes, so cached audio is rebuilt (2: tempo and key with
# their confidence in source.json, issue 13)
DURATION_BINS = (0, 5, 10, 20, 30, 60, 120, float("inf"))


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


# -- one source file, in a worker process ---------------------------------------------------------------------


def process_source(
    path: str, sha1: str, target: str, previous: str, options: dict, variants: tp.Sequence[dict] = ()
) -> dict:
    """Convert one file into segments under `target`, plus its augmented variants (reusing `previous` if it holds
    the same conversion). Returns the cache record, or {"error": reason}."""
    target_dir, previous_dir = Path(target), Path(previous)
    conversion = {**ManifestOptions(**options).conversion(), "variants": [v["name"] for v in variants]}
    record_path = previous_dir / "source.json"
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        files = [previous_dir / s["file"] for s in record["segments"] + record.get("variant_segments", [])]
        if record.get("sha1") == sha1 and record.get("conversion") == conversion and all(f.is_file() for f in files):
            target_dir.mkdir(parents=True, exist_ok=True)
            for file in files + [record_path]:
                try:
                    os.link(file, target_dir / file.name)
                except OSError:  # a filesystem without hard links
                    shutil.copy2(file, target_dir / file.name)
            return {**record, "reused": True}
    try:
        audio, rate = aa.decode(Path(path))
        aa.check(audio, rate, options["min_seconds"])
        source_seconds = audio.shape[-1] / rate
        # the tempo from the file as given: a 16 kHz model's conversion would cut the hi-hats that mark the beats
        # between the snares (measured: 3 of 60 synth808 beats then unread); the key needs no highs
        tempo = aa.measure_tempo(audio, rate)
        audio = aa.convert(audio, rate, options["sample_rate"], options["channels"])
        audio = aa.normalize_loudness(audio, options["sample_rate"], options["loudness"])
        key = aa.measure_key(audio, options["sample_rate"])
    except aa.BadAudio as err:
        return {"error": str(err)}
    except Exception as err:  # noqa: BLE001 - one file's failure is reported, it does not end the run
        return {"error": f"could not be processed ({type(err).__name__}: {err})"}
    target_dir.mkdir(parents=True, exist_ok=True)
    segments = write_segments(audio, target_dir, "seg", options)
    variant_segments = []
    for variant in variants:
        rendered = augment.render(audio, options["sample_rate"], augment.Variant(variant["kind"], variant["amount"]))
        for segment in write_segments(rendered, target_dir, variant["name"], options):
            variant_segments.append({**segment, "variant": variant})
    record = {
        "sha1": sha1,
        "conversion": conversion,
        "source_seconds": round(source_seconds, 3),
        "tempo": dataclasses.asdict(tempo),
        "key": dataclasses.asdict(key),
        "segments": segments,
        "variant_segments": variant_segments,
    }
    (target_dir / "source.json").write_text(json.dumps(record, indent=2) + "\n")
    return {**record, "reused": False}


def write_segments(audio: np.ndarray, folder: Path, prefix: str, options: dict) -> tp.List[dict]:
    """Cut `audio` into training segments, written as 16-bit wavs `<prefix>_000.wav`, ..."""
    rate = options["sample_rate"]
    segments = []
    for index, (start, end) in enumerate(
        segment_bounds(audio.shape[-1], rate, options["segment"], options["min_segment_ratio"])
    ):
        name = f"{prefix}_{index:03d}.wav"
        sf.write(folder / name, audio[:, start:end].T, rate, subtype="PCM_16")
        segments.append({"file": name, "start": round(start / rate, 3), "seconds": (end - start) / rate})
    return segments


def run_workers(
    sources: tp.List[Source], staging: Path, previous: Path, options: ManifestOptions, progress: bool
) -> tp.List[dict]:
    settings = dataclasses.asdict(options)
    variants = [v.to_dict() for v in augment.parse(options.augment)]
    workers = max(1, min(options.workers or os.cpu_count() or 1, len(sources)))
    jobs = [
        (
            str(s.path),
            s.sha1,
            str(staging / "audio" / s.folder_name),
            str(previous / "audio" / s.folder_name),
            settings,
            variants if s.split == "train" else [],
        )
        for s in sources
    ]
    bar = tqdm(total=len(jobs), desc="converting", unit="file", disable=not progress)
    results: tp.List[tp.Optional[dict]] = [None] * len(jobs)
    if workers == 1:
        for i, job in enumerate(jobs):
            results[i] = process_source(*job)
            bar.update()
    else:
        with concurrent.futures.ProcessPoolExecutor(workers) as pool:
            futures = {pool.submit(process_source, *job): i for i, job in enumerate(jobs)}
            for future in concurrent.futures.as_completed(futures):
                results[futures[future]] = future.result()
                bar.update()
    bar.close()
    return tp.cast(tp.List[dict], results)


# -- the dataset ------------------------------------------------------------------------------------------------


def check_options(options: "ManifestOptions", augmenting: bool) -> None:
    """Every setting a user gives (as the Makefile variable that sets it), before anything is read or written."""
    problems = []
    if not (
        isinstance(options.segment, (int, float))
        and math.isfinite(options.segment)
        and options.segment >= options.min_seconds
    ):
        problems.append(
            f"SEGMENT={options.segment}: must be a number of seconds >= {options.min_seconds:g} (30 for "
            "musicgen-small; longer tracks are cut into pieces of this length)"
        )
    if not (isinstance(options.valid, (int, float)) and 0 <= options.valid < 1):
        problems.append(
            f"VALID={options.valid}: must be a fraction in [0, 1), the share of files held out for "
            "validation (0.2: one in five)"
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


def measurements(record: dict, options: ManifestOptions) -> dict:
    """The measured bpm and key to write (None where not confident) and their confidences, from the cache record:
    TEMPO_RANGE is applied here, so that changing it does not convert the audio again."""
    bpm, bpm_confidence = aa.resolve_tempo(aa.TempoEstimate(**record["tempo"]), tempo_range_bounds(options.tempo_range))
    key = aa.KeyEstimate(**record["key"])
    return {
        "bpm": bpm,
        "bpm_confidence": round(bpm_confidence, 3),
        "key": key.trusted,
        "key_confidence": round(key.confidence, 3),
    }


def music_info(source: Source, record: dict, segment: dict, index: int, options: ManifestOptions) -> dict:
    """The complete MusicInfo sidecar of one segment (empty fields are null, never missing).

    bpm and key: the user's, as given; else the measured ones only when confident, as MusicDataset may merge these
    fields into the text the model is conditioned on (merge_text_p). `<field>_confidence`: of the measurement,
    0..1, written from 0.5; null where the user gave the value.
    """
    info: tp.Dict[str, tp.Any] = {field: None for field in MUSIC_INFO_FIELDS}
    info.update(source.caption.fields)
    measured, measurement = [], measurements(record, options)
    for field in ("bpm", "key"):
        given = info[field] not in (None, "")
        if not given and measurement[field] is not None:
            info[field], measured = measurement[field], measured + [field]
        info[f"{field}_confidence"] = None if given else measurement[f"{field}_confidence"]
    if isinstance(info["moods"], str):
        info["moods"] = [m.strip() for m in info["moods"].split(",") if m.strip()]
    info["moods"] = info["moods"] or []
    text = source.caption.text or ""
    info["description"] = with_tempo_and_key(text, info["bpm"], info["key"]) if options.describe else text
    info["name"] = info.get("name") or Path(source.relative).stem
    info.update(
        {
            "measured": measured,
            "caption_source": source.caption.source,
            "source_file": source.relative,
            "segment": index,
            "start": segment["start"],
        }
    )
    return info


def segment_plan(durations: tp.List[float], segment: float) -> dict:
    """How training should treat segments shorter than the training length, and why.

    Segments are cut already, so training reads each from its start (dataset.min_segment_ratio=1: upstream's
    0.8 would seek up to 20% into a full segment and pad the rest with zeros), and whatever padding remains is
    always masked from the loss (tokens.padding_with_special_token), never learned as silence.
    """
    short = [d for d in durations if d < segment - 1e-3]
    if not short:
        return {
            "segment_duration": segment,
            "padding_with_special_token": True,
            "why": f"every segment is a full {segment:g} s: nothing is padded",
        }
    # the longest length that at most 10% of the segments are shorter than, to 0.1 s
    fitting = float(np.floor(sorted(durations)[int(len(durations) * 0.1)] * 10) / 10)
    if len(short) > len(durations) / 2 and fitting >= 1.0:
        padded = sum(d < fitting - 1e-3 for d in durations)
        return {
            "segment_duration": fitting,
            "padding_with_special_token": padded > 0,
            "why": f"{len(short)} of {len(durations)} segments are shorter than {segment:g} s: training on "
            f"{fitting:g} s segments (at most 10% are shorter) instead of padding most of them"
            + (f"; the {padded} shorter ones are padded, masked from the loss" if padded else ""),
        }
    return {
        "segment_duration": segment,
        "padding_with_special_token": True,
        "why": f"{len(short)} of {len(durations)} segments are shorter than {segment:g} s: their padding is "
        "masked from the loss (tokens.padding_with_special_token), so the model does not learn silence",
    }


def histogram(values: tp.Iterable[float], bins: tp.Sequence[float], unit: str) -> tp.Dict[str, int]:
    counts: tp.Dict[str, int] = {}
    for low, high in zip(bins[:-1], bins[1:], strict=True):
        label = f"{low:g}+ {unit}" if high == float("inf") else f"{low:g}-{high:g} {unit}"
        counts[label] = sum(low <= v < high for v in values)
    return {k: v for k, v in counts.items() if v}


def dset_yaml(out: Path, options: ManifestOptions, plan: dict) -> str:
    return "\n".join(
        [
            "# @package __global__",
            f"# Written by `make manifests` for this dataset; `make train NAME={out.name}` passes it to dora.",
            "datasource:",
            f"  max_sample_rate: {options.sample_rate}",
            f"  max_channels: {options.channels}",
            *[
                f"  {split}: {out / source}"
                for split, source in (
                    ("train", "train"),
                    ("valid", "valid"),
                    ("evaluate", "valid"),
                    ("generate", "valid"),
                )
            ],
            "dataset:",
            f"  segment_duration: {plan['segment_duration']:g}",
            "  min_segment_ratio: 1.0   # segments are pre-cut: read each from its start, never padded at the end",
            "tokens:",
            f"  padding_with_special_token: {'true' if plan['padding_with_special_token'] else 'false'}",
            "",
        ]
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


def build_manifests(
    data_dir: tp.Union[str, Path],
    name: str,
    options: tp.Optional[ManifestOptions] = None,
    out_root: tp.Optional[Path] = None,
    progress: bool = False,
) -> Path:
    options = options or ManifestOptions()
    folder = Path(data_dir).expanduser().resolve()
    if not folder.is_dir():
        raise DatasetError(f"DATA={data_dir}: {folder} is not a folder.")
    if not re.fullmatch(r"[\w.-]+", name):
        raise DatasetError(f"NAME={name!r}: use letters, digits, '.', '_' and '-' only.")
    out = (out_root or manifests_root()).resolve() / name
    try:
        variants = augment.parse(options.augment)
    except augment.AugmentSpecError as err:
        raise DatasetError(str(err)) from err
    options.check(bool(variants))
    collector = Collector(options.strict)
    sources, found = collect_sources(folder, options, collector)
    with replaced_when_complete(out) as staging:
        records = run_workers(sources, staging, out, options, progress)
        used = []
        for source, record in zip(sources, records, strict=True):
            if "error" in record:
                collector.skip(source.relative, record["error"])
            else:
                used.append((source, record))
        used_sources = [s for s, _ in used]
        if not used_sources:
            raise DatasetError(
                f"{folder}: none of the {len(sources)} audio files could be used; see the reasons: "
                + "; ".join(f"{s['file']}: {s['reason']}" for s in collector.skipped[:5])
            )
        moved = balance_splits(used_sources, options)
        manifests: tp.Dict[str, tp.List[str]] = {split: [] for split in SPLITS}
        variant_counts: tp.Dict[str, int] = {split: 0 for split in SPLITS}
        durations, tempos, keys, examples = [], [], collections.Counter(), []
        left_out: tp.Dict[str, int] = {"bpm": 0, "key": 0}  # measured, not confident enough to write
        for source, record in used:
            segments = [(segment, None) for segment in record["segments"]]
            if source.split == "train":  # validation is never augmented
                segments += [(segment, segment["variant"]) for segment in record.get("variant_segments", [])]
            for index, (segment, variant) in enumerate(segments):
                wav = staging / "audio" / source.folder_name / segment["file"]
                info = music_info(source, record, segment, index, options)
                weight = None
                if variant is not None:
                    info = augment.transformed_info(info, augment.Variant(variant["kind"], variant["amount"]))
                    weight, variant_counts[source.split] = options.augment_weight, variant_counts[source.split] + 1
                    if variant["name"] not in {e["variant"] for e in examples}:
                        examples.append(
                            {
                                "source": source.relative,
                                "variant": variant["name"],
                                "key": info["key"],
                                "bpm": info["bpm"],
                                "description": info["description"],
                            }
                        )
                elif variants:
                    weight = 1.0
                wav.with_suffix(".json").write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n")
                final = out / wav.relative_to(staging)
                manifests[source.split].append(
                    json.dumps(
                        {
                            "path": str(final),
                            "duration": segment["seconds"],
                            "sample_rate": options.sample_rate,
                            "amplitude": None,
                            "weight": weight,
                            "info_path": None,
                        },
                        ensure_ascii=False,
                    )
                )
                durations.append(segment["seconds"])
            info0 = music_info(source, record, record["segments"][0], 0, options)
            if info0["bpm"]:
                tempos.append(float(info0["bpm"]))
            if info0["key"]:
                keys[str(info0["key"])] += 1
            for field in left_out:
                if info0[field] is None and info0[f"{field}_confidence"] is not None:
                    left_out[field] += 1
        for split in SPLITS:
            (staging / split).mkdir()
            (staging / split / "data.jsonl").write_text("\n".join(manifests[split]) + "\n")
        plan = segment_plan(durations, options.segment)
        (staging / "dset.yaml").write_text(dset_yaml(out, options, plan))
        report = {
            "name": name,
            "source": str(folder),
            "options": dataclasses.asdict(options),
            "files_found": found,
            "files_used": len(used),
            "files_reused": sum(bool(r.get("reused")) for _, r in used),
            "skipped": collector.skipped,
            "split_note": moved,
            "splits": {
                split: {
                    "files": sum(s.split == split for s in used_sources),
                    "segments": len(manifests[split]),
                    "original_segments": len(manifests[split]) - variant_counts[split],
                    "variant_segments": variant_counts[split],
                    "hours": round(sum(json.loads(m)["duration"] for m in manifests[split]) / 3600, 4),
                }
                for split in SPLITS
            },
            "segment_plan": plan,
            "source_durations": histogram([r["source_seconds"] for _, r in used], DURATION_BINS, "s"),
            "tempo": histogram(tempos, list(range(0, 301, 10)) + [float("inf")], "bpm"),
            "keys": dict(keys.most_common()),
            "uncertain": left_out,
            "augmentation": {
                "spec": options.augment,
                "variants": [v.name for v in variants],
                "weight": options.augment_weight,
                "examples": examples,
            }
            if variants
            else None,
        }
        (staging / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return out


def summary(report: dict) -> str:
    """The printed summary of a report.json."""
    lines = [
        f"Dataset {report['name']}: {report['files_found']} audio files found, {report['files_used']} used "
        f"({report['files_reused']} reused from the last run), {len(report['skipped'])} skipped"
    ]
    lines += [f"  skipped   {s['file']}: {s['reason']}" for s in report["skipped"]]
    for split, numbers in report["splits"].items():
        variants = f" ({numbers['variant_segments']} augmented)" if numbers.get("variant_segments") else ""
        lines.append(
            f"  {split:<9} {numbers['files']} files -> {numbers['segments']} segments{variants}, "
            f"{numbers['hours']:.3f} h"
        )
    if report.get("split_note"):
        lines.append(f"  note      {report['split_note']}")
    plan = report["segment_plan"]
    lines.append(f"  segments  {plan['segment_duration']:g} s: {plan['why']}")
    for label, key in (("durations", "source_durations"), ("tempo", "tempo"), ("keys", "keys")):
        if report[key]:
            lines.append(f"  {label:<9} " + ", ".join(f"{k}: {v}" for k, v in report[key].items()))
    uncertain = report.get("uncertain") or {}
    if any(uncertain.values()):
        lines.append(
            f"  uncertain tempo of {uncertain.get('bpm', 0)} files and key of {uncertain.get('key', 0)} files "
            f"left out of their captions: measured with a confidence under {aa.CONFIDENT:g} "
            "(bpm_confidence, key_confidence in the sidecars; TEMPO_RANGE=lo-hi settles tempo octaves)"
        )
    augmentation = report.get("augmentation")
    if augmentation:
        lines.append(
            f"  augment   {', '.join(augmentation['variants'])} of each training file, sampling weight "
            f"{augmentation['weight']:g} each (originals 1); for example:"
        )
        lines += [
            f'            {e["variant"]}: {e["key"]}, {e["bpm"]} bpm: "{e["description"]}"'
            for e in augmentation["examples"]
        ]
    return "\n".join(lines)
