"""Each run-time patch of AudioCraft, against the upstream behaviour it answers."""

import sys

import pytest
import torch
from omegaconf import OmegaConf

from musicgen_finetune import environment, patches

environment.prepare()
patches.apply()


def test_t5_conditioner_accepts_a_local_folder(tiny_model):
    from audiocraft.modules.conditioners import T5Conditioner

    t5_dir = str(tiny_model / "t5")
    conditioner = T5Conditioner(t5_dir, output_dim=16, finetune=False, device="cpu")
    assert conditioner.dim == patches.t5_width(t5_dir) == 32
    tokens = conditioner.tokenize(["hip hop 808 beat"])
    embedding, mask = conditioner(tokens)
    assert embedding.shape[-1] == 16 and mask.sum() > 0
    # unknown words would all map to <unk> (id 2): the tokenizer is a real one that knows the caption words
    assert (tokens["input_ids"][tokens["attention_mask"].bool()] != 2).all()


def test_upstream_t5_conditioner_still_rejects_local_folders(tiny_model):
    """The behaviour the patch answers (modules/conditioners.py:393); when upstream fixes it, drop the patch."""
    from audiocraft.modules.conditioners import T5Conditioner

    upstream_init = T5Conditioner.__init__.__wrapped__
    conditioner = T5Conditioner.__new__(T5Conditioner)
    with pytest.raises(AssertionError, match="Unrecognized t5 model name"):
        upstream_init(conditioner, str(tiny_model / "t5") + "/", output_dim=16, finetune=False, device="cpu")


def test_patches_apply_once():
    from audiocraft.modules.conditioners import T5Conditioner
    from audiocraft.utils import checkpoint

    init, load = T5Conditioner.__init__, checkpoint.load_checkpoint
    patches.apply()
    assert T5Conditioner.__init__ is init and checkpoint.load_checkpoint is load


def test_training_checkpoint_with_its_config_loads_with_the_safe_loader(tmp_path):
    """torch >= 2.6 refuses the pickled DictConfig of every checkpoint.th (utils/checkpoint.py:93)."""
    from audiocraft.utils import checkpoint

    cfg = OmegaConf.create({"optim": {"lr": 1e-4, "betas": [0.9, 0.95]}, "label": None})
    path = tmp_path / "checkpoint.th"
    torch.save({"xp.cfg": cfg, "model": {"w": torch.ones(2)}, "epoch": 3}, path)
    state = checkpoint.load_checkpoint(path)
    assert state["xp.cfg"].optim.lr == 1e-4 and torch.equal(state["model"]["w"], torch.ones(2))


class Payload:
    """Unpickling this would run code: it writes a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("loader", ["checkpoint", "pretrained"])
def test_file_needing_arbitrary_code_is_refused_by_name(tmp_path, loader):
    from audiocraft.models import loaders
    from audiocraft.utils import checkpoint

    marker = tmp_path / "code-ran"
    folder = tmp_path / "model"
    folder.mkdir()
    path = folder / ("checkpoint.th" if loader == "checkpoint" else "state_dict.bin")
    torch.save({"best_state": {}, "payload": Payload(str(marker))}, path)
    with pytest.raises(patches.UnsafeCheckpointError, match=str(path)):
        if loader == "checkpoint":
            checkpoint.load_checkpoint(path)
        else:
            loaders.load_lm_model_ckpt(str(folder))
    assert not marker.exists()


def test_upstream_code_importing_audiocraft_train_gets_our_entry():
    """utils/checkpoint.py:68 imports audiocraft.train, which fails outside a source checkout."""
    import musicgen_finetune.train as ours
    from audiocraft import train

    assert train is ours and sys.modules["audiocraft.train"] is ours
    assert hasattr(train, "main") and hasattr(train, "get_solver_from_sig")


def test_hub_is_switched_off_even_if_imported_first():
    """With HF_HUB_OFFLINE unset and huggingface_hub imported before us, the entry points still go offline."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    code = (
        "import huggingface_hub.constants as c; before = c.HF_HUB_OFFLINE; "
        "from musicgen_finetune import environment; environment.offline_hub(); print(before, c.HF_HUB_OFFLINE)"
    )
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.stdout.split() == ["False", "True"], result.stderr


@pytest.mark.parametrize("loader", ["safe_load", "load_package", "export"])
def test_our_own_loaders_refuse_a_file_needing_code(tmp_path, loader):
    """Every loader of ours reads user files with the weights-only unpickler: the payload never runs."""
    from musicgen_finetune import export
    from musicgen_finetune.models.folder import load_package

    marker = tmp_path / "code-ran"
    if loader == "export":  # an experiment folder whose checkpoint.th carries the payload
        path = tmp_path / "xps" / "abc" / "checkpoint.th"
        path.parent.mkdir(parents=True)
    else:
        path = tmp_path / "state_dict.bin"
    torch.save({"best_state": {"w": torch.ones(1)}, "payload": Payload(str(marker))}, path)
    with pytest.raises(patches.UnsafeCheckpointError, match=str(path)):
        {
            "safe_load": patches.safe_load,
            "load_package": load_package,
            "export": lambda p: export.export(str(p.parent), tmp_path / "out"),
        }[loader](path)
    assert not marker.exists()


def test_a_damaged_file_is_named_as_damaged_not_as_unsafe(tmp_path):
    path = tmp_path / "state_dict.bin"
    torch.save({"best_state": {"w": torch.ones(100)}}, path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(patches.UnreadableCheckpointError, match="truncated or corrupt"):
        patches.safe_load(path)
    (tmp_path / "garbage.bin").write_bytes(b"garbage")
    with pytest.raises(patches.UnreadableCheckpointError, match="garbage.bin"):
        patches.safe_load(tmp_path / "garbage.bin")


def test_the_tools_go_offline_without_the_makefile(workdir):
    """The Makefile exports HF_HUB_OFFLINE=1; a tool run without it (python tools/..., dora run) must still never
    reach the hub: importing the package switches it off."""
    import os
    import subprocess
    import sys

    from conftest import PROCESS_HOOKS, REPO

    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["PYTHONPATH"] = os.pathsep.join([str(PROCESS_HOOKS), str(REPO)])
    doctor = subprocess.run([sys.executable, "tools/doctor.py"], cwd=REPO, env=env, capture_output=True, text=True)
    assert "offline (HF_HUB_OFFLINE=1)" in doctor.stdout, doctor.stdout + doctor.stderr
    code = (
        "import musicgen_finetune, os, huggingface_hub.constants as c; print(os.environ['HF_HUB_OFFLINE'], "
        "os.environ['TRANSFORMERS_OFFLINE'], c.HF_HUB_OFFLINE)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.stdout.split() == ["1", "1", "True"], result.stderr
