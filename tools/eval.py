"""make eval BASE=<model> NAME=<dataset> [TUNED=<model>] [ADAPTER=<adapters.safetensors or PEFT folder>]
[GENERAL=<dataset>] [PROMPTS=] [DURATION=] [SEED=] [CLAP=<folder>] [OUT=]: the comparison report,
output/reports/<NAME>/index.html."""

import argparse
import sys

from musicgen_finetune import cli
from musicgen_finetune.evaluation.evaluate import EvalOptions, evaluate
from musicgen_finetune.generate import Sampling


def main(argv=None) -> None:
    defaults = EvalOptions.sampling  # the dataclass field's default
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base", required=True, help="the model fine-tuning started from")
    parser.add_argument("--name", required=True, help="dataset (manifests/<name>): its valid split is the reference")
    parser.add_argument("--tuned", default=None, help="a fine-tuned model folder (make export)")
    parser.add_argument(
        "--adapter", default=None, help="LoRA adapters.safetensors or a PEFT LoRA folder, applied on --base"
    )
    parser.add_argument(
        "--general", default=None, help="a second dataset: cross-entropy on it shows what was forgotten"
    )
    parser.add_argument(
        "--prior", default=None, help="a model folder fine-tuned with prior preservation (column `prior`)"
    )
    parser.add_argument("--prompts", default=None, help="file or text; default: captions of the valid split")
    parser.add_argument("--duration", type=float, default=defaults.duration)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--top-k", type=int, default=defaults.top_k)
    parser.add_argument("--clap", default=None, help="local transformers CLAP model folder, for the CLAP score")
    parser.add_argument("--t5", default=None)
    parser.add_argument("--out", default=None, help="default: output/reports/<name>")
    opts = parser.parse_args(argv)
    sampling = Sampling(duration=opts.duration, top_k=opts.top_k, batch_size=defaults.batch_size)
    out = evaluate(
        EvalOptions(
            opts.base,
            opts.name,
            opts.tuned,
            opts.adapter,
            opts.general,
            opts.prompts,
            opts.seed,
            sampling,
            opts.clap,
            opts.t5,
            opts.out,
            progress=sys.stderr.isatty(),
            prior=opts.prior,
        )
    )
    print(
        f"Report: {out / 'index.html'} (numbers in {out / 'report.json'})\n"
        f"Blind A/B test with choices saved to {out / 'choices.json'}: make listen REPORT={out}"
    )


if __name__ == "__main__":
    cli.main(main)
