"""make runs [JSON=1]: every experiment in output/xps: signature, model, dataset, full or LoRA, epochs done of
planned, best epoch and its validation cross-entropy, state (running, completed, early_stop, paused, interrupted)."""

import argparse
import json

from musicgen_finetune import cli, runs


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", action="store_true", help="a JSON list instead of the table, for scripts")
    opts = parser.parse_args(argv)
    rows = runs.read_runs()
    print(json.dumps(rows, indent=2) if opts.json else runs.format_table(rows))


if __name__ == "__main__":
    cli.main(main)
