"""make smoke-full's cheap part: the published musicgen-small tensor list (models/published.py, written from the
architecture) against the LM AudioCraft builds from the released config the smoke model is written with
(models/full_size.py), on the meta device (shapes only, no memory); and the stage table the smoke run writes."""

import pytest
import torch

from musicgen_finetune.models import full_size, published


@pytest.fixture(scope="module")
def full_size_lm_shapes(tmp_path_factory):
    """Tensor names and shapes of the LM built from the released config. The T5 conditioner loads its encoder with
    from_pretrained, which refuses a meta device context (transformers modeling_utils.py, from_pretrained), so that
    one load runs on the CPU: a 2-layer T5 of t5-base's width, of which only the width matters to the LM."""
    from audiocraft.models import builders
    from audiocraft.modules import conditioners
    from omegaconf import OmegaConf

    from musicgen_finetune import patches
    from musicgen_finetune.models.tiny import write_t5

    patches.apply()  # a local T5 folder as the conditioner's name (modules/conditioners.py:393)
    t5 = write_t5(tmp_path_factory.mktemp("t5") / "t5", seed=0, width=full_size.T5_BASE["d_model"])
    cfg = full_size.released_lm_config(str(t5))
    OmegaConf.set_struct(cfg, False)
    cfg.device, cfg.dtype = "meta", "float32"  # builders.py:120 moves the LM to cfg.device
    cfg.conditioners.description.t5.autocast_dtype = None  # no autocast on 'meta' (conditioners.py:399)
    from_pretrained = conditioners.T5EncoderModel.from_pretrained

    def on_cpu(*args, **kwargs):
        with torch.device("cpu"):
            return from_pretrained(*args, **kwargs)

    conditioners.T5EncoderModel.from_pretrained = on_cpu
    try:
        with torch.device("meta"):
            lm = builders.get_lm_model(cfg)
    finally:
        conditioners.T5EncoderModel.from_pretrained = from_pretrained
    return published.shapes_of(lm.state_dict())


def test_published_list_counts_the_published_parameters():
    assert published.count(published.lm_tensors()) == 420_371_456
    assert published.PARAMETERS == 420_371_456


def test_released_config_builds_the_published_tensors(full_size_lm_shapes):
    assert published.differences(full_size_lm_shapes) == []
    assert published.count(full_size_lm_shapes) == published.PARAMETERS


def test_differences_name_what_differs():
    shapes = dict(published.lm_tensors())
    del shapes["linears.3.weight"]
    shapes["transformer.layers.0.linear1.weight"] = (4097, 1024)
    shapes["transformer.layers.0.linear1.bias"] = (4096,)
    lines = published.differences(shapes)
    assert lines == [
        "1 missing: linears.3.weight",
        "1 unexpected: transformer.layers.0.linear1.bias",
        "1 shape: transformer.layers.0.linear1.weight [4097, 1024] (published [4096, 1024])",
    ]
