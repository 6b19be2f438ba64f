"""The evaluation's listening page, `<report_dir>/index.html`, and a small server that records blind A/B choices.

    python -m musicgen_finetune.report_page serve <report_dir> [--port 8000] [--host 127.0.0.1]
    python -m musicgen_finetune.report_page write <report_dir>      (again from <report_dir>/report.json)

The page is one self-contained file (inline CSS and JS, no network) that refers to its audio and images by paths
relative to the report folder. Tabs: results (metrics table, notes, loss curves, models), side by side (each
prompt, one column per model: player, spectrogram, descriptors), blind A/B (base model against each other model,
in an order drawn once per pair and stored in the page) and references.

Blind A/B choices: served by `serve()`, each choice is POSTed to /choices and appended to
`<report_dir>/choices.json`; opened as a file, they are kept in the browser's localStorage and a button downloads
them as choices.json. Records: {"prompt", "prompt_text", "pair": [A id, B id], "choice": "A"|"B"|"same",
"preferred_model": id or null, "note", "time"}; a later record for the same prompt and models replaces an earlier
one in the summary.
"""
import argparse
import errno
import functools
import html
import json
import math
import os
import random
import re
import sys
import tempfile
import threading
import typing as tp
from datetime import datetime, timezone
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, urlsplit

PAGE = "index.html"
CHOICES_FILE = "choices.json"
CHOICES = ("A", "B", "same")
MAX_CHOICE_BYTES = 64 * 1024
MAX_NOTE_CHARS = 5000
# Descriptor keys the evaluation writes, as the page names them: (label, unit).
DESCRIPTORS = {"tempo_bpm": ("tempo", "BPM"), "low_freq_ratio": ("low-freq ratio", ""),
               "onset_density": ("onsets", "/s"), "loudness_lufs": ("loudness", "LUFS")}


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
            return float(better[len("closer:"):])
        except ValueError:
            pass
    raise ValueError(f"Metrics row {metric!r}: better={better!r}; use \"lower\", \"higher\", \"closer:<number>\" "
                     "(e.g. \"closer:140\") or null.")


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
            cells.append(f'<td class="best" data-column="{_text(column)}"><strong>{shown}</strong>'
                         '<span class="visually-hidden"> (best)</span></td>' if column in best else
                         f'<td data-column="{_text(column)}">{shown}</td>')
        goal = _goal_words(row.get("better"), str(row.get("metric")))
        body.append(f'<tr><th scope="row">{_text(row.get("metric"))}'
                    + (f'<br><small>{_text(goal)}</small>' if goal else "")
                    + f'</th>{"".join(cells)}<td class="note">{_text(row.get("note"))}</td></tr>')
    return (f'<table id="metrics"><caption>Best value per row highlighted</caption><thead><tr>'
            f'<th scope="col">metric</th>{head}<th scope="col">note</th></tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table>')


# --- media ---------------------------------------------------------------------------------------------------------

def _media_url(report_dir: Path, path: tp.Any) -> tp.Optional[str]:
    """The page's relative URL for a file of the report folder; None when no path is given or the file is gone."""
    if not path:
        return None
    full = os.path.abspath(os.path.join(report_dir, str(path)))
    inside = os.path.abspath(report_dir)
    if os.path.commonpath([full, inside]) != inside:
        raise ValueError(f"{path}: media must lie inside the report folder {report_dir}, which the page refers to "
                         "by relative paths; copy the file there and give its path relative to the folder.")
    if not os.path.isfile(full):
        return None
    return quote(Path(os.path.relpath(full, inside)).as_posix())


def _missing(path: tp.Any) -> str:
    return f'<p class="missing">file missing: <code>{_text(path)}</code></p>' if path else ""


