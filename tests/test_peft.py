"""LoRA adapters shared with transformers + PEFT (models/hf/peft_lora.py), with PEFT itself as the oracle: our
adapters exported to a PEFT folder and loaded by `PeftModel` onto transformers' MusicGen give our logits, and an
adapter made with peft's own API on a tiny transformers MusicGen gives, loaded here as ADAPTER=, the logits PEFT
computes. All offline, float32, on the tiny random transformers MusicGen of test_hf_bridge.py and its import."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import DATASET, run_tool, train, xp_folder
from safetensors.torch import load_file, save_file
from test_hf_bridge import CARD, N_Q, audiocraft_conditions, build_hf_model, delayed_sequence

from musicgen_finetune import UserError, environment, launch, lora
from musicgen_finetune.generate import load
from musicgen_finetune.models import xp_cfg
from musicgen_finetune.models.hf import convert as hf_bridge
from musicgen_finetune.models.hf import peft_lora
from musicgen_finetune.models.open import open_model

environment.prepare()

LOGITS_ATOL = 1e-5  # float32: PEFT adds B(A(x)) * scale to each projection, ours merges B A * scale into the weights
PROMPT = "hip hop 808 beat with trap drums"
# what the public MusicGen "dreamboothing" script adapts: q/k/v/out_proj of self- and cross-attention, fc1/fc2, the
# text projection and every output head
DREAMBOOTH_TARGETS = ["enc_to_dec_proj", "k_proj", "v_proj", "q_proj", "out_proj", "fc1", "fc2"] + [
    f"lm_heads.{k}" for k in range(N_Q)
]


def peft_adapter(hf_model: Path, out: Path, seed: int = 0, **settings) -> Path:
    """A PEFT LoRA folder made with peft's own API on `hf_model`, every lora_B non-zero (as after training)."""
    from peft import LoraConfig, get_peft_model
    from transformers import MusicgenForConditionalGeneration

    model = get_peft_model(MusicgenForConditionalGeneration.from_pretrained(hf_model), LoraConfig(**settings))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    model.save_pretrained(out)
    return out


def randomize_adapters(lm, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in lora.adapter_parameters(lm).items():
            if name.endswith("lora_B"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)


def unmerged_lm(folder: Path):
    """The LM of a model folder, as `generate.load` builds it but without adapters (so they can be saved)."""
    files = open_model(folder)
    return xp_cfg.build_lm(files.xp_cfg, torch.load(files.lm, weights_only=True)["best_state"], t5=files.t5).eval()


def base_state(folder: Path) -> dict:
    return torch.load(open_model(folder).lm, weights_only=True)["best_state"]


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory) -> Path:
    return build_hf_model(tmp_path_factory.mktemp("peft-hf") / "tiny-hf-musicgen")


@pytest.fixture(scope="module")
def imported(hf_model, tmp_path_factory) -> Path:
    return hf_bridge.import_hf(hf_model, tmp_path_factory.mktemp("peft-imported") / "tiny-imported")


@pytest.fixture(scope="module")
def sequence(imported):
    return delayed_sequence(unmerged_lm(imported), batch=1, steps=12, seed=3)


@pytest.fixture(scope="module")
def user_adapter(hf_model, tmp_path_factory) -> Path:
    """A transformers user's adapter, as the dreamboothing script makes it (rank 4 here, alpha 16, dropout 0.05)."""
    folder = tmp_path_factory.mktemp("peft-user") / "my-lora"
    return peft_adapter(hf_model, folder, r=4, lora_alpha=16, lora_dropout=0.05, target_modules=DREAMBOOTH_TARGETS)


def audiocraft_logits(lm, sequence):
    with torch.no_grad():
        return lm(sequence, [], condition_tensors=audiocraft_conditions(lm, [PROMPT])[1])


