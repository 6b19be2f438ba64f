"""`make eval`: did the fine-tune get better? Numbers and a listening page, base model against fine-tuned ones.

    output/reports/<name>/report.json   every number, with how it was measured
    output/reports/<name>/index.html    metrics table, loss curves, players side by side, blind A/B test
    output/reports/<name>/samples/<model>/, reference/, plots/

For each model (base; full fine-tune TUNED=; LoRA = base + ADAPTER=):
- cross-entropy and perplexity on the dataset's valid split, computed as training computes its validation loss
  (same segments, conditions and masking; no other weights needed), and on a second "general" dataset (GENERAL=)
  to show what was forgotten;
- audio generated for the same prompts with the same seeds, then: Frechet distance to the reference clips on the
  base model's EnCodec latents (every user has them), style descriptors (tempo against the prompt's bpm, 808 band
  energy, onset density, loudness), and the CLAP text-audio score when CLAP=<local CLAP folder> is given;
- the training and validation loss of the run it came from (dora history), with its best epoch.
"""
import datetime
import json
import math
import shutil
import typing as tp
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import environment, metrics, model_dir, output_dir
from .data import manifests_root
from .export import find_experiment
from .files import replaced_when_complete

REFERENCE_CLIPS = 8       # reference clips on the page (all valid clips count in the Frechet distance)
DEFAULT_PROMPTS = 4       # without PROMPTS=, this many captions of the valid split


class EvalError(ValueError):
    """Bad input to `make eval`; the message names the value and the fix."""


@dataclass
class ModelSpec:
    id: str
    label: str
    folder: Path
    adapter: tp.Optional[Path] = None

    def run_folder(self) -> tp.Optional[Path]:
        """The experiment this model was exported from (export.json next to it), for its loss curves."""
        info = (self.adapter.parent if self.adapter else self.folder) / "export.json"
        if self.id == "base" or not info.is_file():
            return None
        try:
            return find_experiment(json.loads(info.read_text())["experiment"])
        except Exception:  # the experiment may live on another machine: the report goes on without its curves
            return None


# -- held-out cross-entropy ---------------------------------------------------------------------------------

def manifest_root(name: str, variable: str = "NAME") -> Path:
    root = manifests_root() / name
    for path in (root / "valid" / "data.jsonl", root / "dset.yaml"):
        if not path.is_file():
            raise EvalError(f"{variable}={name}: {path} does not exist; run "
                            f"`make manifests DATA=<folder> NAME={name}` first.")
    return root


def valid_dataset(name: str, sample_rate: int, channels: int, variable: str = "NAME"):
    """The valid split as training reads it (AudioCraft's MusicDataset over our manifest, sidecars for the
    captions), each segment once, in order, as our solver's validation does."""
    from audiocraft.data.audio_dataset import load_audio_meta
    from audiocraft.data.music_dataset import MusicDataset
    from omegaconf import OmegaConf
    from .solver import read_each_segment_once
    root = manifest_root(name, variable)
    meta = load_audio_meta(root / "valid" / "data.jsonl")
    segment = float(OmegaConf.load(root / "dset.yaml").dataset.segment_duration)
    dataset = MusicDataset(meta, segment_duration=segment, shuffle=False, return_info=True,
                           sample_rate=sample_rate, channels=channels, min_segment_ratio=1.0, pad=True,
                           num_samples=len(meta))
    return read_each_segment_once(dataset)


@torch.no_grad()
def cross_entropy(model, dataset, batch_size: int = 4) -> dict:
    """Mean cross-entropy over every valid token, as the solver computes it (padding masked out)."""
    from audiocraft.solvers.musicgen import MusicGenSolver
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
        conditions = lm.condition_provider(lm.condition_provider.tokenize(
            [info.to_condition_attributes() for info in infos]))
        output = lm.compute_predictions(tokens, [], conditions)
        mask = padding & output.mask
        ce, _ = MusicGenSolver._compute_cross_entropy(None, output.logits, tokens, mask)
        count = int(mask.sum())
        total += float(ce) * count
        weight += count
    mean = total / max(weight, 1)
    return {"ce": mean, "ppl": math.exp(mean), "tokens": weight, "segments": len(dataset)}


