"""`make bench`: measured numbers, each with the machine it ran on, to output/bench/ (JSON + markdown).

Benchmarks here are measurements, never pass/fail tests. Each section records what it did, so numbers from
different machines are not confused.

    matrix.py     what to measure: architectures x modes x tokens x batch x segment (StepConfig), and the CPU
                  memory estimate that skips what would not fit in RAM
    step.py       one configuration measured in this process: the LM training step, its time and peak memory
    flops.py      model FLOPs of a step and the model FLOP utilisation (MFU) against the GPU's peak
    isolation.py  each configuration in a process of its own (a fresh interpreter, or a child forked from a
                  server that imported once), so a crash or a timeout is one row's error
    results.py    rows, ratios (cached/uncached, LoRA/full), goals, and the markdown report
    pipeline.py   `make manifests` on generated beats against AudioCraft's indexer, and `make demo` end to end
    run.py        `make bench` itself (tools/bench.py), and `python -m musicgen_finetune.bench step|serve`
"""