def transformers_logits(model, hf_model: Path, sequence):
    """transformers' whole forward (T5, projection, decoder) on the same prompt and codes."""
    from transformers import AutoProcessor

    inputs = AutoProcessor.from_pretrained(hf_model)(text=[PROMPT], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs, decoder_input_ids=sequence.reshape(N_Q, -1)).logits
    return logits.reshape(1, N_Q, sequence.shape[-1], CARD)


def peft_model(hf_model: Path, folder: Path):
    from peft import PeftModel
    from transformers import MusicgenForConditionalGeneration

    return PeftModel.from_pretrained(MusicgenForConditionalGeneration.from_pretrained(hf_model), folder).eval()


def plain_model(hf_model: Path):
    from transformers import MusicgenForConditionalGeneration

    return MusicgenForConditionalGeneration.from_pretrained(hf_model).eval()


@pytest.mark.parametrize(
    "targets, layers, alpha",
    # a fractional alpha too: PEFT scales by lora_alpha / r whatever its type, so 2.5 must reach it as 2.5
    [("attention_ff", None, 6.0), (list(lora.ALLOWED_TARGETS), [1], 2.5)],
    ids=["attention_ff", "everything-in-layer-1"],
)
def test_our_adapter_exported_gives_our_logits_in_peft(hf_model, imported, sequence, targets, layers, alpha, tmp_path):
    from peft import get_peft_model_state_dict
    from peft.tuners.lora import LoraLayer

    lm = unmerged_lm(imported)
    config = lora.LoraConfig(enabled=True, rank=4, alpha=alpha, dropout=0.1, targets=targets, layers=layers)
    names = lora.inject(lm, config)
    randomize_adapters(lm)
    path = lora.save_adapters(lm, tmp_path / "adapters.safetensors", config)
    ours = audiocraft_logits(lm.eval(), sequence)
    folder = peft_lora.export_peft(path, tmp_path / "peft", base_hf=hf_model)
    model = peft_model(hf_model, folder)
    theirs = transformers_logits(model, hf_model, sequence)
    assert (theirs - ours).abs().max() <= LOGITS_ATOL
    assert (theirs - transformers_logits(plain_model(hf_model), hf_model, sequence)).abs().max() > 0.05
    written = json.loads((folder / "adapter_config.json").read_text())
    assert (written["r"], written["lora_alpha"], written["lora_dropout"]) == (4, alpha, 0.1)
    assert written["base_model_name_or_path"] == str(hf_model)
    # PEFT put LoRA on exactly the adapted modules (target_modules names nothing else), each with the file's tensors
    adapted = [module for module in model.base_model.model.modules() if isinstance(module, LoraLayer)]
    assert len(adapted) == len(names)
    assert {module.scaling["default"] for module in adapted} == {alpha / 4}
    loaded, saved = get_peft_model_state_dict(model), load_file(folder / "adapter_model.safetensors")
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)


def test_the_written_adapter_config_is_what_peft_itself_writes_for_those_settings(hf_model, imported, tmp_path):
    """PEFT is the oracle: its own LoraConfig for the same rank, alpha, dropout and targets, saved by PEFT, holds
    the same value for every key we write (PEFT's defaults included: bias, fan_in_fan_out, init, patterns, ...)."""
    from peft import LoraConfig

    lm = unmerged_lm(imported)
    config = lora.LoraConfig(enabled=True, rank=4, alpha=6.0, dropout=0.1, targets="attention_ff")
    lora.inject(lm, config)
    folder = peft_lora.export_peft(
        lora.save_adapters(lm, tmp_path / "adapters.safetensors", config), tmp_path / "peft", base_hf=hf_model
    )
    written = json.loads((folder / "adapter_config.json").read_text())
    theirs = LoraConfig(
        r=4,
        lora_alpha=6,
        lora_dropout=0.1,
        target_modules=written["target_modules"],
        base_model_name_or_path=str(hf_model),
        inference_mode=True,
    )
    theirs.save_pretrained(tmp_path / "theirs")
    saved = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    # auto_mapping: PEFT fills it in when it saves from a model of no task type (PeftModel.save_pretrained)
    differing = {k: (v, saved.get(k)) for k, v in written.items() if k != "auto_mapping" and saved.get(k) != v}
    assert differing == {} and set(written) <= set(saved)


