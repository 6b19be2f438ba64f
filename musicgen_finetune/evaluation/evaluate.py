"""`make eval`: did the fine-tune get better? Numbers and a listening page, base model against fine-tuned ones.

    output/reports/<name>/report.json   every number, with how it was measured
    output/reports/<name>/index.html    metrics table, loss curves, players side by side, blind A/B test
    output/reports/<name>/samples/<model>/, reference/, plots/

It reads model folders and `manifests/<name>/` only. For each model (base; full fine-tune TUNED=; LoRA = base +
ADAPTER=):
- cross-entropy and perplexity on the dataset's valid split, computed as training computes its validation loss
  (same segments, conditions and masking), and on a second "general" dataset (GENERAL=) to show what was forgotten;
- audio generated for the same prompts with the same seeds, then: Frechet distance to the reference clips on the
  base model's EnCodec latents (every user has them), style descriptors (tempo against the prompt's bpm, 808 band
  energy, onset density, loudness), and the CLAP text-audio score when CLAP=<local CLAP folder> is given;
- the training and validation loss of the run it came from (the history `make export` wrote beside it).

The steps, in `evaluate`: check the inputs, measure each model, compare them (the table), draw, write.
"""

import dataclasses
import datetime
import json
import math
import shutil
import typing as tp
from pathlib import Path

import julius
import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
from audiocraft.models import loaders

from .. import lora, machine
from ..data.dataset import PreparedDataset
from ..errors import UserError
from ..experiments import best_epoch, read_history
from ..files import replaced_when_complete
from ..generate import Sampling, load, read_prompts, write_samples
from ..models import folder as model_dir
from ..models.hf.peft_lora import read_adapter
from ..models.open import open_model
from ..paths import output_dir
from . import metrics, page, plots

REFERENCE_CLIPS = 8  # reference clips on the page (all valid clips count in the Frechet distance)
DEFAULT_PROMPTS = 4  # without PROMPTS=, this many captions of the valid split
EXPORT_INFO = "export.json"


class EvalError(UserError, ValueError):
    """Bad input to `make eval`; the message names the value and the fix."""


@dataclasses.dataclass
class EvalOptions:
    """What `make eval` compares, on what, and how it samples.

    Args:
        base: the model fine-tuning started from.
        name: the dataset (manifests/<name>) whose valid split is the reference.
        tuned: a fully fine-tuned model folder (make export).
        adapter: LoRA adapters.safetensors, or a PEFT LoRA folder, applied on `base`.
        general: a second dataset; the cross-entropy on it shows what was forgotten.
        prior: a model folder fine-tuned with prior preservation (make train PRIOR=1, then make export), compared
            as column `prior`.
        prompts: a file or a text; default: captions of the valid split.
        seed: the seed every model samples with.
        sampling: duration, top-k, ... (batch 1: each prompt's noise does not depend on the others).
        clap: a local transformers CLAP folder, for the CLAP score.
        t5: a local T5 folder (default: found beside each model).
        out: the report folder (default: <output>/reports/<name>).
    """

    base: str
    name: str
    tuned: tp.Optional[str] = None
    adapter: tp.Optional[str] = None
    general: tp.Optional[str] = None
    prompts: tp.Optional[str] = None
    seed: int = 0
    sampling: Sampling = Sampling(batch_size=1)
    clap: tp.Optional[str] = None
    t5: tp.Optional[str] = None
    out: tp.Optional[str] = None
    progress: bool = False
    prior: tp.Optional[str] = None


@dataclasses.dataclass
class ModelSpec:
    id: str
    label: str
    folder: Path
    adapter: tp.Optional[Path] = None

    @property
    def export_folder(self) -> Path:
        """The folder `make export` wrote for this model: the adapters' for LoRA."""
        return self.adapter.parent if self.adapter else self.folder

    def run(self) -> tp.Optional[dict]:
        """The training run this model was exported from (its history, best epoch), or None for the base or a
        model without one."""
        info_file = self.export_folder / EXPORT_INFO
        history = read_history(self.export_folder)
        if self.id == "base" or not history or not info_file.is_file():
            return None
        info = json.loads(info_file.read_text())
        return {
            "model": self.id,
            "label": self.label,
            "xp": info.get("experiment"),
            "history": history,
            # the export's own choice (it knows the run's metric and forgetting budget) when it is the best state
            "best_epoch": info.get("epoch") if info.get("which") == "best" else best_epoch(history),
            "epochs": len(history),
            "exported_epoch": info.get("epoch"),
        }


