"""Converting one source file into training segments, in worker processes: decode, check, convert, normalise,
measure tempo and key, cut, render augmented variants; a re-run reuses the conversion of an unchanged file."""

import concurrent.futures
import dataclasses
import json
import os
import shutil
import typing as tp
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm import tqdm

from . import audio as aa
from . import augment
from .audio import segment_bounds
from .options import ManifestOptions
from .sources import Source


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
