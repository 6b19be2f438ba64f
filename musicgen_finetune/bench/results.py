"""From measurements to results: a row per configuration, the ratios and goals computed from the rows, and the
markdown report (bench.md)."""

import dataclasses
import math
import time
import typing as tp

from ..machine import one_line as machine_line
from .flops import FLOPS_FORMULA, mfu
from .matrix import ARCHITECTURES, CHECKPOINTING_CONFIG, MODES, StepConfig, estimated_peak_gib
from .pipeline import manifests_markdown


def config_fields(config: StepConfig) -> dict:
    fields = dataclasses.asdict(config)
    fields.pop("t5")
    return fields


def significant(value: float, digits: int = 6) -> float:
    """Rounded to `digits` significant digits (a CPU's TFLOP/s and a GPU's tokens/s differ by 10^6)."""
    return float(f"{value:.{digits}g}")


def make_row(config: StepConfig, measured: dict, device_name: str, peak_tflops: tp.Optional[float]) -> dict:
    """A row of bench.json: the configuration, what was measured and what follows from it; with `error` set,
    the measured fields are null."""
    arch = ARCHITECTURES[config.arch]
    frame_rate = measured.get("frame_rate") or 50.0
    frames = measured.get("frames") or math.ceil(config.segment_s * frame_rate)
    tokens = config.batch * frames * arch.codebooks
    row = {
        **config_fields(config),
        "device_name": device_name,
        "error": measured.get("error"),
        "estimate_gib": round(estimated_peak_gib(config), 1) if config.device == "cpu" else None,
        "tokens_per_step": tokens,
        "audio_s_per_step": config.batch * config.segment_s,
    }
    metrics = (
        "trainable",
        "total",
        "precision",
        "optimizer",
        "frame_rate",
        "frames",
        "codebooks",
        "positions",
        "text_tokens",
        "step_times_s",
        "step_s",
        "audio_s_per_s",
        "tokens_per_s",
        "peak_gib",
        "peak_reserved_gib",
        "memory",
        "matrix_params",
        "flops_per_step",
        "tflops_per_s",
        "peak_tflops",
        "mfu",
        "mfu_note",
    )
    row.update({key: None for key in metrics})
    if row["error"]:
        return row
    row.update({key: measured[key] for key in measured if key in metrics})
    step_s = sum(measured["step_times_s"]) / len(measured["step_times_s"])
    row.update(
        step_s=significant(step_s),
        audio_s_per_s=significant(row["audio_s_per_step"] / step_s),
        tokens_per_s=significant(tokens / step_s),
        tflops_per_s=significant(measured["flops_per_step"] / step_s / 1e12),
    )
    if config.device != "cuda":
        row["mfu_note"] = "no MFU on the CPU"
    elif peak_tflops is None:
        row["mfu_note"] = f"unknown GPU {device_name!r}: add its dense bf16 peak to bench.GPU_PEAK_TFLOPS for an MFU"
    else:
        row.update(peak_tflops=peak_tflops, mfu=significant(mfu(measured["flops_per_step"], step_s, peak_tflops), 4))
    return row


# -- ratios and goals --------------------------------------------------------------------------------------------


def row_key(row: dict, **changes) -> tuple:
    values = {**row, **changes}
    return tuple(values[k] for k in ("arch", "mode", "tokens", "batch", "segment_s", "checkpointing"))


def successful_rows(rows: tp.List[dict]) -> tp.Dict[tuple, dict]:
    return {row_key(row): row for row in rows if not row["error"]}


def cache_speedups(rows: tp.List[dict]) -> tp.List[dict]:
    """Uncached step time / cached step time, for every configuration measured both ways (an epoch is the same
    number of steps, so this is also the ratio of epoch times)."""
    done = successful_rows(rows)
    ratios = []
    for cached in done.values():
        uncached = done.get(row_key(cached, tokens="uncached"))
        if cached["tokens"] == "cached" and uncached:
            ratios.append(
                {
                    **{k: cached[k] for k in ("arch", "mode", "batch", "segment_s", "checkpointing")},
                    "uncached_step_s": uncached["step_s"],
                    "cached_step_s": cached["step_s"],
                    "speedup": round(uncached["step_s"] / cached["step_s"], 3),
                }
            )
    return ratios