def _audio(report_dir: Path, path: tp.Any, label: str) -> str:
    url = _media_url(report_dir, path)
    if url is None:
        return _missing(path)
    return (f'<audio controls preload="metadata" src="{_text(url)}" aria-label="{_text(label)}">'
            f'<a href="{_text(url)}">{_text(label)}</a></audio>')


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
    details = [f"seed {prompt['seed']}" if prompt.get("seed") is not None else "",
               f"{_number(prompt['bpm'])} BPM" if prompt.get("bpm") is not None else ""]
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
    return (f'<header><h1>MusicGen evaluation: {_text(report.get("name") or "unnamed")}</h1>'
            f'<p class="meta">Created {when} · machine: {_text(_key_values(report.get("machine")))}</p>'
            + (f'<p class="meta">Settings: {_text(_key_values(settings))}</p>' if settings else "")
            + "</header>")


def _notes(report: dict) -> str:
    notes = report.get("notes") or []
    if not notes:
        return "<p>No notes.</p>"
    return "<ul id=\"notes\">" + "".join(f"<li>{_text(note)}</li>" for note in notes) + "</ul>"


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
    rows = "".join(f'<tr><th scope="row">{_text(labels.get(r.get("model"), r.get("model")))}</th>'
                   f'<td><code>{_text(r.get("xp") or "—")}</code></td><td>{_text(_number(r.get("best_epoch")))}'
                   f'</td><td>{_text(_number(r.get("epochs")))}</td></tr>' for r in runs)
    table = (f'<table id="runs"><thead><tr><th scope="col">model</th><th scope="col">experiment</th>'
             f'<th scope="col">best epoch</th><th scope="col">epochs</th></tr></thead><tbody>{rows}</tbody></table>'
             if runs else "<p>No training runs.</p>")
    figures = []
    for name, path in _plot_paths(report.get("plots") or {}):
        caption = ("Cross-entropy per epoch: train dashed, validation solid; a star and a dotted line mark each "
                   "run's best epoch." if name == "loss" else name.replace("_", " "))
        figures.append(f'<figure class="plot">{_image(report_dir, path, caption)}'
                       f'<figcaption>{_text(caption)}</figcaption></figure>')
    return table + "".join(figures)


def _models(report: dict) -> str:
    rows = "".join(f'<tr><th scope="row">{_text(m.get("label", m["id"]))}</th><td><code>{_text(m["id"])}</code>'
                   f'</td><td><code>{_text(m.get("path") or "—")}</code></td>'
                   f'<td><code>{_text(m.get("adapter") or "—")}</code></td>'
                   f'<td><code>{_text(m.get("xp") or "—")}</code></td></tr>' for m in report.get("models") or [])
    return (f'<table id="models"><thead><tr><th scope="col">model</th><th scope="col">id</th><th scope="col">path'
            f'</th><th scope="col">adapter</th><th scope="col">experiment</th></tr></thead><tbody>{rows}</tbody>'
            "</table>")


def _side_by_side(report_dir: Path, report: dict, labels: tp.Dict[str, str]) -> str:
    samples = {(s.get("prompt"), s.get("model")): s for s in report.get("samples") or []}
    articles = []
    for index, prompt in enumerate(report.get("prompts") or []):
        cells = []
        for model, label in labels.items():
            sample = samples.get((index, model))
            name = f"{label}, prompt {index + 1}"
            cells.append(f'<figure class="sample" data-model="{_text(model)}"><figcaption>{_text(label)}'
                         "</figcaption>"
                         + (_audio(report_dir, sample.get("audio"), name)
                            + _image(report_dir, sample.get("spectrogram"), f"Spectrogram, {name}", "spectrogram")
                            + _descriptors(sample.get("descriptors")) if sample else "<p>no sample</p>")
                         + "</figure>")
        articles.append(f'<article class="prompt-row"><h3>Prompt {index + 1}</h3>'
                        f'<p class="prompt">{_text(_prompt_words(prompt))}</p>'
                        f'<div class="columns">{"".join(cells)}</div></article>')
    return "".join(articles) or "<p>No prompts.</p>"