def test_a_peft_adapter_made_on_transformers_loads_as_adapter(hf_model, user_adapter, sequence, capsys):
    """The user's own transformers folder as MODEL (converted once), their PEFT folder as ADAPTER."""
    theirs = transformers_logits(peft_model(hf_model, user_adapter), hf_model, sequence)
    ours = audiocraft_logits(load(hf_model, adapter=user_adapter, device="cpu").lm, sequence)
    assert (ours - theirs).abs().max() <= LOGITS_ATOL
    assert (ours - transformers_logits(plain_model(hf_model), hf_model, sequence)).abs().max() > 0.05
    assert "records no base model hash; checked by name and shape only" in capsys.readouterr().out


def test_peft_layer_selection_converts_to_lora_layers(hf_model, imported, sequence, tmp_path):
    """layers_to_transform (PEFT's own layer filter) on q and v: ours adapts q and v of both attentions in layer 1."""
    folder = peft_adapter(
        hf_model, tmp_path / "layer-1", r=2, lora_alpha=3, target_modules=["q_proj", "v_proj"], layers_to_transform=[1]
    )
    adapter = peft_lora.read_adapter(folder, base_state(imported))
    assert adapter.config.layers == [1] and set(adapter.config.targets) == {
        "self_attn.q",
        "self_attn.v",
        "cross_attention.q",
        "cross_attention.v",
    }
    theirs = transformers_logits(peft_model(hf_model, folder), hf_model, sequence)
    ours = audiocraft_logits(load(imported, adapter=folder, device="cpu").lm, sequence)
    assert (ours - theirs).abs().max() <= LOGITS_ATOL


def test_round_trips_are_bit_equal(hf_model, imported, user_adapter, tmp_path):
    base = base_state(imported)
    # ours -> PEFT -> ours
    lm = unmerged_lm(imported)
    config = lora.LoraConfig(enabled=True, rank=3, alpha=5.5, dropout=0.2, targets="all", layers=[0])  # 5.5 read back
    lora.inject(lm, config)
    randomize_adapters(lm)
    path = lora.save_adapters(lm, tmp_path / "ours" / "adapters.safetensors", config)
    back = peft_lora.read_adapter(peft_lora.export_peft(path, tmp_path / "ours-peft", base_hf=hf_model), base)
    assert back.config == config
    assert back.base_hash == lora.base_model_hash(base)  # recorded in the folder's safetensors metadata
    original = load_file(path)
    assert back.tensors.keys() == original.keys() and all(torch.equal(back.tensors[k], original[k]) for k in original)
    # PEFT -> ours -> PEFT
    adapter = peft_lora.read_adapter(user_adapter, base)
    assert (adapter.config.rank, adapter.config.alpha, adapter.config.dropout) == (4, 16.0, 0.05)
    assert set(adapter.config.targets) == set(lora.ALLOWED_TARGETS) and adapter.config.layers is None
    lm = unmerged_lm(imported)
    lora.apply_adapters(lm, adapter.config, adapter.tensors, str(user_adapter))
    path = lora.save_adapters(lm, tmp_path / "theirs" / "adapters.safetensors", adapter.config)
    again = peft_lora.export_peft(path, tmp_path / "theirs-peft", base_hf=hf_model)
    original, converted = (load_file(f / "adapter_model.safetensors") for f in (user_adapter, again))
    assert converted.keys() == original.keys() and all(torch.equal(converted[k], original[k]) for k in original)


