"""Fine-tune MusicGen with AudioCraft's own solver, from a local model folder, offline.

The pipeline, one folder or module a stage (each arrow owned by one part; nothing reaches back up the chain):

    data/         your folder -> manifests/<name>/        (make manifests)
    models/       model folders: open, check, convert to and from transformers (and PEFT adapters), the tiny model
    planning/     what fits a GPU before training: peak memory and time, traced on fake tensors (make plan)
    train.py      the dora entry; solver.py, lora.py, caches.py: what it trains with; launch.py: make train
    grid.py       make grid over grids/
    experiments   output/xps/<signature>/ as the stages after training read it
    export.py     experiment -> model folder               (make export)
    generate.py   model folder -> audio                     (make generate)
    evaluation/   model folders + manifests -> report       (make eval, make listen)
    bench/        speed and memory                          (make bench)

The package is also the dora package: `dora -P musicgen_finetune run ...` finds `musicgen_finetune.train.main`.
Importing it prepares the process's environment first (`environment.prepare`: offline hub, our teams file and
dora folder, AudioCraft's config tree for Hydra), because dora, Hydra, AudioCraft and transformers read it when
they are imported.
"""

from . import environment as _environment
from .errors import UserError
from .paths import CONFIG_DIR, REPO_ROOT, experiments_dir, manifests_root, output_dir

_environment.prepare()

__all__ = ["CONFIG_DIR", "REPO_ROOT", "UserError", "experiments_dir", "manifests_root", "output_dir"]
