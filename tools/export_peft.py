"""make export-peft ADAPTER=<adapters.safetensors> [OUT=<folder>] [BASE_HF=<transformers MusicGen folder>]"""

import argparse

from musicgen_finetune import cli
from musicgen_finetune.models.hf.peft_lora import export_peft


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--adapter", required=True, help="an adapters.safetensors (with its .json), as make export writes it"
    )
    parser.add_argument("--out", default=None, help="default: peft/ beside the adapter")
    parser.add_argument(
        "--base-hf",
        default=None,
        help="the transformers MusicGen of the adapters' base (default: found from export.json, or converted once)",
    )
    opts = parser.parse_args(argv)
    out = export_peft(opts.adapter, opts.out, base_hf=opts.base_hf)
    print(
        f"Exported to {out}\n  load it: PeftModel.from_pretrained(MusicgenForConditionalGeneration.from_pretrained("
        f"<its base_model_name_or_path>), '{out}'); {out}/README.md shows the lines"
    )


if __name__ == "__main__":
    cli.main(main)
