"""From a folder of captioned audio to AudioCraft manifests (`make manifests`).

Reads our first users' layout, `<data>/metadata.json` = [{"audio": "train/a.wav", "text": "...", ...}], converts
each file to the model's sample rate and channels, and writes

    manifests/<name>/{train,valid}/data.jsonl     AudioCraft's manifest (AudioMeta per line), absolute paths
    manifests/<name>/{train,valid}/audio/*.wav    the converted audio; the user's files are never touched
    manifests/<name>/{train,valid}/audio/*.json   a MusicInfo sidecar per file, every field present
    manifests/<name>/report.json                  what was written

The split is by file name hash, so adding files never moves an existing file to the other side.
"""
import hashlib
import json
import os
import typing as tp
from pathlib import Path

from . import REPO_ROOT
from .files import replaced_when_complete

METADATA_FILE = "metadata.json"
# MusicDataset (data/music_dataset.py ~105) raises KeyError for a sidecar missing any of these.
MUSIC_INFO_FIELDS = ("title", "artist", "key", "bpm", "genre", "moods", "description", "name", "instrument")


class DatasetError(ValueError):
    """The user's folder cannot become a dataset; the message names the file and the fix."""


def manifests_root() -> Path:
    """`$MUSICGEN_FT_MANIFESTS` or `<repo>/manifests`."""
    return Path(os.environ.get("MUSICGEN_FT_MANIFESTS") or REPO_ROOT / "manifests").resolve()


def read_metadata(data_dir: Path) -> tp.List[dict]:
    path = data_dir / METADATA_FILE
    if not path.is_file():
        raise DatasetError(f"{path} not found: the folder needs a metadata.json listing "
                           '[{"audio": "train/a.wav", "text": "caption"}, ...].')
    try:
        entries = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path} is not valid JSON ({err}).") from err
    if not isinstance(entries, list) or not entries:
        raise DatasetError(f"{path} must be a non-empty JSON list of {{\"audio\": ..., \"text\": ...}} objects.")
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not entry.get("audio"):
            raise DatasetError(f"{path}, entry {i}: needs an \"audio\" path relative to {data_dir}.")
        if not (data_dir / entry["audio"]).is_file():
            raise DatasetError(f"{path}, entry {i}: audio file {data_dir / entry['audio']} does not exist.")
    return entries


def music_info(entry: dict, default_text: tp.Optional[str]) -> dict:
    """A complete MusicInfo sidecar: the entry's known fields, the rest empty (never a KeyError in training)."""
    info = {field: None for field in MUSIC_INFO_FIELDS}
    info.update({k: v for k, v in entry.items() if k in MUSIC_INFO_FIELDS})
    info["description"] = entry.get("text") or entry.get("description") or default_text
    info["name"] = info["name"] or Path(entry["audio"]).stem
    if isinstance(info["moods"], str):
        info["moods"] = [info["moods"]]
    info["moods"] = info["moods"] or []
    return info


def is_valid_split(relative_path: str, valid_fraction: float) -> bool:
    digest = hashlib.sha1(relative_path.encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2 ** 32 < valid_fraction


def convert(source: Path, target: Path, sample_rate: int, channels: int) -> tp.Tuple[float, int]:
    """Decode anything AudioCraft reads, resample (julius, band-limited) and mix to the model's format."""
    import soundfile as sf
    from audiocraft.data.audio import audio_read
    from audiocraft.data.audio_utils import convert_audio
    try:
        wav, source_rate = audio_read(source)
    except Exception as err:  # noqa: BLE001 - any decoder failure means the same thing to the user
        raise DatasetError(f"{source} could not be decoded ({err}); re-encode it as wav or flac.") from err
    if wav.numel() == 0:
        raise DatasetError(f"{source} holds no audio samples; remove it from {METADATA_FILE}.")
    wav = convert_audio(wav, source_rate, sample_rate, channels).clamp(-1, 1)
    sf.write(target, wav.t().numpy(), sample_rate, subtype="PCM_16")
    return wav.shape[-1] / sample_rate, sample_rate


def build_manifests(data_dir: tp.Union[str, Path], name: str, sample_rate: int = 32000, channels: int = 1,
                    valid_fraction: float = 0.25, default_text: tp.Optional[str] = None,
                    out_root: tp.Optional[Path] = None) -> Path:
    """Write manifests/<name>/ from `data_dir`; the previous version is replaced only when the new one is whole."""
    from audiocraft.data.audio_dataset import AudioMeta, save_audio_meta
    data_dir = Path(data_dir).resolve()
    out = (out_root or manifests_root()).resolve() / name
    entries = read_metadata(data_dir)
    metas: tp.Dict[str, list] = {"train": [], "valid": []}
    with replaced_when_complete(out) as staging:
        for entry in entries:
            split = "valid" if is_valid_split(entry["audio"], valid_fraction) else "train"
            flat_name = Path(entry["audio"]).with_suffix("").as_posix().replace("/", "__") + ".wav"
            target = staging / split / "audio" / flat_name
            target.parent.mkdir(parents=True, exist_ok=True)
            duration, rate = convert(data_dir / entry["audio"], target, sample_rate, channels)
            target.with_suffix(".json").write_text(json.dumps(music_info(entry, default_text), indent=2) + "\n")
            final_path = out / target.relative_to(staging)
            metas[split].append(AudioMeta(path=str(final_path), duration=duration, sample_rate=rate))
        for split, split_metas in metas.items():
            if not split_metas:
                raise DatasetError(f"{data_dir}: no file fell in the {split} split ({len(entries)} files, "
                                   f"valid fraction {valid_fraction}); add files or change VALID.")
            save_audio_meta(staging / split / "data.jsonl", split_metas)
        report = {"source": str(data_dir), "sample_rate": sample_rate, "channels": channels,
                  "valid_fraction": valid_fraction,
                  "splits": {s: {"files": len(m), "seconds": round(sum(x.duration for x in m), 2)}
                             for s, m in metas.items()}}
        (staging / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return out
