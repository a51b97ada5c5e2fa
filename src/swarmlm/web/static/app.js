// Keyboard shortcuts for the annotation page; no inline scripts (the CSP forbids them).
// 1-9 pick a choice (toggle for multiple choice), a rating is typed as its value, A/B/T/X pick a preference, digits build a
// ranking, Enter submits, S skips. Keys typed into a text field are left alone, except
// Ctrl+Enter in the free-text box, which submits.
(function () {
  "use strict";
  const form = document.getElementById("annotate-form");
  if (!form) return;
  const started = Date.now();
  const kind = form.dataset.kind;
  const submitButton = document.getElementById("submit-button");
  const skipButton = document.getElementById("skip-button");
  const spent = document.getElementById("time_spent_ms");
  const ranking = document.getElementById("ranking");

  form.addEventListener("submit", function () {
    spent.value = String(Date.now() - started);
  });

  function submit(button) {
    if (typeof form.requestSubmit === "function") {
      form.requestSubmit(button);
    } else {
      button.click();
    }
  }

  function byKey(key) {
    return form.querySelector('input[data-key="' + key + '"]');
  }

  // Ratings are typed as their value: a digit picks that value, and a second digit within
  // a second extends it when the longer number is on the scale (1 then 0 gives 10).
  // "-" starts a negative value.
  let typed = "";
  let typedAt = 0;
  function ratingKey(event) {
    if (!/^[0-9-]$/.test(event.key)) return false;
    const now = Date.now();
    const joined = (now - typedAt < 1000 ? typed : "") + event.key;
    typedAt = now;
    let input = form.querySelector('input[name="value"][value="' + joined + '"]');
    typed = joined;
    if (!input && event.key !== "-") {
      input = form.querySelector('input[name="value"][value="' + event.key + '"]');
      typed = event.key;
    }
    event.preventDefault();
    if (input) {
      input.checked = true;
      input.focus();
    }
    return true;
  }

  function rankingKey(event) {
    const k = Number(ranking.dataset.k);
    const order = ranking.value.split(",").filter(function (x) { return x !== ""; });
    if (/^[1-9]$/.test(event.key) && Number(event.key) <= k && order.indexOf(event.key) < 0) {
      order.push(event.key);
    } else if (event.key === "Backspace") {
      order.pop();
    } else {
      return false;
    }
    ranking.value = order.join(",");
    event.preventDefault();
    return true;
  }

  document.addEventListener("keydown", function (event) {
    if (event.altKey || event.metaKey) return;
    const target = event.target;
    const typing = target && (target.tagName === "TEXTAREA" ||
      (target.tagName === "INPUT" && target.type !== "radio" && target.type !== "checkbox"));
    if (target === ranking && rankingKey(event)) return;
    if (typing) {
      if (event.key === "Enter" && event.ctrlKey) {
        event.preventDefault();
        submit(submitButton);
      }
      if (target !== ranking) return;
    }
    if (event.ctrlKey) return;
    const key = event.key.length === 1 ? event.key.toUpperCase() : event.key;
    if (key === "Enter") {
      event.preventDefault();
      submit(submitButton);
      return;
    }
    if (key === "S") {
      event.preventDefault();
      submit(skipButton);
      return;
    }
    if (kind === "ranking" && ranking && rankingKey(event)) return;
    if (kind === "rating" && ratingKey(event)) return;
    const input = byKey(key);
    if (!input) return;
    event.preventDefault();
    if (input.type === "checkbox") {
      input.checked = !input.checked;
    } else {
      input.checked = true;
    }
    input.focus();
  });
})();

// Review page: A accepts, R rejects, C corrects (with the chosen value), L leaves it for
// later. Data manager: "/" jumps to the search box. Keys typed into fields are left alone.
(function () {
  "use strict";
  const review = document.getElementById("review-form");
  const search = document.getElementById("search");
  if (!review && !search) return;
  document.addEventListener("keydown", function (event) {
    if (event.altKey || event.metaKey || event.ctrlKey) return;
    const t = event.target;
    if (t && (t.tagName === "TEXTAREA" || t.tagName === "SELECT" ||
        (t.tagName === "INPUT" && t.type !== "radio" && t.type !== "checkbox"))) return;
    if (search && event.key === "/") {
      event.preventDefault();
      search.focus();
      return;
    }
    if (!review) return;
    const key = event.key.toUpperCase();
    const targets = { A: "accept-button", R: "reject-button", C: "correct-button" };
    if (key === "L") {
      event.preventDefault();
      document.getElementById("later-link").click();
    } else if (targets[key]) {
      event.preventDefault();
      const button = document.getElementById(targets[key]);
      if (typeof review.requestSubmit === "function") review.requestSubmit(button);
      else button.click();
    }
  });
})();
