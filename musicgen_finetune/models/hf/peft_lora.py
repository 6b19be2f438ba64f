"""LoRA adapters between this harness (lora.py, on AudioCraft's LM) and PEFT (on transformers' MusicGen), both ways.

Every adapted module maps to one module of transformers' MusicgenForConditionalGeneration (`module_links`):

    ours (adapters.safetensors, lora.adapted_names)         PEFT (adapter_model.safetensors, after base_model.model.)
    transformer.layers.{i}.self_attn.{q,k,v}                decoder.model.decoder.layers.{i}.self_attn.{q,k,v}_proj
    transformer.layers.{i}.cross_attention.{q,k,v}          decoder.model.decoder.layers.{i}.encoder_attn.{q,k,v}_proj
    transformer.layers.{i}.{self_attn,cross_attention}.out_proj   ....layers.{i}.{self_attn,encoder_attn}.out_proj
    transformer.layers.{i}.linear1 / linear2                decoder.model.decoder.layers.{i}.fc1 / fc2
    linears.{k}                                             decoder.lm_heads.{k}
    condition_provider.conditioners.description.output_proj enc_to_dec_proj

q, k and v, one fused `in_proj_weight` in AudioCraft, are three modules in transformers: each keeps its own A and B
(`...self_attn.lora_in_proj.q.lora_A` is `...self_attn.q_proj.lora_A.weight`). A is [r, in] and B [out, r] on both
sides and the update is B A * alpha / r on both, so tensors are copied unchanged, checked one to one by name and shape
with mapping.py's `apply_rules`. What PEFT's config cannot express as ours, or ours as PEFT's, is refused with the
reason (`UnsupportedPeftAdapterError`): DoRA, biases, modules_to_save, T5 or EnCodec modules, embeddings, ranks or
alphas that differ between modules, projections adapted in some layers and not others. rsLoRA (alpha / sqrt(r)) is
converted when an alpha exists whose alpha / r is the same float.

A PEFT folder carries no hash of its base model: one made here records ours in the safetensors metadata (PEFT ignores
it) and is checked like our own files; one from a transformers user is checked against the base by name and shape
only. PEFT loads with strict=False and only warns about tensors it does not use or does not find, so the import here
accounts for every one, both sides: each tensor maps to exactly one adapter of the base, and the modules the config's
`target_modules` selects (by PEFT's own matcher) are exactly those with tensors.
"""

import dataclasses
import json
import math
import os
import re
import shutil
import typing as tp
from pathlib import Path

import torch

from ... import lora
from ...errors import UserError
from ...files import replaced_when_complete
from ...paths import output_dir
from .. import folder as model_dir
from .configs import check_hf_config, hf_shapes
from .convert import IMPORT_INFO, export_hf, is_hf_folder, load_hf, plan_import
from .mapping import LM_PREFIX, Link, UnmappedTensorsError, apply_rules, unprefixed

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
LEGACY_WEIGHTS_FILE = "adapter_model.bin"  # what PEFT wrote before safetensors became its default
PREFIX = "base_model.model."  # PeftModel's own prefix, as save_pretrained writes keys
DECODER = "decoder.model.decoder"
BASE_HASH_KEY = "musicgen_finetune.base_hash"  # in the safetensors metadata of folders written here
BASES_SUBDIR = "hf_bases"  # <output>/hf_bases/<base>-<hash>: transformers copies of AudioCraft bases, for PEFT
# A converted base goes beside the PEFT folder under this name (hard links into hf_bases/ where the disk allows), and
# base_model_name_or_path says `../transformers-base`: the two folders move together, and no path into our cache
# (which another machine does not have) is ever written.
BESIDE_BASE = "transformers-base"
AUTO_MAPPING = {  # what PEFT writes for a model of no task type: AutoPeftModel.from_pretrained(<folder>) works too
    "base_model_class": "MusicgenForConditionalGeneration",
    "parent_library": "transformers.models.musicgen.modeling_musicgen",
}
# adapter_config.json keys that change what the adapter computes, beyond plain LoRA: a true value is refused.
VARIANTS = {
    "use_dora": "DoRA (a learned magnitude per output feature)",
    "lora_bias": "a trained bias on lora_B (lora_bias)",
    "fan_in_fan_out": "transposed weights (fan_in_fan_out, for GPT-2's Conv1D)",
    "modules_to_save": "whole modules trained and saved beside the adapter (modules_to_save)",
    "trainable_token_indices": "trained token embeddings (trainable_token_indices)",
    "layer_replication": "replicated layers (layer_replication)",
    "target_parameters": "LoRA on raw parameters (target_parameters)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "megatron_config": "Megatron parallel layers (megatron_config)",
    "velora_config": "VeLoRA (velora_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "arrow_config": "Arrow routing (arrow_config)",
    "kasa_config": "KaSA (kasa_config)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
}
# Keys that are read below, or that do not change what a trained adapter computes.
UNDERSTOOD = set(
    "peft_type task_type base_model_name_or_path revision inference_mode auto_mapping peft_version r lora_alpha "
    "lora_dropout bias use_rslora rank_pattern alpha_pattern target_modules exclude_modules layers_to_transform "
    "layers_pattern init_lora_weights loftq_config eva_config corda_config lora_ga_config runtime_config megatron_core "
    "qalora_group_size ensure_weight_tying".split()
)
# init_lora_weights values whose training starts by changing the base weights: the adapter needs that changed base
# (PEFT's save_pretrained(path_initial_model_for_weight_conversion=...) turns it into a plain LoRA of rank 2r).
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")


