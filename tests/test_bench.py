"""`make bench`: the quick bench writes a well-formed report; the FLOP, MFU and failure logic on known numbers.

No timing is asserted: the numbers are measurements of whatever machine runs the tests.
"""

import json
import math
import os
import signal
import statistics
import time

import pytest
from conftest import run_tool

from musicgen_finetune.bench import flops, isolation, matrix, pipeline, results
from musicgen_finetune.bench.flops import MatrixParams
from musicgen_finetune.bench.matrix import StepConfig

QUICK_ROWS = {
    (mode, tokens, batch) for mode in ("full", "lora") for tokens in ("cached", "uncached") for batch in (1, 2)
}
POSITIVE = (
    "trainable",
    "total",
    "step_s",
    "audio_s_per_s",
    "tokens_per_s",
    "tokens_per_step",
    "peak_gib",
    "flops_per_step",
    "tflops_per_s",
    "frames",
    "positions",
    "text_tokens",
    "frame_rate",
)


@pytest.fixture(scope="module")
def quick(workdir, tmp_path_factory):
    """`tools/bench.py --quick` in a subprocess, as `make bench QUICK=1` runs it: (bench.json, bench.md)."""
    out = tmp_path_factory.mktemp("bench")
    result = run_tool(["tools/bench.py", "--quick", "--out", str(out)], workdir, timeout=300)
    assert result.returncode == 0, result.stderr[-5000:]
    assert f"Written to {out}" in result.stdout
    return json.loads((out / "bench.json").read_text()), (out / "bench.md").read_text()


@pytest.mark.long  # make bench QUICK=1 end to end: a benchmark's run
def test_quick_bench_has_every_row_measured(quick):
    results, _ = quick
    assert results["quick"] is True and results["machine"]["cpu"] and results["machine"]["cores"] >= 1
    rows = results["training"]["rows"]
    assert {(r["mode"], r["tokens"], r["batch"]) for r in rows} == QUICK_ROWS and len(rows) == len(QUICK_ROWS)
    for row in rows:
        assert row["arch"] == "tiny" and row["segment_s"] == 1.0 and not row["checkpointing"]
        assert row["error"] is None, row
        assert row["device_name"], "each figure names the machine it ran on"
        for field in POSITIVE:
            assert row[field] > 0, (field, row)
        assert len(row["step_times_s"]) == row["steps"]
        assert row["step_s"] == pytest.approx(statistics.mean(row["step_times_s"]), rel=1e-4)


@pytest.mark.long  # make bench QUICK=1 end to end: a benchmark's run
def test_quick_bench_derived_fields_follow_from_the_measurements(quick):
    for row in quick[0]["training"]["rows"]:
        assert row["frames"] == math.ceil(row["segment_s"] * row["frame_rate"])
        assert row["tokens_per_step"] == row["batch"] * row["frames"] * row["codebooks"]
        assert row["tokens_per_s"] == pytest.approx(row["tokens_per_step"] / row["step_s"], rel=1e-3)
        assert row["audio_s_per_s"] == pytest.approx(row["batch"] * row["segment_s"] / row["step_s"], rel=1e-3)
        arch = matrix.ARCHITECTURES[row["arch"]]
        assert row["flops_per_step"] == flops.training_flops(
            MatrixParams(**row["matrix_params"]),
            row["batch"],
            row["positions"],
            row["text_tokens"],
            arch.layers,
            arch.dim,
        )
        params = row["matrix_params"]
        if row["mode"] == "full":
            assert row["trainable"] == row["total"]
            assert params["sequence_wgrad"] == params["sequence"] and params["text_wgrad"] == params["text"]
        else:
            assert row["trainable"] < row["total"] and params["sequence_wgrad"] < params["sequence"]
        if row["device"] == "cpu":
            assert row["precision"] == "fp32" and row["mfu"] is None and row["mfu_note"]