@dataclasses.dataclass
class Measured:
    """What one model did: cross-entropies, its samples (with descriptors), the EnCodec frames of its samples."""

    valid_ce: dict
    general_ce: tp.Optional[dict]
    samples: tp.List[dict]
    frames: np.ndarray


# -- 1. the inputs ------------------------------------------------------------------------------------------


def model_specs(options: EvalOptions) -> tp.List[ModelSpec]:
    specs = [ModelSpec("base", "base model", Path(options.base).expanduser().resolve())]
    if options.tuned:
        specs.append(ModelSpec("full", "fine-tuned", Path(options.tuned).expanduser().resolve()))
    if options.adapter:
        specs.append(ModelSpec("lora", "LoRA", specs[0].folder, Path(options.adapter).expanduser().resolve()))
    if options.prior:
        specs.append(ModelSpec("prior", "prior preservation", Path(options.prior).expanduser().resolve()))
    return specs


def check_inputs(specs: tp.List[ModelSpec], options: EvalOptions) -> None:
    """Everything that can be wrong with the inputs, before minutes of cross-entropy and generation."""
    if len(specs) == 1:
        raise EvalError(
            "Nothing to compare the base model with: give TUNED=<exported model folder> and/or "
            "ADAPTER=<adapters.safetensors or a PEFT LoRA folder>."
        )
    PreparedDataset(options.name, "NAME")
    if options.general:
        PreparedDataset(options.general, "GENERAL")
    variables = {"base": "BASE", "full": "TUNED", "lora": "ADAPTER", "prior": "TUNED_PRIOR"}
    for spec in specs:
        if (spec.folder / "checkpoint.th").is_file() and not (spec.folder / model_dir.LM_FILE).is_file():
            raise EvalError(
                f"{variables[spec.id]}={spec.folder} is an experiment folder: export it first "
                f"(`make export XP={spec.folder.name}`) and give the exported folder."
            )
        open_model(spec.folder, options.t5)
        if spec.adapter is not None:
            check_adapter(spec, options.t5)
    if options.clap:
        config = Path(options.clap).expanduser() / "config.json"
        model_type = json.loads(config.read_text()).get("model_type") if config.is_file() else None
        if model_type != "clap":
            raise EvalError(
                f"CLAP={options.clap}: not a transformers CLAP model folder (config.json with model_type "
                "'clap', weights and processor files, e.g. a local copy of laion/clap-htsat-unfused)."
            )
    options.sampling.check()


def check_adapter(spec: ModelSpec, t5: tp.Optional[str]) -> None:
    """ADAPTER= fits BASE=: ours by the base hash it records, a PEFT folder by name and shape (`read_adapter`)."""
    if not spec.adapter.exists():
        raise EvalError(
            f"ADAPTER={spec.adapter} does not exist (make export writes adapters.safetensors for LoRA runs, and a "
            "PEFT folder in peft/)."
        )
    base = model_dir.load_package(open_model(spec.folder, t5).lm)["best_state"]
    try:
        read_adapter(spec.adapter, base)
    except lora.AdapterMismatchError as err:
        raise EvalError(
            f"ADAPTER={spec.adapter} does not fit BASE={spec.folder} (trained on another base model?): {err} Give "
            "the base it was trained on (its export.json names it)."
        ) from err


def references(dataset: PreparedDataset, out: Path, limit: int = REFERENCE_CLIPS) -> tp.List[dict]:
    """The valid split's clips, with captions; the first `limit` are copied next to the page to listen to."""
    clips = []
    for index, row in enumerate(dataset.rows("valid")):
        source = Path(row["path"])
        sidecar = source.with_suffix(".json")
        caption = json.loads(sidecar.read_text()).get("description") if sidecar.is_file() else None
        clip = {"source": str(source), "caption": caption}
        if index < limit:
            target = out / "reference" / f"{index:03d}{source.suffix}"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
            clip["audio"] = target.relative_to(out).as_posix()
        clips.append(clip)
    if not clips:
        raise EvalError(f"NAME={dataset.name}: the valid split is empty; rebuild the manifests with VALID=0.2.")
    return clips