class PeftAdapterError(UserError, ValueError):
    """A PEFT adapter folder cannot be read or written here; the message says why and what to do."""


class UnsupportedPeftAdapterError(PeftAdapterError):
    """A PEFT adapter with no exact equivalent here (or one of ours with none in PEFT); the message names what."""


# --------------------------------------------------------------------------------------------------- the table


@dataclasses.dataclass(frozen=True)
class ModuleLink:
    """One adaptable module under both names: ours (`lora.adapted_names`) and transformers'."""

    ours: str
    hf: str
    target: str  # the lora.targets entry it belongs to
    layer: tp.Optional[int]  # None for the output heads and the text projection


def module_links(num_layers: int, num_codebooks: int, projection: bool) -> tp.List[ModuleLink]:
    """Every module either side can adapt, for a MusicGen of this size (`projection`: transformers has
    enc_to_dec_proj, i.e. T5 is not as wide as the decoder)."""
    links = []
    if projection:
        links.append(ModuleLink(lora.TEXT_PROJECTION, "enc_to_dec_proj", lora.TEXT_PROJECTION_TARGET, None))
    for i in range(num_layers):
        ours, hf = f"transformer.layers.{i}", f"{DECODER}.layers.{i}"
        for attention, hf_attention in (("self_attn", "self_attn"), ("cross_attention", "encoder_attn")):
            for p in lora.FUSED_PROJECTIONS:
                links.append(
                    ModuleLink(f"{ours}.{attention}.{p}", f"{hf}.{hf_attention}.{p}_proj", f"{attention}.{p}", i)
                )
            links.append(
                ModuleLink(f"{ours}.{attention}.out_proj", f"{hf}.{hf_attention}.out_proj", f"{attention}.out_proj", i)
            )
        links += [ModuleLink(f"{ours}.linear{n}", f"{hf}.fc{n}", f"linear{n}", i) for n in (1, 2)]
    links += [
        ModuleLink(f"linears.{k}", f"decoder.lm_heads.{k}", lora.OUTPUT_HEADS_TARGET, None)
        for k in range(num_codebooks)
    ]
    return links


def tensor_links(links: tp.Iterable[ModuleLink]) -> tp.List[Link]:
    """lora_A and lora_B of each module: ours <-> PEFT's keys, unchanged."""
    result = []
    for link in links:
        for ours, part in zip(lora.adapter_tensor_names(link.ours), ("lora_A", "lora_B"), strict=True):
            result.append(Link((ours,), (f"{PREFIX}{link.hf}.{part}.weight",)))
    return result


def audiocraft_layout(base: tp.Mapping[str, tp.Any]) -> tp.Tuple[int, int, bool]:
    """(layers, codebooks, transformers has enc_to_dec_proj) of an AudioCraft LM state dict."""
    layers = 1 + max((int(n.split(".")[2]) for n in base if n.startswith("transformer.layers.")), default=-1)
    heads = sum(1 for n in base if re.fullmatch(r"linears\.\d+\.weight", n))
    projection = tuple(base[f"{lora.TEXT_PROJECTION}.weight"].shape)
    return layers, heads, projection[0] != projection[1]


