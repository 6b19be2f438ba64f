"""make plan MODEL=<folder|musicgen-small|musicgen-medium|musicgen-large> [NAME=] [LORA=1] [PRESET=] [ARGS='k=v ...']
[GPU_MEM=<GiB>] [BATCHES=1,2,4,8] [SEGMENT=<s>] [OUT=<file.json>]: predicted peak GPU memory, its parts, FLOPs and
times of one training update per micro-batch, traced on fake tensors (no GPU, no weights)."""

import argparse
from pathlib import Path

from musicgen_finetune import cli
from musicgen_finetune.config import overrides_from_args
from musicgen_finetune.launch import DEFAULT_PRESET
from musicgen_finetune.planning import command
from musicgen_finetune.planning.fit import ASSUMED_MFU
from musicgen_finetune.planning.trace import INPUTS


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, help=f"{', '.join(command.RELEASED)}, or a model folder")
    parser.add_argument("--name", default=None, help="a dataset of `make manifests`: its segments and epoch size")
    parser.add_argument("--preset", default=DEFAULT_PRESET, help="solver preset under config/solver/")
    parser.add_argument("--lora", action="store_true", help="the preset's _lora variant")
    parser.add_argument("--args", default="", help="Hydra overrides, as make train's ARGS")
    parser.add_argument(
        "--gpu-mem", type=float, default=None, help="the GPU's memory in GiB (default: visible, else 24)"
    )
    parser.add_argument("--gpu-name", default=None, help="the GPU whose peak FLOP/s the times use (e.g. 'A100')")
    parser.add_argument("--batches", default=None, help="micro-batch sizes, comma-separated (default 1,2,4,8)")
    parser.add_argument("--segment", type=float, default=None, help="segment seconds (default: NAME's or the preset's)")
    parser.add_argument("--inputs", choices=INPUTS, default="encoded", help="encoded: EnCodec and T5 run each step")
    parser.add_argument("--mfu", type=float, default=ASSUMED_MFU, help="model FLOP utilisation the times assume")
    parser.add_argument("--out", type=Path, default=None, help="write the plan as JSON here")
    opts = parser.parse_args(argv)
    request = command.Request(
        model=opts.model,
        name=opts.name,
        preset=opts.preset + ("_lora" if opts.lora and not opts.preset.endswith("_lora") else ""),
        extra=overrides_from_args(opts.args),
        segment_s=opts.segment,
    )
    result, text = command.plan(
        request, command.batches(opts.batches), opts.gpu_mem, opts.gpu_name, opts.inputs, opts.mfu
    )
    print(text)
    if opts.out:
        print(f"Written to {command.write(result, opts.out)}")


if __name__ == "__main__":
    cli.main(main)
