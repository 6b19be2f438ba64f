"""`make bench` (tools/bench.py): every section in turn, results written as they come to output/bench/."""

import argparse
import dataclasses
import json
import tempfile
import time
import typing as tp
from pathlib import Path

from ..errors import UserError
from ..machine import describe as machine
from ..paths import output_dir
from . import full_size
from .flops import FLOPS_FORMULA, gpu_peak_tflops
from .isolation import ForkServer, describe_failure, measure_in_subprocess
from .matrix import ARCHITECTURES, MODES, TOKENS, StepConfig, matrix, memory_skip_reason
from .pipeline import bench_demo, bench_manifests
from .predicted import section as plan_section
from .results import cache_speedups, goals, lora_memory_ratios, make_row, markdown
from .step import step_measurement, write_text_encoder


def bench_training(configs: tp.List[StepConfig], isolation: str, on_row: tp.Callable[[dict], None]) -> dict:
    """Measure every configuration, each in a process of its own; a failure or a skip is that row's error."""
    m = machine()
    device_name = m["gpu"] if configs and configs[0].device == "cuda" else m["cpu"]
    peak = gpu_peak_tflops(m["gpu"])
    rows = []
    with tempfile.TemporaryDirectory(prefix="musicgen_ft_bench_") as tmp:
        text_encoders = {}
        server = ForkServer() if isolation == "fork" else None
        try:
            for config in configs:
                kind = ARCHITECTURES[config.arch].text_encoder
                if kind not in text_encoders:  # written once, read by every configuration of that size
                    text_encoders[kind] = str(write_text_encoder(kind, Path(tmp) / kind))
                config = dataclasses.replace(config, t5=text_encoders[kind])
                skip = memory_skip_reason(config)
                if skip:
                    measured = {"error": skip}
                elif server:
                    measured = server.measure(config)
                else:
                    measured = measure_in_subprocess(config)
                rows.append(make_row(config, measured, device_name, peak))
                on_row(rows[-1])
        finally:
            if server:
                server.close()
    return {
        "device": configs[0].device if configs else None,
        "isolation": isolation,
        "flops_formula": FLOPS_FORMULA,
        "rows": rows,
    }


# -- make bench --------------------------------------------------------------------------------------------------