def target_regex(modules: tp.Sequence[str]) -> str:
    """A `target_modules` regex (PEFT fullmatches it against module names) naming exactly `modules`: the decoder
    layers' modules as one alternation per set of layers, the others one by one."""
    per_layer: tp.Dict[str, tp.Set[int]] = {}
    others = []
    for module in modules:
        match = re.fullmatch(rf"{re.escape(DECODER)}\.layers\.(\d+)\.(.+)", module)
        if match:
            per_layer.setdefault(match[2], set()).add(int(match[1]))
        else:
            others.append(module)
    groups: tp.Dict[tp.Tuple[int, ...], tp.List[str]] = {}
    for rest, layers in per_layer.items():
        groups.setdefault(tuple(sorted(layers)), []).append(rest)
    parts = [
        rf"{re.escape(DECODER)}\.layers\.(?:{'|'.join(map(str, layers))})\.(?:{'|'.join(map(re.escape, rests))})"
        for layers, rests in groups.items()
    ]
    return "|".join(parts + [re.escape(o) for o in others])


# ------------------------------------------------------------------------------------------- ours -> PEFT


def transformers_lm_state(folder: Path) -> tp.Dict[str, torch.Tensor]:
    """The AudioCraft LM state of a transformers MusicGen folder (as `make import-hf` converts it)."""
    model = load_hf(folder)
    state = model.state_dict()
    plan = plan_import(model.config, state)
    return unprefixed(apply_rules(plan.rules, state, plan.expected, f"{folder} -> AudioCraft"), LM_PREFIX)


def checked_transformers_base(folder: Path, base_hash: str) -> Path:
    """`folder`, a transformers MusicGen whose decoder is the base the adapters were trained on; else an error."""
    folder = Path(folder).expanduser().resolve()
    if not is_hf_folder(folder):
        raise PeftAdapterError(
            f"BASE_HF={folder} is not a transformers MusicGen folder (config.json + model.safetensors); "
            "`make export-hf MODEL=<the adapters' base>` writes one."
        )
    actual = lora.base_model_hash(transformers_lm_state(folder))
    if actual != base_hash:
        raise lora.AdapterMismatchError(
            f"BASE_HF={folder} is not the base these adapters were trained on: its decoder, converted to "
            f"AudioCraft, hashes to {actual[:16]}, the adapters' base to {base_hash[:16]}. Give the transformers "
            "folder of that base, or leave BASE_HF out to have it converted."
        )
    return folder


def transformers_base(base: Path, base_hash: str) -> tp.Tuple[Path, bool]:
    """A transformers MusicGen folder of the AudioCraft model folder `base` (whose LM hashes to `base_hash`), and
    whether it is the user's own: the folder it was imported from (hf_import.json), or `base` itself when it also
    holds the transformers files (as the facebook/musicgen-small snapshot does), when its decoder hashes the same;
    else (not theirs) `base` converted by `export_hf`, once, into <output>/hf_bases/<name>-<hash>."""
    files = model_dir.check(base)
    actual = lora.base_model_hash(model_dir.load_package(files.lm)["best_state"])
    if actual != base_hash:
        raise lora.AdapterMismatchError(
            f"{files.lm} changed since the adapters were trained on it (hash {actual[:16]}, expected "
            f"{base_hash[:16]}): put that model back, or give BASE_HF=<a transformers folder of it>."
        )
    candidates = []
    if (base / IMPORT_INFO).is_file():
        candidates.append(Path(json.loads((base / IMPORT_INFO).read_text())["source"]))
    candidates.append(base)
    for candidate in candidates:
        if is_hf_folder(candidate) and lora.base_model_hash(transformers_lm_state(candidate)) == base_hash:
            return candidate, True
    converted = output_dir() / BASES_SUBDIR / f"{base.name}-{base_hash[:16]}"
    if not is_hf_folder(converted):
        print(f"Converting the base {base} to the transformers format, once, for PEFT: {converted}", flush=True)
        export_hf(base, converted)
    return converted, False


