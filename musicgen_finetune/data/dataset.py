"""One reader of a `manifests/<name>/` folder (written by `make manifests`), for training and evaluation.

    manifests/<name>                            a link to the current version (data/versions.py), resolved once
    manifests/<name>/{train,valid}/data.jsonl   AudioCraft manifests
    manifests/<name>/dset.yaml                  the overrides `make train NAME=<name>` passes to dora
    manifests/<name>/audio/...                  segments and their MusicInfo sidecars

Segments are pre-cut, so validation reads each exactly once, from its start (`SegmentOnceMusicDataset`).
"""

import json
import typing as tp
from pathlib import Path

import torch
from audiocraft.data.audio_dataset import load_audio_meta
from audiocraft.data.music_dataset import MusicDataset
from omegaconf import OmegaConf

from ..config import hydra_value, leaves
from ..errors import UserError
from ..paths import manifests_root
from . import versions

SPLITS = ("train", "valid")
MANIFEST = "data.jsonl"
DSET_FILE = "dset.yaml"


class DatasetNotFoundError(UserError, FileNotFoundError):
    """NAME= names no dataset written by `make manifests`."""


class PreparedDataset:
    """`manifests/<name>/`, checked to hold what training and evaluation read, at its current version (the link
    resolved once: every read of this object is of one version). `variable` is how the user named it (NAME,
    GENERAL) in the messages."""

    def __init__(self, name: str, variable: str = "NAME"):
        self.name, self.root = name, (manifests_root() / name).resolve()
        for path in (self.manifest("train"), self.manifest("valid"), self.root / DSET_FILE):
            if not path.is_file():
                known = dataset_names()
                raise DatasetNotFoundError(
                    f"{variable}={name}: {path} does not exist. Run `make manifests DATA=<your folder> NAME={name}` "
                    "first" + (f"; the datasets there are: {', '.join(known)}." if known else ".")
                )
        self.dset = OmegaConf.to_container(OmegaConf.load(self.root / DSET_FILE), resolve=True)

    @property
    def version(self) -> tp.Optional[dict]:
        """Its version.json (name, content hash, created), None for a dataset written before versions."""
        return versions.read_version(self.root)

    def manifest(self, split: str) -> Path:
        return self.root / split / MANIFEST

    @property
    def sample_rate(self) -> int:
        return int(self.dset["datasource"]["max_sample_rate"])

    @property
    def channels(self) -> int:
        return int(self.dset["datasource"]["max_channels"])

    @property
    def segment_duration(self) -> float:
        return float(self.dset["dataset"]["segment_duration"])

    def overrides(self) -> tp.List[str]:
        """dset.yaml as `key=value` Hydra overrides (data paths, segment length, padding)."""
        return [f"{key}={hydra_value(value)}" for key, value in leaves(self.dset)]

    def rows(self, split: str) -> tp.List[dict]:
        """The manifest's lines of `split`."""
        text = self.manifest(split).read_text()
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def segments_once(self, split: str, sample_rate: int, channels: int) -> MusicDataset:
        """`split` as training reads it (AudioCraft's MusicDataset, the sidecars for the captions), each segment
        once, in order, as our solver's validation does."""
        meta = load_audio_meta(self.manifest(split))
        dataset = MusicDataset(
            meta,
            segment_duration=self.segment_duration,
            shuffle=False,
            return_info=True,
            sample_rate=sample_rate,
            channels=channels,
            min_segment_ratio=1.0,
            pad=True,
            num_samples=len(meta),
        )
        return read_each_segment_once(dataset)


def dataset_names() -> tp.List[str]:
    """The datasets `make manifests` wrote (manifests/<name> with a dset.yaml)."""
    root = manifests_root()
    return (
        sorted(p.name for p in root.glob(f"*/{DSET_FILE}") if not p.parent.name.startswith("."))
        if root.is_dir()
        else []
    )


def count_segments(split_path: tp.Union[str, Path]) -> int:
    """Number of audio files in a manifest folder (data.jsonl[.gz]) or file, as AudioCraft reads it."""
    path = Path(split_path)
    if path.is_dir():
        found = [c for c in (path / MANIFEST, path / (MANIFEST + ".gz")) if c.exists()]
        if not found:
            raise DatasetNotFoundError(f"no {MANIFEST} in {path}: run `make manifests` for this dataset first.")
        path = found[0]
    elif not path.exists():
        raise DatasetNotFoundError(f"manifest {path} does not exist: run `make manifests` for this dataset first.")
    return len(load_audio_meta(path))


class SegmentOnceMusicDataset(MusicDataset):
    """Reads segment `index` for index `index`: upstream's AudioDataset draws a random file for every index, even
    unshuffled (audio_dataset.py `sample_file`), so its validation covers some segments twice and others never."""

    def sample_file(self, index: int, rng: torch.Generator):
        return self.meta[index % len(self.meta)]


def read_each_segment_once(dataset: MusicDataset) -> MusicDataset:
    """Our segments are pre-cut: read each exactly once (a class, not a lambda: data-loader workers pickle it)."""
    dataset.__class__ = SegmentOnceMusicDataset
    return dataset
