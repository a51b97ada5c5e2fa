// Live node dashboard: follows /api/events (server-sent events) and, when an event of the
// page's kinds arrives, re-fetches the page's live region (?part=live) at most once a
// second. The HTML comes from our own server, rendered with Jinja's autoescaping; the event
// log is written with textContent only. No inline scripts (the CSP forbids them).
(function () {
  "use strict";
  const live = document.getElementById("live");
  const log = document.getElementById("event-log");
  const status = document.getElementById("live-status");
  if (!live || typeof EventSource === "undefined") return;
  const kinds = live.dataset.kinds || "";
  const maxLog = Number((log && log.dataset.max) || 50);
  let timer = null;
  let last = 0;

  function setStatus(text) {
    if (status) status.textContent = text;
  }

  function refresh() {
    timer = null;
    last = Date.now();
    fetch(live.dataset.src, { credentials: "same-origin", headers: { Accept: "text/html" } })
      .then(function (r) {
        if (!r.ok) throw new Error("HTTP " + r.status);
        return r.text();
      })
      .then(function (html) {
        const doc = new DOMParser().parseFromString(html, "text/html");
        const nodes = Array.from(doc.body.childNodes).map(function (n) {
          return document.importNode(n, true);
        });
        live.replaceChildren.apply(live, nodes);
      })
      .catch(function (err) {
        setStatus("refresh failed: " + err.message);
      });
  }

  function schedule() {
    if (timer !== null) return;
    timer = setTimeout(refresh, Math.max(0, 1000 - (Date.now() - last)));
  }

  function addLog(kind, raw) {
    if (!log) return;
    let data = {};
    try {
      data = JSON.parse(raw);
    } catch (e) {
      return;
    }
    const when = new Date((data.time || Date.now() / 1000) * 1000);
    const rest = {};
    Object.keys(data).sort().forEach(function (k) {
      if (k !== "kind" && k !== "seq" && k !== "time") rest[k] = data[k];
    });
    let text = JSON.stringify(rest).replace(/,"/g, ', "').replace(/":/g, '": ');
    if (text.length > 200) text = text.slice(0, 199) + "\u2026";
    const li = document.createElement("li");
    const t = document.createElement("span");
    t.className = "muted";
    t.textContent = when.toTimeString().slice(0, 8);
    const b = document.createElement("b");
    b.textContent = kind;
    li.append(t, " ", b, " " + text);
    log.prepend(li);
    while (log.children.length > maxLog) log.lastElementChild.remove();
  }

  const source = new EventSource("/api/events?replay=0&kinds=" + encodeURIComponent(kinds));
  kinds.split(",").filter(Boolean).forEach(function (kind) {
    source.addEventListener(kind, function (ev) {
      addLog(kind, ev.data);
      schedule();
      if (kind === "node_stopping") setStatus("node stopping");
    });
  });
  source.addEventListener("gap", schedule);
  source.onopen = function () {
    setStatus("live");
  };
  source.onerror = function () {
    setStatus("reconnecting\u2026");
  };
})();
