"""The evaluation's listening page, `<report_dir>/index.html`, from its report.json.

The page is one self-contained file (the CSS and JavaScript of assets/ inlined, no network) that refers to its
audio and images by paths relative to the report folder. Tabs: results (metrics table, notes, loss curves, models),
side by side (each prompt, one column per model: player, spectrogram, descriptors), blind A/B (base model against
each other model, in an order drawn once per pair and stored in the page) and references. `make listen` serves it
(server.py) and records the blind A/B choices.
"""

import html
import json
import math
import os
import random
import typing as tp
from pathlib import Path
from urllib.parse import quote

from ..files import write_text_atomically

PAGE = "index.html"
CHOICES = ("A", "B", "same")  # the blind A/B answers; the server accepts these only
MAX_NOTE_CHARS = 5000
# Descriptor keys the evaluation writes, as the page names them: (label, unit).
DESCRIPTORS = {
    "tempo_bpm": ("tempo", "BPM"),
    "low_freq_ratio": ("low-freq ratio", ""),
    "onset_density": ("onsets", "/s"),
    "loudness_lufs": ("loudness", "LUFS"),
}


def _text(value: tp.Any) -> str:
    """Any report value as HTML-escaped text (attribute-safe)."""
    return html.escape("" if value is None else str(value), quote=True)