@pytest.mark.long  # make bench QUICK=1 end to end: a benchmark's run
def test_quick_bench_ratios_and_goals_come_from_the_rows(quick):
    results, _ = quick
    rows = {(r["mode"], r["tokens"], r["batch"]): r for r in results["training"]["rows"]}
    speedups = results["ratios"]["cache_speedup"]
    assert {(r["mode"], r["batch"]) for r in speedups} == {(m, b) for m in ("full", "lora") for b in (1, 2)}
    for ratio in speedups:
        uncached, cached = (rows[ratio["mode"], tokens, ratio["batch"]] for tokens in ("uncached", "cached"))
        assert ratio["speedup"] == pytest.approx(uncached["step_s"] / cached["step_s"], abs=1e-3)
    memory = results["ratios"]["lora_memory"]
    assert len(memory) == 4
    for ratio in memory:
        full, low_rank = rows["full", ratio["tokens"], ratio["batch"]], rows["lora", ratio["tokens"], ratio["batch"]]
        assert ratio["ratio"] == pytest.approx(low_rank["peak_gib"] / full["peak_gib"], abs=1e-3)
    goals = {g["goal"]: g for g in results["goals"]}
    speedup = goals["cached epoch >= 2x faster than uncached (full)"]
    uncached, cached = rows["full", "uncached", 2], rows["full", "cached", 2]  # goals: the largest batch measured
    assert speedup["value"] == pytest.approx(uncached["step_s"] / cached["step_s"], abs=1e-3)
    assert speedup["met"] == (speedup["value"] >= 2)
    assert all(g["met"] in (True, False, None) for g in results["goals"])
    if results["training"]["device"] == "cpu":
        assert sum(1 for g in results["goals"] if g["measured"] == "not measured: no GPU") == 3


@pytest.mark.long  # make bench QUICK=1 end to end: a benchmark's run
def test_quick_bench_markdown_names_the_machine_and_has_one_line_per_row(quick):
    results, text = quick
    lines = text.splitlines()
    assert lines[2].startswith("Machine: ") and results["machine"]["cpu"] in lines[2]
    header = next(i for i, line in enumerate(lines) if line.startswith("| model | mode | tokens |"))
    assert lines[header + 1].startswith("|---")
    table = []
    for line in lines[header + 2 :]:
        if not line.startswith("|"):
            break
        table.append(line)
    assert len(table) == len(results["training"]["rows"])
    assert "## Goals" in text and "(4·N + 2·N_wgrad)" in text and "## make manifests: 20 files" in text
    assert results["manifests"]["files"] == 20 and "demo" not in results


def test_training_flops_by_hand():
    # full: 6 x (100 x 2 x 10 + 20 x 2 x 3) = 12,720; attention: 3 x 2 x 1 x (2 x 10^2 x 4 + 4 x 10 x 3 x 4) = 7,680
    assert (
        flops.training_flops(MatrixParams(100, 100, 20, 20), batch=2, positions=10, text_tokens=3, layers=1, dim=4)
        == 20_400
    )
    # LoRA: (4 x 100 + 2 x 10) x 20 + (4 x 20 + 2 x 2) x 6 = 8,904, the same attention
    assert (
        flops.training_flops(MatrixParams(100, 10, 20, 2), batch=2, positions=10, text_tokens=3, layers=1, dim=4)
        == 16_584
    )


def test_mfu_and_gpu_peaks():
    assert flops.mfu(989e12 * 0.5, 1.0, 989.0) == pytest.approx(0.5)
    assert flops.mfu(330e12, 2.0, 165.0) == pytest.approx(1.0)
    assert flops.mfu(1e12, 1.0, None) is None
    assert flops.gpu_peak_tflops("NVIDIA H100 80GB HBM3") == 989
    assert flops.gpu_peak_tflops("NVIDIA H100 PCIe") == 756
    assert flops.gpu_peak_tflops("NVIDIA H200") == 989
    assert flops.gpu_peak_tflops("NVIDIA A100-SXM4-40GB") == 312
    assert flops.gpu_peak_tflops("NVIDIA A10G") == 70
    assert flops.gpu_peak_tflops("NVIDIA GeForce RTX 4090") == 165
    assert flops.gpu_peak_tflops("NVIDIA L4") == 121
    assert flops.gpu_peak_tflops("NVIDIA L40S") == 362
    assert flops.gpu_peak_tflops("Tesla V100-SXM2-16GB") is None and flops.gpu_peak_tflops(None) is None


