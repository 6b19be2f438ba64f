"""make manifests DATA=<folder> NAME=<dataset> [MODEL=] [SEGMENT=30] [VALID=0.2] [TEXT=] [STRICT=1] [AUGMENT=]
[FORCE=1]"""

import argparse
import json
import sys

from musicgen_finetune import cli
from musicgen_finetune.config import compose
from musicgen_finetune.data.manifests import ManifestOptions, build_manifests, summary
from musicgen_finetune.data.versions import HASH_LENGTH, read_version


def model_format(model):
    """(sample_rate, channels) of the model, or of the default training config."""
    if model:
        from musicgen_finetune.models.open import open_model  # torch and transformers: only when MODEL= is given

        cfg = open_model(model).xp_cfg
    else:
        cfg = compose([])
    return int(cfg.sample_rate), int(cfg.channels)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", required=True, help="folder of audio files and their captions")
    parser.add_argument("--name", required=True, help="dataset name: manifests/<name>/")
    parser.add_argument("--model", default=None, help="take sample rate and channels from this model's xp.cfg")
    parser.add_argument("--segment", default="30", help="training segment length in seconds")
    parser.add_argument("--valid", default="0.2", help="fraction of source files held out for validation")
    parser.add_argument("--seed", default="0", help="seed of the train/valid split")
    parser.add_argument("--text", default=None, help="caption for files that have none")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad file")
    parser.add_argument("--no-describe", action="store_true", help="do not add tempo and key to descriptions")
    parser.add_argument(
        "--tempo-range",
        default=None,
        help="lo-hi bpm, e.g. 70-140: measured tempos are halved or "
        "doubled into it (default: none; a tempo whose octave the audio cannot settle is left out)",
    )
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    parser.add_argument(
        "--augment",
        default=None,
        help="variants of training files, e.g. default or 'pitch=-2,-1,1,2;tempo=0.95,1.05;gain_db=-3,3'",
    )
    parser.add_argument("--augment-weight", default="0.5", help="sampling weight of each variant segment")
    parser.add_argument(
        "--force", action="store_true", help="build even while a run trains on the current version (it keeps it)"
    )
    opts = parser.parse_args(argv)
    numbers = {
        "segment": cli.number(opts.segment, "SEGMENT"),
        "valid": cli.number(opts.valid, "VALID"),
        "seed": cli.number(opts.seed, "SPLIT_SEED", int),
        "augment_weight": cli.number(opts.augment_weight, "AUGMENT_WEIGHT"),
    }
    sample_rate, channels = model_format(opts.model)
    options = ManifestOptions(
        sample_rate=sample_rate,
        channels=channels,
        text=opts.text,
        strict=opts.strict,
        describe=not opts.no_describe,
        tempo_range=opts.tempo_range,
        workers=opts.workers,
        augment=opts.augment,
        **numbers,
    )
    out = build_manifests(opts.data, opts.name, options, progress=sys.stderr.isatty(), force=opts.force)
    print(summary(json.loads((out / "report.json").read_text())))
    version = read_version(out.resolve()) or {}
    print(
        f"Written to {out} -> {out.resolve()} (content hash {version.get('hash', '?')[:HASH_LENGTH]}; report.json, "
        f"dset.yaml); train with: make train MODEL=<model> NAME={opts.name}"
    )


if __name__ == "__main__":
    cli.main(main)