def test_the_recorded_base_hash_is_checked(hf_model, imported, tiny_model, tmp_path):
    """Our adapters know their base: BASE_HF= of another model is refused, and so is a PEFT folder written here on
    another base, though every shape fits."""
    lm = unmerged_lm(imported)
    config = lora.LoraConfig(enabled=True, rank=2, alpha=4.0, targets="attention")
    lora.inject(lm, config)
    path = lora.save_adapters(lm, tmp_path / "adapters.safetensors", config)
    other = build_hf_model(tmp_path / "other-hf", seed=1)
    with pytest.raises(lora.AdapterMismatchError, match=f"BASE_HF={other} is not the base"):
        peft_lora.export_peft(path, tmp_path / "refused", base_hf=other)
    assert not (tmp_path / "refused").exists()
    folder = peft_lora.export_peft(path, tmp_path / "peft", base_hf=hf_model)
    assert lora.adapter_shapes(config, base_state(tiny_model)) == lora.adapter_shapes(config, base_state(imported))
    with pytest.raises(lora.AdapterMismatchError, match="was trained on base model"):
        peft_lora.read_adapter(folder, base_state(tiny_model))


def test_rslora_converts_exactly(hf_model, imported, sequence, tmp_path):
    """rsLoRA scales by alpha / sqrt(r): rank 6 and alpha 8 become an alpha' with alpha' / 6 the same float."""
    folder = peft_adapter(hf_model, tmp_path / "rslora", r=6, lora_alpha=8, use_rslora=True, target_modules=["fc1"])
    adapter = peft_lora.read_adapter(folder, base_state(imported))
    assert adapter.config.scale == 8 / math.sqrt(6) and adapter.config.alpha != 8
    theirs = transformers_logits(peft_model(hf_model, folder), hf_model, sequence)
    ours = audiocraft_logits(load(imported, adapter=folder, device="cpu").lm, sequence)
    assert (ours - theirs).abs().max() <= LOGITS_ATOL


def made_by_peft(**settings):
    """An adapter made with peft's own API on the transformers model (rank 4, alpha 8, and `settings`)."""
    return lambda hf_model, user_adapter, out: peft_adapter(hf_model, out, r=4, lora_alpha=8, **settings)


def edited(config=None, tensors=None):
    """A copy of the user's adapter with `config` merged into its adapter_config.json and its tensors passed
    through `tensors`."""

    def make(hf_model: Path, user_adapter: Path, out: Path) -> Path:
        shutil.copytree(user_adapter, out)
        raw = json.loads((out / "adapter_config.json").read_text())
        (out / "adapter_config.json").write_text(json.dumps({**raw, **(config or {})}))
        state = load_file(out / "adapter_model.safetensors")
        save_file(tensors(state) if tensors else state, out / "adapter_model.safetensors")
        return out

    return make


Q0 = "base_model.model.decoder.model.decoder.layers.0.self_attn.q_proj"


def without(*keys):
    return lambda state: {k: v for k, v in state.items() if k not in keys}


def plus(key: str, tensor: torch.Tensor):
    return lambda state: {**state, key: tensor}


