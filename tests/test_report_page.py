"""The evaluation's report page in a real headless Chromium (media load, best metrics highlighted, blind A/B choices
reach choices.json), its server, and the plots it shows.

Chromium: $CHROMIUM, else chromium / chromium-browser / google-chrome on PATH; Playwright never downloads one.
Without it the browser tests are skipped, unless REQUIRE_CHROMIUM=1 (CI), which makes them fail.
"""

import json
import os
import shutil
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from musicgen_finetune.evaluation import page as report_page
from musicgen_finetune.evaluation import plots, server

RATE = 32000
MODELS = [
    {"id": "base", "label": "base model", "path": "/models/base", "adapter": None, "xp": None},
    {"id": "full", "label": "full fine-tune", "path": "/exports/full", "adapter": None, "xp": "a1b2c3d4"},
    {
        "id": "lora",
        "label": "LoRA",
        "path": "/exports/lora",
        "adapter": "/exports/lora/adapters.safetensors",
        "xp": "e5f6a7b8",
    },
]
KICK_HZ = {"base": 45.0, "full": 55.0, "lora": 65.0}
# Prompt text with markup in it: the page must show it as text.
PROMPTS = [
    {"text": 'hip-hop 808 beat <b>140</b> bpm & "hard"', "seed": 0, "bpm": 140.0},
    {"text": "trap beat, rolling hi-hats", "seed": 1, "bpm": None},
]
TABLE_ROWS = [  # (row, the columns that must be highlighted)
    (
        {
            "metric": "valid CE (808 set)",
            "better": "lower",
            "values": {"base": 4.1, "full": 3.2, "lora": 3.5},
            "note": "same loss as training",
        },
        {"full"},
    ),
    (
        {"metric": "CLAP score", "better": "higher", "values": {"base": 0.35, "full": 0.25, "lora": 0.31}, "note": ""},
        {"base"},
    ),
    (
        {
            "metric": "tempo (BPM)",
            "better": "closer:140",
            "values": {"base": 120.0, "full": 151.0, "lora": 138.5},
            "note": "prompts ask for 140",
        },
        {"lora"},
    ),
    (
        {"metric": "pitch error", "better": "lower", "values": {"base": None, "full": 2.0, "lora": 2.0}, "note": "tie"},
        {"full", "lora"},
    ),
    ({"metric": "onsets / s", "better": None, "values": {"base": 4.0, "full": 5.0, "lora": 6.0}, "note": ""}, set()),
    ({"metric": "FAD (VGGish)", "better": "lower", "values": {}, "note": "skipped: no VGGish model"}, set()),
]


def beat(kick_hz: float, seconds: float = 1.0, channels: int = 1) -> np.ndarray:
    """Four decaying sine kicks and a little noise: an 808 band a spectrogram must show."""
    t = np.arange(int(seconds * RATE)) / RATE
    audio = np.zeros_like(t)
    for start in np.arange(0, seconds, seconds / 4):
        tail = t >= start
        audio[tail] += np.sin(2 * np.pi * kick_hz * (t[tail] - start)) * np.exp(-6 * (t[tail] - start))
    audio = 0.5 * audio + 0.02 * np.random.default_rng(int(kick_hz)).standard_normal(len(t))
    return np.stack([audio] * channels, axis=1).astype(np.float32)


