"""Our Hydra overlay on AudioCraft's config tree: composition, presets, signatures, no USER."""

import os

import pytest
import torch
from omegaconf import OmegaConf

from musicgen_finetune.config import compose
from musicgen_finetune.models import folder as model_dir
from musicgen_finetune.models import xp_cfg


def architecture(cfg) -> dict:
    plain = OmegaConf.to_container(cfg, resolve=True)
    return {section: plain.get(section) for section in xp_cfg.ARCHITECTURE_SECTIONS}


def test_upstream_groups_are_found_through_the_search_path():
    cfg = compose(["solver=musicgen/musicgen_base_32khz", "dset=audio/example"])
    assert cfg.solver == "musicgen" and cfg.optim.optimizer == "dadam"  # upstream's own values


def test_musicgen_small_preset_keeps_the_released_architecture():
    """Key names and shapes must match facebook/musicgen-small's weights: same architecture as upstream's."""
    ours = architecture(compose(["solver=finetune/musicgen_small"]))
    upstream = architecture(compose(["solver=musicgen/musicgen_base_32khz"]))
    assert ours == upstream
    assert ours["transformer_lm"]["dim"] == 1024 and ours["transformer_lm"]["num_layers"] == 24


def test_musicgen_small_preset_is_for_one_24gb_gpu():
    cfg = compose(["solver=finetune/musicgen_small"])
    assert cfg.solver == "musicgen_finetune" and cfg.device == "cuda"
    assert cfg.optim.optimizer == "adamw" and 5e-5 <= cfg.optim.lr <= 2e-4  # not D-Adaptation at lr 1
    assert cfg.schedule.lr_scheduler == "cosine" and cfg.schedule.cosine.warmup > 0
    assert cfg.dataset.batch_size <= 8  # upstream: 192 for 32 GPUs
    assert cfg.optim.grad_accum_steps == "auto"  # micro-batches planned for the GPU at start (planning.fit)
    assert cfg.autocast and cfg.autocast_dtype == "auto" and cfg.optim.adam.fused
    assert cfg.checkpoint.save_last and not cfg.optim.ema.use
    assert cfg.generate.every and cfg.generate.every <= cfg.optim.epochs


def test_runs_need_no_slurm_git_or_xformers_kernel():
    cfg = compose(["solver=finetune/musicgen_small"])
    assert cfg.dora.git_save is False  # upstream: true, grids then need a pristine git checkout
    assert cfg.efficient_attention_backend == "torch"  # xformers 0.0.33 has no CPU kernel
    assert cfg.transformer_lm.memory_efficient  # custom attention: the released checkpoints' key names


def test_cpu_preset_runs_without_cuda():
    cfg = compose(["solver=finetune/cpu_tiny"])
    assert cfg.device == "cpu" and not cfg.autocast and cfg.dataset.num_workers == 0
    # one thread: on shared cores torch's OpenMP threads spin-wait (the demo under a test run's load, issue 26)
    assert cfg.num_threads == 1


def test_config_resolves_without_user(monkeypatch):
    """Upstream's config.yaml and teams files interpolate ${oc.env:USER} (InterpolationResolutionError)."""
    from audiocraft.environment import AudioCraftEnvironment

    monkeypatch.delenv("USER", raising=False)
    cfg = compose(["solver=finetune/cpu_tiny"])
    assert cfg.dora.dir == os.environ["AUDIOCRAFT_DORA_DIR"]
    AudioCraftEnvironment.reset()
    try:
        assert str(AudioCraftEnvironment.get_dora_dir()) == os.environ["AUDIOCRAFT_DORA_DIR"]
    finally:
        AudioCraftEnvironment.reset()


def test_signature_ignores_overrides_equal_to_defaults():
    """make train passes only the architecture keys that differ; equal ones would not change the name anyway."""
    from musicgen_finetune.train import main

    base = ["solver=finetune/musicgen_small", "datasource.train=/d/train", "datasource.valid=/d/valid"]
    plain = main.get_xp(base)
    assert main.get_xp([*base, "transformer_lm.dim=1024"]).sig == plain.sig
    assert main.get_xp([*base, "transformer_lm.dim=64"]).sig != plain.sig
    assert main.get_xp(list(base)).sig == plain.sig


def test_signature_reflects_lora_settings():
    from musicgen_finetune.train import main

    base = ["datasource.train=/d/train", "datasource.valid=/d/valid"]
    full = main.get_xp(["solver=finetune/musicgen_small", *base]).sig
    lora = main.get_xp(["solver=finetune/musicgen_small_lora", *base]).sig
    rank8 = main.get_xp(["solver=finetune/musicgen_small_lora", "lora.rank=8", *base]).sig
    assert len({full, lora, rank8}) == 3
    disabled = main.get_xp(["solver=finetune/musicgen_small", "lora.enabled=false", *base]).sig
    assert disabled == full  # LoRA off changes nothing


def test_lora_preset_defaults():
    cfg = compose(["solver=finetune/musicgen_small_lora"])
    assert cfg.lora.enabled and (cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout) == (12, 24, 0.1)
    assert cfg.lora.targets == "attention" and cfg.solver == "musicgen_finetune"
    assert not compose(["solver=finetune/musicgen_small"]).lora.enabled


def test_runs_without_a_base_model_are_refused():
    """ac#277: a run without continue_from would silently train from scratch."""
    from musicgen_finetune.train import check_required

    cfg = compose(
        [
            "solver=finetune/cpu_tiny",
            "datasource.train=/d/train",
            "datasource.valid=/d/valid",
            "compression_model_checkpoint=//pretrained//m",
        ]
    )
    with pytest.raises(ValueError, match="random weights"):
        check_required(cfg)
    cfg.continue_from = "//pretrained//m"
    check_required(cfg)


