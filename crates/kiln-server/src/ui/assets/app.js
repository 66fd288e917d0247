// Kiln's web UI: live parts of a page follow the runs without a reload, and buttons that
// change something ask first when they say so (data-confirm).
"use strict";

(function () {
  const live = () => document.querySelectorAll("[data-live][id]");
  let busy = false;
  let again = false;

  async function refresh() {
    if (busy) { again = true; return; }
    busy = true;
    try {
      // Parts already final (a finished run's result) are not computed and sent again.
      const final = [...document.querySelectorAll("[data-live][data-final][id]")].map((e) => e.id).join(",");
      const response = await fetch(location.href, {
        headers: { "X-Kiln-Live": "1", "X-Kiln-Final": final },
        credentials: "same-origin",
      });
      if (!response.ok) return;
      const fresh = new DOMParser().parseFromString(await response.text(), "text/html");
      for (const part of live()) {
        const next = fresh.getElementById(part.id);
        if (next && next.innerHTML !== part.innerHTML) {
          // Keep open the subflows someone opened.
          const open = new Set([...part.querySelectorAll("details[open] summary a")].map((a) => a.getAttribute("href")));
          part.replaceWith(next);
          for (const d of next.querySelectorAll("details")) {
            const a = d.querySelector("summary a");
            if (a && open.has(a.getAttribute("href"))) d.open = true;
          }
        }
      }
      document.dispatchEvent(new CustomEvent("kiln:refreshed"));
    } catch (e) {
      // The server may be restarting: the next event brings the page up to date.
    } finally {
      busy = false;
      if (again) { again = false; setTimeout(refresh, 150); }
    }
  }

  // A stream only while the tab is visible: browsers allow six connections to a server,
  // and hidden tabs holding theirs would stall every other page.
  let events = null;
  function listen() {
    if (!live().length || !window.EventSource) return;
    if (document.hidden) {
      if (events) { events.close(); events = null; }
      return;
    }
    if (events) return;
    events = new EventSource("/ui/events");
    events.addEventListener("changed", refresh);
    // What changed between the page's rendering and the stream's start (or while the
    // connection was lost: the browser reconnects by itself) is caught up on every open.
    events.addEventListener("open", refresh);
  }
  document.addEventListener("visibilitychange", listen);

  // Log lines change no run's state: a page about a run that has not ended also looks
  // again every few seconds while it is visible.
  setInterval(() => {
    if (!document.hidden && document.querySelector("[data-poll]")) refresh();
  }, 3000);

  document.addEventListener("submit", (event) => {
    const form = event.target;
    const question = form.getAttribute("data-confirm");
    if (question && !window.confirm(question)) event.preventDefault();
  });

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", listen);
  else listen();
})();
