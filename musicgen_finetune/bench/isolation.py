"""Each configuration in a process of its own, so that its peak memory is its own and a crash, an out-of-memory
kill or a timeout is one row's error: a fresh interpreter (`python -m musicgen_finetune.bench step`), or a child
forked from a server (`... bench serve`) that imported the training stack once."""

import dataclasses
import json
import os
import subprocess
import sys
import tempfile

from ..paths import REPO_ROOT
from .matrix import StepConfig
from .step import step_measurement

# Measuring processes run with glibc's mmap threshold fixed at 1 MiB: by default it grows after large frees, so
# freed activation-sized tensors stay in the heap and peak RSS counts them again (LoRA's per-forward q/k/v weights
# then read as ~1.8 GiB more than is ever allocated at once). With it fixed, RSS follows what is allocated.
MEASUREMENT_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2**20)}

# -- each configuration in a process of its own ------------------------------------------------------------------


def describe_failure(err: BaseException) -> str:
    """One line for a row's `error`: out of memory named as such, else the exception's type and first line."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    if isinstance(err, MemoryError) or "out of memory" in text.lower() or "can't allocate memory" in text.lower():
        return f"out of memory ({text[:200]})" if text else "out of memory"
    return f"{type(err).__name__}: {text[:300]}"


def describe_exit(code: int, stderr: str = "") -> str:
    """Why a measuring process ended without a result: a signal (SIGKILL is usually the OOM killer) or a code."""
    if code < 0:
        import signal

        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    tail = lines[-1][:300] if lines else "no output"
    if "out of memory" in stderr.lower():
        return f"out of memory ({tail})"
    return f"exited with code {code}: {tail}"


def measure_in_subprocess(config: StepConfig) -> dict:
    """A fresh interpreter for one configuration (`bench step`): its imports, its memory, its CUDA context."""
    try:
        result = subprocess.run(
            [sys.executable, "-m", "musicgen_finetune.bench", "step", *config.step_args()],
            capture_output=True,
            text=True,
            timeout=config.timeout_s,
            cwd=REPO_ROOT,
            env={**os.environ, **MEASUREMENT_ENV},
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {config.timeout_s:g} s"}
    last = (result.stdout.strip().splitlines() or [""])[-1]
    try:
        measured = json.loads(last)
    except json.JSONDecodeError:
        measured = None
    if isinstance(measured, dict) and (result.returncode == 0 or measured.get("error")):
        return measured
    return {"error": describe_exit(result.returncode, result.stderr)}


def measure_into(config: StepConfig, sender) -> None:
    """A forked child's work: measure, send the result (or the failure) to the server."""
    try:
        result = step_measurement(config)
    except BaseException as err:  # noqa: BLE001 - every failure becomes the row's error
        result = {"error": describe_failure(err)}
    sender.send(result)
    sender.close()


def measure_forked(config: StepConfig) -> dict:
    """One configuration in a child forked from this (already importing) process, killed at its timeout."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=measure_into, args=(config, sender), daemon=True)
    child.start()
    sender.close()  # the child holds the only sending end: its death reads as end of file
    if not receiver.poll(config.timeout_s):
        child.kill()
        child.join()
        return {"error": f"timed out after {config.timeout_s:g} s"}
    try:
        result = receiver.recv()
    except EOFError:  # died without an answer: killed (the OOM killer) or crashed
        result = None
    child.join(30)
    if child.is_alive():
        child.kill()
        child.join()
    return result or {"error": describe_exit(child.exitcode or 0)}


def serve() -> None:
    """`bench serve`: import the training stack once, then measure each configuration (a JSON line on stdin) in a
    forked child and answer with a JSON line; saves each configuration the ~6 s of imports of a new process.
    Children write their own output to stderr: stdout carries the answers only."""
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # forking must find CUDA uninitialised
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    import torch  # noqa: F401 - imported once, here, for every child
    from audiocraft.models import builders  # noqa: F401
    from transformers import T5EncoderModel  # noqa: F401

    from .. import lora, patches  # noqa: F401

    for line in sys.stdin:
        if line.strip():
            answers.write(json.dumps(measure_forked(StepConfig(**json.loads(line)))) + "\n")
            answers.flush()


class ForkServer:
    """The parent's side of `bench serve`: one process for all configurations, forking one child for each."""

    def __init__(self):
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "musicgen_finetune.bench", "serve"],
            cwd=REPO_ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            env={**os.environ, **MEASUREMENT_ENV},
        )

    def measure(self, config: StepConfig) -> dict:
        try:
            self.process.stdin.write(json.dumps(dataclasses.asdict(config)) + "\n")
            self.process.stdin.flush()
            answer = self.process.stdout.readline()
        except (BrokenPipeError, OSError):
            answer = ""
        if answer:
            return json.loads(answer)
        self.stderr.seek(0)
        return {"error": "the bench server ended: " + describe_exit(self.process.wait(), self.stderr.read())}

    def close(self) -> None:
        if self.process.stdin:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.stderr.close()
