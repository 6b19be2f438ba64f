"""`make export` and `make generate` on the tiny runs: model folders AudioCraft loads, reproducible audio."""

import json
import shutil
from pathlib import Path

import pytest
import soundfile as sf
import torch
from conftest import one_error_line, run_tool, xp_folder

from musicgen_finetune import export, generate, lora
from musicgen_finetune.checkpoints import resolve_best_state
from musicgen_finetune.experiments import ExperimentNotFoundError
from musicgen_finetune.models import folder as model_dir
from musicgen_finetune.patches import safe_load

PROMPT = "hip hop 808 beat, 140 bpm"


@pytest.fixture(scope="module")
def full_export(first_run, tmp_path_factory):
    return export.export(xp_folder(first_run).name, tmp_path_factory.mktemp("exports") / "full")


@pytest.fixture(scope="module")
def lora_export(lora_run, tmp_path_factory):
    return export.export(str(xp_folder(lora_run)), tmp_path_factory.mktemp("exports") / "lora")


def test_full_export_has_the_snapshot_layout_and_the_best_state(full_export, first_run, tiny_model):
    checkpoint = safe_load(xp_folder(first_run) / "checkpoint.th")
    package = torch.load(full_export / "state_dict.bin", weights_only=True)
    assert set(package) == {"best_state", "xp.cfg", "version", "exported"} and isinstance(package["xp.cfg"], str)
    for key, value in resolve_best_state(xp_folder(first_run), checkpoint)["model"].items():
        assert torch.equal(package["best_state"][key], value), key
    assert (full_export / "compression_state_dict.bin").read_bytes() == (
        tiny_model / "compression_state_dict.bin"
    ).read_bytes()
    info = json.loads((full_export / "export.json").read_text())
    history = checkpoint["history"]
    assert info["valid_ce"] == min(e["valid"]["ce"] for e in history) and info["epochs_trained"] == len(history)
    assert info["base_model"] == str(tiny_model) and info["lora"] is None


def test_last_state_on_request(first_run, tmp_path):
    out = export.export(xp_folder(first_run).name, tmp_path / "last", which="last")
    checkpoint = safe_load(xp_folder(first_run) / "checkpoint.th")
    package = torch.load(out / "state_dict.bin", weights_only=True)
    for key, value in checkpoint["model"].items():
        assert torch.equal(package["best_state"][key], value), key


def test_export_loads_with_audiocraft_own_loaders(full_export, first_run):
    """Upstream's loaders, with our patches (the T5 is a local folder)."""
    from audiocraft.models import loaders

    from musicgen_finetune import patches

    patches.apply()
    lm = loaders.load_lm_model(str(full_export))
    compression = loaders.load_compression_model(str(full_export))
    assert lm.card == compression.cardinality and lm.num_codebooks == compression.num_codebooks
    # MusicGen.get_pretrained builds from these two loaders (its own constructor then asserts a generation window
    # longer than the tiny model's 1 s segments, so the test calls them directly): the weights are the run's
    checkpoint = safe_load(xp_folder(first_run) / "checkpoint.th")
    loaded = lm.state_dict()
    for key, value in resolve_best_state(xp_folder(first_run), checkpoint)["model"].items():
        assert torch.equal(loaded[key].float(), value.float()), key


def test_best_is_the_lowest_validation_loss_not_the_last_epoch(first_run, tmp_path):
    """A run whose best epoch (1) is not its last (3): WHICH=best exports epoch 1's state, WHICH=last epoch 3's."""
    folder = tmp_path / "xps" / "best-is-first"
    shutil.copytree(xp_folder(first_run), folder)
    checkpoint = safe_load(folder / "checkpoint.th")
    best = {k: v + 1 if v.is_floating_point() else v for k, v in checkpoint["model"].items()}  # unlike the last
    checkpoint["best_state"]["model"] = best
    checkpoint["history"][0]["valid"]["ce"] = 0.5  # the lowest: epoch 1 is the best
    torch.save(checkpoint, folder / "checkpoint.th")
    for which, epoch, expected in (("best", 1, best), ("last", 3, checkpoint["model"])):
        out = export.export(str(folder), tmp_path / which, which=which)
        package = torch.load(out / "state_dict.bin", weights_only=True)["best_state"]
        assert all(torch.equal(package[key], value) for key, value in expected.items()), which
        info = json.loads((out / "export.json").read_text())
        assert info["epoch"] == epoch and info["valid_ce"] == checkpoint["history"][epoch - 1]["valid"]["ce"]
        assert json.loads((out / "history.json").read_text()) == checkpoint["history"]