REFUSALS = {  # what a transformers user can bring that has no exact equivalent here, and the words naming it
    "dora": (made_by_peft(use_dora=True, target_modules=["fc1"]), "DoRA"),
    "t5": (made_by_peft(target_modules=r"text_encoder.*\.(q|v)"), "T5 modules"),
    "embeddings": (made_by_peft(target_modules=["embed_tokens.0"]), "embeddings"),
    "some heads": (made_by_peft(target_modules=["lm_heads.0", "fc1"]), "1 of the 4 output heads"),
    "per-layer subsets": (
        made_by_peft(target_modules=r"decoder\.model\.decoder\.layers\.(0\.self_attn\.q_proj|1\.fc1)"),
        "different layers",
    ),
    "two ranks": (made_by_peft(target_modules=["fc1", "fc2"], rank_pattern={"fc2": 2}), "ranks and alphas differ"),
    "encodec": (
        edited(
            tensors=plus("base_model.model.audio_encoder.encoder.layers.0.conv.lora_A.weight", torch.zeros(4, 1, 7))
        ),
        "EnCodec modules",
    ),
    "another size": (
        edited(tensors=lambda state: {**state, f"{Q0}.lora_A.weight": torch.zeros(4, 96)}),
        "another size",
    ),
    "more layers": (
        edited(tensors=plus("base_model.model.decoder.model.decoder.layers.7.fc1.lora_A.weight", torch.zeros(4, 64))),
        "another size",
    ),
    "a missing tensor": (edited(tensors=without(f"{Q0}.lora_B.weight")), f"{Q0}.lora_B.weight"),
    "a module without tensors": (
        edited(tensors=without(f"{Q0}.lora_A.weight", f"{Q0}.lora_B.weight")),
        "have no tensors",
    ),
    "tensors of a module not selected": (
        edited(config={"target_modules": [t for t in DREAMBOOTH_TARGETS if t != "fc2"]}),
        "which it does not select (PEFT would ignore them)",
    ),
    "pissa": (edited(config={"init_lora_weights": "pissa"}), "changes the base weights"),
    "trained biases": (edited(config={"bias": "lora_only"}), "trained biases"),
    "an unknown setting": (edited(config={"use_magic": True}), "use_magic=True, which this converter does not know"),
    "ia3": (edited(config={"peft_type": "IA3"}), "only LoRA"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_what_cannot_map_is_refused_by_name(case, hf_model, imported, user_adapter, tmp_path):
    make, named = REFUSALS[case]
    folder = make(hf_model, user_adapter, tmp_path / case)
    with pytest.raises(UserError) as error:
        peft_lora.read_adapter(folder, base_state(imported))
    assert named in str(error.value) and str(folder) in str(error.value)
    if case in ("a missing tensor", "tensors of a module not selected"):  # PEFT itself loads these, only warning
        peft_model(hf_model, folder)


@pytest.fixture(scope="module")
def lora_export(lora_run, tmp_path_factory):
    from musicgen_finetune.export import export

    return export(str(xp_folder(lora_run)), tmp_path_factory.mktemp("peft-exports") / "lora")


def test_make_export_writes_a_peft_folder_that_transformers_loads_and_runs(lora_export, lora_model):
    assert json.loads((lora_export / "export.json").read_text())["peft"] == {"folder": "peft"}
    # portable: the converted base sits beside peft/ and is named relative to it, so the export moves as one folder
    moved = lora_export.parent / "moved" / "elsewhere"
    shutil.copytree(lora_export, moved)
    folder = moved / "peft"
    reference = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert reference == "../transformers-base"
    base = (folder / reference).resolve()
    assert base == moved / "transformers-base" and hf_bridge.is_hf_folder(base)  # the tiny base, converted
    assert '"<this folder>") / "../transformers-base"' in (folder / "README.md").read_text()
    sequence = delayed_sequence(unmerged_lm(lora_model), batch=1, steps=10, seed=5)
    model = peft_model(base, folder)
    ours = load(lora_model, adapter=lora_export / "adapters.safetensors", device="cpu").lm
    assert (transformers_logits(model, base, sequence) - audiocraft_logits(ours, sequence)).abs().max() <= LOGITS_ATOL
    from transformers import AutoProcessor

    inputs = AutoProcessor.from_pretrained(base)(text=[PROMPT], return_tensors="pt")
    torch.manual_seed(0)
    audio = model.generate(**inputs, do_sample=True, max_new_tokens=8, guidance_scale=3.0)
    assert audio.shape[:2] == (1, 1) and audio.shape[-1] > 0 and torch.isfinite(audio).all()
    assert "PeftModel.from_pretrained" in (folder / "README.md").read_text()


def test_export_peft_tool(lora_export, hf_model, workdir, tmp_path):
    out = tmp_path / "peft"
    log = workdir / "export_peft_network.log"
    result = run_tool(
        ["tools/export_peft.py", "--adapter", str(lora_export / "adapters.safetensors"), "--out", str(out)],
        workdir,
        extra_env={"NETWORK_GUARD_LOG": str(log)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Exported to {out}" in result.stdout and (not log.exists() or log.read_text() == "")
    made, by_export = (load_file(f / "adapter_model.safetensors") for f in (out, lora_export / "peft"))
    assert made.keys() == by_export.keys() and all(torch.equal(made[k], by_export[k]) for k in made)
    # the converted base is placed beside the folder written, never named inside our cache (output/hf_bases)
    written = json.loads((out / "adapter_config.json").read_text())
    assert written["base_model_name_or_path"] == "../transformers-base"
    assert hf_bridge.is_hf_folder(tmp_path / "transformers-base")
    # a second export beside it reuses that base; another base there is refused, never silently named
    peft_lora.export_peft(lora_export / "adapters.safetensors", tmp_path / "again")
    shutil.rmtree(tmp_path / "transformers-base")
    shutil.copytree(hf_model, tmp_path / "transformers-base")
    with pytest.raises(peft_lora.PeftAdapterError, match="holds the transformers form of another base model"):
        peft_lora.export_peft(lora_export / "adapters.safetensors", tmp_path / "other")
    assert not (tmp_path / "other").exists()
    alone = tmp_path / "alone"
    alone.mkdir()
    for name in ("adapters.safetensors", "adapters.safetensors.json"):
        shutil.copyfile(lora_export / name, alone / name)
    with pytest.raises(peft_lora.PeftAdapterError, match="no export.json beside it .* give BASE_HF="):
        peft_lora.export_peft(alone / "adapters.safetensors")


def test_training_continues_from_a_peft_folder(workdir, tiny_model, dataset, tmp_path):
    """lora.init_from=<PEFT folder>: the run starts from its adapters (with a learning rate of 0 they stay exactly
    those), and a run whose rank differs is refused with the settings that match, before anything starts."""
    from musicgen_finetune.patches import safe_load

    transformers_form = hf_bridge.export_hf(tiny_model, tmp_path / "tiny-hf")
    folder = peft_adapter(
        transformers_form,
        tmp_path / "user",
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "k_proj", "v_proj", "out_proj"],
    )
    preset = "finetune/cpu_tiny_lora"  # rank 4, alpha 8, attention: the adapter's own settings
    with pytest.raises(lora.LoraConfigError, match="rank 4 \\(this run: 8\\): add ARGS='lora.rank=4 lora.alpha=8.0"):
        launch.plan(str(tiny_model), DATASET, preset=preset, extra=[f"lora.init_from={folder}", "lora.rank=8"])
    result = train(workdir, tiny_model, preset=preset, args=f"lora.init_from={folder} optim.epochs=1 optim.lr=0")
    assert result.returncode == 0, result.stderr[-5000:]
    assert f"LoRA adapters start from {folder}" in result.stdout + result.stderr
    checkpoint = safe_load(xp_folder(result) / "checkpoint.th")
    expected = peft_lora.read_adapter(folder, base_state(tiny_model)).tensors
    assert {k for k in checkpoint["model"] if lora.is_adapter_key(k)} == set(expected)
    for key, tensor in expected.items():
        assert torch.equal(checkpoint["model"][key], tensor), key


def test_eval_with_a_peft_adapter_on_a_transformers_base(hf_model, user_adapter, dataset, tmp_path):
    """make eval BASE=<transformers folder> ADAPTER=<PEFT folder>: the user's own files, compared here."""
    from musicgen_finetune.evaluation.evaluate import EvalOptions, evaluate
    from musicgen_finetune.generate import Sampling

    sampling = Sampling(duration=1.0, top_k=50, batch_size=1)
    options = EvalOptions(str(hf_model), DATASET, adapter=str(user_adapter), prompts=PROMPT, sampling=sampling)
    options.out = str(tmp_path / "report")
    out = evaluate(options)
    report = json.loads((out / "report.json").read_text())
    models = {model["id"]: model for model in report["models"]}
    assert models["lora"]["adapter"] == str(user_adapter) and models["base"]["path"] == str(hf_model)
    valid = report["cross_entropy"]["valid"]
    assert valid["lora"] != valid["base"], valid  # the adapter changes what the model predicts
    assert {s["model"] for s in report["samples"]} == {"base", "lora"}