def _references(report_dir: Path, report: dict) -> str:
    figures = []
    for index, reference in enumerate(report.get("references") or []):
        name = f"Reference {index + 1}"
        figures.append(f'<figure class="sample"><figcaption>{_text(name)}: {_text(reference.get("caption") or "")}'
                       "</figcaption>" + _audio(report_dir, reference.get("audio"), name)
                       + _image(report_dir, reference.get("spectrogram"), f"Spectrogram, {name}", "spectrogram")
                       + _descriptors(reference.get("descriptors")) + "</figure>")
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
            pairs.append({"prompt": index, "prompt_text": prompt.get("text", ""), "order": order,
                          "audio": [audio[(index, model)] for model in order], "words": _prompt_words(prompt)})
    return pairs


def _blind(report_dir: Path, pairs: tp.List[dict]) -> str:
    if not pairs:
        return "<p>No pairs to compare: the blind test needs samples of the base model and another model.</p>"
    articles = []
    for i, pair in enumerate(pairs):
        players = "".join(f'<figure><figcaption>{letter}</figcaption>'
                          f'{_audio(report_dir, path, f"Sample {letter} of pair {i + 1}")}</figure>'
                          for letter, path in zip("AB", pair["audio"]))
        options = "".join(f'<label><input type="radio" name="choice-{i}" value="{value}"> {text}</label>'
                          for value, text in zip(CHOICES, ("A", "B", "same / no preference")))
        articles.append(
            f'<article class="pair" data-pair="{i}" aria-labelledby="pair-{i}-title">'
            f'<h3 id="pair-{i}-title">Pair {i + 1} · prompt {pair["prompt"] + 1}</h3>'
            f'<p class="prompt">{_text(pair["words"])}</p><div class="ab">{players}</div>'
            f'<fieldset class="choice" disabled><legend>Which do you prefer?</legend>{options}</fieldset>'
            f'<label class="note">Note (optional) <input type="text" maxlength="{MAX_NOTE_CHARS}"></label> '
            '<button type="button" class="reveal" disabled>Reveal (after choosing)</button>'
            '<p class="revealed" hidden></p><p class="pair-status" role="status"></p></article>')
    return (
        "<p>Each pair holds the base model and one other model, as A and B in a random order drawn once per pair. "
        "Listen to both, choose, then reveal; a revealed choice is locked.</p>"
        '<p><span id="ab-mode" role="status"></span> '
        '<button type="button" id="ab-download">Download choices.json</button></p>'
        '<h3>Summary</h3><p>Latest choice per pair: <span id="ab-progress"></span></p>'
        '<table id="ab-summary" aria-label="Wins, losses and ties per model">'
        '<thead><tr><th scope="col">model</th><th scope="col">wins</th><th scope="col">losses</th>'
        '<th scope="col">ties</th></tr></thead><tbody></tbody></table>' + "".join(articles))


# --- page ----------------------------------------------------------------------------------------------------------