def prompt_texts(prompts: tp.Optional[str], refs: tp.List[dict]) -> tp.List[str]:
    """PROMPTS= (a file or a text), else the first captions of the valid split."""
    if prompts:
        return read_prompts(prompts)
    captions = list(dict.fromkeys(r["caption"] for r in refs if r["caption"]))
    if not captions:
        raise EvalError("The valid clips have no captions to prompt with: give PROMPTS=<file or text>.")
    return captions[:DEFAULT_PROMPTS]


# -- 2. measuring one model --------------------------------------------------------------------------------------


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The LM's loss as training computes it (solvers/musicgen.py `_compute_cross_entropy`): per codebook, the
    mean cross-entropy over its unmasked positions, then the mean over codebooks. logits [B, K, T, card]."""
    per_codebook = [
        F.cross_entropy(logits[:, k][mask[:, k]], targets[:, k][mask[:, k]]) for k in range(targets.shape[1])
    ]
    return torch.stack(per_codebook).mean()


@torch.no_grad()
def cross_entropy(model, dataset, batch_size: int = 4) -> dict:
    """Mean cross-entropy over every valid token of `dataset` (padding masked out, as training masks it)."""
    lm, compression = model.lm, model.compression_model
    device = next(lm.parameters()).device
    total, weight = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        audio = torch.stack([wav for wav, _ in items]).to(device)
        infos = [info for _, info in items]
        tokens, _ = compression.encode(audio)
        padding = torch.ones_like(tokens, dtype=torch.bool)
        for i, info in enumerate(infos):  # upstream's padding_with_special_token (solvers/musicgen.py)
            valid = math.floor(info.n_frames / info.sample_rate * compression.frame_rate)
            tokens[i, :, valid:] = lm.special_token_id
            padding[i, :, valid:] = False
        conditions = lm.condition_provider(
            lm.condition_provider.tokenize([info.to_condition_attributes() for info in infos])
        )
        output = lm.compute_predictions(tokens, [], conditions)
        mask = padding & output.mask
        ce = masked_cross_entropy(output.logits, tokens, mask)
        count = int(mask.sum())
        total += float(ce) * count
        weight += count
    mean = total / max(weight, 1)
    return {"ce": mean, "ppl": math.exp(mean), "tokens": weight, "segments": len(dataset)}


def read_audio(path: Path) -> tp.Tuple[np.ndarray, int]:
    audio, rate = sf.read(str(path), dtype="float32", always_2d=True)
    return audio.T, rate


@torch.no_grad()
def encodec_frames(compression, paths: tp.Sequence[Path]) -> np.ndarray:
    """Per-frame latents of the (shared, frozen) EnCodec encoder: the embedding of the Frechet distance."""
    device = next(compression.parameters()).device
    # a stereo MusicGen's codec interleaves channels through a mono EnCodec (InterleaveStereoCompressionModel)
    inner = compression if hasattr(compression, "encoder") else compression.model
    encoder, channels = inner.encoder, inner.channels
    frames = []
    for path in paths:
        audio, rate = read_audio(path)
        wav = torch.from_numpy(audio).to(device)
        wav = julius.resample_frac(wav, rate, compression.sample_rate) if rate != compression.sample_rate else wav
        if wav.shape[0] != channels:
            wav = wav.mean(0, keepdim=True).expand(channels, -1)
        latent = encoder(wav[None])  # [1, dim, frames], before quantisation
        frames.append(latent[0].T.cpu().numpy())
    return np.concatenate(frames)


def base_codec(spec: ModelSpec, t5: tp.Optional[str] = None):
    """The base model's compression model alone (its LM is not needed to embed audio)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return loaders.load_compression_model(str(open_model(spec.folder, t5).root), device=device).eval()