def history(start: float, epochs: int) -> list:
    return [
        {"train": {"ce": start - 0.3 * e, "ppl": 20.0}, "valid": {"ce": start + 0.2 - 0.25 * e}} for e in range(epochs)
    ]


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("report")
    samples = []
    for prompt in range(len(PROMPTS)):
        for model in KICK_HZ:
            audio, spectrogram = f"samples/{model}/{prompt:03d}.wav", f"plots/{model}_{prompt:03d}.png"
            (folder / audio).parent.mkdir(parents=True, exist_ok=True)
            sf.write(folder / audio, beat(KICK_HZ[model], channels=2 if model == "lora" else 1), RATE)
            plots.spectrogram(folder / audio, folder / spectrogram)
            samples.append(
                {
                    "prompt": prompt,
                    "model": model,
                    "audio": audio,
                    "spectrogram": spectrogram,
                    "descriptors": {
                        "tempo_bpm": 139.7,
                        "low_freq_ratio": 0.41,
                        "onset_density": 4.2,
                        "loudness_lufs": -14.1,
                    },
                }
            )
    (folder / "reference").mkdir()
    sf.write(folder / "reference/000.wav", beat(50.0), RATE)
    plots.spectrogram(folder / "reference/000.wav", folder / "plots/reference_000.png")
    plots.loss_curves(
        [
            {"label": "full fine-tune", "history": history(4.0, 4), "best_epoch": 4},
            {"label": "LoRA", "history": history(4.1, 3), "best_epoch": 3},
        ],
        folder / "plots/loss.png",
    )
    report = {
        "name": "demo808",
        "created": "2026-11-25T15:00:00Z",
        "machine": {"cpu": "test cpu", "cores": 2, "gpu": None, "torch": "2.9.1"},
        "settings": {"duration": 1.0, "seed": 0, "top_k": 250},
        "models": MODELS,
        "prompts": PROMPTS,
        "samples": samples,
        "references": [
            {
                "audio": "reference/000.wav",
                "caption": "a real 808 loop",
                "spectrogram": "plots/reference_000.png",
                "descriptors": {"tempo_bpm": 140.0},
            }
        ],
        "table": {"columns": ["base", "full", "lora"], "rows": [row for row, _ in TABLE_ROWS]},
        "notes": ["VGGish FAD skipped: no VGGish model <offline>"],
        "runs": [
            {"model": "full", "xp": "a1b2c3d4", "best_epoch": 4, "epochs": 4},
            {"model": "lora", "xp": "e5f6a7b8", "best_epoch": 3, "epochs": 3},
        ],
        "plots": {"loss": "plots/loss.png"},
    }
    (folder / "report.json").write_text(json.dumps(report))
    report_page.write(folder, report)
    return folder


@pytest.fixture(scope="module")
def report(report_dir) -> dict:
    return json.loads((report_dir / "report.json").read_text())


@pytest.fixture(scope="module")
def served(report_dir):
    running = server.make_server(report_dir, port=0, quiet=True)
    thread = threading.Thread(target=running.serve_forever, daemon=True)
    thread.start()
    yield running.url
    running.shutdown()
    running.server_close()


def chromium() -> str:
    """The browser to drive, or skip (fail under REQUIRE_CHROMIUM=1) saying why there is none."""
    candidates = [os.environ.get("CHROMIUM")] + [
        shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
    ]
    found = next((path for path in candidates if path and os.path.isfile(path)), None)
    reason = (
        None
        if found
        else ("no Chromium: set CHROMIUM=/path/to/chromium or install chromium (apt-get install chromium)")
    )
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        reason = "the playwright package is not installed in this environment"
    if reason:
        if os.environ.get("REQUIRE_CHROMIUM") == "1":
            pytest.fail(f"REQUIRE_CHROMIUM=1 but {reason}")
        pytest.skip(reason)
    return found


@pytest.fixture(scope="module")
def browser():
    executable = chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # Playwright passes --no-sandbox by default (chromium_sandbox=False), which Chromium needs as root.
        launched = playwright.chromium.launch(executable_path=executable)
        yield launched
        launched.close()


class Watched:
    """A page and what went wrong on it: console errors, page errors, failed requests, HTTP errors."""

    def __init__(self, page):
        self.page, self.problems = page, []
        page.on("console", lambda message: message.type == "error" and self.problems.append(f"console: {message.text}"))
        page.on("pageerror", lambda error: self.problems.append(f"page error: {error}"))
        page.on("requestfailed", self._failed)
        page.on(
            "response",
            lambda response: response.status >= 400 and self.problems.append(f"HTTP {response.status}: {response.url}"),
        )

    def _failed(self, request) -> None:
        if request.resource_type == "media" and request.failure == "net::ERR_ABORTED":
            return  # a player stops reading once it has what preload="metadata" asks for; errors show as audio.error
        self.problems.append(f"failed: {request.url} ({request.resource_type}) {request.failure}")


@pytest.fixture
def watched(browser):
    """A fresh page with its own localStorage."""
    context = browser.new_context(accept_downloads=True)
    yield Watched(context.new_page())
    context.close()