STYLE = """
:root { font-family: system-ui, sans-serif; color: #1d1d1f; background: #fafafa; }
body { margin: 0 auto; max-width: 1200px; padding: 0 1rem 3rem; }
header h1 { margin-bottom: .2rem; }
.meta { color: #555; margin-top: 0; }
.tabs { display: none; gap: .3rem; border-bottom: 2px solid #ccc; margin: 1rem 0; }
html.js .tabs { display: flex; }
.tabs button { font: inherit; padding: .5rem 1rem; border: 1px solid #ccc; border-bottom: none; background: #eee;
  border-radius: 6px 6px 0 0; cursor: pointer; }
.tabs button[aria-selected="true"] { background: #fff; font-weight: 600; }
section { background: #fff; padding: .5rem 1rem 1rem; border-radius: 6px; margin-bottom: 1rem; }
table { border-collapse: collapse; margin: .5rem 0 1rem; }
th, td { border: 1px solid #ddd; padding: .3rem .6rem; text-align: left; vertical-align: top; }
td[data-column] { text-align: right; font-variant-numeric: tabular-nums; }
caption { text-align: left; color: #555; padding-bottom: .3rem; }
td.best { background: #d9f2d9; }
td.note { color: #555; max-width: 28rem; }
.visually-hidden { position: absolute; width: 1px; height: 1px; overflow: hidden; clip: rect(0 0 0 0); }
.columns { display: grid; grid-template-columns: repeat(auto-fit, minmax(260px, 1fr)); gap: 1rem; }
.columns.references { grid-template-columns: repeat(auto-fill, minmax(300px, 1fr)); }
figure { margin: 0; }
figure.sample { border: 1px solid #e3e3e3; border-radius: 6px; padding: .5rem; }
figcaption { font-weight: 600; margin-bottom: .3rem; }
figure.plot figcaption { font-weight: normal; color: #555; }
audio { width: 100%; }
img { max-width: 100%; height: auto; display: block; }
.prompt { font-style: italic; }
.descriptors { display: grid; grid-template-columns: repeat(2, 1fr); gap: .1rem .8rem; margin: .4rem 0 0;
  font-size: .85rem; }
.descriptors div { display: flex; justify-content: space-between; gap: .4rem; }
.descriptors dt { color: #555; }
.descriptors dd { margin: 0; font-variant-numeric: tabular-nums; }
.missing { color: #a00; }
.pair { border: 1px solid #e3e3e3; border-radius: 6px; padding: .5rem 1rem; margin: 1rem 0; }
.ab { display: grid; grid-template-columns: 1fr 1fr; gap: 1rem; }
.choice { border: none; padding: 0; margin: .5rem 0; display: flex; gap: 1rem; flex-wrap: wrap; }
.choice legend { font-weight: 600; margin-bottom: .3rem; }
.note input { width: min(30rem, 100%); }
.revealed { background: #fff7d6; padding: .3rem .6rem; border-radius: 4px; }
.pair-status { color: #555; font-size: .85rem; min-height: 1em; }
.pair-status.error { color: #a00; }
"""