def place_beside(converted: Path, peft_folder: Path, base_hash: str) -> Path:
    """The converted base `converted` (whose decoder hashes to `base_hash`) as <peft_folder's parent>/
    transformers-base: hard links (no second copy of the weights) where the two share a file system, else copies;
    kept when that base is already there, refused when another base is (a PEFT folder beside it names it)."""
    beside = peft_folder.parent / BESIDE_BASE
    if is_hf_folder(beside):
        if lora.base_model_hash(transformers_lm_state(beside)) == base_hash:
            return beside
        raise PeftAdapterError(
            f"{beside} holds the transformers form of another base model, which PEFT folders beside it may name: "
            f"write this adapter's PEFT folder into another folder (OUT=<another folder>/peft)."
        )
    with replaced_when_complete(beside) as staging:
        for file in converted.iterdir():
            if file.is_file():
                try:
                    os.link(file, staging / file.name)
                except OSError:  # another file system, or one without hard links
                    shutil.copyfile(file, staging / file.name)
    return beside


def base_reference(base_hf: Path, peft_folder: Path) -> str:
    """base_model_name_or_path: `../<name>` when the base sits beside the PEFT folder (the two move together),
    else the base's absolute path (the user's own transformers folder)."""
    if base_hf.resolve().parent == peft_folder.resolve().parent:
        return os.path.join(os.pardir, base_hf.name)
    return str(base_hf)


def write_peft(
    folder: Path,
    config: lora.LoraConfig,
    tensors: tp.Mapping[str, torch.Tensor],
    adapted: tp.Sequence[str],
    base_hash: str,
    base_hf: Path,
    source: str,
) -> Path:
    """Write `folder` (existing, empty) as a PEFT LoRA folder of our adapters (`adapted`, `tensors`) for the
    transformers MusicGen `base_hf` (beside `folder`, or the user's own): adapter_config.json,
    adapter_model.safetensors, README.md."""
    from safetensors.torch import save_file
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(base_hf)
    check_hf_config(hf_config)
    decoder = hf_config.decoder
    projection = hf_config.text_encoder.hidden_size != decoder.hidden_size
    by_ours = {link.ours: link for link in module_links(decoder.num_hidden_layers, decoder.num_codebooks, projection)}
    unmapped = [name for name in adapted if name not in by_ours]
    if unmapped:
        reason = (
            "T5 is as wide as the decoder, so transformers' MusicGen has no enc_to_dec_proj to carry the "
            f"{lora.TEXT_PROJECTION_TARGET} adapter"
            if lora.TEXT_PROJECTION in unmapped and not projection
            else f"the transformers base ({decoder.num_hidden_layers} layers, {decoder.num_codebooks} codebooks) "
            "has no such modules: a MusicGen of another size"
        )
        raise UnsupportedPeftAdapterError(f"{source}: {', '.join(unmapped[:3])} cannot be converted: {reason}.")
    links = [by_ours[name] for name in adapted]
    shapes = hf_shapes(hf_config)
    expected = {}
    for link in links:
        out_features, in_features = shapes[f"{link.hf}.weight"]
        expected[f"{PREFIX}{link.hf}.lora_A.weight"] = (config.rank, in_features)
        expected[f"{PREFIX}{link.hf}.lora_B.weight"] = (out_features, config.rank)
    rules = [link.rule("to_hf") for link in tensor_links(links)]
    converted = apply_rules(rules, tensors, expected, f"{source} -> PEFT on {base_hf}")
    regex = target_regex([link.hf for link in links])
    modules = {name[: -len(".weight")] for name in shapes if name.endswith(".weight")}
    selected = {m for m in modules if re.fullmatch(regex, m)}
    assert selected == {link.hf for link in links}, sorted(selected ^ {link.hf for link in links})[:5]
    alpha = int(config.alpha) if float(config.alpha).is_integer() else config.alpha
    peft_config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_reference(base_hf, folder),
        "revision": None,
        "r": config.rank,
        "lora_alpha": alpha,
        "lora_dropout": config.dropout,
        "target_modules": regex,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "init_lora_weights": True,
        "inference_mode": True,
        "auto_mapping": AUTO_MAPPING,
    }
    (folder / CONFIG_FILE).write_text(json.dumps(peft_config, indent=2) + "\n")
    tensors_out = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in converted.items()}
    save_file(tensors_out, str(folder / WEIGHTS_FILE), metadata={"format": "pt", BASE_HASH_KEY: base_hash})
    (folder / "README.md").write_text(readme(config, adapted, source, base_reference(base_hf, folder), base_hash))
    return folder