def expect_media_loaded(page, audio_count: int) -> None:
    page.wait_for_function(
        "() => Array.from(document.querySelectorAll('audio')).every((a) => a.readyState >= 1 || a.error)", timeout=15000
    )
    page.wait_for_function("() => Array.from(document.images).every((image) => image.complete)", timeout=15000)
    audio = page.evaluate(
        "() => Array.from(document.querySelectorAll('audio'))"
        ".map((a) => ({src: a.currentSrc, ready: a.readyState, error: a.error && a.error.code}))"
    )
    assert len(audio) == audio_count
    assert [a for a in audio if a["error"] or a["ready"] < 1] == []
    images = page.evaluate("() => Array.from(document.images).map((image) => [image.src, image.naturalWidth])")
    assert len(images) == 3 * len(PROMPTS) + 2  # spectrograms, the reference's, the loss curves
    assert [src for src, width in images if width == 0] == []


def pair_card(page, index: int):
    return page.locator("article.pair").nth(index)


def test_served_page_loads_highlights_and_records_blind_choices(watched, served, report_dir, report):
    page = watched.page
    pairs = report_page.blind_pairs(report)
    assert len(pairs) == 2 * len(PROMPTS)
    page.goto(served)
    expect_media_loaded(page, audio_count=3 * len(PROMPTS) + 2 * len(pairs) + 1)

    highlighted = page.evaluate(
        "() => Array.from(document.querySelectorAll('#metrics tbody tr')).map((row) => "
        "Array.from(row.querySelectorAll('td.best')).map((cell) => cell.dataset.column))"
    )
    assert [set(columns) for columns in highlighted] == [best for _, best in TABLE_ROWS]
    assert page.locator(".prompt").first.inner_text() == f"“{PROMPTS[0]['text']}” · seed 0 · 140 BPM"
    assert page.locator(".prompt b").count() == 0

    page.get_by_role("tab", name="Blind A/B").click()
    page.wait_for_selector("body[data-choices-loaded]")
    card, order = pair_card(page, 0), pairs[0]["order"]
    assert card.locator(".reveal").is_disabled() and card.locator(".revealed").is_hidden()
    card.get_by_label("Note (optional)").fill("punchier 808")
    with page.expect_response(lambda r: r.url.endswith("/choices") and r.request.method == "POST") as posted:
        card.get_by_role("radio", name="B", exact=True).check()
    assert posted.value.ok
    saved = json.loads((report_dir / "choices.json").read_text())
    assert saved[-1]["pair"] == order and saved[-1]["choice"] == "B" and saved[-1]["preferred_model"] == order[1]
    assert saved[-1]["note"] == "punchier 808" and saved[-1]["prompt"] == 0

    labels = {m["id"]: m["label"] for m in MODELS}
    card.locator(".reveal").click()
    assert card.locator(".revealed").inner_text() == f"A: {labels[order[0]]} · B: {labels[order[1]]}"
    assert card.get_by_role("radio", name="A", exact=True).is_disabled()
    summary = page.locator(f'#ab-summary tr[data-model="{order[1]}"] td')
    assert summary.all_inner_texts() == ["1", "0", "0"]

    assert watched.problems == []
    page.reload()  # the choice comes back from the server, the reveal from the browser; the tab from the URL
    page.wait_for_selector("body[data-choices-loaded]")
    assert pair_card(page, 0).get_by_role("radio", name="B", exact=True).is_checked()
    assert pair_card(page, 0).locator(".revealed").is_visible()
    assert page.locator("#ab-progress").inner_text() == f"1 of {len(pairs)} pairs judged"
    assert watched.problems == []


def test_file_page_keeps_choices_in_the_browser_and_downloads_them(watched, report_dir, report, tmp_path):
    page = watched.page
    before = (report_dir / "choices.json").read_bytes() if (report_dir / "choices.json").exists() else None
    page.goto((report_dir / "index.html").as_uri() + "#blind")
    page.wait_for_selector("body[data-choices-loaded]")
    expect_media_loaded(page, audio_count=3 * len(PROMPTS) + 4 * len(PROMPTS) + 1)
    pair_card(page, 1).get_by_role("radio", name="same / no preference").check()
    with page.expect_download() as download:
        page.get_by_role("button", name="Download choices.json").click()
    download.value.save_as(tmp_path / "choices.json")
    saved = json.loads((tmp_path / "choices.json").read_text())
    assert [(r["pair"], r["choice"], r["preferred_model"]) for r in saved] == [
        (report_page.blind_pairs(report)[1]["order"], "same", None)
    ]
    page.reload()
    page.wait_for_selector("body[data-choices-loaded]")
    assert pair_card(page, 1).get_by_role("radio", name="same / no preference").is_checked()
    after = (report_dir / "choices.json").read_bytes() if (report_dir / "choices.json").exists() else None
    assert after == before
    assert watched.problems == []


