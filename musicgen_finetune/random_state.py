"""Every random generator training draws from, as one checkpointable state, so that a resumed run is the same run.

Training draws from Python's `random` (T5 word dropout, MusicDataset's description merging when data loads
in-process), NumPy's global generator, torch's CPU generator (the data sampler's order and the seeds of data-loader
workers, dropout, LoRA dropout), the CUDA generators, and generators that modules keep for themselves: the
LM's classifier-free guidance and attribute dropouts each draw from a `torch.Generator` of their own, seeded
when the model is built (modules/conditioners.py:1030 `DropoutModule`), so a resumed run would otherwise drop
other conditions than the run it continues.

Checkpoints are written at the end of an epoch, after its train, valid and generate stages, so the state saved
with them is exactly what the next epoch starts from; restoring it on resume makes the epochs after a preemption
draw what an uninterrupted run would have drawn. (AudioCraft's generate stage runs under its own seeded
torch generator, solvers/base.py `with_rank_rng`, and leaves the global one as it found it.)

The state holds tensors, ints and tuples only, so it loads with torch's weights-only unpickler.
"""

import random
import typing as tp

import numpy as np
import torch


def module_generators(model: tp.Optional[torch.nn.Module]) -> tp.Dict[str, torch.Generator]:
    """The generators modules of `model` keep as their `rng` attribute, by module name."""
    if model is None:
        return {}
    return {
        name: module.rng
        for name, module in model.named_modules()
        if isinstance(getattr(module, "rng", None), torch.Generator)
    }


def capture(model: tp.Optional[torch.nn.Module] = None) -> dict:
    """The current state of every generator, on this process (and of `model`'s own)."""
    numpy_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": numpy_state["bit_generator"],
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "modules": {name: generator.get_state() for name, generator in module_generators(model).items()},
    }


def restore(state: tp.Mapping[str, tp.Any], model: tp.Optional[torch.nn.Module] = None) -> None:
    """Put every generator back in `state` (from `capture`), `model`'s own included. CUDA states are restored on as
    many devices as both the state and this machine have."""
    random.setstate(tuple(item if not isinstance(item, list) else tuple(item) for item in state["python"]))
    numpy_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": numpy_state["bit_generator"],
            "state": {"key": numpy_state["key"].numpy().astype(np.uint32), "pos": numpy_state["pos"]},
            "has_gauss": numpy_state["has_gauss"],
            "gauss": numpy_state["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state["cuda"]:
        devices = min(len(state["cuda"]), torch.cuda.device_count())
        for device in range(devices):
            torch.cuda.set_rng_state(state["cuda"][device], device)
    generators = module_generators(model)
    for name, generator_state in state.get("modules", {}).items():
        if name in generators:
            generators[name].set_state(generator_state)