def readme(config: lora.LoraConfig, adapted: tp.Sequence[str], source: str, base: str, base_hash: str) -> str:
    layers = "every layer" if config.layers is None else f"layers {', '.join(map(str, config.layers))}"
    beside = not os.path.isabs(base)
    where = (
        f"`{base}`, relative to this folder: the transformers form of the model the adapter was trained on, beside "
        "it (move or copy the two folders together)"
        if beside
        else f"{base}, the transformers form of the model the adapter was trained on"
    )
    base_path = f'Path("<this folder>") / "{base}"' if beside else f'"{base}"'
    return (
        "# LoRA adapter for transformers' MusicGen (PEFT)\n\n"
        f"Converted by musicgen-finetune from {source}: rank {config.rank}, alpha {config.alpha:g}, dropout "
        f"{config.dropout:g}, on {', '.join(config.targets)} ({len(adapted)} modules, {layers}). Its base "
        f"(`base_model_name_or_path`) is {where}; base hash {base_hash[:16]}.\n\n"
        "```python\n"
        "from pathlib import Path\n\n"
        "from peft import PeftModel\n"
        "from transformers import AutoProcessor, MusicgenForConditionalGeneration\n\n"
        f"base_path = {base_path}\n"
        "base = MusicgenForConditionalGeneration.from_pretrained(base_path)\n"
        'model = PeftModel.from_pretrained(base, "<this folder>").eval()  # .merge_and_unload(): a plain model\n'
        "processor = AutoProcessor.from_pretrained(base_path)\n"
        'inputs = processor(text=["hip hop 808 beat, 140 bpm"], padding=True, return_tensors="pt")\n'
        "audio = model.generate(**inputs, do_sample=True, max_new_tokens=500)  # 10 s at 50 frames/s\n"
        "```\n\n"
        "Back in musicgen-finetune, this folder works as `ADAPTER=` (make generate, make eval) and as "
        "`lora.init_from=` (make train ... LORA=1), on the same base.\n"
    )


def export_peft(
    adapter: tp.Union[str, Path],
    out: tp.Optional[tp.Union[str, Path]] = None,
    base_hf: tp.Optional[tp.Union[str, Path]] = None,
    base: tp.Optional[tp.Union[str, Path]] = None,
) -> Path:
    """`make export-peft`: our adapters.safetensors as a PEFT LoRA folder for transformers' MusicGen.

    Args:
        adapter: an adapters.safetensors (with its .json), as `make export` writes it.
        out: the folder to write (default: `peft/` beside the adapter).
        base_hf: the transformers MusicGen of the adapters' base; checked by its decoder's hash.
        base: without `base_hf`, the AudioCraft base folder (default: the one export.json beside the adapter names),
            whose transformers form is found (the user's own) or converted once and placed beside `out` as
            transformers-base/ (`transformers_base`, `place_beside`).
    Returns:
        The folder written.
    """
    adapter = Path(adapter).expanduser().resolve()
    if not adapter.is_file():
        raise PeftAdapterError(f"ADAPTER={adapter} does not exist (make export writes adapters.safetensors).")
    config, metadata, tensors = lora.read_adapters(adapter)
    if base_hf:
        hf = checked_transformers_base(Path(base_hf), metadata["base_hash"])
    else:
        if base is None:
            info = adapter.parent / "export.json"
            base = json.loads(info.read_text()).get("base_model") if info.is_file() else None
        if not base:
            raise PeftAdapterError(
                f"ADAPTER={adapter} has no export.json beside it naming its base model: give "
                "BASE_HF=<the transformers MusicGen folder of the base it was trained on>."
            )
        hf, users_own = transformers_base(Path(base).expanduser().resolve(), metadata["base_hash"])
    out = Path(out).expanduser().resolve() if out else adapter.parent / "peft"
    if not base_hf and not users_own:
        hf = place_beside(hf, out, metadata["base_hash"])
    with replaced_when_complete(out) as staging:
        write_peft(staging, config, tensors, metadata["adapted"], metadata["base_hash"], hf, str(adapter))
    return out


# ------------------------------------------------------------------------------------------- PEFT -> ours


@dataclasses.dataclass
class Adapter:
    """Adapters ready for `lora.apply_adapters`: their config and tensors under our names."""

    config: lora.LoraConfig
    tensors: tp.Dict[str, torch.Tensor]
    source: Path
    base_hash: tp.Optional[str]  # the base they were trained on, where recorded
    adapted: tp.Optional[tp.List[str]] = None  # the adapted names they were saved with (ours)


