"""`make eval` end to end, as the demo runs it at small scale: a "general" base (the tiny model trained on another
style), fine-tuned on the 808 set through real `dora run`, then compared; the report is opened in Chromium."""

import json
import math
from pathlib import Path

import pytest
from conftest import DATASET, run_tool, train, xp_folder
from test_report_page import Watched, browser, watched  # noqa: F401  (browser fixtures)

from musicgen_finetune import export

GENERAL = "chiptune-test"
# The comparison on a trained base is make test-all's (the long cases): its fixtures train a codec on two styles, a
# base on one and a fine-tune on the other, 10 of make test's 13.6 min when it ran there (2 cores, idle machine).
# make test keeps evaluation's parts: metrics (test_metrics.py), the report page (test_report_page.py), an eval run
# with a PEFT adapter (test_peft.py), and keeping the earlier blind choices (below).
LONG = pytest.mark.long


@pytest.fixture(scope="module")
def general_model(workdir, beats, dataset):
    """A tiny model whose codec was trained on both styles, then trained for a few epochs on chiptune: a base
    that knows another style, with audio that shows which style its tokens carry (as in `make demo`)."""
    from musicgen_finetune.data.manifests import ManifestOptions, build_manifests
    from musicgen_finetune.data.synthetic import write_dataset
    from musicgen_finetune.models.tiny import write_tiny_model

    data = write_dataset(workdir / "chiptune", count=8, seconds=3.0, seed=7, style="chiptune")
    build_manifests(data, GENERAL, ManifestOptions(segment=1.0, valid=0.25))
    styled = write_tiny_model(workdir / "tiny-styled", seed=0, codec_data=[beats, data])  # as `make demo`
    result = run_tool(
        [
            "tools/train.py",
            "--model",
            str(styled),
            "--name",
            GENERAL,
            "--preset",
            "finetune/cpu_tiny",
            "--args",
            "optim.epochs=4",
        ],
        workdir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # exported in this process: `make export`'s tool is tested elsewhere, and each tool process starts torch anew
    return export.export(xp_folder(result).name, workdir / "models" / "general")


@pytest.fixture(scope="module")
def tuned_model(workdir, general_model, dataset):
    result = train(workdir, general_model)
    assert result.returncode == 0, result.stderr[-3000:]
    return export.export(xp_folder(result).name, workdir / "models" / "tuned-from-general"), xp_folder(result)


@pytest.fixture(scope="module")
def evaluated(workdir, general_model, tuned_model, tmp_path_factory):
    prompts = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    prompts.write_text("hip hop 808 beat with trap drums, 140 bpm\ndark trap beat with heavy 808 bass, 150 bpm\n")
    out = workdir / "reports" / "eval-test"
    result = run_tool(
        [
            "tools/eval.py",
            "--base",
            str(general_model),
            "--tuned",
            str(tuned_model[0]),
            "--name",
            DATASET,
            "--general",
            GENERAL,
            "--prompts",
            str(prompts),
            "--duration",
            "1",
            "--top-k",
            "50",
            "--out",
            str(out),
        ],
        workdir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out, json.loads((out / "report.json").read_text())


def row(report: dict, prefix: str) -> dict:
    return next(r for r in report["table"]["rows"] if r["metric"].startswith(prefix))["values"]


@LONG
def test_the_briefly_trained_codec_keeps_the_styles_apart(general_model, workdir, beats):
    """What the audio measures below rest on: decoded through the demo's tiny codec, 808 clips keep their sub-bass
    and chiptune clips (almost none below 120 Hz) do not gain it; a codec that collapsed decodes every clip alike."""
    import torch
    from audiocraft.models.loaders import load_compression_model

    from musicgen_finetune.evaluation.metrics import low_freq_ratio
    from musicgen_finetune.models.folder import COMPRESSION_FILE
    from musicgen_finetune.models.tiny import read_clips

    codec = load_compression_model(str(general_model / COMPRESSION_FILE), device="cpu")
    ratios = {}
    for style, folder in (("808", beats), ("chiptune", workdir / "chiptune")):
        clips = read_clips([folder], codec.sample_rate, seconds=3.0)
        with torch.no_grad():
            decoded = codec.decode(*codec.encode(clips))
        ratios[style] = [low_freq_ratio(clip[0].numpy(), codec.sample_rate) for clip in decoded]
    assert min(ratios["808"]) > 0.8 and max(ratios["chiptune"]) < 0.4, ratios


@LONG
def test_fine_tuning_lowers_the_808_cross_entropy(evaluated):
    _, report = evaluated
    valid = row(report, "valid cross-entropy")
    assert valid["full"] < valid["base"]
    assert math.isclose(row(report, "valid perplexity")["full"], math.exp(valid["full"]), rel_tol=1e-9)
    # on the general style, the base (trained on it) is the better of the two: what fine-tuning moves away from
    general = report["cross_entropy"]["general"]
    assert general["base"]["ce"] < report["cross_entropy"]["valid"]["base"]["ce"]


@LONG
def test_fine_tuned_audio_moves_toward_the_808_references(evaluated):
    """The general base makes chiptune-like audio; after fine-tuning the samples carry more sub-bass and sit
    closer to the 808 references in EnCodec space."""
    _, report = evaluated
    low = row(report, "low-frequency")
    assert low["full"] > low["base"] + 0.1, low
    frechet = row(report, "Frechet distance")
    assert frechet["full"] < frechet["base"], frechet
    forgot = report["cross_entropy"]["general"]
    assert forgot["full"]["ce"] > forgot["base"]["ce"]  # and it forgot some of the general style


@LONG
def test_valid_cross_entropy_is_the_one_training_reported(evaluated, tuned_model):
    """Eval and training read the same valid segments, each once, and compute the same loss; training then
    averages its batches (of 4 here), eval every token alike."""
    from musicgen_finetune.data.dataset import PreparedDataset
    from musicgen_finetune.evaluation.evaluate import cross_entropy
    from musicgen_finetune.generate import load

    _, report = evaluated
    export = json.loads((tuned_model[0] / "export.json").read_text())
    model = load(tuned_model[0], device="cpu")
    dataset = PreparedDataset(DATASET).segments_once("valid", model.sample_rate, model.audio_channels)
    batches = [
        cross_entropy(model, [dataset[i] for i in range(start, min(start + 4, len(dataset)))])
        for start in range(0, len(dataset), 4)
    ]
    assert math.isclose(sum(b["ce"] for b in batches) / len(batches), export["valid_ce"], abs_tol=1e-4)
    per_token = sum(b["ce"] * b["tokens"] for b in batches) / sum(b["tokens"] for b in batches)
    assert math.isclose(report["cross_entropy"]["valid"]["full"]["ce"], per_token, abs_tol=1e-4)


@LONG
def test_eval_refuses_bad_inputs_before_any_work(workdir, general_model, tuned_model, tiny_model):
    from musicgen_finetune import UserError, lora
    from musicgen_finetune.evaluation.evaluate import EvalOptions, evaluate
    from musicgen_finetune.generate import Sampling, load

    def refusal(**kwargs) -> str:
        with pytest.raises(UserError) as error:
            evaluate(EvalOptions(str(general_model), DATASET, **kwargs))
        return str(error.value)

    missing = refusal(tuned=str(tuned_model[0]), general="no-such-set")
    assert "GENERAL=no-such-set" in missing and "make manifests" in missing
    experiment = refusal(tuned=str(tuned_model[1]))
    assert "is an experiment folder" in experiment and f"make export XP={tuned_model[1].name}" in experiment
    lora_on_other_base = workdir / "lora-other-base.safetensors"
    model = load(tiny_model, device="cpu")  # adapters saved against the random tiny model, not the general base
    lora.inject(model.lm, lora.LoraConfig(enabled=True, rank=2, alpha=4))
    lora.save_adapters(model.lm, lora_on_other_base, lora.LoraConfig(enabled=True, rank=2, alpha=4))
    assert "trained on another base model" in refusal(adapter=str(lora_on_other_base))
    assert "DURATION=0" in refusal(tuned=str(tuned_model[0]), sampling=Sampling(duration=0))
    assert not (workdir / "output" / "reports" / DATASET).exists()  # nothing written for a refused run


@LONG
def test_same_prompts_and_seeds_for_every_model(evaluated):
    out, report = evaluated
    by_model = {}
    for sample in report["samples"]:
        assert (out / sample["audio"]).is_file() and (out / sample["spectrogram"]).is_file()
        assert set(sample["descriptors"]) >= {"tempo_bpm", "low_freq_ratio", "onset_density", "loudness_lufs"}
        by_model.setdefault(sample["model"], []).append(sample["prompt"])
    assert by_model == {"base": [0, 1], "full": [0, 1]}
    assert [p["bpm"] for p in report["prompts"]] == [140.0, 150.0]
    seeds = {m: sorted(p.name for p in (out / "samples" / m).glob("*.wav")) for m in by_model}
    assert seeds["base"] == seeds["full"] and all(name.endswith("_seed0.wav") for name in seeds["base"])
    frechet = row(report, "Frechet distance")
    assert all(value >= 0 and math.isfinite(value) for value in frechet.values())


@LONG
def test_report_names_the_run_its_best_epoch_and_what_was_skipped(evaluated, tuned_model):
    out, report = evaluated
    folder = tuned_model[1]
    done = json.loads((folder / "done.json").read_text())
    exported = json.loads((tuned_model[0] / "export.json").read_text())
    assert report["runs"] == [
        {
            "model": "full",
            "label": "fine-tuned",
            "xp": folder.name,
            "best_epoch": done["best_epoch"],
            "epochs": done["epochs"],
            "exported_epoch": exported["epoch"],
        }
    ]
    assert (out / report["plots"]["loss"]).is_file()
    assert any("CLAP" in note for note in report["notes"]) and any("VGGish" in note for note in report["notes"])


@LONG
def test_report_page_loads_in_chromium(evaluated, watched):  # noqa: F811
    out, report = evaluated
    page = watched.page
    page.goto((out / "index.html").as_uri())
    page.wait_for_function(
        "() => Array.from(document.querySelectorAll('audio')).every((a) => a.readyState >= 1 || a.error)", timeout=15000
    )
    audio = page.evaluate(
        "() => Array.from(document.querySelectorAll('audio')).map((a) => [a.currentSrc, "
        "a.readyState, a.error && a.error.code])"
    )
    sources = {Path(src.split("://", 1)[1]).relative_to(out).as_posix() for src, _, _ in audio}
    assert {s["audio"] for s in report["samples"]} <= sources
    assert [a for a in audio if a[2] or a[1] < 1] == []
    images = page.evaluate("() => Array.from(document.images).map((image) => [image.src, image.naturalWidth])")
    assert len(images) >= len(report["samples"]) + 1 and all(width > 0 for _, width in images)
    assert watched.problems == []


def test_a_new_report_keeps_the_previous_blind_choices_aside(tmp_path):
    from musicgen_finetune.evaluation.evaluate import keep_previous_choices

    previous, new = tmp_path / "report", tmp_path / "report.partial"
    previous.mkdir()
    new.mkdir()
    (previous / "report.json").write_text(json.dumps({"created": "2026-01-02T03:04:05+00:00"}))
    (previous / "choices.json").write_text('[{"choice": "A"}]')
    (previous / "choices-older.json").write_text("[]")
    keep_previous_choices(previous, new)
    assert sorted(p.name for p in new.iterdir()) == ["choices-2026-01-02T030405+0000.json", "choices-older.json"]
    assert json.loads((new / "choices-2026-01-02T030405+0000.json").read_text()) == [{"choice": "A"}]
    assert not (new / "choices.json").exists()
