// Director Studio: progressive enhancement only. Every page works without this file; it adds
// live updates (server-sent events), copy buttons, confirmations and JSON help in forms.
(function () {
  "use strict";

  // --- copy buttons: <button class="copy" data-copy="ID" hidden> -----------------------------
  function setupCopy(root) {
    root.querySelectorAll("button.copy[data-copy]").forEach(function (button) {
      button.hidden = false;
      button.addEventListener("click", function () {
        var source = document.getElementById(button.dataset.copy);
        if (!source) { return; }
        var text = source.value !== undefined ? source.value : source.textContent;
        var done = function () {
          var label = button.textContent;
          button.textContent = "Copied";
          button.setAttribute("aria-live", "polite");
          setTimeout(function () { button.textContent = label; }, 1500);
        };
        if (navigator.clipboard && window.isSecureContext) {
          navigator.clipboard.writeText(text).then(done, function () { selectText(source); });
        } else {
          selectText(source);
          try { document.execCommand("copy"); done(); } catch (e) { /* selected: copy by hand */ }
        }
      });
    });
  }

  function selectText(node) {
    var range = document.createRange();
    range.selectNodeContents(node);
    var selection = window.getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
  }

  // --- confirmations: <form data-confirm="Really?"> -------------------------------------------
  function setupConfirm(root) {
    root.querySelectorAll("form[data-confirm]").forEach(function (form) {
      form.addEventListener("submit", function (event) {
        if (!window.confirm(form.dataset.confirm)) { event.preventDefault(); }
      });
    });
  }

  // --- JSON fields: <textarea data-json> -------------------------------------------------------
  function setupJson(root) {
    root.querySelectorAll("textarea[data-json]").forEach(function (area) {
      var note = document.getElementById(area.id + "-json");
      var check = function (pretty) {
        if (!area.value.trim()) { area.removeAttribute("aria-invalid"); if (note) { note.textContent = ""; } return true; }
        try {
          var value = JSON.parse(area.value);
          if (pretty) { area.value = JSON.stringify(value, null, 2); }
          area.removeAttribute("aria-invalid");
          if (note) { note.textContent = ""; }
          return true;
        } catch (error) {
          area.setAttribute("aria-invalid", "true");
          if (note) { note.textContent = "Not valid JSON: " + error.message; }
          return false;
        }
      };
      area.addEventListener("blur", function () { check(true); });
      if (area.form) {
        area.form.addEventListener("submit", function (event) {
          if (!check(false)) { event.preventDefault(); area.focus(); }
        });
      }
    });
  }

  // --- live regions: [data-live] elements are refreshed when the server says so ----------------
  function markDirty(root) {
    root.querySelectorAll("[data-live] form").forEach(function (form) {
      form.addEventListener("input", function () { form.dataset.dirty = "1"; });
    });
  }

  var refreshing = null;
  function refreshRegions() {
    if (refreshing) { refreshing.again = true; return; }
    refreshing = { again: false };
    fetch(window.location.href, { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (response) { return response.ok ? response.text() : null; })
      .then(function (html) {
        if (!html) { return; }
        var fresh = new DOMParser().parseFromString(html, "text/html");
        document.querySelectorAll("[data-live]").forEach(function (region) {
          var replacement = fresh.getElementById(region.id);
          if (!replacement) { return; }
          if (region.contains(document.activeElement) || region.querySelector("form[data-dirty]")) { return; }
          region.replaceWith(replacement);
          enhance(replacement);
        });
        document.documentElement.dataset.refreshed = String(Date.now());
      })
      .catch(function () { /* the next event tries again */ })
      .then(function () {
        var again = refreshing && refreshing.again;
        refreshing = null;
        if (again) { refreshRegions(); }
      });
  }

  function setupEvents() {
    var body = document.body;
    if (!body.dataset.events || !window.EventSource) { return; }
    var source = new EventSource(body.dataset.events);
    var dot = document.getElementById("live-dot");
    source.addEventListener("open", function () {
      document.documentElement.dataset.live = "connected";
      if (dot) { dot.classList.add("on"); dot.title = "Live updates on"; }
    });
    source.addEventListener("error", function () {
      document.documentElement.dataset.live = "reconnecting";
      if (dot) { dot.classList.remove("on"); dot.title = "Live updates reconnecting"; }
    });
    source.addEventListener("changed", function (event) {
      var change;
      try { change = JSON.parse(event.data); } catch (e) { return; }
      var watching = body.dataset.playbook;
      if (watching === undefined || watching === "" || watching === change.playbook) {
        refreshRegions();
      }
    });
  }

  function enhance(root) {
    setupCopy(root);
    setupConfirm(root);
    setupJson(root);
    markDirty(root);
  }

  // After a form was refused or a tool ran, move the focus (and screen readers) to what
  // the server said: the error summary, else the result.
  function focusOutcome() {
    var target = document.getElementById("errors") || document.getElementById("result");
    if (target) { target.focus(); }
  }

  document.addEventListener("DOMContentLoaded", function () {
    enhance(document);
    setupEvents();
    focusOutcome();
  });
})();