def describe(path: Path) -> dict:
    audio, rate = read_audio(path)
    return metrics.descriptors(audio, rate)


def measure(
    spec: ModelSpec,
    options: EvalOptions,
    texts: tp.List[str],
    out_dir: Path,
    frames_of: tp.Callable[[tp.Sequence[Path]], np.ndarray],
) -> Measured:
    """One model: its cross-entropies, then its samples for `texts` (generated at its own level, not
    loudness-normalised, so that loudness can be compared), described and embedded with `frames_of`."""
    print(f"[{spec.id}] {spec.folder}{' + ' + str(spec.adapter) if spec.adapter else ''}", flush=True)
    model = load(spec.folder, spec.adapter, t5=options.t5)
    rate, channels = model.sample_rate, model.audio_channels
    valid_ce = cross_entropy(model, PreparedDataset(options.name).segments_once("valid", rate, channels))
    general_ce = None
    if options.general:
        general = PreparedDataset(options.general, "GENERAL")
        general_ce = cross_entropy(model, general.segments_once("valid", rate, channels))
    sampling = options.sampling.for_model(int(model.lm.card))
    folder = out_dir / "samples" / spec.id
    samples = []
    for item in write_samples(
        model, texts, folder, sampling, (options.seed,), progress=options.progress, loudness_normalize=False
    ):
        path = folder / item["file"]
        samples.append(
            {
                "prompt": item["index"],
                "model": spec.id,
                "path": path,
                "audio": path.relative_to(out_dir).as_posix(),
                "descriptors": describe(path),
            }
        )
    return Measured(valid_ce, general_ce, samples, frames_of([s["path"] for s in samples]))


# -- 3. comparing them ---------------------------------------------------------------------------------------


def mean_of(summary: dict, key: str) -> tp.Optional[float]:
    return summary.get(key, {}).get("mean")


def closeness_row(metric: str, key: str, summaries: dict, reference: dict, note: str) -> dict:
    target = mean_of(reference, key)
    return {
        "metric": metric,
        "better": f"closer:{target}" if target is not None else None,
        "values": {model: mean_of(summary, key) for model, summary in summaries.items()},
        "note": f"{note}; reference clips: {target:.3g}" if target is not None else note,
    }


def clap_row(options: EvalOptions, measured: tp.Dict[str, Measured], texts: tp.List[str]) -> dict:
    scores = {}
    for spec_id, result in measured.items():
        clips = [read_audio(s["path"]) for s in result.samples]
        values = metrics.clap_scores(
            Path(options.clap), [c[0] for c in clips], clips[0][1], [texts[s["prompt"]] for s in result.samples]
        )
        scores[spec_id] = float(np.mean(values))
    return {
        "metric": "CLAP text-audio score",
        "better": "higher",
        "values": scores,
        "note": f"cosine similarity, CLAP from {options.clap}",
    }


