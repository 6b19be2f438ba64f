"""make train MODEL=<folder> NAME=<dataset> [T5=<folder>] [PRESET=finetune/musicgen_small] [ARGS='k=v ...']
[PRIOR=1] [PRIOR_PROMPTS=<file>] [GENERAL=<dataset>]"""

import argparse
from pathlib import Path

from musicgen_finetune import cli, launch
from musicgen_finetune.config import overrides_from_args


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, help="local MusicGen folder (musicgen-small snapshot layout)")
    parser.add_argument("--name", required=True, help="dataset written by `make manifests NAME=...`")
    parser.add_argument("--t5", default=None, help="local T5 folder (default: <model>/t5, then the HF cache)")
    parser.add_argument("--preset", default=launch.DEFAULT_PRESET, help="solver preset under config/solver/")
    parser.add_argument("--args", default="", help="extra Hydra overrides, as one string")
    parser.add_argument(
        "--gpus",
        default="1",
        help="training processes: a number (dora run -d --ddp_workers N; on "
        "the CPU with gloo when there is no GPU), or all (every visible GPU)",
    )
    parser.add_argument("--xp-file", default=None, help="write the experiment folder's path to this file")
    parser.add_argument(
        "--fresh", action="store_true", help="start the experiment again instead of resuming it (dora run --clear)"
    )
    parser.add_argument("--prior", action="store_true", help="prior preservation on (prior.enabled=true)")
    parser.add_argument("--prior-prompts", default=None, help="file of general prompts for the prior set, one a line")
    parser.add_argument("--general", default=None, help="a dataset to replay into training at replay.share")
    opts = parser.parse_args(argv)
    extra = [
        *launch.preservation_overrides(opts.prior, opts.prior_prompts, opts.general),
        *overrides_from_args(opts.args),
    ]
    folder = launch.run(opts.model, opts.name, opts.t5, opts.preset, extra, opts.gpus, opts.fresh)
    if opts.xp_file:
        Path(opts.xp_file).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.xp_file).write_text(f"{folder}\n")


if __name__ == "__main__":
    cli.main(main)
