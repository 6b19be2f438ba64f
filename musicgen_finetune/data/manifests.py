"""From a folder of captioned audio to an AudioCraft dataset (`make manifests`).

    manifests/<name>                            a link to the dataset's current version (data/versions.py): a
                                                run reads the version it started on to its end
    manifests/<name>/{train,valid}/data.jsonl   AudioCraft manifests (one AudioMeta per line, absolute paths into
                                                the version's folder, the true duration and sample rate of each
                                                written file)
    manifests/<name>/audio/<source>-<hash>/     converted segments (wav) and their MusicInfo sidecars (.json, every
                                                field present); source.json caches the conversion for re-runs
    manifests/<name>/dset.yaml                  what `make train NAME=<name>` passes to dora (paths, segment plan)
    manifests/<name>/report.json                files found, used, skipped with reasons, splits, distributions

The user's files are only read. A new version is built beside the current one and replaces it once complete;
building refuses while a run trains on the current version, unless FORCE=1.
"""

import collections
import dataclasses
import json
import re
import typing as tp
from pathlib import Path

import numpy as np

from ..paths import manifests_root
from . import audio as aa
from . import augment
from .audio import segment_bounds
from .captions import with_tempo_and_key
from .conversion import run_workers
from .options import DatasetError, ManifestOptions, tempo_range_bounds
from .sources import SPLITS, Collector, Source, balance_splits, collect_sources
from .versions import new_version

# MusicDataset (data/music_dataset.py ~105) raises KeyError for a sidecar missing any of these.
MUSIC_INFO_FIELDS = ("title", "artist", "key", "bpm", "genre", "moods", "description", "name", "instrument")
DURATION_BINS = (0, 5, 10, 20, 30, 60, 120, float("inf"))


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


def cut_length(source_seconds: tp.Sequence[float], options: ManifestOptions) -> float:
    """The length long tracks are cut at: SEGMENT, or the shorter training length `segment_plan` picks when most
    clips are shorter than SEGMENT. Cutting long tracks at the training length too makes every segment one that
    training reads whole from its start (one token-cache entry each), never one it seeks into at random."""
    rate = options.sample_rate
    pieces = [
        (end - start) / rate
        for seconds in source_seconds
        if seconds > 0
        for start, end in segment_bounds(round(seconds * rate), rate, options.segment, options.min_segment_ratio)
    ]
    return segment_plan(pieces, options.segment)["segment_duration"] if pieces else options.segment


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


def build_manifests(
    data_dir: tp.Union[str, Path],
    name: str,
    options: tp.Optional[ManifestOptions] = None,
    out_root: tp.Optional[Path] = None,
    progress: bool = False,
    force: bool = False,
) -> Path:
    """`make manifests`: the folder `data_dir` of captioned audio as the dataset `manifests/<name>` (see the module's
    docstring), a new version published only once complete; returns the dataset's link. `out_root` moves it
    (tests), `progress` shows a bar, `force` builds even while a run reads the current version. Raises DatasetError
    naming the file or setting and the fix."""
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
    cut = cut_length([aa.duration_seconds(s.path) for s in sources], options)
    with new_version(out, force) as (staging, version):
        records = run_workers(sources, staging, out, dataclasses.replace(options, segment=cut), progress)
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
                final = version / wav.relative_to(staging)
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
        plan = segment_plan(durations, cut)
        if cut < options.segment:
            plan["why"] = (
                f"most clips are shorter than {options.segment:g} s: training on {cut:g} s segments, long "
                f"tracks cut at that length too; {plan['why']}"
            )
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
