// segq's job viewer. Polls the job's JSON (same signed token as the page)
// and draws each item: its image, every mask tinted in its own colour with
// its polygon outline, the prompts (a text prompt's phrase listed with its
// exemplar boxes drawn), and a table of segments with toggles.
// Everything the client sent is inserted as text, never as markup.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
// Tableau's ten: distinct from each other on most photographs.
const COLOURS = [
  "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
  "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f",
];
// A text prompt answers up to 256 instances: past the ten, each segment's
// hue turns by the golden angle, so neighbours in the table stay apart.
const GOLDEN_ANGLE = 137.508;
const FINISHED = new Set(["Completed", "Failed", "Canceled"]);
const dataUrl = document.body.dataset.jobUrl;
// position -> the item status drawn, so a poll redraws only what changed
// (and keeps the toggles of finished items as the person left them).
const drawn = new Map();
let pendingImages = 0;

function element(tag, attributes = {}, text = null) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    // The page's Content-Security-Policy refuses style attributes (no
    // 'unsafe-inline'): colours go in SVG presentation attributes (fill,
    // stroke), sizes and visibility through the CSSOM (node.style.x = …).
    if (name === "style") throw new Error("style attributes are refused by this page's CSP");
    node.setAttribute(name, value);
  }
  if (text !== null) node.textContent = text;
  return node;
}

function svgElement(tag, attributes = {}) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, String(value));
  return node;
}

function watchImage(image) {
  // The page says when every image it drew has arrived (tests wait on it).
  pendingImages += 1;
  document.body.dataset.imagesLoaded = "false";
  const settle = () => {
    pendingImages -= 1;
    if (pendingImages === 0) document.body.dataset.imagesLoaded = "true";
  };
  image.addEventListener("load", settle, { once: true });
  image.addEventListener("error", settle, { once: true });
}

function itemTitle(item) {
  // The file's name first (what a person called the image), then its
  // externalId when that says something more.
  const title = element("h2");
  let name;
  let externalId = item.fileExternalId;
  if (item.fileName) name = item.fileName;
  else if (externalId) [name, externalId] = [externalId, null];
  else if (item.fileInstanceId) name = `${item.fileInstanceId.space}/${item.fileInstanceId.externalId}`;
  else if (item.fileUrl) name = item.fileUrl;
  else name = `file ${item.fileId}`;
  title.append(element("span", { class: "file-name" }, `#${item.position} ${name}`));
  if (externalId && externalId !== name) {
    title.append(element("span", { class: "external-id", title: "externalId" }, externalId));
  }
  return title;
}

function swatch(colour) {
  // An SVG square filled through its presentation attribute: a style
  // attribute would be refused by the page's Content-Security-Policy.
  const icon = svgElement("svg", {
    class: "swatch", width: 12, height: 12, viewBox: "0 0 12 12", "data-colour": colour,
    "aria-hidden": "true",
  });
  icon.append(svgElement("rect", { width: 12, height: 12, rx: 2, fill: colour }));
  return icon;
}

function hex(value) {
  return Math.round(value * 255).toString(16).padStart(2, "0");
}

function colourOf(index) {
  // "#rrggbb" (the swatch and the tests read it back): the palette, then
  // HSL hues a golden angle apart, in three lightnesses.
  if (index < COLOURS.length) return COLOURS[index];
  const hue = ((index - COLOURS.length) * GOLDEN_ANGLE) % 360;
  const lightness = [0.5, 0.38, 0.62][index % 3];
  const chroma = 0.75 * Math.min(lightness, 1 - lightness);
  const channel = (n) => {
    const k = (n + hue / 30) % 12;
    return lightness - chroma * Math.max(-1, Math.min(k - 3, 9 - k, 1));
  };
  return `#${hex(channel(0))}${hex(channel(8))}${hex(channel(4))}`;
}

function promptsOf(job) {
  const prompt = job.prompt || {};
  if (prompt.prompts && prompt.prompts.length) return prompt.prompts;
  if ((prompt.points && prompt.points.length) || prompt.boundingBox || prompt.text) return [prompt];
  return [];
}

function promptLabel(prompt, promptIndex) {
  // A text prompt by its phrase; a click or box prompt by its index only.
  return prompt && prompt.text ? `${promptIndex} “${prompt.text}”` : String(promptIndex);
}

function ringPath(polygon, width, height) {
  const points = polygon.vertices.map((v) => `${(v.x * width).toFixed(2)} ${(v.y * height).toFixed(2)}`);
  return points.length ? `M${points.join("L")}Z` : "";
}

