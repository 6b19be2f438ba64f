"""The checks of a local model folder, and the overrides that make training use it offline."""

import shutil

import pytest
import torch
from omegaconf import OmegaConf

from musicgen_finetune.config import compose, hydra_value
from musicgen_finetune.models import folder as model_dir
from musicgen_finetune.models import xp_cfg
from musicgen_finetune.models.open import open_model


def copy_model(tiny_model, tmp_path, name="model"):
    target = tmp_path / name
    shutil.copytree(tiny_model, target)
    return target


def test_tiny_model_passes(tiny_model):
    files = model_dir.check(tiny_model)
    assert files.lm == tiny_model / "state_dict.bin" and files.t5 == tiny_model / "t5"
    assert files.tensors == len(torch.load(files.lm, weights_only=True)["best_state"])


def test_missing_weights_are_named(tiny_model, tmp_path):
    model = copy_model(tiny_model, tmp_path)
    (model / "compression_state_dict.bin").unlink()
    with pytest.raises(model_dir.ModelDirError, match="lacks compression_state_dict.bin"):
        model_dir.check(model)


def test_transformers_format_folder_gets_a_hint(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(model_dir.ModelDirError, match="only 'musicgen' converts"):
        open_model(tmp_path)  # what MODEL= goes through: a transformers folder is converted, this one cannot be
    with pytest.raises(model_dir.ModelDirError, match="has transformers files"):
        model_dir.check(tmp_path)  # the check alone only reads, and says what it sees


def test_a_parent_folder_names_the_model_below_it(tiny_model, tmp_path):
    """MODEL=<the folder holding the model>, or a hub cache's models--... folder: the line names the folder below."""
    copy_model(tiny_model, tmp_path / "models", "musicgen-small")
    (tmp_path / "models" / "notes").mkdir()
    with pytest.raises(model_dir.ModelDirError, match=f"MODEL={tmp_path / 'models' / 'musicgen-small'}\\.$"):
        open_model(tmp_path / "models")
    cache = tmp_path / "models--facebook--musicgen-small"
    copy_model(tiny_model, cache / "snapshots", "0123abc")
    with pytest.raises(model_dir.ModelDirError, match=f"below it: MODEL={cache / 'snapshots' / '0123abc'}"):
        open_model(cache)
    with pytest.raises(model_dir.ModelDirError, match="lacks state_dict.bin"):
        open_model(tmp_path / "models" / "notes")  # nothing below either: the usual line


def test_adapters_given_as_model_suggest_adapter(tmp_path):
    adapters = tmp_path / "adapters.safetensors"
    adapters.write_bytes(b"")
    (tmp_path / "adapters.safetensors.json").write_text("{}")
    with pytest.raises(
        model_dir.ModelDirError, match=f"a LoRA adapter file, not a model: give it as ADAPTER={adapters},"
    ):
        open_model(adapters)
    peft = tmp_path / "peft"
    peft.mkdir()
    (peft / "adapter_config.json").write_text("{}")
    with pytest.raises(
        model_dir.ModelDirError, match=f"a PEFT adapter folder, not a model: give it as ADAPTER={peft},"
    ):
        open_model(peft)


def test_training_checkpoint_is_not_a_model(tiny_model, tmp_path):
    model = copy_model(tiny_model, tmp_path)
    torch.save({"model": {}, "xp.cfg": "{}"}, model / "state_dict.bin")
    with pytest.raises(model_dir.ModelDirError, match="make export"):
        model_dir.check(model)


def test_compression_file_pointing_at_the_hub_is_refused(tiny_model, tmp_path):
    """ac#489: exported compression files that only name a hub model."""
    model = copy_model(tiny_model, tmp_path)
    torch.save({"pretrained": "facebook/encodec_32khz", "best_state": {}}, model / "compression_state_dict.bin")
    with pytest.raises(model_dir.ModelDirError, match="facebook/encodec_32khz"):
        model_dir.check(model)


def rename_t5(model, name):
    package = torch.load(model / "state_dict.bin", weights_only=True)
    cfg = OmegaConf.create(package["xp.cfg"])
    cfg.conditioners.description.t5.name = name
    package["xp.cfg"] = OmegaConf.to_yaml(cfg)
    torch.save(package, model / "state_dict.bin")


def test_missing_t5_lists_where_it_looked(tiny_model, tmp_path, monkeypatch):
    model = copy_model(tiny_model, tmp_path)
    t5 = tmp_path / "elsewhere" / "t5-base"
    shutil.move(model / "t5", t5)
    rename_t5(model, "t5-base")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    with pytest.raises(model_dir.ModelDirError) as err:
        model_dir.check(model)
    assert str(model / "t5") in str(err.value) and "T5=" in str(err.value)
    assert str(tmp_path / "hf" / "hub" / "models--t5-base") in str(err.value)
    assert model_dir.check(model, t5=t5).t5 == t5  # T5= wins


def test_t5_is_found_in_the_hugging_face_cache(tiny_model, tmp_path, monkeypatch):
    model = copy_model(tiny_model, tmp_path)
    rename_t5(model, "t5-base")
    snapshot = tmp_path / "hf" / "hub" / "models--google-t5--t5-base" / "snapshots" / "abc123"
    shutil.move(model / "t5", snapshot)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    assert model_dir.check(model).t5 == snapshot


def test_bad_explicit_t5_is_named(tiny_model, tmp_path):
    with pytest.raises(model_dir.ModelDirError, match=f"T5={tmp_path} is not a T5 folder"):
        model_dir.check(tiny_model, t5=tmp_path)


def test_pretrained_overrides_point_at_the_folder(tiny_model):
    from musicgen_finetune.launch import pretrained_overrides

    overrides = pretrained_overrides(model_dir.check(tiny_model))
    assert f"continue_from=//pretrained/{tiny_model}" in overrides  # //pretrained/ + /abs/path
    assert f"compression_model_checkpoint=//pretrained/{tiny_model}" in overrides
    assert f"conditioners.description.t5.name={tiny_model / 't5'}" in overrides


def test_architecture_comes_from_the_snapshot(tiny_model):
    files = model_dir.check(tiny_model)
    run_cfg = compose(["solver=finetune/cpu_tiny"])
    overrides = xp_cfg.architecture_overrides(files.xp_cfg, run_cfg)
    applied = compose(["solver=finetune/cpu_tiny", *overrides])
    for section in ("transformer_lm", "codebooks_pattern"):
        assert OmegaConf.to_container(applied[section]) == OmegaConf.to_container(files.xp_cfg[section])
    assert not any("t5.name" in o for o in overrides)


def test_architecture_overrides_are_empty_for_a_matching_model():
    run_cfg = compose(["solver=finetune/musicgen_small"])
    assert xp_cfg.architecture_overrides(run_cfg, run_cfg) == []


@pytest.mark.parametrize(
    "value, text",
    [
        (None, "null"),
        (True, "true"),
        (3, "3"),
        (0.5, "0.5"),
        ([0, 1, 2], "[0,1,2]"),
        ("delay", "delay"),
        ("a b", "'a b'"),
        ("it's", "'it\\'s'"),
    ],
)
def test_hydra_values(value, text):
    assert hydra_value(value) == text


def test_state_dict_report():
    model = {"a": torch.zeros(2), "b": torch.zeros(3), "c": torch.zeros(1)}
    loaded = {"a": torch.ones(2), "b": torch.ones(4), "x": torch.ones(1)}
    report = model_dir.compare_state_dicts(model, loaded)
    assert (report.matched, report.missing, report.unexpected, report.mismatched) == (1, ["c"], ["x"], ["b"])


def test_unresolvable_keys_outside_the_architecture_are_ignored(tiny_model):
    """A released xp.cfg carries e.g. dora.dir: /checkpoint/${oc.env:USER}/...; only the architecture is read."""
    files = model_dir.check(tiny_model)
    snapshot = OmegaConf.create(OmegaConf.to_yaml(files.xp_cfg))
    snapshot.dora.dir = "/checkpoint/${oc.env:NO_SUCH_VARIABLE_HERE}/outputs"
    run_cfg = compose(["solver=finetune/cpu_tiny"])
    assert xp_cfg.architecture_overrides(snapshot, run_cfg) == xp_cfg.architecture_overrides(files.xp_cfg, run_cfg)


def test_unreadable_model_file_is_named(tiny_model, tmp_path):
    model = copy_model(tiny_model, tmp_path)
    (model / "state_dict.bin").write_bytes(b"this is not a torch file")
    with pytest.raises(model_dir.ModelDirError, match="state_dict.bin is not a readable torch file"):
        model_dir.check(model)