def test_generation_is_reproducible_and_longer_than_training_segments(full_export, tmp_path):
    """The tiny runs trained on 1 s segments; generation asks for 3 s, twice with the same seed."""
    first = generate.generate(
        full_export,
        PROMPT,
        tmp_path / "a",
        sampling=generate.Sampling(duration=3.0, top_k=50),
        seeds=[7],
        progress=False,
    )
    again = generate.generate(
        full_export,
        PROMPT,
        tmp_path / "b",
        sampling=generate.Sampling(duration=3.0, top_k=50),
        seeds=[7, 8],
        progress=False,
    )
    items = json.loads((again / "generated.json").read_text())["items"]
    assert [(i["seed"], i["prompt"], i["seconds"]) for i in items] == [(7, PROMPT, 3.0), (8, PROMPT, 3.0)]
    wav_a, rate = sf.read(first / items[0]["file"])
    wav_b, _ = sf.read(again / items[0]["file"])
    wav_other, _ = sf.read(again / items[1]["file"])
    assert rate == 32000 and len(wav_a) == 3 * rate
    assert (wav_a == wav_b).all() and not (wav_a == wav_other).all()


def test_lora_export_merged_equals_base_plus_adapters(lora_export, lora_model, tmp_path):
    assert (lora_export / "adapters.safetensors").is_file()
    saved = json.loads(lora.config_path(lora_export / "adapters.safetensors").read_text())
    assert saved["base_hash"] == lora.base_model_hash(
        torch.load(lora_model / "state_dict.bin", weights_only=True)["best_state"]
    )
    merged = generate.generate(
        lora_export,
        PROMPT,
        tmp_path / "merged",
        sampling=generate.Sampling(duration=1.0, top_k=50),
        seeds=[3],
        progress=False,
    )
    adapted = generate.generate(
        lora_model,
        PROMPT,
        tmp_path / "adapter",
        sampling=generate.Sampling(duration=1.0, top_k=50),
        seeds=[3],
        adapter=str(lora_export / "adapters.safetensors"),
        progress=False,
    )
    base = generate.generate(
        lora_model,
        PROMPT,
        tmp_path / "base",
        sampling=generate.Sampling(duration=1.0, top_k=50),
        seeds=[3],
        progress=False,
    )
    name = json.loads((merged / "generated.json").read_text())["items"][0]["file"]
    assert (sf.read(merged / name)[0] == sf.read(adapted / name)[0]).all()
    assert not (sf.read(merged / name)[0] == sf.read(base / name)[0]).all()  # the adapters do something


def test_adapter_for_another_base_is_refused(lora_export, full_export):
    with pytest.raises(lora.AdapterMismatchError, match="was trained on base model"):
        generate.load(full_export, adapter=lora_export / "adapters.safetensors")


def test_bad_generation_input_fails_before_loading(tmp_path, full_export):
    empty = tmp_path / "prompts.txt"
    empty.write_text("# only a comment\n\n")
    with pytest.raises(generate.GenerationError, match="has no prompt"):
        generate.generate(full_export, str(empty), tmp_path / "out")
    with pytest.raises(generate.GenerationError, match="DURATION=0"):
        generate.generate(full_export, PROMPT, tmp_path / "out", sampling=generate.Sampling(duration=0))
    with pytest.raises(generate.GenerationError, match="TOP_K=250 is more than the 64 codes"):
        generate.generate(full_export, PROMPT, tmp_path / "out", sampling=generate.Sampling(duration=1.0, top_k=250))
    with pytest.raises(model_dir.ModelDirError, match="is not a folder"):
        generate.load(tmp_path / "no-model")
    with pytest.raises(generate.GenerationError, match="does not exist"):
        generate.load(full_export, adapter=tmp_path / "missing.safetensors")