def metric_rows(
    options: EvalOptions,
    measured: tp.Dict[str, Measured],
    refs: tp.List[dict],
    reference_frames: np.ndarray,
    texts: tp.List[str],
) -> tp.Tuple[tp.List[dict], tp.List[str]]:
    """The report's table (one row per metric, one value per model, which direction is better) and its notes."""
    ids, name, general = list(measured), options.name, options.general
    summaries = {m: metrics.summarize([s["descriptors"] for s in measured[m].samples]) for m in ids}
    reference = metrics.summarize([r["descriptors"] for r in refs])
    notes = []
    rows = [
        {
            "metric": f"valid cross-entropy ({name})",
            "better": "lower",
            "values": {m: measured[m].valid_ce["ce"] for m in ids},
            "note": f"the validation loss of training, on its {measured[ids[0]].valid_ce['segments']} held-out "
            "segments",
        },
        {
            "metric": f"valid perplexity ({name})",
            "better": "lower",
            "values": {m: measured[m].valid_ce["ppl"] for m in ids},
            "note": "exp(cross-entropy)",
        },
    ]
    if general:
        rows.append(
            {
                "metric": f"cross-entropy on {general} (general)",
                "better": "lower",
                "values": {m: measured[m].general_ce["ce"] for m in ids},
                "note": "what the base could do; a rise is what fine-tuning forgot",
            }
        )
    rows.extend(gain_and_forgetting_rows(measured, name, general))
    if not general:
        notes.append("No GENERAL=<dataset>: the cross-entropy on a general set (what was forgotten) is not measured.")
    rows.append(
        {
            "metric": "Frechet distance to reference (EnCodec latents)",
            "better": "lower",
            "values": {m: metrics.frechet_distance(measured[m].frames, reference_frames) for m in ids},
            "note": f"per-frame latents of the base model's EnCodec; {len(refs)} reference clips, "
            f"{len(texts)} generated per model (few clips: compare models, not absolute values)",
        }
    )
    rows.append(
        {
            "metric": "tempo error vs prompt bpm",
            "better": "lower",
            "values": {m: mean_of(summaries[m], "tempo_error") for m in ids},
            "note": "relative, half/double tempo forgiven; prompts without a bpm are left out",
        }
    )
    rows.append(
        closeness_row(
            "low-frequency (808) energy ratio",
            "low_freq_ratio",
            summaries,
            reference,
            f"energy below {metrics.LOW_FREQ_HZ} Hz over all",
        )
    )
    rows.append(closeness_row("onset density (per s)", "onset_density", summaries, reference, "drum hits per second"))
    rows.append(
        closeness_row("loudness (LUFS)", "loudness_lufs", summaries, reference, "integrated loudness of the raw output")
    )
    if options.clap:
        rows.append(clap_row(options, measured, texts))
    else:
        notes.append(
            "CLAP text-audio score skipped: give CLAP=<local folder of a transformers CLAP model, e.g. "
            "laion/clap-htsat-unfused> to compute it."
        )
    notes.append(
        "VGGish FAD skipped: it needs the VGGish weights (TensorFlow), which are not installed; the Frechet "
        "distance on EnCodec latents above is computed the same way on embeddings you already have."
    )
    return rows, notes


def relative_change(value: float, base: float) -> float:
    return 100 * (value / base - 1)


def gain_and_forgetting_rows(measured: tp.Dict[str, Measured], name: str, general: tp.Optional[str]) -> tp.List[dict]:
    """Style gained (the fall of the valid cross-entropy, % of the base's) against ability lost (the rise of the
    general cross-entropy, % of the base's) for each fine-tune; the base has neither."""
    tuned = [m for m in measured if m != "base"]
    base_valid = measured["base"].valid_ce["ce"]
    rows = [
        {
            "metric": f"style gain (% fall of the {name} valid cross-entropy)",
            "better": "higher",
            "values": {
                "base": None,
                **{m: -relative_change(measured[m].valid_ce["ce"], base_valid) for m in tuned},
            },
            "note": "how much of the base's validation loss on the new style each fine-tune removed",
        }
    ]
    if general:
        base_general = measured["base"].general_ce["ce"]
        rows.append(
            {
                "metric": f"forgetting (% rise of the {general} cross-entropy)",
                "better": "lower",
                "values": {
                    "base": None,
                    **{m: relative_change(measured[m].general_ce["ce"], base_general) for m in tuned},
                },
                "note": "what the base could do and the fine-tune lost; issue 18's goal for prior preservation: "
                "at most +15%",
            }
        )
    return rows


def tempo_errors(samples: tp.List[dict], prompt_rows: tp.List[dict]) -> None:
    """Each sample's tempo error against the bpm its prompt asks for (None without one)."""
    for sample in samples:
        target = prompt_rows[sample["prompt"]]["bpm"]
        tempo = sample["descriptors"].get("tempo_bpm")
        sample["descriptors"]["tempo_error"] = metrics.tempo_error(tempo, target) if target and tempo else None


# -- 4. drawing and writing -----------------------------------------------------------------------------------


