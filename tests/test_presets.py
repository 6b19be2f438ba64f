"""Every preset a user can pick trains end to end, with its own data loading (the GPU presets' worker processes
and upstream's `forkserver` start method), on the CPU with a device override and short segments. The CPU presets
(cpu_tiny, cpu_tiny_lora) are what every other end-to-end test trains with."""

import json

import pytest
from conftest import train, xp_folder

from musicgen_finetune import CONFIG_DIR
from musicgen_finetune.config import compose

PRESETS = sorted(
    p.relative_to(CONFIG_DIR / "solver").with_suffix("").as_posix()
    for p in (CONFIG_DIR / "solver" / "finetune").glob("*.yaml")
)
GPU_PRESETS = [p for p in PRESETS if not p.startswith("finetune/cpu_")]
# The device override a user without a GPU adds, one epoch, short samples (their top-k of 250 is more than the tiny
# model's 64 codes: the solver samples among all 64, and says so). One data-loader worker instead of the preset's
# four: each is a forkserver process that starts Python, torch and AudioCraft, and one is enough to show that a
# worker starts, loads and does not re-run the tool (issue 13's crash came from every worker alike).
ON_THE_CPU = "device=cpu autocast=false optim.epochs=1 generate.lm.gen_duration=1 dataset.num_workers=1"


def test_the_presets_are_found():
    assert {"finetune/musicgen_small", "finetune/musicgen_small_lora", "finetune/cpu_tiny"} <= set(PRESETS)


@pytest.mark.long
@pytest.mark.parametrize("preset", GPU_PRESETS)
def test_gpu_preset_trains_an_epoch_with_its_worker_processes(preset, workdir, tiny_model, dataset):
    cfg = compose([f"solver={preset}"])
    assert cfg.dataset.num_workers > 0 and cfg.mp_start_method == "forkserver"  # what is being tested
    result = train(workdir, tiny_model, args=ON_THE_CPU, preset=preset)
    assert result.returncode == 0, result.stderr[-5000:]
    assert "the following arguments are required" not in result.stderr  # a worker re-running the tool's parser
    assert "generate.lm.top_k=250 is more than this model's 64 codes" in result.stderr
    history = json.loads((xp_folder(result) / "history.json").read_text())
    assert len(history) == 1 and history[0]["valid"]["ce"] > 0
