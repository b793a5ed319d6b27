// imgpipe console: upload a CSV, follow it, manage it. No framework, no CDN.
//
// Everything shown comes from strangers (product names, URLs, error messages): it is
// only ever set as textContent or as attributes of elements made here, and only
// http(s) URLs go into src or href.
"use strict";

(function () {
  const FINAL = new Set(["completed", "error", "cancelled"]);
  const KEY_STORE = "imgpipe.apiKey";
  const FAST = 1000; // ms between polls while a request runs
  const SLOW = 5000; // ms between polls once it has finished (it may be retried elsewhere)
  const MAX_PRODUCTS = 200; // products drawn; the output CSV has them all
  const STATUS_WORDS = {
    received: "Received, waiting to start",
    processing: "Processing",
    completed: "Completed",
    error: "Finished with errors",
    cancelled: "Cancelled",
  };

  let config = null;
  let current = null; // the request on screen
  let generation = 0; // bumps when another request is shown; stale polls stop
  let uploadKey = null; // Idempotency-Key of the upload being attempted
  let uploading = false;
  let recentNext = null;

  const $ = (id) => document.getElementById(id);

  // --- helpers -------------------------------------------------------------------

  function el(tag, props, children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(props || {})) {
      if (name === "text") node.textContent = value;
      else if (name === "className") node.className = value;
      else node.setAttribute(name, value);
    }
    for (const child of children || []) node.append(child);
    return node;
  }

  function httpUrl(value) {
    if (typeof value !== "string") return null;
    try {
      const url = new URL(value);
      return url.protocol === "http:" || url.protocol === "https:" ? url.href : null;
    } catch (_) {
      return null;
    }
  }

  function newKey() {
    const bytes = new Uint8Array(16);
    crypto.getRandomValues(bytes);
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  function show(node, visible) {
    node.hidden = !visible;
  }

  function say(node, text) {
    node.textContent = text || "";
  }

  function statusUrl(id, suffix) {
    return `${config.status_base_url}/status/${encodeURIComponent(id)}${suffix || ""}`;
  }

  class AuthNeeded extends Error {}

  async function api(url, options) {
    const opts = Object.assign({}, options || {});
    opts.headers = Object.assign({}, opts.headers || {});
    const key = sessionStorage.getItem(KEY_STORE);
    if (key) opts.headers.Authorization = `Bearer ${key}`;
    const response = await fetch(url, opts);
    if (response.status === 401 && config && config.api_key_required) {
      sessionStorage.removeItem(KEY_STORE);
      askForKey("The API key was refused. Enter a valid key.");
      throw new AuthNeeded("API key refused");
    }
    return response;
  }

  async function detailOf(response) {
    try {
      const body = await response.json();
      if (body && typeof body.detail === "string") return body.detail;
    } catch (_) {
      /* not JSON */
    }
    return `HTTP ${response.status}`;
  }

  function pageError(text) {
    say($("page-error"), text);
    show($("page-error"), Boolean(text));
  }

  // --- API key -------------------------------------------------------------------

  function askForKey(message) {
    show($("app"), false);
    show($("key-section"), true);
    show($("forget-key"), false);
    say($("key-error"), message || "");
    show($("key-error"), Boolean(message));
    stopPolling();
    $("api-key").value = "";
    $("api-key").focus();
  }

  async function submitKey(event) {
    event.preventDefault();
    const key = $("api-key").value.trim();
    if (!key) {
      say($("key-error"), "Enter the API key.");
      show($("key-error"), true);
      return;
    }
    sessionStorage.setItem(KEY_STORE, key);
    try {
      // A request that cannot exist: 404 says the key passed, 401 that it did not.
      const response = await api(statusUrl("key-check"));
      if (response.status !== 404 && !response.ok) {
        say($("key-error"), `The status service answered: ${await detailOf(response)}`);
        show($("key-error"), true);
        return;
      }
    } catch (error) {
      if (!(error instanceof AuthNeeded)) {
        say($("key-error"), "The status service did not answer. Try again.");
        show($("key-error"), true);
      }
      return;
    }
    openApp();
  }

  function openApp() {
    show($("key-section"), false);
    show($("app"), true);
    show($("forget-key"), Boolean(config.api_key_required));
    loadRecent(false);
    if (current && !current.gone) track(current.id); // asked for a key again mid-way
  }

  // --- upload --------------------------------------------------------------------

  function formChanged() {
    uploadKey = null; // another file or other options: another upload
  }

  function showProblems(title, errors) {
    say($("upload-errors-title"), title);
    const list = $("upload-errors-list");
    list.replaceChildren();
    for (const problem of errors || []) {
      const where = [];
      if (problem.line !== null && problem.line !== undefined) where.push(`Line ${problem.line}`);
      if (problem.column) where.push(`column “${problem.column}”`);
      if (problem.field) where.push(`field “${problem.field}”`);
      const prefix = where.length ? `${where.join(", ")}: ` : "";
      list.append(el("li", { text: prefix + String(problem.message) }));
    }
    show($("upload-errors"), true);
  }

  async function upload(event) {
    event.preventDefault();
    if (uploading) return; // a double submit sends nothing twice
    const fileInput = $("csv-file");
    show($("upload-errors"), false);
    if (!fileInput.files || fileInput.files.length === 0) {
      say($("upload-message"), "Choose a CSV file first.");
      fileInput.focus();
      return;
    }
    const form = new FormData();
    form.append("file", fileInput.files[0], fileInput.files[0].name);
    const quality = $("quality").value.trim();
    if (quality) form.append("quality", quality);
    const webhook = $("webhook-url").value.trim();
    if (webhook) form.append("webhook_url", webhook);
    uploadKey = uploadKey || newKey(); // kept until it succeeds: a retry is the same upload
    uploading = true;
    $("upload-button").disabled = true;
    say($("upload-message"), "Uploading…");
    try {
      const response = await api("/upload", {
        method: "POST",
        body: form,
        headers: { "Idempotency-Key": uploadKey },
      });
      if (response.status === 202) {
        const body = await response.json();
        uploadKey = null;
        say($("upload-message"), "Uploaded. Following its progress below.");
        track(body.request_id);
        loadRecent(false);
      } else if (response.status === 422 || response.status === 413) {
        const body = await response.json();
        say($("upload-message"), "The file was refused; nothing was processed.");
        showProblems(body.detail, body.errors);
      } else {
        say($("upload-message"), `Upload refused: ${await detailOf(response)}`);
      }
    } catch (error) {
      if (!(error instanceof AuthNeeded)) {
        say($("upload-message"), "The upload did not get through. Try again (it will not be doubled).");
      }
    } finally {
      uploading = false;
      $("upload-button").disabled = false;
    }
  }

  function setUpDropZone() {
    const zone = $("drop-zone");
    // A file dropped beside the zone must not replace the page.
    document.addEventListener("dragover", (e) => e.preventDefault());
    document.addEventListener("drop", (e) => e.preventDefault());
    zone.addEventListener("dragover", (e) => {
      e.preventDefault();
      zone.classList.add("dragging");
    });
    zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
    zone.addEventListener("drop", (e) => {
      e.preventDefault();
      zone.classList.remove("dragging");
      if (e.dataTransfer && e.dataTransfer.files.length) {
        $("csv-file").files = e.dataTransfer.files;
        formChanged();
        say($("upload-message"), `Chosen: ${e.dataTransfer.files[0].name}`);
      }
    });
  }

  // --- the request on screen -----------------------------------------------------

  function stopPolling() {
    generation += 1;
    if (current && current.timer) clearTimeout(current.timer);
  }

  function track(id) {
    stopPolling();
    current = {
      id,
      gen: generation,
      timer: null,
      seen: false,
      last: null,
      pending: null, // {kind, round, before, until}: a command whose effect is awaited
      deleting: false,
      images: [],
    };
    say($("request-id"), id);
    $("request-section").dataset.status = "";
    say($("progress-text"), "Waiting for the status service…");
    $("progress-bar").value = 0;
    $("products").replaceChildren();
    say($("action-message"), "");
    show($("request-section"), true);
    updateButtons();
    poll(current.gen);
  }

  async function poll(gen) {
    if (!current || current.gen !== gen) return;
    const request = current;
    let delay = FAST;
    try {
      // The default first page: the one the status service caches (and gzips).
      const response = await api(statusUrl(request.id));
      if (request.gen !== generation) return;
      if (response.status === 404) {
        if (request.deleting || request.seen) {
          finishDeleted(request);
          return;
        }
        // Just uploaded: the status service learns of it through the broker.
      } else if (response.ok) {
        const body = await response.json();
        if (request.gen !== generation) return;
        render(request, body);
        // The recent list shows this request's state too: keep it in step.
        if (request.lastStatus !== undefined && request.lastStatus !== body.status) {
          loadRecent(false);
        }
        request.lastStatus = body.status;
        delay = settle(request, body) ? SLOW : FAST;
      } else {
        say($("action-message"), `Status unavailable: ${await detailOf(response)}`);
        delay = SLOW;
      }
    } catch (error) {
      if (error instanceof AuthNeeded) return;
      say($("action-message"), "The status service did not answer; trying again.");
      delay = SLOW;
    }
    if (request.gen === generation) request.timer = setTimeout(() => poll(gen), delay);
  }

  // Whether the request is at rest: finished, and no command's effect awaited.
  function settle(request, body) {
    const final = FINAL.has(body.status);
    const pending = request.pending;
    if (pending) {
      const roundSeen = body.round === undefined || pending.round == null || body.round >= pending.round;
      const moved = body.updated_at !== pending.before;
      if ((final && moved && roundSeen) || Date.now() > pending.until) {
        request.pending = null;
        say($("action-message"), pending.kind === "retry" ? "Retry finished." : "");
        loadRecent(false);
      }
    }
    updateButtons();
    return final && !request.pending;
  }

  function finishDeleted(request) {
    request.deleting = false;
    request.gone = true;
    $("request-section").dataset.status = "deleted";
    say($("progress-text"), "Deleted: every service has dropped this request and its images.");
    $("progress-bar").value = 0;
    $("products").replaceChildren();
    updateButtons();
    loadRecent(false);
  }

  function render(request, body) {
    const first = !request.seen;
    request.seen = true;
    request.last = body;
    const progress = body.progress || { total: 0, ok: 0, failed: 0 };
    const done = progress.ok + progress.failed;
    $("request-section").dataset.status = body.status;
    const word = STATUS_WORDS[body.status] || String(body.status);
    let text = `${word}: ${done} of ${progress.total} images done (${progress.ok} ok, ${progress.failed} failed).`;
    if (body.round) text += ` Retry round ${body.round}.`;
    if (body.error_message) text += ` ${String(body.error_message).replace(/\.?$/, ".")}`;
    say($("progress-text"), text);
    $("progress-bar").max = Math.max(progress.total, 1);
    $("progress-bar").value = done;
    if (first) buildProducts(request, body.products || [], body.products_total);
    updateImages(request, body);
  }

  function buildProducts(request, products, total) {
    const all = total === undefined ? products.length : total;
    const list = $("products");
    list.replaceChildren();
    request.images = [];
    products.slice(0, MAX_PRODUCTS).forEach((product, p) => {
      const name = `${product.serial_number}. ${product.product_name}`;
      const images = el("ul", { className: "images" });
      (product.input_urls || []).forEach((input, i) => {
        const before = thumbnail(input, `Before: ${product.product_name}, image ${i + 1}`);
        const afterSlot = el("span", { className: "thumb-slot" }, [placeholder("no output yet")]);
        const state = el("span", { className: "state", text: "waiting" });
        const source = el("span", { className: "url", text: input });
        const item = el("li", { className: "image", "data-state": "pending", "data-input-url": input }, [
          el("span", { className: "pair" }, [
            el("span", { className: "thumb-slot" }, [before]),
            el("span", { className: "arrow", "aria-hidden": "true", text: "→" }),
            afterSlot,
          ]),
          el("span", { className: "image-text" }, [state, source]),
        ]);
        images.append(item);
        request.images.push({ p, i, item, afterSlot, state, output: null, alt: `After: ${product.product_name}, image ${i + 1}` });
      });
      list.append(el("li", { className: "product" }, [el("h4", { text: name }), images]));
    });
    if (all > MAX_PRODUCTS) {
      list.append(el("li", { className: "note", text: `Showing ${MAX_PRODUCTS} of ${all} products; the output CSV has them all.` }));
    }
  }

  function placeholder(text) {
    return el("span", { className: "thumb empty", text });
  }

  function thumbnail(url, alt) {
    const safe = httpUrl(url);
    if (!safe) return placeholder("not a web address");
    const img = el("img", {
      className: "thumb",
      src: safe,
      alt,
      width: "64",
      height: "64",
      loading: "lazy",
      decoding: "async",
      referrerpolicy: "no-referrer",
    });
    img.addEventListener("error", () => img.classList.add("broken"));
    return img;
  }

  function updateImages(request, body) {
    const products = body.products || [];
    const final = FINAL.has(body.status);
    for (const image of request.images) {
      const product = products[image.p];
      if (!product) continue;
      const output = (product.output_urls || [])[image.i] || null;
      const error = (product.errors || [])[image.i] || null;
      let state;
      let text;
      if (output) {
        state = "ok";
        text = "ok";
      } else if (error) {
        state = "failed";
        text = `failed: ${error.message} (${error.code})`;
      } else {
        state = "pending";
        text = final ? "not processed" : "waiting";
      }
      image.item.dataset.state = state;
      say(image.state, text);
      if (output !== image.output) {
        image.output = output;
        image.afterSlot.replaceChildren(output ? thumbnail(output, image.alt) : placeholder(error ? "failed" : "no output yet"));
      }
    }
  }

  function updateButtons() {
    const request = current;
    const body = request && request.last;
    const gone = !request || request.gone;
    const status = body ? body.status : null;
    const failed = body ? body.progress.failed : 0;
    $("download-button").disabled = gone || !body;
    $("retry-button").disabled =
      gone || !body || request.pending !== null || !(status === "completed" || status === "error") || failed === 0;
    $("cancel-button").disabled =
      gone || !body || request.pending !== null || !(status === "received" || status === "processing");
    $("delete-button").disabled = gone || !body || request.deleting;
  }

  async function command(kind) {
    const request = current;
    if (!request) return;
    const url = `/requests/${encodeURIComponent(request.id)}${kind === "delete" ? "" : `/${kind}`}`;
    const before = request.last ? request.last.updated_at : null;
    if (kind === "delete") request.deleting = true;
    else request.pending = { kind, round: null, before, until: Date.now() + 60000 };
    updateButtons();
    try {
      const response = await api(url, { method: kind === "delete" ? "DELETE" : "POST" });
      if (response.status === 202) {
        const body = await response.json();
        if (request.pending) request.pending.round = body.round;
        const words = { cancel: "Cancel sent.", retry: "Retry started: failed images run again.", delete: "Delete sent." };
        say($("action-message"), words[kind]);
        stopPolling();
        request.gen = generation;
        poll(request.gen);
      } else {
        request.pending = null;
        request.deleting = false;
        say($("action-message"), `Not done: ${await detailOf(response)}`);
      }
    } catch (error) {
      request.pending = null;
      request.deleting = false;
      if (!(error instanceof AuthNeeded)) say($("action-message"), "Ingest did not answer; nothing was done.");
    }
    updateButtons();
  }

  async function download() {
    const request = current;
    if (!request) return;
    try {
      const response = await api(statusUrl(request.id, "/output.csv"));
      if (!response.ok) {
        say($("action-message"), `No output CSV: ${await detailOf(response)}`);
        return;
      }
      const blob = await response.blob();
      const link = el("a", { href: URL.createObjectURL(blob), download: `${request.id}.csv` });
      document.body.append(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(link.href), 60000);
      say($("action-message"), "Output CSV downloaded.");
    } catch (error) {
      if (!(error instanceof AuthNeeded)) say($("action-message"), "The status service did not answer.");
    }
  }

  // --- recent requests -----------------------------------------------------------

  async function loadRecent(more) {
    const list = $("recent");
    const params = new URLSearchParams({ limit: "20" });
    if (more && recentNext) params.set("before", recentNext);
    try {
      const response = await api(`${config.status_base_url}/requests?${params}`);
      if (response.status === 404 || response.status === 405) {
        say($("recent-message"), "This status service does not list requests yet.");
        return;
      }
      if (!response.ok) {
        say($("recent-message"), `Could not list requests: ${await detailOf(response)}`);
        return;
      }
      const body = await response.json();
      if (!more) list.replaceChildren();
      for (const item of body.items || []) list.append(recentItem(item));
      recentNext = body.next || null;
      const older = $("recent-older");
      if (older) older.remove();
      if (recentNext) {
        const button = el("button", { type: "button", id: "recent-older", text: "Show older" });
        button.addEventListener("click", () => loadRecent(true));
        list.after(button);
      }
      say($("recent-message"), list.children.length ? "" : "No requests yet.");
    } catch (error) {
      if (!(error instanceof AuthNeeded)) say($("recent-message"), "The status service did not answer.");
    }
  }

  function plural(count, word) {
    if (typeof count !== "number") return `? ${word}s`;
    return `${count} ${word}${count === 1 ? "" : "s"}`;
  }

  function recentItem(item) {
    const progress = item.progress || { total: 0, ok: 0, failed: 0 };
    const when = item.created_at ? new Date(item.created_at).toLocaleString() : "";
    const button = el("button", { type: "button", className: "recent-open", "data-request-id": item.request_id }, [
      el("span", { className: `badge ${String(item.status)}`, text: String(item.status) }),
      el("span", { className: "recent-id", text: String(item.request_id) }),
      el("span", {
        className: "recent-detail",
        text: `${plural(item.product_count, "product")}, ${progress.ok}/${progress.total} ok, ${progress.failed} failed · ${when}`,
      }),
    ]);
    button.addEventListener("click", () => {
      track(item.request_id);
      $("request-title").scrollIntoView();
      $("request-section").focus({ preventScroll: true });
    });
    return el("li", { "data-status": String(item.status) }, [button]);
  }

  // --- start ---------------------------------------------------------------------

  async function start() {
    $("key-form").addEventListener("submit", submitKey);
    $("forget-key").addEventListener("click", () => {
      sessionStorage.removeItem(KEY_STORE);
      askForKey("");
    });
    $("upload-form").addEventListener("submit", upload);
    for (const id of ["csv-file", "quality", "webhook-url"]) $(id).addEventListener("input", formChanged);
    $("csv-file").addEventListener("change", formChanged);
    $("download-button").addEventListener("click", download);
    $("retry-button").addEventListener("click", () => command("retry"));
    $("cancel-button").addEventListener("click", () => command("cancel"));
    $("delete-button").addEventListener("click", () => {
      if (window.confirm("Delete this request and its images everywhere?")) command("delete");
    });
    $("refresh-recent").addEventListener("click", () => loadRecent(false));
    $("request-section").tabIndex = -1;
    setUpDropZone();
    try {
      const response = await fetch("/console/config.json");
      config = await response.json();
    } catch (_) {
      pageError("Could not load the console's settings from ingest. Reload the page.");
      return;
    }
    if (config.api_key_required && !sessionStorage.getItem(KEY_STORE)) askForKey("");
    else openApp();
  }

  document.addEventListener("DOMContentLoaded", start);
})();