def lora_memory_ratios(rows: tp.List[dict]) -> tp.List[dict]:
    """LoRA peak memory / full fine-tuning peak memory at the same configuration."""
    done = successful_rows(rows)
    ratios = []
    for full in done.values():
        low_rank = done.get(row_key(full, mode="lora"))
        if full["mode"] == "full" and low_rank:
            ratios.append(
                {
                    **{k: full[k] for k in ("arch", "tokens", "batch", "segment_s", "checkpointing")},
                    "full_peak_gib": full["peak_gib"],
                    "lora_peak_gib": low_rank["peak_gib"],
                    "ratio": round(low_rank["peak_gib"] / full["peak_gib"], 3),
                }
            )
    return ratios


def headline(rows: tp.List[dict]) -> tp.Optional[dict]:
    """The configuration the goals are judged on: the largest arch, batch and segment measured (cached, full and
    LoRA both measured, no checkpointing)."""
    done = successful_rows(rows)
    candidates = [
        row
        for row in done.values()
        if row["mode"] == "full"
        and row["tokens"] == "cached"
        and not row["checkpointing"]
        and row_key(row, mode="lora") in done
        and row_key(row, tokens="uncached") in done
    ]
    order = list(ARCHITECTURES)
    return min(candidates, key=lambda r: (order.index(r["arch"]), -r["batch"], -r["segment_s"]), default=None)


def goal(name: str, value: tp.Optional[float], text: str, met: tp.Optional[bool], note: str = "") -> dict:
    return {"goal": name, "value": value, "measured": text, "met": met, "note": note}


def goals(rows: tp.List[dict], device: tp.Optional[str]) -> tp.List[dict]:
    """Each goal with its measured value, from the rows of this run."""
    results = []
    top = headline(rows)
    where = f"{top['arch']} batch {top['batch']} x {top['segment_s']:g} s" if top else ""
    speedups = {(r["arch"], r["mode"], r["batch"], r["segment_s"], r["checkpointing"]): r for r in cache_speedups(rows)}
    memory = {
        (r["arch"], r["tokens"], r["batch"], r["segment_s"], r["checkpointing"]): r for r in lora_memory_ratios(rows)
    }
    for mode in MODES:
        ratio = speedups.get((top["arch"], mode, top["batch"], top["segment_s"], False)) if top else None
        results.append(
            goal(
                f"cached epoch >= 2x faster than uncached ({mode})",
                ratio and ratio["speedup"],
                f"{ratio['speedup']:.2f}x, {where}" if ratio else "not measured",
                ratio["speedup"] >= 2 if ratio else None,
            )
        )
    ratio = memory.get((top["arch"], "cached", top["batch"], top["segment_s"], False)) if top else None
    results.append(
        goal(
            "LoRA / full peak memory <= 0.5",
            ratio and ratio["ratio"],
            f"{ratio['ratio']:.2f}, {where}, cached" if ratio else "not measured",
            ratio["ratio"] <= 0.5 if ratio else None,
            "process RSS includes ~1 GiB of interpreter and libraries" if device == "cpu" else "",
        )
    )
    results += gpu_goals(rows, device)
    return results


