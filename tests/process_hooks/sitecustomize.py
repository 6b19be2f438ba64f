"""Loaded by every Python process the end-to-end tests start (PYTHONPATH), to watch and to break them on purpose.

- Network guard ($NETWORK_GUARD_LOG): any attempt to reach another host is written to that file and fails.
  Loopback (the gloo rendezvous of multi-process training) and Unix sockets stay allowed.
- Kill switch ($MUSICGEN_FT_TEST_KILL_AT = "<stage>:<epoch>[:<step>]"): the training process kills itself with
  SIGKILL at that moment, as a preempted job or the OOM killer would: `train:2:1` before the second update of epoch
  2, `valid:2` at the first validation batch of epoch 2, `generate:3` when epoch 3's samples start, `checkpoint:1`
  halfway through writing epoch 1's checkpoint.
- Thread cap ($MUSICGEN_FT_TEST_THREADS): torch's intra-op threads of the process, whatever `num_threads` the
  preset asks for (cpu_tiny: 2). conftest.py sets it to the cores per test process: with two test processes on two
  cores, two threads each oversubscribe the cores, and torch's OpenMP threads then spin-wait on each other (the
  tiny codec's training took 15 times the CPU time with 2 threads than with 1 under that load).
"""

import importlib.abc
import importlib.util
import os
import signal
import socket
import sys

_LOG = os.environ.get("NETWORK_GUARD_LOG")
LOOPBACK = ("127.0.0.1", "::1", "localhost")

if _LOG:
    _connect = socket.socket.connect
    _connect_ex = socket.socket.connect_ex
    _getaddrinfo = socket.getaddrinfo

    def _refuse(what):
        with open(_LOG, "a") as log:
            log.write(f"{os.getpid()} {what!r}\n")
        raise OSError(f"network access refused by the test suite: {what!r}")

    def _outside(address) -> bool:
        return not (isinstance(address, tuple) and address and address[0] in LOOPBACK)

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and _outside(address):
            _refuse(address)
        return _connect(self, address)

    def connect_ex(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and _outside(address):
            _refuse(address)
        return _connect_ex(self, address)

    def getaddrinfo(host, *args, **kwargs):
        if host not in LOOPBACK:
            _refuse(host)
        return _getaddrinfo(host, *args, **kwargs)

    socket.socket.connect = connect
    socket.socket.connect_ex = connect_ex
    socket.getaddrinfo = getaddrinfo


_KILL_AT = os.environ.get("MUSICGEN_FT_TEST_KILL_AT")


def _die() -> None:
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _install_kill_switch(solver_module) -> None:
    stage, epoch, *rest = _KILL_AT.split(":")
    epoch, step = int(epoch), int(rest[0]) if rest else 0
    solver = solver_module.FinetuneSolver
    run_step, generate, save_checkpoints = solver.run_step, solver.generate, solver.save_checkpoints

    def killing_run_step(self, idx, batch, metrics):
        if self.epoch == epoch and idx == step and stage == self.current_stage:
            _die()
        return run_step(self, idx, batch, metrics)

    def killing_generate(self):
        if stage == "generate" and self.epoch == epoch:
            _die()
        return generate(self)

    def killing_save_checkpoints(self):
        if stage != "checkpoint" or self.epoch - 1 != epoch:
            return save_checkpoints(self)
        import io

        import torch

        real_save = torch.save

        def half_save(obj, f, *args, **kwargs):  # half of the bytes on disk, then the process dies
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
            _die()

        torch.save = half_save
        return save_checkpoints(self)

    solver.run_step, solver.generate, solver.save_checkpoints = (
        killing_run_step,
        killing_generate,
        killing_save_checkpoints,
    )


_THREADS = os.environ.get("MUSICGEN_FT_TEST_THREADS")


def _install_thread_cap(solver_module) -> None:
    import torch

    cap, set_num_threads = int(_THREADS), torch.set_num_threads
    torch.set_num_threads = lambda threads: set_num_threads(min(threads, cap))  # train.py init_seed_and_system
    set_num_threads(cap)


class _AfterSolverImport(importlib.abc.MetaPathFinder):
    """Installs the kill switch and the thread cap once musicgen_finetune.solver is imported."""

    def find_spec(self, name, path, target=None):
        if name != "musicgen_finetune.solver":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        exec_module = spec.loader.exec_module

        def exec_then_install(module):
            exec_module(module)
            if _KILL_AT:
                _install_kill_switch(module)
            if _THREADS:
                _install_thread_cap(module)

        spec.loader.exec_module = exec_then_install
        return spec


if _KILL_AT or _THREADS:
    sys.meta_path.insert(0, _AfterSolverImport())