SCRIPT = r"""
"use strict";
(function () {
  const data = JSON.parse(document.getElementById("report-data").textContent);
  document.documentElement.classList.add("js");

  // Tabs: one panel at a time; the URL's #hash keeps the open tab across reloads.
  const tabs = Array.from(document.querySelectorAll('[role="tab"]'));
  function showTab(id, remember) {
    if (!tabs.some((tab) => tab.getAttribute("aria-controls") === id)) id = tabs[0].getAttribute("aria-controls");
    for (const tab of tabs) {
      const selected = tab.getAttribute("aria-controls") === id;
      const panel = document.getElementById(tab.getAttribute("aria-controls"));
      tab.setAttribute("aria-selected", String(selected));
      tab.tabIndex = selected ? 0 : -1;
      panel.hidden = !selected;
      if (!selected) panel.querySelectorAll("audio").forEach((audio) => audio.pause());
    }
    if (remember) history.replaceState(null, "", "#" + id);
  }
  tabs.forEach((tab, i) => {
    tab.addEventListener("click", () => showTab(tab.getAttribute("aria-controls"), true));
    tab.addEventListener("keydown", (event) => {
      const step = event.key === "ArrowRight" ? 1 : event.key === "ArrowLeft" ? -1 : 0;
      if (!step) return;
      const next = tabs[(i + step + tabs.length) % tabs.length];
      next.focus();
      showTab(next.getAttribute("aria-controls"), true);
    });
  });
  showTab(location.hash.slice(1), false);
  window.addEventListener("hashchange", () => showTab(location.hash.slice(1), false));

  // One player at a time, so that A and B are never heard together.
  document.addEventListener("play", (event) => {
    document.querySelectorAll("audio").forEach((audio) => { if (audio !== event.target) audio.pause(); });
  }, true);

  // Blind A/B.
  const articles = Array.from(document.querySelectorAll("article.pair"));
  if (!articles.length) return;
  const served = location.protocol === "http:" || location.protocol === "https:";
  const storageKey = "musicgen-report:" + data.storage_key;
  const modeText = document.getElementById("ab-mode");
  let records = [];

  const label = (id) => data.models[id] || id;
  const pairKey = (prompt, ids) => prompt + "|" + ids.slice().sort().join("|");
  const preferredModel = (choice, order) => (choice === "A" ? order[0] : choice === "B" ? order[1] : null);

  function readStored(suffix) {
    try { return JSON.parse(localStorage.getItem(storageKey + suffix) || "[]"); } catch (error) { return []; }
  }
  function store(suffix, value) {
    try {
      localStorage.setItem(storageKey + suffix, JSON.stringify(value));
      return true;
    } catch (error) {
      return false;
    }
  }
  function latestRecords() {
    const latest = new Map();
    for (const record of records) latest.set(pairKey(record.prompt, record.pair), record);
    return latest;
  }

  function summarize() {
    const counts = new Map(Object.keys(data.models).map((id) => [id, {wins: 0, losses: 0, ties: 0}]));
    const count = (id) => {
      if (!counts.has(id)) counts.set(id, {wins: 0, losses: 0, ties: 0});  // a model of an older page
      return counts.get(id);
    };
    const latest = latestRecords();
    for (const record of latest.values()) {
      if (record.choice === "same") { record.pair.forEach((id) => count(id).ties++); continue; }
      const winner = record.preferred_model;
      count(winner).wins++;
      record.pair.filter((id) => id !== winner).forEach((id) => count(id).losses++);
    }
    const body = document.querySelector("#ab-summary tbody");
    body.replaceChildren();
    for (const [id, c] of counts) {
      const row = body.insertRow();
      const name = document.createElement("th");
      name.scope = "row";
      name.textContent = label(id);
      row.append(name);
      row.dataset.model = id;
      for (const value of [c.wins, c.losses, c.ties]) row.insertCell().textContent = String(value);
    }
    const judged = data.pairs.filter((pair) => latest.has(pairKey(pair.prompt, pair.order))).length;
    document.getElementById("ab-progress").textContent = judged + " of " + data.pairs.length + " pairs judged";
  }

  function showReveal(article, pair) {
    const revealed = article.querySelector(".revealed");
    revealed.textContent = "A: " + label(pair.order[0]) + " · B: " + label(pair.order[1]);
    revealed.hidden = false;
    article.querySelectorAll('input[type="radio"]').forEach((input) => { input.disabled = true; });
    article.querySelector(".reveal").disabled = true;
  }

  function setStatus(article, text, isError) {
    const status = article.querySelector(".pair-status");
    status.textContent = text;
    status.classList.toggle("error", Boolean(isError));
  }

  async function record(article, pair, choice) {
    const entry = {prompt: pair.prompt, prompt_text: pair.prompt_text, pair: pair.order, choice: choice,
                   preferred_model: preferredModel(choice, pair.order),
                   note: article.querySelector(".note input").value, time: new Date().toISOString()};
    records.push(entry);
    summarize();
    article.querySelector(".reveal").disabled = article.querySelector(".revealed").hidden === false;
    if (!served) {
      setStatus(article, store(":choices", records) ? "Kept in this browser (download choices.json to keep it)."
                                                  : "Could not keep it in this browser: download choices.json now.",
                false);
      return;
    }
    setStatus(article, "Saving…", false);
    try {
      const response = await fetch("choices", {method: "POST", headers: {"Content-Type": "application/json"},
                                               body: JSON.stringify(entry)});
      const answer = await response.text();
      if (!response.ok) throw new Error("HTTP " + response.status + " " + answer.slice(0, 200));
      setStatus(article, "Saved to choices.json.", false);
    } catch (error) {
      store(":choices", records);
      setStatus(article, "Not saved on the server (" + error.message + "); kept in this browser: download " +
                "choices.json, or serve the page with python -m musicgen_finetune.report_page serve.", true);
    }
  }

  function restore() {
    const latest = latestRecords();
    const revealed = new Set(readStored(":revealed"));
    data.pairs.forEach((pair, i) => {
      const article = articles[i];
      const key = pairKey(pair.prompt, pair.order);
      const previous = latest.get(key);
      if (!previous) return;
      // By model rather than letter: the record names the models, whatever order this page shows them in.
      const letter = previous.choice === "same" ? "same" : pair.order[0] === previous.preferred_model ? "A" : "B";
      article.querySelector('input[value="' + letter + '"]').checked = true;
      article.querySelector(".note input").value = previous.note || "";
      article.querySelector(".reveal").disabled = false;
      if (revealed.has(key)) showReveal(article, pair);
    });
    summarize();
  }

  data.pairs.forEach((pair, i) => {
    const article = articles[i];
    article.querySelectorAll('input[type="radio"]').forEach((input) => {
      input.addEventListener("change", () => record(article, pair, input.value));
    });
    article.querySelector(".note input").addEventListener("change", () => {
      const checked = article.querySelector('input[type="radio"]:checked');
      if (checked) record(article, pair, checked.value);  // a note typed after choosing updates the choice
    });
    article.querySelector(".reveal").addEventListener("click", () => {
      showReveal(article, pair);
      const revealed = new Set(readStored(":revealed"));
      revealed.add(pairKey(pair.prompt, pair.order));
      store(":revealed", Array.from(revealed));
    });
  });

  document.getElementById("ab-download").addEventListener("click", () => {
    const url = URL.createObjectURL(new Blob([JSON.stringify(records, null, 1)], {type: "application/json"}));
    const link = document.createElement("a");
    link.href = url;
    link.download = "choices.json";
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 1000);
  });

  async function load() {
    if (served) {
      try {
        const response = await fetch("choices.json", {cache: "no-store"});
        if (!response.ok) throw new Error("HTTP " + response.status);
        records = await response.json();
        modeText.textContent = "Choices are saved on the server, in choices.json of the report folder.";
      } catch (error) {
        records = readStored(":choices");
        modeText.textContent = "The server's choices could not be read (" + error.message + "); choices are kept " +
          "in this browser.";
      }
    } else {
      records = readStored(":choices");
      modeText.textContent = "Opened as a file: choices are kept in this browser; download them as choices.json.";
    }
    restore();
    // Choosing waits for the recorded choices, so that loading them cannot drop a new one.
    document.querySelectorAll("fieldset.choice").forEach((fieldset) => { fieldset.disabled = false; });
    document.body.dataset.choicesLoaded = "true";
  }
  load();
})();
"""