def gpu_goals(rows: tp.List[dict], device: tp.Optional[str]) -> tp.List[dict]:
    """Memory and MFU goals for musicgen-small at batch 4 x 30 s (cached tokens, no checkpointing), GPU only."""
    arch, batch, segment = CHECKPOINTING_CONFIG
    done = {row_key(row): row for row in rows}
    specs = [
        ("full", "peak_gib", 16.0, "full fine-tuning peak < 16 GiB"),
        ("lora", "peak_gib", 10.0, "LoRA peak < 10 GiB"),
        ("full", "mfu", 0.35, "MFU >= 35%"),
    ]
    results = []
    for mode, field, threshold, name in specs:
        row = done.get((arch, mode, "cached", batch, segment, False))
        label = f"{name} ({arch}, batch {batch} x {segment:g} s, cached)"
        if device != "cuda":
            results.append(goal(label, None, "not measured: no GPU", None))
        elif row is None or row["error"] or row[field] is None:
            reason = (row["error"] or row["mfu_note"]) if row else "configuration not in this run"
            results.append(goal(label, None, f"not measured: {reason}", None))
        elif field == "mfu":
            results.append(goal(label, row["mfu"], f"{100 * row['mfu']:.1f}%", row["mfu"] >= threshold))
        else:
            results.append(goal(label, row[field], f"{row[field]:.2f} GiB", row[field] < threshold))
    return results


# -- the report --------------------------------------------------------------------------------------------------