# -- generated audio --------------------------------------------------------------------------------------

def read_audio(path: Path) -> tp.Tuple[np.ndarray, int]:
    import soundfile as sf
    audio, rate = sf.read(str(path), dtype="float32", always_2d=True)
    return audio.T, rate


@torch.no_grad()
def encodec_frames(compression, paths: tp.Sequence[Path]) -> np.ndarray:
    """Per-frame latents of the (shared, frozen) EnCodec encoder: the embedding of the Frechet distance."""
    import julius
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


def describe(path: Path) -> dict:
    audio, rate = read_audio(path)
    return metrics.descriptors(audio, rate)


# -- putting the report together ------------------------------------------------------------------------

def references(name: str, out: Path, limit: int = REFERENCE_CLIPS) -> tp.List[dict]:
    """The valid split's clips, with captions; the first `limit` are copied next to the page to listen to."""
    manifest = manifests_root() / name / "valid" / "data.jsonl"
    rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    clips = []
    for index, row in enumerate(rows):
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
        raise EvalError(f"NAME={name}: the valid split is empty; rebuild the manifests with VALID=0.2.")
    return clips


def read_prompts(prompts: tp.Optional[str], refs: tp.List[dict]) -> tp.List[str]:
    from .generate import read_prompts as read_prompt_file
    if prompts:
        return read_prompt_file(prompts)
    captions = list(dict.fromkeys(r["caption"] for r in refs if r["caption"]))
    if not captions:
        raise EvalError("The valid clips have no captions to prompt with: give PROMPTS=<file or text>.")
    return captions[:DEFAULT_PROMPTS]


def run_history(spec: ModelSpec) -> tp.Optional[dict]:
    from .solver import best_epoch
    folder = spec.run_folder()
    history_file = folder / "history.json" if folder else None
    if not history_file or not history_file.is_file():
        return None
    history = json.loads(history_file.read_text())
    return {"model": spec.id, "label": spec.label, "xp": folder.name, "history": history,
            "best_epoch": best_epoch(history), "epochs": len(history)}


def mean_of(summary: dict, key: str) -> tp.Optional[float]:
    return summary.get(key, {}).get("mean")


def closeness_row(metric: str, key: str, summaries: dict, reference: dict, note: str) -> dict:
    target = mean_of(reference, key)
    return {"metric": metric, "better": f"closer:{target}" if target is not None else None,
            "values": {model: mean_of(summary, key) for model, summary in summaries.items()},
            "note": f"{note}; reference clips: {target:.3g}" if target is not None else note}


def check_inputs(specs: tp.List[ModelSpec], name: str, general: tp.Optional[str], clap: tp.Optional[str],
                 t5: tp.Optional[str]) -> None:
    """Everything that can be wrong with the inputs, before minutes of cross-entropy and generation."""
    from . import lora, patches
    if len(specs) == 1:
        raise EvalError("Nothing to compare the base model with: give TUNED=<exported model folder> and/or "
                        "ADAPTER=<adapters.safetensors>.")
    manifest_root(name, "NAME")
    if general:
        manifest_root(general, "GENERAL")
    for spec, variable in zip(specs, ("BASE", "TUNED" if specs[1].id == "full" else "ADAPTER", "ADAPTER")):
        if (spec.folder / "checkpoint.th").is_file() and not (spec.folder / model_dir.LM_FILE).is_file():
            raise EvalError(f"{variable}={spec.folder} is an experiment folder: export it first "
                            f"(`make export XP={spec.folder.name}`) and give the exported folder.")
        model_dir.check(spec.folder, t5)
        if spec.adapter is None:
            continue
        if not spec.adapter.is_file():
            raise EvalError(f"ADAPTER={spec.adapter} does not exist (make export writes adapters.safetensors "
                            "for LoRA runs).")
        saved = json.loads(lora.config_path(spec.adapter).read_text()).get("base_hash")
        actual = lora.base_model_hash(patches.safe_load(model_dir.lm_file(str(spec.folder)))["best_state"])
        if saved != actual:
            raise EvalError(f"ADAPTER={spec.adapter} was trained on another base model than BASE={spec.folder} "
                            f"(base hash {str(saved)[:16]}, this one {actual[:16]}): give the base it was trained "
                            "on (its export.json names it).")
    if clap:
        config = Path(clap).expanduser() / "config.json"
        model_type = json.loads(config.read_text()).get("model_type") if config.is_file() else None
        if model_type != "clap":
            raise EvalError(f"CLAP={clap}: not a transformers CLAP model folder (config.json with model_type "
                            "'clap', weights and processor files, e.g. a local copy of laion/clap-htsat-unfused).")


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