def _page_data(report: dict, pairs: tp.List[dict]) -> str:
    """The data the script needs, as JSON safe inside a <script> element."""
    data = {"storage_key": f"{report.get('name')}|{report.get('created')}",
            "models": {m["id"]: m.get("label") or m["id"] for m in report.get("models") or []},
            "pairs": [{key: pair[key] for key in ("prompt", "prompt_text", "order")} for pair in pairs]}
    text = json.dumps(data, ensure_ascii=False)
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def render(report_dir: Path, report: dict) -> str:
    """The page's HTML for `report`, whose media paths are relative to `report_dir`."""
    report_dir = Path(report_dir)
    labels = {m["id"]: m.get("label") or m["id"] for m in report.get("models") or []}
    pairs = blind_pairs(report)
    results = ("<h2>Metrics</h2>" + _metrics_table(report, labels) + "<h2>Notes</h2>" + _notes(report)
               + "<h2>Training</h2>" + _training(report_dir, report, labels) + "<h2>Models</h2>" + _models(report))
    tabs = [("results", "Results", results),
            ("side-by-side", "Side by side", "<h2>Side by side</h2>" + _side_by_side(report_dir, report, labels)),
            ("blind", "Blind A/B", "<h2>Blind A/B</h2>" + _blind(report_dir, pairs)),
            ("references", "References", "<h2>Reference clips</h2>" + _references(report_dir, report))]
    buttons = "".join(f'<button type="button" role="tab" id="tab-{key}" aria-controls="{key}" '
                      f'aria-selected="false">{title}</button>' for key, title, _ in tabs)
    panels = "".join(f'<section id="{key}" role="tabpanel" aria-labelledby="tab-{key}">{body}</section>'
                     for key, _, body in tabs)
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>MusicGen evaluation: {_text(report.get('name') or 'unnamed')}</title>"
            '<link rel="icon" href="data:,">'  # no /favicon.ico request, so no 404 in the console
            f"<style>{STYLE}</style></head>\n<body>{_header(report)}"
            f'<nav class="tabs" role="tablist" aria-label="Report sections">{buttons}</nav>'
            f"<main>{panels}</main>\n"
            f'<script type="application/json" id="report-data">{_page_data(report, pairs)}</script>\n'
            f"<script>{SCRIPT}</script></body></html>\n")