def is_peft_folder(path: tp.Union[str, Path]) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def read_adapter(path: tp.Union[str, Path], base: tp.Mapping[str, torch.Tensor], what: str = "ADAPTER") -> Adapter:
    """Adapters for the AudioCraft LM whose weights are `base`: our adapters.safetensors, or a PEFT LoRA folder
    converted here. Checked against `base` by the base hash they record (ours; PEFT folders written here) and always
    by name and shape; `what` names the setting in messages (ADAPTER, lora.init_from)."""
    path = Path(path).expanduser().resolve()
    if is_peft_folder(path):
        adapter = read_peft(path, base)
    elif path.is_file():
        config, metadata, tensors = lora.read_adapters(path)
        adapter = Adapter(config, tensors, path, metadata.get("base_hash"), metadata.get("adapted"))
    else:
        raise PeftAdapterError(
            f"{what}={path}: neither an adapters.safetensors (make export) nor a PEFT LoRA folder "
            f"({CONFIG_FILE} + {WEIGHTS_FILE}, as PeftModel.save_pretrained writes them)."
        )
    if adapter.base_hash is not None:
        actual = lora.base_model_hash(base)
        if actual != adapter.base_hash:
            raise lora.AdapterMismatchError(
                f"{what}={path} was trained on base model {adapter.base_hash[:16]}, but this base is "
                f"{actual[:16]}: use it on the base it was trained from (its export.json names it)."
            )
    else:
        print(f"{what}={path}: a PEFT folder records no base model hash; checked by name and shape only.", flush=True)
    expected = lora.adapter_shapes(adapter.config, base)
    got = {k: tuple(v.shape) for k, v in adapter.tensors.items()}
    if got != expected:
        wrong = sorted(k for k in set(got) | set(expected) if got.get(k) != expected.get(k))
        raise lora.AdapterMismatchError(
            f"{what}={path} does not fit this base: "
            + ", ".join(f"{k} {got.get(k, 'absent')} (base: {expected.get(k, 'none')})" for k in wrong[:5])
        )
    return adapter


def read_peft(folder: Path, base: tp.Mapping[str, torch.Tensor]) -> Adapter:
    """A PEFT LoRA folder made on a transformers MusicGen of the base `base` (an AudioCraft LM state dict), as our
    adapters: every tensor mapped, every refusal named."""
    raw = read_peft_config(folder)
    tensors, metadata = read_peft_tensors(folder)
    num_layers, num_codebooks, projection = audiocraft_layout(base)
    links = {link.hf: link for link in module_links(num_layers, num_codebooks, projection)}
    modules = adapted_modules(folder, tensors, links, num_layers)
    chosen = [link for link in links.values() if link.hf in modules]  # in the table's order
    check_selection(folder, raw, set(modules), list(links))
    rank, alpha = rank_and_alpha(folder, raw, chosen, tensors)
    config = lora.LoraConfig(
        enabled=True,
        rank=rank,
        alpha=alpha,
        dropout=float(raw.get("lora_dropout") or 0.0),
        targets=our_targets(folder, chosen, num_layers, num_codebooks),
        layers=layers_of(chosen, num_layers),
    )
    expected = lora.adapter_shapes(config, base)
    try:
        ours = apply_rules([r.rule("to_ac") for r in tensor_links(chosen)], tensors, expected, f"{folder} -> ours")
    except UnmappedTensorsError as err:
        if err.mismatched and not (err.unused or err.absent or err.unfilled):
            raise UnsupportedPeftAdapterError(
                f"{folder} was made on a MusicGen of another size than this base ({err.mismatched[0]}, ...)."
            ) from err
        raise
    return Adapter(config, ours, folder, metadata.get(BASE_HASH_KEY))