def parse_options(argv: tp.Optional[tp.Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="make bench",
        description="Speed measurements to output/bench/ (bench.json, bench.md), each with the machine it ran on.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny model only, batch 1 and 2 x 1 s, 20 files for manifests, no demo (seconds)",
    )
    parser.add_argument("--out", type=Path, help="folder for bench.json and bench.md (default: <output>/bench)")
    parser.add_argument("--no-demo", action="store_true", help="do not time `make demo`")
    parser.add_argument(
        "--full-size-only",
        action="store_true",
        help="only musicgen-small's checkpoint (full and LoRA) and the projected 50-clip job (~13 GB of RAM)",
    )
    parser.add_argument("--no-full-size", action="store_true", help="skip the full-size checkpoint and projection")
    parser.add_argument("--no-manifests", action="store_true", help="skip the manifests section")
    parser.add_argument(
        "--no-plan", action="store_true", help="skip the plan's predictions against measurements (quick skips them)"
    )
    parser.add_argument(
        "--checkpointing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="add activation-checkpointing rows (musicgen-small, batch 4 x 30 s); default: on a GPU",
    )
    parser.add_argument("--arch", action="append", choices=list(ARCHITECTURES), help="only this model (repeatable)")
    parser.add_argument("--batches", help="comma-separated batch sizes (default 1,2,4; quick: 1,2)")
    parser.add_argument("--segments", help="comma-separated segment lengths in s (default 10,30; quick: 1)")
    parser.add_argument(
        "--timeout", type=float, help="seconds per configuration (default: GPU 600, CPU 1800, quick 120)"
    )
    parser.add_argument(
        "--isolation",
        choices=["fork", "process"],
        help="fork: children of one process that imported once (default on the CPU); process: a "
        "new interpreter per configuration (default on a GPU)",
    )
    return parser.parse_args(argv)


def numbers(text: tp.Optional[str], kind: type) -> tp.Tuple:
    try:
        return tuple(kind(x) for x in text.split(",")) if text else ()
    except ValueError:
        raise UserError(f"{text!r} is not a comma-separated list of numbers (e.g. 1,2,4).") from None


def write_results(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "bench.md").write_text(report(results) + "\n")


def report(results: dict) -> str:
    """The markdown report: results.markdown's sections, then the full-size one."""
    text = markdown(results)
    if results.get("full_size"):
        text += "\n" + "\n".join(full_size.markdown(results["full_size"]))
    return text


def progress(row: dict) -> None:
    config = f"{row['arch']} {row['mode']} {row['tokens']} batch {row['batch']} x {row['segment_s']:g} s" + (
        " checkpointing" if row["checkpointing"] else ""
    )
    result = row["error"] or f"{row['step_s']:.4g} s/step, {row['peak_gib']:.3g} GiB peak"
    print(f"  {config}: {result}", flush=True)


def run(options: argparse.Namespace) -> Path:
    """The sections `options` ask for, in turn, each result written as it comes (a bench stopped midway keeps its
    rows)."""
    import torch

    out = options.out or output_dir() / "bench"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results: tp.Dict[str, tp.Any] = {"machine": machine(), "time": time.time(), "quick": options.quick}
    if options.full_size_only:
        return run_full_size(results, out)
    if not options.no_manifests:
        print("make manifests ...", flush=True)
        results["manifests"] = bench_manifests(files=20 if options.quick else 1000)
    configs = matrix(
        device,
        options.quick,
        options.arch or (),
        numbers(options.batches, int),
        numbers(options.segments, float),
        options.checkpointing,
        options.timeout,
    )
    isolation = options.isolation or ("fork" if device == "cpu" else "process")
    print(f"Training steps: {len(configs)} configurations on {device} ({isolation}) ...", flush=True)
    partial = {**results, "training": {"device": device, "isolation": isolation, "rows": []}}

    def on_row(row: dict) -> None:  # a bench stopped midway still leaves its rows
        progress(row)
        partial["training"]["rows"].append(row)
        write_results(partial, out)

    results["training"] = bench_training(configs, isolation, on_row)
    rows = results["training"]["rows"]
    results["ratios"] = {"cache_speedup": cache_speedups(rows), "lora_memory": lora_memory_ratios(rows)}
    results["goals"] = goals(rows, device)
    if not (options.quick or options.no_plan):
        print("make plan's predictions ...", flush=True)
        results["plan"] = plan_section(rows)
    if not (options.quick or options.no_demo):
        print("make demo ...", flush=True)
        results["demo"] = bench_demo()
    if not (options.quick or options.no_full_size):
        return run_full_size(results, out)
    write_results(results, out)
    print(report(results))
    return out


def run_full_size(results: dict, out: Path) -> Path:
    """The full-size section (bench/full_size.py) and its goals, added to `results`."""
    print("Full size: musicgen-small's checkpoint, full and LoRA, and the projected 50-clip job ...", flush=True)
    results["full_size"] = full_size.section()
    results["goals"] = results.get("goals", []) + full_size.goals(results["full_size"])
    write_results(results, out)
    print(report(results))
    return out


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> Path:
    """`make bench`: every section measured, written to <output>/bench (bench.json, bench.md); returns the folder."""
    return run(parse_options(argv))


def step_main(argv: tp.Sequence[str]) -> int:
    """`python -m musicgen_finetune.bench step ...`: one configuration, its measurement as a JSON line."""
    parser = argparse.ArgumentParser(prog="python -m musicgen_finetune.bench step")
    parser.add_argument("--arch", choices=list(ARCHITECTURES), required=True)
    parser.add_argument("--mode", choices=MODES, required=True)
    parser.add_argument("--tokens", choices=TOKENS, default="cached")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--segment", type=float, default=2.0)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--t5", default="", help="a T5 folder (default: one written for the step)")
    opts = parser.parse_args(argv)
    config = StepConfig(
        opts.arch,
        opts.mode,
        opts.tokens,
        opts.batch,
        opts.segment,
        opts.checkpointing,
        opts.device,
        opts.warmup,
        opts.steps,
        opts.t5,
    )
    try:
        print(json.dumps(step_measurement(config)), flush=True)
        return 0
    except Exception as err:  # noqa: BLE001 - the caller makes it the row's error
        print(json.dumps({"error": describe_failure(err)}), flush=True)
        return 1