def _write_atomically(path: Path, text: str) -> None:
    """Write beside `path`, then rename over it: a reader sees the old file or the new one, never half of one."""
    descriptor, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(partial, path)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise


def write(report_dir: Path, report: dict) -> Path:
    """Write `<report_dir>/index.html` for `report` (see the module's docstring); returns its path."""
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    page = report_dir / PAGE
    _write_atomically(page, render(report_dir, report))
    return page


# --- server --------------------------------------------------------------------------------------------------------

def _read_choices(path: Path) -> tp.List[dict]:
    if not path.exists():
        return []
    records = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(records, list):
        raise ValueError(f"{path} is not a JSON list; fix it or move it away to start a new one.")
    return records


def checked_choice(entry: tp.Any) -> dict:
    """A POSTed choice as it is stored; ValueError says what is wrong with it."""
    if not isinstance(entry, dict):
        raise ValueError("a choice is a JSON object")
    pair, choice = entry.get("pair"), entry.get("choice")
    if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(model, str) for model in pair)):
        raise ValueError(f"pair={pair!r}: give the two model ids in A, B order")
    if choice not in CHOICES:
        raise ValueError(f"choice={choice!r}: use one of {', '.join(CHOICES)}")
    note = entry.get("note") or ""
    if not isinstance(note, str):
        raise ValueError(f"note={note!r}: give text")
    return {"prompt": entry.get("prompt"), "prompt_text": entry.get("prompt_text"), "pair": pair, "choice": choice,
            "preferred_model": {"A": pair[0], "B": pair[1]}.get(choice),  # from the choice, whatever was sent
            "note": note[:MAX_NOTE_CHARS],
            "time": str(entry.get("time") or datetime.now(timezone.utc).isoformat(timespec="seconds"))}


class ReportServer(ThreadingHTTPServer):
    """Serves one report folder; `choices_lock` makes the appends to choices.json one at a time."""

    def __init__(self, report_dir: Path, address: tp.Tuple[str, int], quiet: bool = False):
        self.report_dir = Path(report_dir).resolve()
        self.choices_path = self.report_dir / CHOICES_FILE
        self.choices_lock = threading.Lock()
        self.quiet = quiet
        super().__init__(address, functools.partial(ReportHandler, directory=str(self.report_dir)))

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"


RANGE = re.compile(r"bytes=(\d*)-(\d*)")