def read_peft_config(folder: Path) -> dict:
    """adapter_config.json, refusing what plain LoRA on this model cannot be."""
    try:
        raw = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, ValueError) as err:
        raise PeftAdapterError(f"{folder / CONFIG_FILE} is not readable JSON ({err}).") from err
    if raw.get("peft_type") != "LORA":
        raise UnsupportedPeftAdapterError(
            f"{folder} is a PEFT {raw.get('peft_type')!r} adapter; only LoRA (peft_type LORA) converts."
        )
    problems = [what for key, what in VARIANTS.items() if raw.get(key)]
    if raw.get("bias", "none") != "none":
        problems.append(f"trained biases (bias={raw['bias']!r})")
    init = raw.get("init_lora_weights", True)
    if isinstance(init, str) and init.startswith(BASE_CHANGING_INITS):
        problems.append(
            f"init_lora_weights={init!r}, which changes the base weights the adapter works with (save it with "
            "PEFT's path_initial_model_for_weight_conversion= to make it a plain LoRA)"
        )
    unknown = sorted(k for k, v in raw.items() if k not in UNDERSTOOD and k not in VARIANTS and v)
    problems += [f"{key}={raw[key]!r}, which this converter does not know (a newer PEFT?)" for key in unknown]
    if problems:
        raise UnsupportedPeftAdapterError(f"{folder / CONFIG_FILE} is not plain LoRA: {'; '.join(problems)}.")
    return raw


def read_peft_tensors(folder: Path) -> tp.Tuple[tp.Dict[str, torch.Tensor], tp.Dict[str, str]]:
    """The adapter's tensors (float32, CPU) and its safetensors metadata."""
    from safetensors import safe_open

    if (folder / WEIGHTS_FILE).is_file():
        with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as file:
            metadata = file.metadata() or {}
            tensors = {key: file.get_tensor(key) for key in file.keys()}
    elif (folder / LEGACY_WEIGHTS_FILE).is_file():
        tensors, metadata = torch.load(folder / LEGACY_WEIGHTS_FILE, map_location="cpu", weights_only=True), {}
    else:
        raise PeftAdapterError(f"{folder} has {CONFIG_FILE} but no {WEIGHTS_FILE} (or {LEGACY_WEIGHTS_FILE}).")
    return {k: v.float() for k, v in tensors.items()}, metadata


def adapted_modules(
    folder: Path, tensors: tp.Mapping[str, torch.Tensor], links: tp.Mapping[str, ModuleLink], num_layers: int
) -> tp.List[str]:
    """The transformers modules the tensors adapt, or one error naming every tensor that cannot map, by reason."""
    modules, reasons = [], {}
    for key in sorted(tensors):
        match = re.fullmatch(r"(.+)\.lora_[AB]\.weight", key[len(PREFIX) :]) if key.startswith(PREFIX) else None
        module = match[1] if match else key[len(PREFIX) :]
        if match and module in links:
            modules.append(module)
            continue
        if "lora_magnitude_vector" in key:
            reason = "DoRA magnitudes"
        elif "lora_embedding_" in key or ".embed_tokens." in key or ".embed_positions." in key:
            reason = "embeddings (our LoRA adapts projections only)"
        elif module.startswith("text_encoder."):
            reason = "T5 modules (the text encoder is frozen here)"
        elif module.startswith("audio_encoder."):
            reason = "EnCodec modules (the codec is frozen here)"
        elif key.endswith(".bias"):
            reason = "biases"
        elif match and re.fullmatch(
            rf"{re.escape(DECODER)}\.layers\.\d+\..+|decoder\.lm_heads\.\d+|enc_to_dec_proj", module
        ):
            reason = (
                f"modules this base does not have ({num_layers} layers): made on a MusicGen of another size, or one "
                "whose T5 is as wide as its decoder"
            )
        else:
            reason = (
                "keys that are not PeftModel.save_pretrained's LoRA keys for a MusicgenForConditionalGeneration "
                f"({PREFIX}{DECODER}.layers.0.self_attn.q_proj.lora_A.weight, ...)"
            )
        reasons.setdefault(reason, []).append(key)
    if reasons:
        listed = "; ".join(
            f"{reason}: {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}" for reason, keys in reasons.items()
        )
        raise UnsupportedPeftAdapterError(f"{folder / WEIGHTS_FILE} has tensors that cannot be converted: {listed}.")
    if not modules:
        raise PeftAdapterError(f"{folder / WEIGHTS_FILE} holds no LoRA tensor.")
    return sorted(set(modules))


