// Keyboard review for the grid and the face page. Plain JS, no build step: the pages work as
// server-rendered HTML, this file only adds the keys and posts decisions to /api/decisions.
"use strict";
(function () {
  const cards = Array.from(document.querySelectorAll(".card"));
  const note = document.getElementById("note");
  const status = document.getElementById("status");
  const grid = document.getElementById("grid");
  const single = document.getElementById("face");
  let current = 0;

  function say(text, bad) {
    status.textContent = text;
    status.className = bad ? "bad" : "";
  }

  function select(i) {
    if (!cards.length) return;
    current = Math.max(0, Math.min(cards.length - 1, i));
    cards.forEach((c, j) => c.classList.toggle("selected", j === current));
    const card = cards[current];
    card.focus({ preventScroll: true });
    card.scrollIntoView({ block: "nearest" });
    const target = document.getElementById("note-target");
    if (target) target.textContent = card.querySelector(".name").textContent.trim();
  }

  function undecided(card) {
    return card.dataset.status === "ok" && (card.dataset.decision === "" || card.dataset.decision === "skip");
  }

  function showCounts(counts) {
    for (const [name, value] of Object.entries(counts)) {
      const el = document.getElementById("count-" + name.replace("_", "-"));
      if (el) el.textContent = value;
    }
    const bar = document.getElementById("progress");
    if (bar) {
      bar.max = Math.max(1, counts.faces);
      bar.value = counts.reviewed;
    }
  }

  async function decide(decision) {
    const card = cards[current];
    if (!card) return;
    const body = {
      run_id: card.dataset.runId,
      image_id: card.dataset.imageId,
      face_index: Number(card.dataset.faceIndex),
      decision: decision,
      note: note && note.value ? note.value : null,
      counts_run: grid ? grid.dataset.countsRun || null : null,
    };
    let reply;
    try {
      const response = await fetch("/api/decisions", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body),
      });
      reply = await response.json();
      if (!response.ok) throw new Error(reply.error || response.statusText);
    } catch (err) {
      say("not saved: " + err.message, true);
      return;
    }
    card.dataset.decision = decision;
    card.querySelector("[data-role=decision]").textContent = decision;
    if (body.note) card.querySelector("[data-role=note]").textContent = body.note;
    if (note) note.value = "";
    showCounts(reply.counts);
    say(decision + " saved");
    if (single) {
      window.location.reload();
    } else if (current < cards.length - 1) {
      select(current + 1);
    } else if (grid.dataset.nextUrl) {
      window.location.href = grid.dataset.nextUrl;
    }
  }

  if (note) {
    note.addEventListener("keydown", (event) => {
      if (event.key === "Enter" || event.key === "Escape") {
        event.preventDefault();
        note.blur();
        select(current);
      }
    });
  }

  document.querySelectorAll("[data-decide]").forEach((button) =>
    button.addEventListener("click", () => decide(button.dataset.decide))
  );

  cards.forEach((card, i) => card.addEventListener("click", () => select(i)));

  document.addEventListener("keydown", (event) => {
    if (event.target === note || event.ctrlKey || event.metaKey || event.altKey) return;
    if (event.target.tagName === "SELECT" || event.target.tagName === "INPUT") return;
    const keys = {
      j: () => select(current + 1),
      ArrowRight: () => select(current + 1),
      ArrowDown: () => select(current + 1),
      k: () => select(current - 1),
      ArrowLeft: () => select(current - 1),
      ArrowUp: () => select(current - 1),
      a: () => decide("accept"),
      r: () => decide("reject"),
      s: () => decide("skip"),
      n: () => note && note.focus(),
      o: () => cards[current] && cards[current].dataset.href && (window.location.href = cards[current].dataset.href),
      Enter: () => cards[current] && cards[current].dataset.href && (window.location.href = cards[current].dataset.href),
      Escape: () => single && (window.location.href = single.dataset.backUrl),
      "[": () => grid && grid.dataset.prevUrl && (window.location.href = grid.dataset.prevUrl),
      "]": () => grid && grid.dataset.nextUrl && (window.location.href = grid.dataset.nextUrl),
    };
    const action = keys[event.key];
    if (action) {
      event.preventDefault();
      action();
    }
  });

  // Start at the first face still to review, so a curator picks up where they stopped.
  const first = cards.findIndex(undecided);
  select(first >= 0 ? first : 0);
})();