function drawSegment(stage, defs, item, segment, index) {
  const width = item.width;
  const height = item.height;
  const colour = colourOf(index);
  const group = svgElement("g", { class: "segment", "data-segment": index, "data-colour": colour });
  if (segment.mask && segment.mask.url) {
    const maskId = `mask-${item.position}-${index}`;
    const mask = svgElement("mask", {
      id: maskId, maskUnits: "userSpaceOnUse", x: 0, y: 0, width, height,
    });
    const maskImage = svgElement("image", {
      href: segment.mask.url, x: 0, y: 0, width, height, preserveAspectRatio: "none",
    });
    watchImage(maskImage);
    mask.append(maskImage);
    defs.append(mask);
    group.append(svgElement("rect", {
      class: "tint", x: 0, y: 0, width, height, fill: colour, "fill-opacity": 0.5,
      mask: `url(#${maskId})`,
    }));
  }
  const outline = (segment.polygons || [])
    .map((polygon) => ringPath(polygon, width, height)).join(" ");
  if (outline) {
    group.append(svgElement("path", {
      class: "outline", d: outline, fill: "none", stroke: colour, "stroke-width": 2,
      "vector-effect": "non-scaling-stroke",
    }));
  }
  stage.append(group);
  return { group, colour };
}

function drawPrompts(stage, job, width, height) {
  const group = svgElement("g", { class: "prompts" });
  const radius = Math.max(3, Math.round(Math.max(width, height) * 0.012));
  promptsOf(job).forEach((prompt, promptIndex) => {
    const box = prompt.boundingBox;
    if (box) {
      group.append(svgElement("rect", {
        class: "prompt-box", "data-prompt": promptIndex,
        x: box.xMin * width, y: box.yMin * height,
        width: (box.xMax - box.xMin) * width, height: (box.yMax - box.yMin) * height,
        fill: "none", stroke: "#ffd33d", "stroke-width": 2, "stroke-dasharray": "6 4",
        "vector-effect": "non-scaling-stroke",
      }));
    }
    for (const exemplar of prompt.boxes || []) {
      // A text prompt's exemplar: green an example of the phrase, red a
      // counter-example, dotted apart from a box prompt's dashes.
      const positive = exemplar.label === 1;
      const rect = svgElement("rect", {
        class: positive ? "prompt-exemplar positive" : "prompt-exemplar negative",
        "data-prompt": promptIndex,
        x: exemplar.xMin * width, y: exemplar.yMin * height,
        width: (exemplar.xMax - exemplar.xMin) * width,
        height: (exemplar.yMax - exemplar.yMin) * height,
        fill: "none", stroke: positive ? "#3fb950" : "#f85149", "stroke-width": 2,
        "stroke-dasharray": "2 3", "vector-effect": "non-scaling-stroke",
      });
      const title = svgElement("title");
      title.textContent = `prompt ${promptIndex} “${prompt.text}”: ${positive ? "example" : "counter-example"}`;
      rect.append(title);
      group.append(rect);
    }
    for (const point of prompt.points || []) {
      const marker = svgElement("circle", {
        class: point.label === 1 ? "prompt-point foreground" : "prompt-point background",
        "data-prompt": promptIndex, cx: point.x * width, cy: point.y * height, r: radius,
        fill: point.label === 1 ? "#3fb950" : "#f85149", stroke: "#ffffff", "stroke-width": 1.5,
        "vector-effect": "non-scaling-stroke",
      });
      const title = svgElement("title");
      title.textContent = `prompt ${promptIndex}: ${point.label === 1 ? "foreground" : "background"} point`;
      marker.append(title);
      group.append(marker);
    }
  });
  stage.append(group);
  return group;
}

function toggle(label, group, name) {
  const box = element("input", { type: "checkbox", name });
  box.checked = true;
  box.addEventListener("change", () => {
    group.style.display = box.checked ? "" : "none";
  });
  const wrapper = element("label", {}, null);
  wrapper.append(box, document.createTextNode(label));
  return wrapper;
}

function promptList(job, segments) {
  // Each text prompt's phrase with what it found (its instances are the
  // table's rows of that prompt).
  const list = element("ul", { class: "prompt-list" });
  promptsOf(job).forEach((prompt, promptIndex) => {
    if (!prompt.text) return;
    const found = segments.filter((segment) => segment.promptIndex === promptIndex).length;
    const entry = element("li", { "data-prompt": promptIndex });
    entry.append(
      element("span", { class: "prompt-index" }, `prompt ${promptIndex} `),
      element("q", { class: "phrase" }, prompt.text),
      document.createTextNode(` ${found} found`),
    );
    const exemplars = prompt.boxes || [];
    if (exemplars.length) {
      const positive = exemplars.filter((box) => box.label === 1).length;
      entry.append(element("span", { class: "note" },
        ` (exemplars: ${positive} example(s), ${exemplars.length - positive} counter-example(s))`));
    }
    list.append(entry);
  });
  return list.childElementCount ? list : null;
}