def check_selection(folder: Path, raw: dict, present: tp.Set[str], candidates: tp.Sequence[str]) -> None:
    """The modules PEFT would adapt (its matcher, on the config's target_modules, exclude_modules, layers_to_transform)
    must be exactly those with tensors: PEFT leaves a selected module without tensors at its initialisation, and
    silently drops tensors of a module it does not select."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    keys = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern")
    if not raw.get("target_modules"):
        raise PeftAdapterError(f"{folder / CONFIG_FILE} names no target_modules: which modules it adapts is unknown.")
    try:
        config = LoraConfig(**{k: raw[k] for k in keys if raw.get(k) is not None})
    except (TypeError, ValueError) as err:
        raise PeftAdapterError(f"{folder / CONFIG_FILE}: PEFT refuses its target settings ({err}).") from err
    selected = {m for m in candidates if check_target_module_exists(config, m)}
    parts = []
    if selected - present:
        parts.append(
            f"it selects {sorted(selected - present)[:3]}, which have no tensors (PEFT would leave them as initialised)"
        )
    if present - selected:
        parts.append(
            f"it has tensors for {sorted(present - selected)[:3]}, which it does not select (PEFT would ignore them)"
        )
    if parts:
        raise PeftAdapterError(f"{folder}: target_modules and the tensors disagree: {'; '.join(parts)}.")


def rank_and_alpha(
    folder: Path, raw: dict, chosen: tp.Sequence[ModuleLink], tensors: tp.Mapping[str, torch.Tensor]
) -> tp.Tuple[int, float]:
    """One rank and one alpha for every module (ours have one of each), with PEFT's scale alpha / r exactly."""
    from peft.utils.other import get_pattern_key

    rank_pattern, alpha_pattern = raw.get("rank_pattern") or {}, raw.get("alpha_pattern") or {}
    pairs = set()
    for link in chosen:
        r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), link.hf), raw.get("r", 8))
        alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), link.hf), raw.get("lora_alpha", 8))
        stored = tensors.get(f"{PREFIX}{link.hf}.lora_A.weight")
        if stored is not None and stored.shape[0] != r:
            raise PeftAdapterError(f"{folder}: {link.hf}'s lora_A has rank {stored.shape[0]}, its config says {r}.")
        pairs.add((r, alpha))
    if len(pairs) != 1:
        raise UnsupportedPeftAdapterError(
            f"{folder}: ranks and alphas differ between modules ({sorted(pairs)[:4]}, from rank_pattern / "
            "alpha_pattern); adapters here have one rank and one alpha."
        )
    ((r, alpha),) = pairs
    if not raw.get("use_rslora"):
        return int(r), float(alpha)
    scale = alpha / math.sqrt(r)  # rsLoRA's, as PEFT computes it (tuners/lora/layer.py update_layer)
    for candidate in (scale * r, math.nextafter(scale * r, math.inf), math.nextafter(scale * r, -math.inf)):
        if candidate / r == scale:
            return int(r), candidate
    raise UnsupportedPeftAdapterError(
        f"{folder}: rsLoRA's scale alpha / sqrt(r) = {scale!r} is no float alpha' / r exactly (r={r}); adapters here "
        "scale by alpha / r."
    )


def our_targets(
    folder: Path, chosen: tp.Sequence[ModuleLink], num_layers: int, num_codebooks: int
) -> tp.Tuple[str, ...]:
    """lora.targets for the adapted modules, which must be the same projections in every adapted layer, and every
    output head or none."""
    per_layer: tp.Dict[str, tp.Set[int]] = {}
    for link in chosen:
        if link.layer is not None:
            per_layer.setdefault(link.target, set()).add(link.layer)
    layer_sets = {frozenset(layers) for layers in per_layer.values()}
    heads = sum(1 for link in chosen if link.target == lora.OUTPUT_HEADS_TARGET)
    if len(layer_sets) > 1:
        described = ", ".join(f"{t} in layers {sorted(layers)}" for t, layers in per_layer.items())
        raise UnsupportedPeftAdapterError(
            f"{folder} adapts projections in different layers ({described}); adapters here adapt the same "
            "projections in every adapted layer (lora.targets x lora.layers)."
        )
    if heads not in (0, num_codebooks):
        raise UnsupportedPeftAdapterError(
            f"{folder} adapts {heads} of the {num_codebooks} output heads (lm_heads); adapters here adapt all or none."
        )
    present = {link.target for link in chosen}
    return tuple(t for t in lora.ALLOWED_TARGETS if t in present)


def layers_of(chosen: tp.Sequence[ModuleLink], num_layers: int) -> tp.Optional[tp.List[int]]:
    layers = sorted({link.layer for link in chosen if link.layer is not None})
    return None if layers == list(range(num_layers)) or not layers else layers