def test_server_rejects_bad_choices_and_serves_byte_ranges(served, report_dir):
    request = urllib.request.Request(
        served + "choices",
        data=json.dumps({"pair": ["base"], "choice": "A"}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with pytest.raises(urllib.error.HTTPError) as rejected:
        urllib.request.urlopen(request, timeout=10)
    assert rejected.value.code == 400 and "pair=" in rejected.value.read().decode()
    ranged = urllib.request.Request(served + "reference/000.wav", headers={"Range": "bytes=4-11"})
    with urllib.request.urlopen(ranged, timeout=10) as response:
        assert response.status == 206 and response.read() == (report_dir / "reference/000.wav").read_bytes()[4:12]
    with urllib.request.urlopen(served + "choices.json", timeout=10) as response:
        assert isinstance(json.loads(response.read()), list)


def test_page_text_is_escaped_and_media_must_be_inside_the_report(report_dir, report, tmp_path):
    html = (report_dir / "index.html").read_text()
    assert "<b>140</b>" not in html and "&lt;b&gt;140&lt;/b&gt;" in html and "<offline>" not in html
    assert "http://" not in html and "https://" not in html  # self-contained: no CDN, no fonts
    assert not list(report_dir.glob(".index.html.*"))  # the atomic write left nothing behind
    assert "No metrics were computed" in report_page.render(tmp_path, {})  # optional keys may all be missing
    outside = dict(report, references=[{"audio": str(tmp_path / "elsewhere.wav")}])
    with pytest.raises(ValueError, match="inside the report folder"):
        report_page.render(report_dir, outside)
    with pytest.raises(ValueError, match="closer:<number>"):
        report_page.best_columns({"metric": "tempo", "better": "near 140", "values": {"a": 1, "b": 2}})


def test_loss_curves_draw_nothing_without_history(tmp_path):
    assert plots.loss_curves([], tmp_path / "none.png") is None
    assert plots.loss_curves([{"label": "base", "history": [], "best_epoch": None}], tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_loss_curves_write_a_png(tmp_path):
    partial = history(4.0, 3)
    del partial[1]["valid"]  # epochs without validation are drawn from the train loss alone
    out = plots.loss_curves(
        [{"label": "full", "history": partial, "best_epoch": 3}, {"label": "empty", "history": [], "best_epoch": None}],
        tmp_path / "loss.png",
    )
    assert out == tmp_path / "loss.png" and Image.open(out).format == "PNG"


def test_spectrogram_has_the_expected_size(tmp_path):
    sf.write(tmp_path / "beat.wav", beat(55.0, seconds=0.5, channels=2), RATE)
    assert Image.open(plots.spectrogram(tmp_path / "beat.wav", tmp_path / "spec.png")).size == (500, 200)
    small = plots.spectrogram(tmp_path / "beat.wav", tmp_path / "small.png", size=(3.0, 1.0), dpi=80)
    assert Image.open(small).size == (240, 80)
    (tmp_path / "broken.wav").write_bytes(b"not audio")
    with pytest.raises(ValueError, match="broken.wav"):
        plots.spectrogram(tmp_path / "broken.wav", tmp_path / "broken.png")


@pytest.mark.parametrize(
    "better, values, best",
    [
        ("lower", {"base": 5.5, "full": 2.7, "lora": 3.4}, {"full"}),
        ("higher", {"base": 0.21, "full": 0.23, "lora": 0.22}, {"full"}),
        ("closer:0.93", {"base": 0.29, "full": 0.97, "lora": 0.94}, {"lora"}),
        ("lower", {"base": 2.0, "full": 2.0, "lora": None}, {"base", "full"}),  # a tie; a missing value is no winner
        (None, {"base": 1.0, "full": 2.0}, set()),
    ],
)
def test_best_values_follow_the_direction_without_a_browser(better, values, best):
    assert report_page.best_columns({"metric": "m", "better": better, "values": values}) == best