def draw(out_dir: Path, runs: tp.List[dict], samples: tp.List[dict], refs: tp.List[dict]) -> dict:
    """Loss curves and spectrograms under plots/; the samples and references get their spectrogram's path."""
    plot_files = {}
    loss_png = plots.loss_curves(runs, out_dir / "plots" / "loss.png") if runs else None
    if loss_png:
        plot_files["loss"] = Path(loss_png).relative_to(out_dir).as_posix()
    for sample in samples:
        png = out_dir / "plots" / f"{sample['model']}_{sample['prompt']:03d}.png"
        sample["spectrogram"] = plots.spectrogram(sample.pop("path"), png).relative_to(out_dir).as_posix()
    for index, ref in enumerate(r for r in refs if "audio" in r):
        png = out_dir / "plots" / f"reference_{index:03d}.png"
        ref["spectrogram"] = plots.spectrogram(out_dir / ref["audio"], png).relative_to(out_dir).as_posix()
    return plot_files


def keep_previous_choices(previous: Path, new: Path) -> None:
    """A new report replacing `previous`: the blind A/B choices made on it are about other audio, so they move
    to `choices-<its date>.json` (earlier ones are kept too)."""
    for kept in previous.glob("choices-*.json"):
        shutil.copyfile(kept, new / kept.name)
    choices = previous / "choices.json"
    if choices.is_file():
        report = previous / "report.json"
        created = json.loads(report.read_text()).get("created", "previous") if report.is_file() else "previous"
        target = new / f"choices-{created.replace(':', '')}.json"
        shutil.copyfile(choices, target)
        print(f"Blind A/B choices of the previous report kept as {target.name}")


def evaluate(options: EvalOptions) -> Path:
    """`make eval`: compare the base with its fine-tunes (see the module's docstring); returns the report folder,
    replaced only once the new report is complete."""
    specs = model_specs(options)
    check_inputs(specs, options)
    final = Path(options.out).expanduser().resolve() if options.out else output_dir() / "reports" / options.name
    with replaced_when_complete(final) as out_dir:  # an interrupted or failed run leaves the old report
        keep_previous_choices(final, out_dir)
        refs = references(PreparedDataset(options.name), out_dir)
        texts = prompt_texts(options.prompts, refs)
        codec = base_codec(specs[0], options.t5)  # one embedding space for all: the base model's EnCodec

        def frames_of(paths: tp.Sequence[Path]) -> np.ndarray:
            return encodec_frames(codec, paths)

        reference_frames = frames_of([Path(r["source"]) for r in refs])
        measured = {spec.id: measure(spec, options, texts, out_dir, frames_of) for spec in specs}
        prompt_rows = [{"text": text, "seed": options.seed, "bpm": metrics.bpm_from_text(text)} for text in texts]
        samples = [sample for result in measured.values() for sample in result.samples]
        tempo_errors(samples, prompt_rows)
        for ref in refs:
            ref["descriptors"] = describe(Path(ref["source"]))
        rows, notes = metric_rows(options, measured, refs, reference_frames, texts)
        runs = [run for run in (spec.run() for spec in specs) if run]
        plot_files = draw(out_dir, runs, samples, refs)
        report = {
            "name": options.name,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine.describe(),
            "models": [
                {
                    "id": s.id,
                    "label": s.label,
                    "path": str(s.folder),
                    "adapter": str(s.adapter) if s.adapter else None,
                    "xp": (s.run() or {}).get("xp"),
                }
                for s in specs
            ],
            "prompts": prompt_rows,
            "settings": {
                **dataclasses.asdict(options.sampling),
                "seed": options.seed,
                "general": options.general,
                "clap": options.clap,
            },
            "samples": samples,
            "references": [{k: v for k, v in r.items() if k != "source"} for r in refs if "audio" in r],
            "cross_entropy": {
                "valid": {m: r.valid_ce for m, r in measured.items()},
                **({"general": {m: r.general_ce for m, r in measured.items()}} if options.general else {}),
            },
            "descriptors": {
                "reference": metrics.summarize([r["descriptors"] for r in refs]),
                **{m: metrics.summarize([s["descriptors"] for s in r.samples]) for m, r in measured.items()},
            },
            "table": {"columns": list(measured), "rows": rows},
            "notes": notes,
            "runs": [{k: v for k, v in run.items() if k != "history"} for run in runs],
            "plots": plot_files,
        }
        (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
        page.write(out_dir, report)
    return final