def _number(value: tp.Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return "n/a"
    return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def _is_number(value: tp.Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# --- metrics table -----------------------------------------------------------------------------------------------


def _goal(better: tp.Any, metric: str) -> tp.Union[None, str, float]:
    """None (no best), "lower", "higher", or the target number of "closer:<number>"."""
    if better in (None, "lower", "higher"):
        return better
    if isinstance(better, str) and better.startswith("closer:"):
        try:
            return float(better[len("closer:") :])
        except ValueError:
            pass
    raise ValueError(
        f'Metrics row {metric!r}: better={better!r}; use "lower", "higher", "closer:<number>" '
        '(e.g. "closer:140") or null.'
    )


def best_columns(row: dict) -> tp.Set[str]:
    """The columns holding the row's best value (all of them on a tie); none without a goal or two numbers."""
    goal = _goal(row.get("better"), str(row.get("metric")))
    values = {column: value for column, value in (row.get("values") or {}).items() if _is_number(value)}
    if goal is None or len(values) < 2:
        return set()
    if goal == "lower":
        score = dict(values)
    elif goal == "higher":
        score = {column: -value for column, value in values.items()}
    else:
        score = {column: abs(value - goal) for column, value in values.items()}
    best = min(score.values())
    return {column for column, value in score.items() if value == best}


def _goal_words(better: tp.Any, metric: str) -> str:
    goal = _goal(better, metric)
    if goal is None:
        return ""
    return f"{goal} is better" if isinstance(goal, str) else f"closer to {_number(goal)} is better"


def _metrics_table(report: dict, labels: tp.Dict[str, str]) -> str:
    table = report.get("table") or {}
    columns = table.get("columns") or list(labels)
    rows = table.get("rows") or []
    if not rows:
        return "<p>No metrics were computed.</p>"
    head = "".join(f'<th scope="col">{_text(labels.get(c, c))}<br><code>{_text(c)}</code></th>' for c in columns)
    body = []
    for row in rows:
        best = best_columns(row)
        values = row.get("values") or {}
        cells = []
        for column in columns:
            shown = _text(_number(values.get(column)))
            cells.append(
                f'<td class="best" data-column="{_text(column)}"><strong>{shown}</strong>'
                '<span class="visually-hidden"> (best)</span></td>'
                if column in best
                else f'<td data-column="{_text(column)}">{shown}</td>'
            )
        goal = _goal_words(row.get("better"), str(row.get("metric")))
        body.append(
            f'<tr><th scope="row">{_text(row.get("metric"))}'
            + (f"<br><small>{_text(goal)}</small>" if goal else "")
            + f'</th>{"".join(cells)}<td class="note">{_text(row.get("note"))}</td></tr>'
        )
    return (
        f'<table id="metrics"><caption>Best value per row highlighted</caption><thead><tr>'
        f'<th scope="col">metric</th>{head}<th scope="col">note</th></tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>"
    )


# --- media ---------------------------------------------------------------------------------------------------------


def _media_url(report_dir: Path, path: tp.Any) -> tp.Optional[str]:
    """The page's relative URL for a file of the report folder; None when no path is given or the file is gone."""
    if not path:
        return None
    full = os.path.abspath(os.path.join(report_dir, str(path)))
    inside = os.path.abspath(report_dir)
    if os.path.commonpath([full, inside]) != inside:
        raise ValueError(
            f"{path}: media must lie inside the report folder {report_dir}, which the page refers to "
            "by relative paths; copy the file there and give its path relative to the folder."
        )
    if not os.path.isfile(full):
        return None
    return quote(Path(os.path.relpath(full, inside)).as_posix())


def _missing(path: tp.Any) -> str:
    return f'<p class="missing">file missing: <code>{_text(path)}</code></p>' if path else ""


def _audio(report_dir: Path, path: tp.Any, label: str) -> str:
    url = _media_url(report_dir, path)
    if url is None:
        return _missing(path)
    return (
        f'<audio controls preload="metadata" src="{_text(url)}" aria-label="{_text(label)}">'
        f'<a href="{_text(url)}">{_text(label)}</a></audio>'
    )


def _image(report_dir: Path, path: tp.Any, alt: str, css_class: str = "") -> str:
    url = _media_url(report_dir, path)
    if url is None:
        return _missing(path)
    return f'<img src="{_text(url)}" alt="{_text(alt)}"' + (f' class="{css_class}"' if css_class else "") + ">"


def _descriptors(descriptors: tp.Optional[dict]) -> str:
    if not descriptors:
        return ""
    items = []
    for key, value in descriptors.items():
        name, unit = DESCRIPTORS.get(key, (key.replace("_", " "), ""))
        shown = _number(value) + (f" {unit}" if unit and _is_number(value) else "")
        items.append(f"<div><dt>{_text(name)}</dt><dd>{_text(shown)}</dd></div>")
    return f'<dl class="descriptors">{"".join(items)}</dl>'


def _prompt_words(prompt: dict) -> str:
    details = [
        f"seed {prompt['seed']}" if prompt.get("seed") is not None else "",
        f"{_number(prompt['bpm'])} BPM" if prompt.get("bpm") is not None else "",
    ]
    return f"“{prompt.get('text', '')}”" + "".join(f" · {d}" for d in details if d)


# --- sections ------------------------------------------------------------------------------------------------------


def _key_values(value: tp.Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{key}: {'none' if item is None else item}" for key, item in value.items())
    return str(value or "unknown")


def _header(report: dict) -> str:
    created = report.get("created")
    when = f'<time datetime="{_text(created)}">{_text(created)}</time>' if created else "unknown date"
    settings = report.get("settings")
    return (
        f"<header><h1>MusicGen evaluation: {_text(report.get('name') or 'unnamed')}</h1>"
        f'<p class="meta">Created {when} · machine: {_text(_key_values(report.get("machine")))}</p>'
        + (f'<p class="meta">Settings: {_text(_key_values(settings))}</p>' if settings else "")
        + "</header>"
    )


def _notes(report: dict) -> str:
    notes = report.get("notes") or []
    if not notes:
        return "<p>No notes.</p>"
    return '<ul id="notes">' + "".join(f"<li>{_text(note)}</li>" for note in notes) + "</ul>"


def _plot_paths(plots: dict) -> tp.List[tp.Tuple[str, tp.Any]]:
    """(name, path) of every plot, loss first; an entry may be one path or a list of them."""
    names = sorted(plots, key=lambda name: (name != "loss", name))
    pairs = []
    for name in names:
        paths = plots[name] if isinstance(plots[name], (list, tuple)) else [plots[name]]
        pairs += [(name, path) for path in paths if path]
    return pairs


def _training(report_dir: Path, report: dict, labels: tp.Dict[str, str]) -> str:
    runs = report.get("runs") or []
    rows = "".join(
        f'<tr><th scope="row">{_text(labels.get(r.get("model"), r.get("model")))}</th>'
        f"<td><code>{_text(r.get('xp') or '—')}</code></td><td>{_text(_number(r.get('best_epoch')))}"
        f"</td><td>{_text(_number(r.get('epochs')))}</td></tr>"
        for r in runs
    )
    table = (
        f'<table id="runs"><thead><tr><th scope="col">model</th><th scope="col">experiment</th>'
        f'<th scope="col">best epoch</th><th scope="col">epochs</th></tr></thead><tbody>{rows}</tbody></table>'
        if runs
        else "<p>No training runs.</p>"
    )
    figures = []
    for name, path in _plot_paths(report.get("plots") or {}):
        caption = (
            "Cross-entropy per epoch: train dashed, validation solid; a star and a dotted line mark each "
            "run's best epoch."
            if name == "loss"
            else name.replace("_", " ")
        )
        figures.append(
            f'<figure class="plot">{_image(report_dir, path, caption)}'
            f"<figcaption>{_text(caption)}</figcaption></figure>"
        )
    return table + "".join(figures)


def _models(report: dict) -> str:
    rows = "".join(
        f'<tr><th scope="row">{_text(m.get("label", m["id"]))}</th><td><code>{_text(m["id"])}</code>'
        f"</td><td><code>{_text(m.get('path') or '—')}</code></td>"
        f"<td><code>{_text(m.get('adapter') or '—')}</code></td>"
        f"<td><code>{_text(m.get('xp') or '—')}</code></td></tr>"
        for m in report.get("models") or []
    )
    return (
        f'<table id="models"><thead><tr><th scope="col">model</th><th scope="col">id</th><th scope="col">path'
        f'</th><th scope="col">adapter</th><th scope="col">experiment</th></tr></thead><tbody>{rows}</tbody>'
        "</table>"
    )


def _side_by_side(report_dir: Path, report: dict, labels: tp.Dict[str, str]) -> str:
    samples = {(s.get("prompt"), s.get("model")): s for s in report.get("samples") or []}
    articles = []
    for index, prompt in enumerate(report.get("prompts") or []):
        cells = []
        for model, label in labels.items():
            sample = samples.get((index, model))
            name = f"{label}, prompt {index + 1}"
            cells.append(
                f'<figure class="sample" data-model="{_text(model)}"><figcaption>{_text(label)}'
                "</figcaption>"
                + (
                    _audio(report_dir, sample.get("audio"), name)
                    + _image(report_dir, sample.get("spectrogram"), f"Spectrogram, {name}", "spectrogram")
                    + _descriptors(sample.get("descriptors"))
                    if sample
                    else "<p>no sample</p>"
                )
                + "</figure>"
            )
        articles.append(
            f'<article class="prompt-row"><h3>Prompt {index + 1}</h3>'
            f'<p class="prompt">{_text(_prompt_words(prompt))}</p>'
            f'<div class="columns">{"".join(cells)}</div></article>'
        )
    return "".join(articles) or "<p>No prompts.</p>"


def _references(report_dir: Path, report: dict) -> str:
    figures = []
    for index, reference in enumerate(report.get("references") or []):
        name = f"Reference {index + 1}"
        figures.append(
            f'<figure class="sample"><figcaption>{_text(name)}: {_text(reference.get("caption") or "")}'
            "</figcaption>"
            + _audio(report_dir, reference.get("audio"), name)
            + _image(report_dir, reference.get("spectrogram"), f"Spectrogram, {name}", "spectrogram")
            + _descriptors(reference.get("descriptors"))
            + "</figure>"
        )
    return f'<div class="columns references">{"".join(figures)}</div>' if figures else "<p>No reference clips.</p>"


def blind_pairs(report: dict) -> tp.List[dict]:
    """Each prompt's base-vs-other pairs (the base is the first model) with both samples; the A/B order is drawn
    from the report's name, date, prompt and model, so writing the same report again keeps it."""
    models = [m["id"] for m in report.get("models") or []]
    audio = {(s.get("prompt"), s.get("model")): s["audio"] for s in report.get("samples") or [] if s.get("audio")}
    pairs = []
    for index, prompt in enumerate(report.get("prompts") or []):
        for other in models[1:]:
            if (index, models[0]) not in audio or (index, other) not in audio:
                continue
            order = [models[0], other]
            random.Random(f"{report.get('name')}|{report.get('created')}|{index}|{other}").shuffle(order)
            pairs.append(
                {
                    "prompt": index,
                    "prompt_text": prompt.get("text", ""),
                    "order": order,
                    "audio": [audio[(index, model)] for model in order],
                    "words": _prompt_words(prompt),
                }
            )
    return pairs


def _blind(report_dir: Path, pairs: tp.List[dict]) -> str:
    if not pairs:
        return "<p>No pairs to compare: the blind test needs samples of the base model and another model.</p>"
    articles = []
    for i, pair in enumerate(pairs):
        players = "".join(
            f"<figure><figcaption>{letter}</figcaption>"
            f"{_audio(report_dir, path, f'Sample {letter} of pair {i + 1}')}</figure>"
            for letter, path in zip("AB", pair["audio"])
        )
        options = "".join(
            f'<label><input type="radio" name="choice-{i}" value="{value}"> {text}</label>'
            for value, text in zip(CHOICES, ("A", "B", "same / no preference"))
        )
        articles.append(
            f'<article class="pair" data-pair="{i}" aria-labelledby="pair-{i}-title">'
            f'<h3 id="pair-{i}-title">Pair {i + 1} · prompt {pair["prompt"] + 1}</h3>'
            f'<p class="prompt">{_text(pair["words"])}</p><div class="ab">{players}</div>'
            f'<fieldset class="choice" disabled><legend>Which do you prefer?</legend>{options}</fieldset>'
            f'<label class="note">Note (optional) <input type="text" maxlength="{MAX_NOTE_CHARS}"></label> '
            '<button type="button" class="reveal" disabled>Reveal (after choosing)</button>'
            '<p class="revealed" hidden></p><p class="pair-status" role="status"></p></article>'
        )
    return (
        "<p>Each pair holds the base model and one other model, as A and B in a random order drawn once per pair. "
        "Listen to both, choose, then reveal; a revealed choice is locked.</p>"
        '<p><span id="ab-mode" role="status"></span> '
        '<button type="button" id="ab-download">Download choices.json</button></p>'
        '<h3>Summary</h3><p>Latest choice per pair: <span id="ab-progress"></span></p>'
        '<table id="ab-summary" aria-label="Wins, losses and ties per model">'
        '<thead><tr><th scope="col">model</th><th scope="col">wins</th><th scope="col">losses</th>'
        '<th scope="col">ties</th></tr></thead><tbody></tbody></table>' + "".join(articles)
    )


# --- page ----------------------------------------------------------------------------------------------------------

ASSETS = Path(__file__).resolve().parent / "assets"


def asset(name: str) -> str:
    """A file of assets/ (the page's CSS and JavaScript), inlined so that the page stays one file."""
    return (ASSETS / name).read_text(encoding="utf-8")


def _page_data(report: dict, pairs: tp.List[dict]) -> str:
    """The data the script needs, as JSON safe inside a <script> element."""
    data = {
        "storage_key": f"{report.get('name')}|{report.get('created')}",
        "models": {m["id"]: m.get("label") or m["id"] for m in report.get("models") or []},
        "pairs": [{key: pair[key] for key in ("prompt", "prompt_text", "order")} for pair in pairs],
    }
    text = json.dumps(data, ensure_ascii=False)
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def render(report_dir: Path, report: dict) -> str:
    """The page's HTML for `report`, whose media paths are relative to `report_dir`."""
    report_dir = Path(report_dir)
    labels = {m["id"]: m.get("label") or m["id"] for m in report.get("models") or []}
    pairs = blind_pairs(report)
    results = (
        "<h2>Metrics</h2>"
        + _metrics_table(report, labels)
        + "<h2>Notes</h2>"
        + _notes(report)
        + "<h2>Training</h2>"
        + _training(report_dir, report, labels)
        + "<h2>Models</h2>"
        + _models(report)
    )
    tabs = [
        ("results", "Results", results),
        ("side-by-side", "Side by side", "<h2>Side by side</h2>" + _side_by_side(report_dir, report, labels)),
        ("blind", "Blind A/B", "<h2>Blind A/B</h2>" + _blind(report_dir, pairs)),
        ("references", "References", "<h2>Reference clips</h2>" + _references(report_dir, report)),
    ]
    buttons = "".join(
        f'<button type="button" role="tab" id="tab-{key}" aria-controls="{key}" aria-selected="false">{title}</button>'
        for key, title, _ in tabs
    )
    panels = "".join(
        f'<section id="{key}" role="tabpanel" aria-labelledby="tab-{key}">{body}</section>' for key, _, body in tabs
    )
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>MusicGen evaluation: {_text(report.get('name') or 'unnamed')}</title>"
        '<link rel="icon" href="data:,">'  # no /favicon.ico request, so no 404 in the console
        f"<style>{asset('report.css')}</style></head>\n<body>{_header(report)}"
        f'<nav class="tabs" role="tablist" aria-label="Report sections">{buttons}</nav>'
        f"<main>{panels}</main>\n"
        f'<script type="application/json" id="report-data">{_page_data(report, pairs)}</script>\n'
        f"<script>{asset('report.js')}</script></body></html>\n"
    )


def write(report_dir: Path, report: dict) -> Path:
    """Write `<report_dir>/index.html` for `report` (see the module's docstring); returns its path."""
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    page = report_dir / PAGE
    write_text_atomically(page, render(report_dir, report))
    return page