def gpu_config(**changes) -> StepConfig:
    return StepConfig(
        **{
            "arch": "musicgen-small",
            "mode": "full",
            "tokens": "cached",
            "batch": 4,
            "segment_s": 30.0,
            "device": "cuda",
            "warmup": 3,
            "steps": 2,
            **changes,
        }
    )


def measured_on_gpu(flops: float, times) -> dict:
    return {
        "trainable": 10,
        "total": 10,
        "precision": "bf16 autocast",
        "frame_rate": 50.0,
        "frames": 1500,
        "codebooks": 4,
        "positions": 1500,
        "text_tokens": 20,
        "step_times_s": times,
        "peak_gib": 12.0,
        "memory": "GPU max allocated",
        "flops_per_step": flops,
    }


def test_row_mfu_on_a_known_and_an_unknown_gpu():
    row = results.make_row(gpu_config(), measured_on_gpu(1e15, [2.0, 2.0]), "NVIDIA H100 80GB HBM3", 989.0)
    assert row["step_s"] == 2.0 and row["tokens_per_s"] == 4 * 1500 * 4 / 2.0
    assert row["mfu"] == pytest.approx(5e14 / 989e12, abs=1e-4) and row["peak_tflops"] == 989.0
    unknown = results.make_row(gpu_config(), measured_on_gpu(1e15, [2.0]), "NVIDIA Future GPU", None)
    assert unknown["mfu"] is None and "NVIDIA Future GPU" in unknown["mfu_note"]


def test_gpu_goals_from_rows():
    rows = [
        results.make_row(
            gpu_config(mode=mode), {**measured_on_gpu(flops, [1.0]), "peak_gib": peak}, "NVIDIA H100 80GB HBM3", 989.0
        )
        for mode, flops, peak in (("full", 400e12, 15.0), ("lora", 300e12, 11.0))
    ]
    goals = {g["goal"].split(" (")[0]: g for g in results.gpu_goals(rows, "cuda")}
    assert goals["full fine-tuning peak < 16 GiB"]["met"] is True
    assert goals["LoRA peak < 10 GiB"]["met"] is False and goals["LoRA peak < 10 GiB"]["value"] == 11.0
    assert goals["MFU >= 35%"]["met"] is True and goals["MFU >= 35%"]["value"] == pytest.approx(400 / 989, abs=1e-4)


def test_an_impossible_config_becomes_an_error_row():
    config = StepConfig("tiny", "full", "cached", batch=0, segment_s=1.0, timeout_s=120)
    measured = isolation.measure_in_subprocess(config)  # `python -m musicgen_finetune.bench step --batch=0 ...`
    assert "batch" in measured["error"] and "must be >= 1" in measured["error"]
    row = results.make_row(config, measured, "cpu", None)
    assert row["error"] == measured["error"] and row["step_s"] is None and row["tokens_per_s"] is None
    forked = isolation.measure_forked(config)
    assert forked["error"] == measured["error"]


def test_a_config_past_its_timeout_becomes_an_error_row():
    config = StepConfig("tiny", "full", "cached", batch=1, segment_s=1.0, timeout_s=0.5)
    assert isolation.measure_in_subprocess(config) == {"error": "timed out after 0.5 s"}


def test_a_killed_or_stuck_child_becomes_an_error_row(monkeypatch):
    config = StepConfig("tiny", "full", "cached", batch=1, segment_s=1.0, timeout_s=0.5)
    monkeypatch.setattr(isolation, "step_measurement", lambda config: os.kill(os.getpid(), signal.SIGKILL))
    assert isolation.measure_forked(config) == {"error": "killed by SIGKILL (out of memory?)"}  # as the OOM killer does
    monkeypatch.setattr(isolation, "step_measurement", lambda config: time.sleep(30))
    assert isolation.measure_forked(config) == {"error": "timed out after 0.5 s"}