def fmt(value: tp.Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def training_table(rows: tp.List[dict]) -> tp.List[str]:
    lines = [
        "| model | mode | tokens | batch x segment | checkpointing | precision | step (s) | audio s/s | "
        "tokens/s | peak (GiB) | MFU | error |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mfu_text = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        lines.append(
            f"| {r['arch']} | {r['mode']} | {r['tokens']} | {r['batch']} x {r['segment_s']:g} s | "
            f"{'torch' if r['checkpointing'] else 'none'} | {r['precision'] or '-'} | "
            f"{fmt(r['step_s'], 4)} | {fmt(r['audio_s_per_s'])} | {fmt(r['tokens_per_s'])} | "
            f"{fmt(r['peak_gib'])} | {mfu_text} | {r['error'] or ''} |"
        )
    return lines


def training_markdown(section: dict) -> tp.List[str]:
    rows = section["rows"]
    first = next((r for r in rows if not r["error"]), rows[0] if rows else None)
    if first is None:
        return []
    memory = first["memory"] or ("GPU max allocated" if section["device"] == "cuda" else "process peak RSS")
    steps = f"{first['warmup']} warm-up + {first['steps']} measured steps"
    lines = [
        f"## LM training step on {first['device_name']} ({section['device']})",
        "",
        f"One step: the batch's inputs, forward, backward, gradient clipping, AdamW; {steps}, averaged; "
        f"each configuration in its own process ({section['isolation']}). Random weights in musicgen-small's "
        "shapes (LM, 32 kHz EnCodec, T5 of t5-base's shapes) and the tiny model's. *cached*: tokens and T5 "
        "outputs precomputed; *uncached*: EnCodec encodes the batch's audio and T5 runs on its captions in "
        f"every step. Tokens = batch x frames x codebooks ({fmt(first['frame_rate'])} Hz). Peak memory: "
        f"{memory}, over the steps"
        + (
            " (glibc's mmap threshold fixed at 1 MiB, so that RSS follows what is allocated)."
            if section["device"] != "cuda"
            else "."
        ),
        "",
    ]
    lines += training_table(rows) + ["", FLOPS_FORMULA, ""]
    return lines


def ratios_markdown(ratios: dict) -> tp.List[str]:
    lines = [
        "## Ratios (same run)",
        "",
        "Cached vs uncached step time (= epoch time):",
        "",
        "| model | mode | batch x segment | checkpointing | uncached (s) | cached (s) | speedup |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['arch']} | {r['mode']} | {r['batch']} x {r['segment_s']:g} s | "
        f"{'torch' if r['checkpointing'] else 'none'} | {fmt(r['uncached_step_s'], 4)} | "
        f"{fmt(r['cached_step_s'], 4)} | {r['speedup']:.2f}x |"
        for r in ratios["cache_speedup"]
    ]
    lines += [
        "",
        "LoRA / full peak memory:",
        "",
        "| model | tokens | batch x segment | checkpointing | full (GiB) | LoRA (GiB) | LoRA / full |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['arch']} | {r['tokens']} | {r['batch']} x {r['segment_s']:g} s | "
        f"{'torch' if r['checkpointing'] else 'none'} | {fmt(r['full_peak_gib'])} | "
        f"{fmt(r['lora_peak_gib'])} | {r['ratio']:.2f} |"
        for r in ratios["lora_memory"]
    ]
    return lines + [""]


def goals_markdown(goal_list: tp.List[dict]) -> tp.List[str]:
    lines = ["## Goals", ""]
    for g in goal_list:
        verdict = "" if g["met"] is None else ": **met**" if g["met"] else ": **not met**"
        lines.append(f"- {g['goal']}: {g['measured']}{verdict}" + (f" ({g['note']})" if g["note"] else ""))
    return lines + [""]


def plan_markdown(plan: dict) -> tp.List[str]:
    """The plan's predictions (musicgen_finetune.planning) against the published A100 figures and, on a GPU,
    against this run's measurements."""
    lines = [
        "## Predicted (make plan) against measured",
        "",
        "Full fine-tuning of musicgen-small, 30 s segments, one A100, as published (AudioCraft's musicgen_base_32khz "
        "solver: fp16 autocast, AdamW, EMA on the GPU, tokens encoded every step), against the plan of the same "
        "settings traced on fake tensors. Predicted peak: max_memory_allocated with cuBLAS and attention "
        "workspaces; predicted total: with the allocator's reserve and the CUDA context (what nvidia-smi shows).",
        "",
        "| batch | published (GB) | predicted peak (GB) | predicted total (GB) | total / published |",
        "|---|---|---|---|---|",
    ]
    for r in plan["published_a100"]:
        published = f"{r['published_gb']:g}" if r["published_gb"] is not None else "out of memory"
        ratio = f"{r['predicted_total_gb'] / r['published_gb']:.2f}" if r["published_gb"] else "-"
        lines.append(
            f"| {r['batch']} | {published} | {r['predicted_peak_gb']:.1f} | {r['predicted_total_gb']:.1f} | {ratio} |"
        )
    if plan["measured"]:
        lines += [
            "",
            "This run's GPU rows against the plan of the same step:",
            "",
            "| model | mode | tokens | batch x segment | checkpointing | allocated (GiB) | predicted (GiB) | "
            "reserved (GiB) | predicted reserved (GiB) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['arch']} | {r['mode']} | {r['tokens']} | {r['batch']} x {r['segment_s']:g} s | "
            f"{'torch' if r['checkpointing'] else 'none'} | {fmt(r['measured_allocated_gib'])} | "
            f"{fmt(r['predicted_peak_gib'])} | {fmt(r['measured_reserved_gib'])} | "
            f"{fmt(r['predicted_reserved_gib'])} |"
            for r in plan["measured"]
        ]
    return lines + [""]


def markdown(results: dict) -> str:
    lines = [
        f"# Benchmark ({time.strftime('%Y-%m-%d', time.gmtime(results['time']))}"
        f"{', quick' if results.get('quick') else ''})",
        "",
        machine_line(results["machine"]),
        "",
    ]
    if results.get("training"):
        lines += training_markdown(results["training"])
    if results.get("ratios"):
        lines += ratios_markdown(results["ratios"])
    if results.get("goals"):
        lines += goals_markdown(results["goals"])
    if results.get("plan"):
        lines += plan_markdown(results["plan"])
    demo = results.get("demo")
    if demo:
        result = f"{demo['wall_s']} s end to end" if demo["wall_s"] is not None else demo["error"]
        lines += [
            "## make demo",
            "",
            f"`{demo['command']}`: {result}" + (f" (warning: {demo['warning']})" if demo.get("warning") else ""),
            "",
        ]
    if results.get("manifests"):
        lines += manifests_markdown(results["manifests"])
    return "\n".join(lines)
