"""LoRA rank against learning rate (alpha = 2 x rank, so the adapters' scale stays the same)."""

from ._base import base_overrides
from ._explorers import FinetuneExplorer


@FinetuneExplorer
def explorer(launcher):
    launcher.slurm_(gpus=1)
    launcher.bind_(base_overrides(lora=True))
    for rank in [4, 12, 32]:
        for lr in [1e-4, 3e-4, 1e-3]:
            launcher({"lora.rank": rank, "lora.alpha": 2 * rank, "optim.lr": lr})