def test_the_demo_runs_with_every_output_path_in_a_temporary_folder(tmp_path):
    makefile = tmp_path / "Makefile"
    makefile.write_text(
        "DEMO_MODEL ?= output/models/tiny\nDEMO_NAME ?= demo\nDEMO_NEW_DATA ?= output/data/new\nOUT ?=\n"
    )
    assert pipeline.demo_path_overrides(makefile, tmp_path / "out") == [
        f"DEMO_MODEL={tmp_path / 'out/models/tiny'}",
        f"DEMO_NEW_DATA={tmp_path / 'out/data/new'}",
    ]


def test_failures_are_named():
    assert isolation.describe_exit(-9) == "killed by SIGKILL (out of memory?)"
    assert isolation.describe_exit(1, "Traceback...\nValueError: bad") == "exited with code 1: ValueError: bad"
    assert isolation.describe_failure(MemoryError()) == "out of memory"
    assert isolation.describe_failure(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB")).startswith(
        "out of memory"
    )


def test_a_config_too_big_for_the_ram_is_skipped_with_its_estimate():
    config = StepConfig("musicgen-small", "full", "uncached", batch=10_000, segment_s=30.0)
    reason = matrix.memory_skip_reason(config)
    assert reason.startswith("skipped: needs ~") and "GiB" in reason
    assert matrix.memory_skip_reason(StepConfig("tiny", "full", "cached", batch=1, segment_s=1.0)) is None
    assert matrix.estimated_peak_gib(
        StepConfig("musicgen-small", "lora", "cached", 4, 30.0)
    ) < matrix.estimated_peak_gib(StepConfig("musicgen-small", "full", "cached", 4, 30.0))


def test_the_matrix():
    quick = matrix.matrix("cpu", quick=True)
    assert {(c.arch, c.mode, c.tokens, c.batch, c.segment_s) for c in quick} == {
        ("tiny", m, t, b, 1.0) for m, t, b in QUICK_ROWS
    }
    full_gpu = matrix.matrix("cuda", quick=False)
    assert len(full_gpu) == 2 * 3 * 2 * 2 * 2 + 4 and all((c.warmup, c.steps) == (3, 10) for c in full_gpu)
    checkpointed = [c for c in full_gpu if c.checkpointing]
    assert {(c.arch, c.batch, c.segment_s) for c in checkpointed} == {("musicgen-small", 4, 30.0)}
    assert not any(c.checkpointing for c in matrix.matrix("cpu", quick=False))
    assert all((c.warmup, c.steps) == (1, 2) for c in matrix.matrix("cpu", quick=False))


def test_the_plan_against_the_published_a100_figures_and_a_gpu_row():
    """make bench's plan section: AudioCraft's published full fine-tuning of musicgen-small (one A100, 30 s, fp16,
    EMA on the GPU: 13.4 GB at batch 1, 27.5 GB at 8, out of memory at 16 on a 40 GB card) against the plan of the
    same settings; and a GPU row of this bench beside the plan of the same step."""
    from musicgen_finetune.bench import predicted

    published = predicted.published_rows((1, 8, 16))
    for row in published[:2]:
        assert row["predicted_total_gb"] == pytest.approx(row["published_gb"], rel=0.15), row
        assert row["parts_gib"]["ema"] > 1.5  # EMA on the GPU, as published
    assert published[2]["published_gb"] is None and published[2]["predicted_total_gb"] > 40
    gpu_row = {
        "device": "cuda",
        "arch": "musicgen-small",
        "mode": "lora",
        "tokens": "cached",
        "batch": 2,
        "segment_s": 10.0,
        "checkpointing": False,
        "precision": "bf16 autocast",
        "error": None,
        "peak_gib": 5.1,
        "peak_reserved_gib": 5.6,
    }
    measured = predicted.measured_rows([gpu_row, {**gpu_row, "device": "cpu"}, {**gpu_row, "arch": "tiny"}])
    assert len(measured) == 1 and measured[0]["measured_allocated_gib"] == 5.1
    assert 0 < measured[0]["predicted_peak_gib"] < measured[0]["predicted_reserved_gib"]
    text = "\n".join(results.plan_markdown({"published_a100": published, "measured": measured}))
    assert "| 1 | 13.4 |" in text and "| 16 | out of memory |" in text and "| musicgen-small | lora | cached |" in text