def test_the_default_top_k_fits_a_model_with_fewer_codes(tmp_path, full_export, capfd):
    """The tiny model's codebooks have 64 codes: MusicGen's default top-k of 250 becomes 64, said on stderr, in
    make generate and in load() (whose MusicGen would otherwise fail in torch.topk)."""
    out = generate.generate(full_export, PROMPT, tmp_path / "out", sampling=generate.Sampling(duration=0.5))
    assert json.loads((out / "generated.json").read_text())["settings"]["top_k"] == 64
    assert "top-k: 64" in capfd.readouterr().err
    model = generate.load(full_export)
    assert model.generation_params["top_k"] == 64
    model.set_generation_params(duration=0.2, top_k=model.generation_params["top_k"])
    assert model.generate(["a beat"]).shape[-1] > 0


def test_export_errors_name_the_experiment(tmp_path, first_run):
    with pytest.raises(ExperimentNotFoundError, match=f"Experiments with a checkpoint: .*{xp_folder(first_run).name}"):
        export.export("nosuchsig")
    with pytest.raises(export.ExportError, match="WHICH='worst'"):
        export.export(xp_folder(first_run).name, tmp_path / "x", which="worst")


def test_generate_command_writes_one_wav_per_prompt_and_seed(full_export, workdir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("808 beat one\n# skipped\n808 beat two\n")
    result = run_tool(
        [
            "tools/generate.py",
            "--model",
            str(full_export),
            "--prompts",
            str(prompts),
            "--duration",
            "1",
            "--seeds",
            "0,1",
            "--top-k",
            "50",
            "--out",
            str(tmp_path / "wavs"),
        ],
        workdir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((tmp_path / "wavs" / "generated.json").read_text())
    assert len(manifest["items"]) == 4 and manifest["settings"]["top_k"] == 50
    assert all((tmp_path / "wavs" / item["file"]).is_file() for item in manifest["items"])


def test_each_generate_command_writes_a_folder_of_its_own_and_never_over_another(full_export, workdir):
    def run(*args):
        return run_tool(["tools/generate.py", "--model", str(full_export), "--duration", "0.5", *args], workdir)

    def folder_of(result):
        assert result.returncode == 0, result.stderr[-3000:]
        last = result.stdout.strip().splitlines()[-1]
        assert last.startswith("Generated into ")
        return Path(last.split()[2])

    first, second = folder_of(run("--text", "boom")), folder_of(run("--prompts", "two words"))
    assert first != second and first.parent == second.parent == workdir / "output" / "samples" / full_export.name
    assert [i["prompt"] for i in json.loads((first / "generated.json").read_text())["items"]] == ["boom"]
    assert [i["prompt"] for i in json.loads((second / "generated.json").read_text())["items"]] == ["two words"]
    listed = sorted(first.parent.iterdir())
    again = run("--text", "boom", "--out", str(first))
    assert again.returncode == 2 and "already holds the samples of another run" in one_error_line(again.stderr)
    word = run("--prompts", "prompts")
    assert word.returncode == 2 and "TEXT=prompts" in one_error_line(word.stderr)
    assert sorted(first.parent.iterdir()) == listed  # no folder left by the refusals


def test_prompts_is_a_file_or_words_and_text_is_always_the_prompt(tmp_path):
    listed = tmp_path / "prompts"
    listed.write_text("one\n# not this\ntwo words\n")
    assert generate.read_prompts(str(listed)) == ["one", "two words"]
    assert generate.read_prompts("a trap beat") == ["a trap beat"]
    assert generate.read_prompts(str(listed), text=True) == [str(listed)]
    with pytest.raises(generate.GenerationError, match="TEXT=boom"):
        generate.read_prompts("boom")
    with pytest.raises(generate.GenerationError, match="TEXT is empty"):
        generate.read_prompts(" ", text=True)
