"""The grid table: upstream's LM explorer (train/valid cross-entropy, best valid perplexity) plus how each run
ended and its best epoch (from the solver's done.json)."""

import treetable as tt
from audiocraft.grids.musicgen._explorers import LMExplorer

from ..experiments import best_epoch, read_done


class FinetuneExplorer(LMExplorer):
    def get_grid_metrics(self):
        return super().get_grid_metrics() + [
            tt.group("run", [tt.leaf("status"), tt.leaf("best_epoch")], align=">"),
        ]

    def process_sheep(self, sheep, history):
        parts = super().process_sheep(sheep, history)
        done = read_done(sheep.xp.folder)
        status = done["reason"] if done else ("partial" if history else "not run")
        # done.json's choice knows the run's early_stop.metric and forgetting budget
        best = done.get("best_epoch") if done else best_epoch(history)
        parts["run"] = {"status": status, "best_epoch": best or ""}
        return parts
