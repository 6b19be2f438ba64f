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