def evaluate(base: str, name: str, tuned: tp.Optional[str] = None, adapter: tp.Optional[str] = None,
             general: tp.Optional[str] = None, prompts: tp.Optional[str] = None, duration: float = 10.0,
             seed: int = 0, top_k: int = 250, clap: tp.Optional[str] = None, out: tp.Optional[str] = None,
             t5: tp.Optional[str] = None, progress: bool = False) -> Path:
    environment.prepare()
    from . import plots, report_page
    from .bench import machine
    from .generate import check_settings, load, write_samples
    specs = [ModelSpec("base", "base model", Path(base).expanduser().resolve())]
    if tuned:
        specs.append(ModelSpec("full", "fine-tuned", Path(tuned).expanduser().resolve()))
    if adapter:
        specs.append(ModelSpec("lora", "LoRA", specs[0].folder, Path(adapter).expanduser().resolve()))
    check_inputs(specs, name, general, clap, t5)
    check_settings(duration, top_k, 0.0, 1.0, 3.0, 1)
    final = Path(out).expanduser().resolve() if out else output_dir() / "reports" / name
    with replaced_when_complete(final) as out_dir:  # an interrupted or failed run leaves the old report
        keep_previous_choices(final, out_dir)
        refs = references(name, out_dir)
        texts = read_prompts(prompts, refs)
        notes: tp.List[str] = []

        valid_ce, general_ce, samples = {}, {}, []
        reference_frames = None
        frames: tp.Dict[str, np.ndarray] = {}
        for spec in specs:
            print(f"[{spec.id}] {spec.folder}{' + ' + str(spec.adapter) if spec.adapter else ''}", flush=True)
            model = load(spec.folder, spec.adapter, t5=t5)
            rate, channels = model.sample_rate, model.audio_channels
            valid_ce[spec.id] = cross_entropy(model, valid_dataset(name, rate, channels))
            if general:
                general_ce[spec.id] = cross_entropy(model, valid_dataset(general, rate, channels, "GENERAL"))
            k = min(top_k, int(model.lm.card))
            _, items = write_samples(model, texts, out_dir / "samples" / spec.id, duration, (seed,), top_k=k,
                                     batch_size=1, progress=progress, loudness_normalize=False)
            for item in items:
                path = out_dir / "samples" / spec.id / item["file"]
                samples.append({"prompt": item["index"], "model": spec.id, "path": path,
                                "audio": path.relative_to(out_dir).as_posix(), "descriptors": describe(path)})
            if reference_frames is None:  # one embedding space for all: the base model's EnCodec
                compression = model.compression_model
                reference_frames = encodec_frames(compression, [Path(r["source"]) for r in refs])
            frames[spec.id] = encodec_frames(compression, [s["path"] for s in samples if s["model"] == spec.id])
            del model

        prompt_rows = [{"text": text, "seed": seed, "bpm": metrics.bpm_from_text(text)} for text in texts]
        for sample in samples:
            target = prompt_rows[sample["prompt"]]["bpm"]
            tempo = sample["descriptors"].get("tempo_bpm")
            sample["descriptors"]["tempo_error"] = metrics.tempo_error(tempo, target) if target and tempo else None
        for ref in refs:
            ref["descriptors"] = describe(Path(ref["source"]))
        reference_summary = metrics.summarize([r["descriptors"] for r in refs])
        summaries = {spec.id: metrics.summarize([s["descriptors"] for s in samples if s["model"] == spec.id])
                     for spec in specs}
        ids = [spec.id for spec in specs]

        rows = [{"metric": f"valid cross-entropy ({name})", "better": "lower",
                 "values": {m: valid_ce[m]["ce"] for m in ids},
                 "note": f"the validation loss of training, on its {valid_ce[ids[0]]['segments']} held-out segments"},
                {"metric": f"valid perplexity ({name})", "better": "lower",
                 "values": {m: valid_ce[m]["ppl"] for m in ids}, "note": "exp(cross-entropy)"}]
        if general:
            rows.append({"metric": f"cross-entropy on {general} (general)", "better": "lower",
                         "values": {m: general_ce[m]["ce"] for m in ids},
                         "note": "what the base could do; a rise is what fine-tuning forgot"})
        else:
            notes.append("No GENERAL=<dataset>: the cross-entropy on a general set (what was forgotten) is not "
                         "measured.")
        rows.append({"metric": "Frechet distance to reference (EnCodec latents)", "better": "lower",
                     "values": {m: metrics.frechet_distance(frames[m], reference_frames) for m in ids},
                     "note": f"per-frame latents of the base model's EnCodec; {len(refs)} reference clips, "
                             f"{len(texts)} generated per model (few clips: compare models, not absolute values)"})
        rows.append({"metric": "tempo error vs prompt bpm", "better": "lower",
                     "values": {m: mean_of(summaries[m], "tempo_error") for m in ids},
                     "note": "relative, half/double tempo forgiven; prompts without a bpm are left out"})
        rows.append(closeness_row("low-frequency (808) energy ratio", "low_freq_ratio", summaries, reference_summary,
                                  f"energy below {metrics.LOW_FREQ_HZ} Hz over all"))
        rows.append(closeness_row("onset density (per s)", "onset_density", summaries, reference_summary,
                                  "drum hits per second"))
        rows.append(closeness_row("loudness (LUFS)", "loudness_lufs", summaries, reference_summary,
                                  "integrated loudness of the raw output"))
        if clap:
            scores = {}
            for spec_id in ids:
                mine = [s for s in samples if s["model"] == spec_id]
                clips = [read_audio(s["path"]) for s in mine]
                values = metrics.clap_scores(Path(clap), [c[0] for c in clips], clips[0][1],
                                             [texts[s["prompt"]] for s in mine])
                scores[spec_id] = float(np.mean(values))
            rows.append({"metric": "CLAP text-audio score", "better": "higher", "values": scores,
                         "note": f"cosine similarity, CLAP from {clap}"})
        else:
            notes.append("CLAP text-audio score skipped: give CLAP=<local folder of a transformers CLAP model, e.g. "
                         "laion/clap-htsat-unfused> to compute it.")
        notes.append("VGGish FAD skipped: it needs the VGGish weights (TensorFlow), which are not installed; the "
                     "Frechet distance on EnCodec latents above is computed the same way on embeddings you "
                     "already have.")

        runs = [run for run in (run_history(spec) for spec in specs) if run]
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

        report = {
            "name": name, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(),
            "models": [{"id": s.id, "label": s.label, "path": str(s.folder),
                        "adapter": str(s.adapter) if s.adapter else None,
                        "xp": (s.run_folder().name if s.run_folder() else None)} for s in specs],
            "prompts": prompt_rows,
            "settings": {"duration": duration, "seed": seed, "top_k": k, "general": general, "clap": clap},
            "samples": samples,
            "references": [{k: v for k, v in r.items() if k != "source"} for r in refs if "audio" in r],
            "cross_entropy": {"valid": valid_ce, **({"general": general_ce} if general else {})},
            "descriptors": {"reference": reference_summary, **summaries},
            "table": {"columns": ids, "rows": rows},
            "notes": notes,
            "runs": [{k: v for k, v in run.items() if k != "history"} for run in runs],
            "plots": plot_files,
        }
        (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
        report_page.write(out_dir, report)
    return final