class ReportHandler(SimpleHTTPRequestHandler):
    """The report folder's files (with byte ranges, so players can seek), GET /choices.json, POST /choices."""
    server: ReportServer
    _range_left: tp.Optional[int] = None

    def log_message(self, format: str, *args: tp.Any) -> None:
        if not self.server.quiet:
            super().log_message(format, *args)

    def _send_json(self, status: int, value: tp.Any) -> None:
        body = json.dumps(value, indent=1).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if urlsplit(self.path).path != "/" + CHOICES_FILE:
            return super().do_GET()
        try:
            with self.server.choices_lock:
                records = _read_choices(self.server.choices_path)
        except ValueError as error:
            return self._send_json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": str(error)})
        self._send_json(HTTPStatus.OK, records)

    def do_POST(self) -> None:
        if urlsplit(self.path).path != "/choices":
            return self._send_json(HTTPStatus.NOT_FOUND, {"error": "POST choices to /choices"})
        length = int(self.headers.get("Content-Length") or 0)
        if not 0 < length <= MAX_CHOICE_BYTES:
            return self._send_json(HTTPStatus.BAD_REQUEST, {"error": f"a choice is 1 to {MAX_CHOICE_BYTES} bytes"})
        try:
            entry = checked_choice(json.loads(self.rfile.read(length)))
        except ValueError as error:  # json.JSONDecodeError included
            return self._send_json(HTTPStatus.BAD_REQUEST, {"error": str(error)})
        try:
            with self.server.choices_lock:
                records = _read_choices(self.server.choices_path) + [entry]
                _write_atomically(self.server.choices_path, json.dumps(records, indent=1, ensure_ascii=False) + "\n")
        except (ValueError, OSError) as error:
            return self._send_json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": str(error)})
        self._send_json(HTTPStatus.OK, {"saved": len(records)})

    def send_head(self):
        """As the base class, plus one `Range: bytes=start-end` per request (206 Partial Content)."""
        self._range_left = None
        match = RANGE.fullmatch(self.headers.get("Range", "").strip())
        path = self.translate_path(self.path)
        if not match or not os.path.isfile(path) or match.groups() == ("", ""):
            return super().send_head()
        size = os.path.getsize(path)
        first, last = match.groups()
        start = int(first) if first else max(0, size - int(last))
        end = min(int(last), size - 1) if first and last else size - 1
        if start >= size or start > end:
            self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
            self.send_header("Content-Range", f"bytes */{size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        file = open(path, "rb")
        file.seek(start)
        self.send_response(HTTPStatus.PARTIAL_CONTENT)
        self.send_header("Content-Type", self.guess_type(path))
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        self._range_left = end - start + 1
        return file

    def copyfile(self, source, outputfile) -> None:
        try:
            if self._range_left is None:
                return super().copyfile(source, outputfile)
            while self._range_left > 0:
                chunk = source.read(min(64 * 1024, self._range_left))
                if not chunk:
                    break
                outputfile.write(chunk)
                self._range_left -= len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the browser stopped reading (a player had the metadata it wanted): not an error


def make_server(report_dir: Path, port: int = 8000, host: str = "127.0.0.1", quiet: bool = False) -> ReportServer:
    """A server for `report_dir`, not yet serving (call serve_forever); port 0 picks a free port."""
    report_dir = Path(report_dir)
    if not (report_dir / PAGE).is_file():
        raise FileNotFoundError(f"{report_dir / PAGE} does not exist: write the report first "
                                "(report_page.write, or the evaluation that calls it).")
    try:
        return ReportServer(report_dir, (host, port), quiet=quiet)
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            raise OSError(f"Port {port} on {host} is in use: choose another with --port.") from error
        raise


def serve(report_dir: Path, port: int = 8000, host: str = "127.0.0.1") -> None:
    """Serve the report until interrupted; blind A/B choices go to `<report_dir>/choices.json`."""
    server = make_server(report_dir, port, host)
    print(f"Report at {server.url} (choices go to {server.choices_path}); Ctrl-C stops.", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m musicgen_finetune.report_page",
                                     description="Serve an evaluation report, or write its page again.")
    commands = parser.add_subparsers(dest="command", required=True)
    serving = commands.add_parser("serve", help="serve <report_dir> and record blind A/B choices")
    serving.add_argument("report_dir", type=Path)
    serving.add_argument("--port", type=int, default=8000)
    serving.add_argument("--host", default="127.0.0.1")
    writing = commands.add_parser("write", help="write <report_dir>/index.html again from its report.json")
    writing.add_argument("report_dir", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            serve(args.report_dir, args.port, args.host)
        else:
            report_json = args.report_dir / "report.json"
            if not report_json.is_file():
                raise FileNotFoundError(f"{report_json} does not exist: run the evaluation first.")
            print(write(args.report_dir, json.loads(report_json.read_text(encoding="utf-8"))))
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
