"""The dora entry point: `dora -P musicgen_finetune run solver=finetune/... key=value ...`.

The same steps as AudioCraft's `audiocraft/train.py` `main`, with our config overlay (config/) on top of
upstream's tree, our teams file and dora directory, the hub switched off (the package's import prepared the
environment), and our patches applied. It also
stands in for `audiocraft.train`, which upstream code imports to resolve checkpoints and signatures.
"""

import logging
import multiprocessing
import os
import random
import sys
import typing as tp

import flashy
import hydra
import numpy as np
import omegaconf
import torch
from audiocraft.environment import AudioCraftEnvironment
from audiocraft.modules.transformer import set_efficient_attention_backend
from audiocraft.utils.cluster import get_slurm_parameters
from dora import XP, git_save, hydra_main

from audiocraft import solvers

from . import patches
from .cli import USER_ERROR_STATUS, one_line
from .errors import UserError
from .solver import FinetuneSolver, TrainingRefusedError

logger = logging.getLogger(__name__)

patches.apply()
patches.register_train_module(sys.modules[__name__])

DATASET_SPLITS = ("train", "valid", "evaluate", "generate")


def split_batch_over_gpus(cfg: omegaconf.DictConfig) -> None:
    """`dataset.batch_size` is the total over all GPUs, as upstream; each process gets its share."""
    world_size = flashy.distrib.world_size()
    sections = [("dataset", cfg.dataset)] + [
        (f"dataset.{split}", cfg.dataset[split])
        for split in DATASET_SPLITS
        if split in cfg.dataset and cfg.dataset[split].get("batch_size") is not None
    ]
    for name, section in sections:
        if section.batch_size % world_size:
            raise TrainingRefusedError(
                f"{name}.batch_size={section.batch_size} does not split over {world_size} GPUs; "
                f"use a multiple of {world_size}."
            )
        section.batch_size //= world_size


def check_required(cfg: omegaconf.DictConfig) -> None:
    """Our presets leave these null (dora cannot name an XP whose config holds ???); say how to set them."""
    if cfg.solver != "musicgen_finetune":
        return
    if not cfg.get("continue_from"):
        raise TrainingRefusedError(
            "continue_from is not set, so this would train MusicGen from random weights. Fine-tune a model with "
            "`make train MODEL=<folder>`, or pass continue_from=//pretrained//<abs model folder> (or "
            "continue_from=<signature> to start from another experiment)."
        )
    if not cfg.get("compression_model_checkpoint"):
        raise TrainingRefusedError(
            "compression_model_checkpoint is not set: use `make train MODEL=<folder>`, or pass "
            "compression_model_checkpoint=//pretrained//<abs model folder> and "
            "continue_from=//pretrained//<abs model folder>."
        )
    for split in ("train", "valid"):
        if not cfg.datasource.get(split):
            raise TrainingRefusedError(
                f"datasource.{split} is not set: use `make train NAME=<dataset>`, or pass "
                f"datasource.{split}=<abs path to manifests/<name>/{split}>."
            )


def get_solver(cfg: omegaconf.DictConfig):
    """The solver for a run's config (ours for `solver: musicgen_finetune`, upstream's otherwise), after the
    checks of what our presets leave to `make train` and with each process's share of the batch."""
    check_required(cfg)
    split_batch_over_gpus(cfg)
    for split, path in cfg.datasource.items():
        if isinstance(path, str):
            cfg.datasource[split] = git_save.to_absolute_path(path)
    if cfg.solver == FinetuneSolver.NAME:
        return FinetuneSolver(cfg)
    return solvers.get_solver(cfg)


def get_solver_from_xp(
    xp: XP,
    override_cfg: tp.Optional[tp.Union[dict, omegaconf.DictConfig]] = None,
    restore: bool = True,
    load_best: bool = True,
    ignore_state_keys: tp.Sequence[str] = (),
    disable_fsdp: bool = True,
):
    """A solver for an existing experiment (upstream `train.get_solver_from_xp`, used by export and eval)."""
    cfg = xp.cfg
    if override_cfg is not None:
        cfg = omegaconf.OmegaConf.merge(cfg, omegaconf.DictConfig(override_cfg))
    if disable_fsdp and cfg.fsdp.use:
        cfg.fsdp.use = False
        ignore_state_keys = [*ignore_state_keys, "model", "ema", "best_state"]
    try:
        with xp.enter():
            solver = get_solver(cfg)
            if restore:
                solver.restore(load_best=load_best, ignore_state_keys=list(ignore_state_keys))
        return solver
    finally:
        hydra.core.global_hydra.GlobalHydra.instance().clear()


def get_solver_from_sig(sig: str, *args, **kwargs):
    return get_solver_from_xp(main.get_xp_from_sig(sig), *args, **kwargs)


def init_seed_and_system(cfg: omegaconf.DictConfig) -> None:
    multiprocessing.set_start_method(cfg.mp_start_method, force=True)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.num_threads)
    os.environ["MKL_NUM_THREADS"] = str(cfg.num_threads)
    os.environ["OMP_NUM_THREADS"] = str(cfg.num_threads)
    set_efficient_attention_backend(cfg.efficient_attention_backend)


def distributed_backend(cfg: omegaconf.DictConfig) -> str:
    """NCCL between GPUs, gloo between processes on the CPU (dora/distrib.py `init` asserts NCCL is not asked for
    without CUDA), so that `make train GPUS=2` also runs, and is tested, on a machine without GPUs."""
    return "nccl" if cfg.device == "cuda" and torch.cuda.is_available() else "gloo"


def run(cfg: omegaconf.DictConfig):
    """What upstream's `main` does: seed, logging, distributed init, the solver, its run (or one stage)."""
    init_seed_and_system(cfg)
    log_name = f"{cfg.execute_only}.log.{{rank}}" if cfg.execute_only else "solver.log.{rank}"
    flashy.setup_logging(level=str(cfg.logging.level).upper(), log_name=log_name)
    flashy.distrib.init(backend=distributed_backend(cfg))
    solver = get_solver(cfg)
    if cfg.show:
        solver.show()
        return
    if cfg.execute_only:
        if not (cfg.execute_inplace or cfg.continue_from is not None):
            raise TrainingRefusedError("execute_only needs continue_from=<sig or path>, or execute_inplace=true.")
        solver.restore(replay_metrics=False)
        solver.run_one_stage(cfg.execute_only)
        return
    return solver.run()


@hydra_main(config_path="../config", config_name="musicgen_finetune", version_base="1.1")
def main(cfg):
    """The dora entry. A refusal the user can act on (a replaced base model, ...) ends the run with its message
    alone, on one line, and exit status 2 (Hydra would print a traceback for any exception)."""
    try:
        return run(cfg)
    except UserError as err:
        logger.error("%s", err)
        if flashy.distrib.is_rank_zero():
            print(f"error: {one_line(str(err))}", file=sys.stderr, flush=True)
        raise SystemExit(USER_ERROR_STATUS) from None


main.dora.dir = AudioCraftEnvironment.get_dora_dir()
main.dora.exclude.append("stop_after_epoch")  # where a run pauses is not what it is
main.dora.exclude += ["token_cache.*", "text_cache.*"]  # caches change the speed, not the results
main._base_cfg.slurm = get_slurm_parameters(main._base_cfg.slurm)

if __name__ == "__main__":
    main()
