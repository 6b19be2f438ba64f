"""Full fine-tuning against LoRA, on the same model, data and preset."""

from ._base import base_overrides
from ._explorers import FinetuneExplorer


@FinetuneExplorer
def explorer(launcher):
    launcher.slurm_(gpus=1)
    launcher(base_overrides())
    launcher(base_overrides(lora=True))