function segmentTable(job, item, segments, drawnSegments) {
  const prompts = promptsOf(job);
  const table = element("table", { class: "segments" });
  const head = element("tr");
  for (const title of ["segment", "prompt", "score", "area"]) head.append(element("th", {}, title));
  table.append(head);
  segments.forEach((segment, index) => {
    const row = element("tr", { "data-segment": index });
    const cell = element("td");
    const { group, colour } = drawnSegments[index];
    cell.append(toggle(` #${index}`, group, `segment-${item.position}-${index}`));
    cell.append(swatch(colour));
    row.append(cell);
    row.append(element("td", { class: "prompt" }, segment.promptIndex === undefined
      || segment.promptIndex === null
      ? "–" : promptLabel(prompts[segment.promptIndex], segment.promptIndex)));
    row.append(element("td", {}, segment.score.toFixed(3)));
    row.append(element("td", {}, `${(segment.area * 100).toFixed(2)} %`));
    table.append(row);
  });
  return table;
}

function drawItem(job, item) {
  const card = element("section", { class: "item", "data-position": item.position, "data-status": item.status });
  const title = itemTitle(item);
  title.append(element("span", { class: `badge ${item.status}` }, item.status));
  card.append(title);
  if (item.errorMessage) card.append(element("p", { class: "error item-error" }, item.errorMessage));
  const body = element("div", { class: "item-body" });
  card.append(body);
  if (!item.width || !item.height) {
    body.append(element("p", { class: "note" }, item.fileUrl
      ? "The image was fetched from its URL by the worker; segq keeps no copy to show."
      : "No image to show."));
    return card;
  }
  const stage = svgElement("svg", {
    class: "stage", width: item.width, height: item.height,
    viewBox: `0 0 ${item.width} ${item.height}`, "data-position": item.position,
  });
  const defs = svgElement("defs");
  stage.append(defs);
  if (item.imageUrl) {
    const picture = svgElement("image", {
      class: "picture", href: item.imageUrl, x: 0, y: 0, width: item.width, height: item.height,
      preserveAspectRatio: "none",
    });
    watchImage(picture);
    stage.append(picture);
  }
  const segments = item.segments || [];
  const drawnSegments = segments.map((segment, index) => drawSegment(stage, defs, item, segment, index));
  const prompts = drawPrompts(stage, job, item.width, item.height);
  body.append(stage);
  const side = element("div", { class: "side" });
  side.append(toggle(" prompts", prompts, `prompts-${item.position}`));
  const phrases = promptList(job, segments);
  if (phrases) side.append(phrases);
  if (segments.length) side.append(segmentTable(job, item, segments, drawnSegments));
  else if (item.status === "Completed") side.append(element("p", { class: "note" }, "No segment found."));
  else if (!FINISHED.has(item.status)) side.append(element("p", { class: "note" }, "Waiting for a worker…"));
  body.append(side);
  return card;
}

function showJob(job) {
  document.body.dataset.status = job.status;
  document.getElementById("job-status").textContent = job.status;
  document.getElementById("job-engine").textContent = job.engine ? `(engine: ${job.engine})` : "";
  const { total, completed, failed } = job.progress;
  const share = (count) => (total ? `${(100 * count) / total}%` : "0");
  document.getElementById("progress-done").style.width = share(completed);
  document.getElementById("progress-failed").style.width = share(failed);
  const bar = document.getElementById("progress");
  bar.setAttribute("aria-valuemax", String(total));
  bar.setAttribute("aria-valuenow", String(completed + failed));
  document.getElementById("progress-text").textContent =
    `${completed} of ${total} done` + (failed ? `, ${failed} failed` : "");
  const jobError = document.getElementById("job-error");
  jobError.hidden = !job.errorMessage;
  jobError.textContent = job.errorMessage || "";
  const container = document.getElementById("items");
  for (const item of job.items) {
    if (drawn.get(item.position) === item.status) continue;
    const card = drawItem(job, item);
    const old = container.querySelector(`section.item[data-position="${item.position}"]`);
    if (old) old.replaceWith(card);
    else container.append(card);
    drawn.set(item.position, item.status);
  }
  if (pendingImages === 0) document.body.dataset.imagesLoaded = "true";
}

async function poll() {
  let wait = 5;
  try {
    const response = await fetch(dataUrl, { cache: "no-store", credentials: "omit" });
    if (response.status === 401 || response.status === 403) {
      const body = await response.json().catch(() => ({}));
      throw new Error((body.error && body.error.message) || "this link is no longer valid");
    }
    if (!response.ok) {
      document.getElementById("job-error").hidden = false;
      document.getElementById("job-error").textContent = `segq answered ${response.status}; retrying`;
    } else {
      const job = await response.json();
      showJob(job);
      if (job.refreshAfter === null || job.refreshAfter === undefined) return;
      wait = Math.max(0.5, job.refreshAfter);
    }
  } catch (error) {
    if (error instanceof TypeError) {
      document.getElementById("job-error").hidden = false;
      document.getElementById("job-error").textContent = "segq cannot be reached; retrying";
    } else {
      document.getElementById("job-error").hidden = false;
      document.getElementById("job-error").textContent = error.message;
      document.body.dataset.status = "unavailable";
      return;
    }
  }
  setTimeout(poll, wait * 1000);
}

poll();
