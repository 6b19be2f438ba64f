"""make generate MODEL=<folder> PROMPTS=<file or "several words"> | TEXT=<prompt> [ADAPTER=] [DURATION=] [SEED=0]
[OUT=] [TOP_K TOP_P TEMPERATURE CFG BATCH]; unset values take the defaults of musicgen_finetune.generate.Sampling.
Each run writes a folder of its own, output/samples/<model>/<UTC time>/ (or OUT=), named on the last line."""

import argparse
import sys
from pathlib import Path

from musicgen_finetune import cli, output_dir
from musicgen_finetune.generate import GenerationError, Sampling, generate, new_samples_folder, slug


def seeds_of(text: str) -> list:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise GenerationError(f"SEED={text!r}: use integers, comma-separated (SEED=0,1,2).") from None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    prompts = parser.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompts", help="a text file, one prompt a line, or a prompt of several words")
    prompts.add_argument("--text", help="the prompt itself, whatever it looks like")
    parser.add_argument(
        "--adapter", default=None, help="LoRA adapters.safetensors, or a PEFT LoRA folder, to apply on the model"
    )
    parser.add_argument("--duration", type=float, default=Sampling.duration)
    parser.add_argument("--seeds", default="0", help="comma-separated seeds, one wav per prompt and seed")
    parser.add_argument("--out", default=None)
    parser.add_argument("--top-k", type=int, default=Sampling.top_k)
    parser.add_argument("--top-p", type=float, default=Sampling.top_p)
    parser.add_argument("--temperature", type=float, default=Sampling.temperature)
    parser.add_argument("--cfg", type=float, default=Sampling.cfg_coef, help="classifier-free guidance coefficient")
    parser.add_argument("--batch", type=int, default=Sampling.batch_size)
    parser.add_argument("--t5", default=None, help="local T5 folder (default: found like make train finds it)")
    opts = parser.parse_args(argv)
    seeds = seeds_of(opts.seeds)
    name = opts.model.rstrip("/").split("/")[-1]
    if opts.adapter:  # never overwrite the base model's samples with the adapted model's
        parts = opts.adapter.rstrip("/").split("/")  # <export>/adapters.safetensors, <export>/peft, <peft folder>
        name += "+" + (
            parts[-2]
            if parts[-1].endswith(".safetensors")
            else "-".join(parts[-2:] if parts[-1] == "peft" else parts[-1:])
        )
    out = opts.out or new_samples_folder(output_dir() / "samples" / slug(name))
    sampling = Sampling(opts.duration, opts.top_k, opts.top_p, opts.temperature, opts.cfg, opts.batch)
    try:
        folder = generate(
            opts.model,
            opts.text if opts.text is not None else opts.prompts,
            out,
            opts.adapter,
            sampling,
            seeds,
            progress=sys.stderr.isatty(),
            t5=opts.t5,
            text=opts.text is not None,
        )
    except BaseException:
        if not opts.out and not any(Path(out).iterdir()):
            Path(out).rmdir()  # the new folder, left empty by a refusal
        raise
    print(f"Generated into {folder} (generated.json lists prompts, seeds and settings)")


if __name__ == "__main__":
    cli.main(main)
