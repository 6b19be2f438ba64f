"""The embedded default model: deterministic, in the musicgen-small layout, loadable by AudioCraft's loaders."""

import torch
from omegaconf import OmegaConf

from musicgen_finetune import environment

environment.prepare()


def test_tiny_model_is_deterministic(tiny_model, tmp_path):
    from musicgen_finetune.models.tiny import write_tiny_model

    again = write_tiny_model(tmp_path / "again", seed=0)
    for name in ("state_dict.bin", "compression_state_dict.bin", "t5/model.safetensors", "t5/spiece.model"):
        assert (again / name).read_bytes() == (tiny_model / name).read_bytes(), name


def test_tiny_model_has_the_snapshot_layout(tiny_model):
    package = torch.load(tiny_model / "state_dict.bin", weights_only=True)
    assert set(package) == {"best_state", "xp.cfg", "version", "exported"}
    assert isinstance(package["xp.cfg"], str)  # a yaml string, as in the released files
    assert all(v.dtype == torch.float16 for v in package["best_state"].values() if v.is_floating_point())
    cfg = OmegaConf.create(package["xp.cfg"])
    assert cfg.lm_model == "transformer_lm" and cfg.conditioners.description.model == "t5"
    assert cfg.transformer_lm.memory_efficient  # key names of the released checkpoints
    assert any(k.startswith("transformer.layers.0.self_attn.in_proj_weight") for k in package["best_state"])


def test_compression_model_loads_with_audiocraft_and_codes_audio(tiny_model):
    from audiocraft.models.loaders import load_compression_model

    model = load_compression_model(str(tiny_model))
    assert (model.sample_rate, model.frame_rate, model.num_codebooks, model.cardinality) == (32000, 50, 4, 64)
    codes, scale = model.encode(torch.randn(1, 1, 32000) * 0.1)
    assert codes.shape == (1, 4, 50) and scale is None
    assert len(codes.unique()) > 8  # k-means-initialised codebooks, not one dead code
    assert model.decode(codes).shape == (1, 1, 32000)