def test_launch_checks_preset_and_batch_before_training():
    from musicgen_finetune import launch

    with pytest.raises(launch.LaunchError, match="no config/solver/finetune/nope_lora.yaml"):
        launch.check_preset("finetune/nope_lora")
    launch.check_preset("finetune/musicgen_small_lora")
    cfg = compose(["solver=finetune/musicgen_small", "dataset.batch_size=2", "optim.grad_accum_steps=4"])
    with pytest.raises(launch.LaunchError, match="optim.grad_accum_steps=4"):
        launch.check_batch(cfg, 1)
    launch.check_batch(compose(["solver=finetune/musicgen_small"]), 1)


@pytest.mark.parametrize(
    "cuda, bf16, expected", [(True, True, "bfloat16"), (True, False, "float16"), (False, False, "bfloat16")]
)
def test_auto_precision_is_bf16_where_supported_else_fp16(monkeypatch, cuda, bf16, expected):
    from musicgen_finetune.solver import describe_precision, resolve_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    cfg = compose(["solver=finetune/musicgen_small", f"device={'cuda' if cuda else 'cpu'}"])
    resolve_precision(cfg)
    assert cfg.autocast_dtype == expected
    assert ("loss scaling" in describe_precision(cfg)) == (expected == "float16")


@pytest.mark.parametrize("preset", ["musicgen_small_lowmem", "musicgen_small_lowmem_lora"])
def test_low_memory_presets_checkpoint_activations(preset):
    cfg = compose([f"solver=finetune/{preset}"])
    assert cfg.transformer_lm.checkpointing == "torch"
    assert cfg.optim.grad_accum_steps == "auto"  # planned with checkpointing on
    assert cfg.lora.enabled == preset.endswith("_lora")


def test_snapshot_does_not_undo_the_presets_runtime_choices(tiny_model):
    """The snapshot's xp.cfg says checkpointing: none (how it was trained); the _lowmem preset's choice stands."""
    files = model_dir.check(tiny_model)
    assert files.xp_cfg.transformer_lm.checkpointing == "none"
    composed = compose(["solver=finetune/musicgen_small_lowmem"])
    overrides = xp_cfg.architecture_overrides(files.xp_cfg, composed)
    assert overrides and not [o for o in overrides if o.startswith("transformer_lm.checkpointing")]
    assert compose(["solver=finetune/musicgen_small_lowmem", *overrides]).transformer_lm.checkpointing == "torch"


@pytest.mark.parametrize(
    "key, accepted, refused",
    [
        # a dropout probability of 1 drops every input: nothing would train
        ("lora.dropout", [0, 0.1, 0.999], [1, 1.0, 1.5, -0.1]),
        # a share of 1 leaves none of the run's own data in an epoch, 0 none of the replayed
        ("replay.share", [0.001, 0.2, 0.999], [0, 1, 1.0, 1.5]),
        ("prior.ratio", [0.01, 1, 4.0], [0, -1]),
        ("prior.weight", [0, 0.5, 2], [-0.1]),
    ],
)
def test_value_checks_accept_exactly_what_the_code_using_the_value_accepts(key, accepted, refused):
    """config.ALLOWED refuses a value before anything starts; the bounds (worked out above from what each value
    means) must also be those of the code that uses it later, so nothing it refuses passes the early check."""
    from musicgen_finetune import lora, prior, replay
    from musicgen_finetune.config import ALLOWED, OverrideError, check_values

    def used(value) -> bool:
        """Whether the code reading `key` takes `value`."""
        try:
            if key == "lora.dropout":
                lora.LoraConfig(enabled=True, dropout=value)
            elif key == "replay.share":
                replay.mixed_rows([{"path": "own.wav"}], [{"path": "general.wav"}], value)
            else:
                prior.PriorConfig(prompts=["p"], **{key.split(".")[1]: value}).check()
        except (lora.LoraConfigError, replay.ReplayConfigError, prior.PriorConfigError):
            return False
        return True

    for value in accepted:
        assert ALLOWED[key].problem(key, value) is None and used(value), value
    for value in refused:
        assert ALLOWED[key].problem(key, value) is not None and not used(value), value
    section, name = key.split(".")
    with pytest.raises(OverrideError, match=f"^{key}={refused[0]}: must be"):
        check_values(OmegaConf.create({section: {name: refused[0]}}))


def test_closest_keys_are_close_spellings_then_keys_of_the_same_last_name():
    from musicgen_finetune.config import closest_keys

    known = ["optim.epochs", "optim.ema.epochs", "a.b.c.epochs", "lora.rank", "x.y"]
    # optim.epochs is a close spelling of the whole key; then the keys ending in .epochs, at any depth
    assert closest_keys("train.optim.epochs", known) == ["optim.epochs", "optim.ema.epochs", "a.b.c.epochs"]
    assert closest_keys("epochs", known + ["zz.zz.zz.epochs"]) == ["optim.epochs", "optim.ema.epochs", "a.b.c.epochs"]
    assert closest_keys("epochs", known, count=2) == ["optim.epochs", "optim.ema.epochs"]
    # two spellings one edit away, the closer first (difflib's ratio: 0.968 and 0.966)
    assert closest_keys("optim.max_norms", ["optim.max_norm", "optim.max_norm_s"]) == [
        "optim.max_norm_s",
        "optim.max_norm",
    ]
    # within 0.03 of the closest only: an exact spelling leaves out one a letter off (ratio 0.875)
    assert closest_keys("abcdefgh", ["abcdefgX", "abcdefgh"]) == ["abcdefgh"]
    assert closest_keys("abcd", ["abce"]) == ["abce"]  # a ratio of exactly 0.75 is close enough
    assert closest_keys("abcd", []) == []
