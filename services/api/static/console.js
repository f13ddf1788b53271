// Kiln console: small progressive enhancements. Every page works without this file; it only
// auto-submits the org switcher, asks before destructive actions, copies secrets, narrows the
// pod form's MIG choices to the chosen GPU type, and keeps a pod's page live (its state and its
// logs, read with EventSource from the console's own same-origin streams).
(function () {
  "use strict";

  function copyText(text, done) {
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(done, function () { legacyCopy(text); done(); });
    } else {
      legacyCopy(text);
      done();
    }
  }

  function legacyCopy(text) {
    var area = document.createElement("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.className = "visually-hidden";
    document.body.appendChild(area);
    area.select();
    try { document.execCommand("copy"); } catch (e) { /* nothing more to try */ }
    document.body.removeChild(area);
  }

  // ---- pods ----

  var FINAL_STATES = { terminated: true, failed: true, stopped: true };

  // The badge colour of a pod state (the server has the same table).
  function stateClass(state) {
    if (state === "running") { return "badge-ok"; }
    if (state === "failed") { return "badge-danger"; }
    if (state === "terminated" || state === "stopped") { return "badge-off"; }
    return "badge-warn";
  }

  function el(tag, className, text) {
    var node = document.createElement(tag);
    if (className) { node.className = className; }
    if (text !== undefined && text !== null) { node.textContent = text; }
    return node;
  }

  function replaceChildren(parent, children) {
    while (parent.firstChild) { parent.removeChild(parent.firstChild); }
    children.forEach(function (c) { parent.appendChild(c); });
  }

  // A code element with `text`, or a muted note when there is none.
  function codeOr(text, none) {
    if (text) { var c = el("code", "wrap", text); return c; }
    return el("span", "muted", none);
  }

  // Show a pod view (the JSON of an `event: pod`).
  function showPod(pod) {
    var badge = document.getElementById("pod-state");
    if (badge) {
      badge.textContent = pod.state;
      badge.className = "badge " + stateClass(pod.state);
    }
    var reason = document.getElementById("pod-reason");
    if (reason) { reason.textContent = pod.state_reason || ""; }
    var node = document.getElementById("pod-node");
    if (node) { replaceChildren(node, [codeOr(pod.node, "not placed yet")]); }
    var gpus = document.getElementById("pod-gpus");
    if (gpus) { replaceChildren(gpus, [codeOr((pod.gpus || []).join(", "), "none")]); }
    var ports = document.getElementById("pod-ports");
    if (ports) {
      var rows = (pod.ports || []).map(function (p) {
        var row = el("div", "pod-port");
        row.setAttribute("data-port", String(p.container_port));
        if (p.host && p.host_port) {
          var address = p.host + ":" + p.host_port;
          var link = el("a", null, address);
          link.href = "http://" + address + "/";
          link.rel = "noopener";
          link.target = "_blank";
          row.appendChild(link);
          row.appendChild(document.createTextNode(" "));
          row.appendChild(el("span", "muted", "\u2192 " + p.container_port));
        } else {
          var note = FINAL_STATES[pod.state] ? "" : " (not bound yet)";
          row.appendChild(el("span", "muted", p.container_port + note));
        }
        return row;
      });
      replaceChildren(ports, rows.length ? rows : [el("span", "muted", "none")]);
    }
    var del = document.getElementById("delete-pod-form");
    if (del && pod.state === "terminated") { del.hidden = true; }
  }

  // The pod's state, live.
  function followPod(url) {
    var live = document.getElementById("live-status");
    var source = new EventSource(url);
    function say(text) {
      if (!live) { return; }
      live.hidden = !text;
      live.textContent = text || "";
    }
    source.addEventListener("open", function () { say("\u25CF live"); });
    source.addEventListener("pod", function (event) {
      var pod;
      try { pod = JSON.parse(event.data); } catch (e) { return; }
      showPod(pod);
      if (FINAL_STATES[pod.state]) { source.close(); say(""); }
    });
    source.addEventListener("end", function () { source.close(); say(""); });
    source.addEventListener("error", function () {
      say(source.readyState === EventSource.CLOSED ? "not live: reload the page" : "reconnecting\u2026");
    });
  }

  // "2026-11-22T07:13:42.123Z" -> "07:13:42"
  function clock(at) {
    var m = /T(\d\d:\d\d:\d\d)/.exec(at || "");
    return m ? m[1] : "";
  }

  var MAX_LOG_LINES = 2000;

  // The pod's output: its last lines, then each new one.
  function followLogs(url) {
    var box = document.getElementById("pod-logs");
    var status = document.getElementById("logs-status");
    if (!box) { return; }
    var source = new EventSource(url);
    function say(text) { if (status) { status.textContent = text; } }
    source.addEventListener("open", function () { say("Following: new lines appear as they are written."); });
    source.addEventListener("log", function (event) {
      var line;
      try { line = JSON.parse(event.data); } catch (e) { return; }
      var empty = document.getElementById("logs-empty");
      if (empty) { empty.parentNode.removeChild(empty); }
      var atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 24;
      var source_ = /^[a-z]+$/.test(line.source || "") ? line.source : "stdout";
      var row = el("div", "log-line log-" + source_);
      row.setAttribute("data-source", source_);
      var time = el("span", "log-at", clock(line.at));
      time.title = line.at || "";
      row.appendChild(time);
      row.appendChild(el("span", "log-text", line.text));
      box.appendChild(row);
      while (box.childNodes.length > MAX_LOG_LINES) { box.removeChild(box.firstChild); }
      if (atBottom) { box.scrollTop = box.scrollHeight; }
    });
    source.addEventListener("end", function () {
      source.close();
      say("The pod has ended; these are its last lines.");
    });
    source.addEventListener("error", function () {
      say(source.readyState === EventSource.CLOSED ? "Logs are unavailable right now: reload the page to try again." : "Reconnecting\u2026");
    });
  }

  // The new-pod form offers only the MIG profiles of the chosen GPU type.
  function narrowMigProfiles(form) {
    var type = form.querySelector("#pod-gpu-type");
    var mig = form.querySelector("#pod-mig-profile");
    if (!type || !mig) { return; }
    function sync() {
      mig.querySelectorAll("optgroup").forEach(function (group) {
        var mine = group.getAttribute("data-gpu-type") === type.value;
        group.hidden = !mine;
        group.disabled = !mine;
      });
      var chosen = mig.options[mig.selectedIndex];
      if (chosen && chosen.parentNode.tagName === "OPTGROUP" && chosen.parentNode.disabled) { mig.value = ""; }
      mig.disabled = !mig.querySelector("optgroup:not([disabled])");
      if (mig.disabled) { mig.value = ""; }
    }
    type.addEventListener("change", sync);
    sync();
  }

  function init() {
    // The org switcher navigates as soon as an org is picked.
    document.querySelectorAll("form[data-autosubmit] select").forEach(function (select) {
      select.addEventListener("change", function () {
        if (select.value) { select.form.submit(); }
      });
      var fallback = select.form.querySelector("[data-nojs]");
      if (fallback) { fallback.hidden = true; }
    });

    // Destructive forms ask first.
    document.querySelectorAll("form[data-confirm]").forEach(function (form) {
      form.addEventListener("submit", function (event) {
        if (!window.confirm(form.getAttribute("data-confirm"))) { event.preventDefault(); }
      });
    });

    // Copy buttons: data-copy names the element whose value (or text) to copy.
    document.querySelectorAll("[data-copy]").forEach(function (button) {
      button.hidden = false;
      button.addEventListener("click", function () {
        var target = document.getElementById(button.getAttribute("data-copy"));
        if (!target) { return; }
        var text = "value" in target ? target.value : target.textContent;
        var label = button.textContent;
        copyText(text, function () {
          button.textContent = "Copied";
          window.setTimeout(function () { button.textContent = label; }, 1600);
        });
      });
    });

    // The pod form, and a pod's live page.
    var podForm = document.getElementById("new-pod-form");
    if (podForm) { narrowMigProfiles(podForm); }
    var pod = document.getElementById("pod");
    if (pod && window.EventSource) {
      var events = pod.getAttribute("data-events");
      var logs = pod.getAttribute("data-logs");
      if (events) { followPod(events); }
      if (logs) { followLogs(logs); }
    }

    // Clicking into a secret selects all of it.
    document.querySelectorAll("input[data-select-all]").forEach(function (input) {
      input.addEventListener("focus", function () { input.select(); });
    });
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", init);
  } else {
    init();
  }
})();
