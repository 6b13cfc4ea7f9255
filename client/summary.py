"""The HTML summary page of an explained report: one row per study, failures included, each with its
montage thumbnail, sortable by probability.

Self-contained: inline style and script, no fonts, scripts or styles fetched from anywhere (a
Content-Security-Policy forbids it), thumbnails linked relatively from the folder beside the page.
No patient identifiers: studies are named by their row number in the report (the same order as the
report's rows), never by path or UID, and thumbnails by a hash of the study's path.
"""

from __future__ import annotations

import hashlib
import html
import os
import re
import urllib.parse
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from contract import shown_probability
from preprocess import printable, write_atomically

from .montage import describe_model
from .result import SUCCESS

_SCRIPT = """
(function () {
  var body = document.getElementById("studies");
  var button = document.getElementById("sort-probability");
  var header = document.getElementById("probability-header");
  function probability(row) {
    var value = row.getAttribute("data-probability");
    return value === "" ? null : parseFloat(value);
  }
  function number(row) { return parseInt(row.getAttribute("data-row"), 10); }
  function sortRows(order) {  // "desc" or "asc" by probability, failures last; "row": the report's order
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      if (order !== "row") {
        var x = probability(a), y = probability(b);
        if (x === null && y !== null) return 1;
        if (y === null && x !== null) return -1;
        if (x !== null && y !== null && x !== y) return order === "asc" ? x - y : y - x;
      }
      return number(a) - number(b);
    });
    rows.forEach(function (row) { body.appendChild(row); });
    header.setAttribute("aria-sort", order === "asc" ? "ascending" : order === "desc" ? "descending" : "none");
    button.textContent = order === "desc" ? "P(pathology) \\u25bc" : order === "asc" ? "P(pathology) \\u25b2" : "P(pathology) \\u21c5";
    document.body.setAttribute("data-sorted", order);
  }
  button.addEventListener("click", function () {
    var order = document.body.getAttribute("data-sorted") === "desc" ? "asc" : "desc";
    sortRows(order);
    if (window.history && history.replaceState) history.replaceState(null, "", "#sort=probability-" + order);
  });
  document.getElementById("sort-row").addEventListener("click", function () { sortRows("row"); });
  var asked = /sort=probability-(asc|desc)/.exec(window.location.hash);
  sortRows(asked ? asked[1] : "row");
})();
"""

_STYLE = """
body { font-family: sans-serif; margin: 1.5em; background: #fafafa; color: #111; }
table { border-collapse: collapse; }
th, td { border-bottom: 1px solid #ccc; padding: 0.4em 0.7em; text-align: left; vertical-align: middle; }
th button { font: inherit; font-weight: bold; cursor: pointer; background: none; border: 1px solid #888; border-radius: 3px; }
td.error { min-width: 18em; }
td.number, td.probability { text-align: right; font-variant-numeric: tabular-nums; }
tr.failure td { background: #fdecea; }
tr.pathology td.decision { color: #b00020; font-weight: bold; }
img.thumbnail { width: 480px; height: auto; display: block; background: #000; }
.note { color: #555; max-width: 60em; }
"""

GENERATOR = "ct-triage report summary"  # marks the pages a report wrote: only those are ever replaced
_REPORT_META = "ct-triage-report"  # the report a page summarises: report.xlsx and report.csv would share report.html
_CSP = "default-src 'none'; img-src 'self' file: data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"


def thumbnail_name(path_to_study: str) -> str:
    """A study's thumbnail file name: a hash of its report key, so no path appears in file names."""
    return hashlib.sha256(path_to_study.encode("utf-8", "surrogateescape")).hexdigest()[:20] + ".png"


def summary_paths(out: str | os.PathLike[str]) -> tuple[Path, Path]:
    """The page and its thumbnail folder beside a report: report.xlsx -> report.html, report_thumbnails/."""
    target = Path(out)
    return target.with_suffix(".html"), target.parent / f"{target.stem}_thumbnails"


def render(rows: Iterable[dict[str, Any]], thumbnails: Path, page: Path, *, report_name: str) -> str:
    """The page's HTML for report rows in report order (their row numbers are 1-based positions)."""
    rows = list(rows)
    succeeded = sum(row.get("processing_status") == SUCCESS for row in rows)
    models = sorted({describe_model(row.get("model")) for row in rows if row.get("processing_status") == SUCCESS and row.get("model")})
    folder = os.path.relpath(thumbnails, page.parent)
    lines = []
    for number, row in enumerate(rows, start=1):
        lines.append(_row(number, row, thumbnails, folder))
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    model_lines = "".join(f"<li>{html.escape(model)}</li>" for model in models) or "<li>none answered yet</li>"
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_CSP}">
<meta name="referrer" content="no-referrer">
<meta name="generator" content="{GENERATOR}">
<meta name="{_REPORT_META}" content="{html.escape(printable(report_name), quote=True)}">
<title>Chest-CT triage summary: {html.escape(printable(report_name))}</title>
<style>{_STYLE}</style>
</head>
<body data-sorted="row">
<h1>Chest-CT triage summary</h1>
<p>Report <code>{html.escape(printable(report_name))}</code>: {len(rows)} studies, {succeeded} Success, {len(rows) - succeeded} Failure.
Written {generated}.</p>
<ul class="models">{model_lines}</ul>
<p class="note">Row # is the study's row in the report (its rows below the header, in the same order); the report
names the study. Pictures: axial, coronal and sagittal slices through the most attributed region (magenta box),
attribution over the CT in a lung window (W 1500, L -600). Decision support only: every study is read by a
radiologist.</p>
<table>
<thead><tr>
<th aria-sort="none"><button id="sort-row" type="button">#</button></th>
<th>picture</th>
<th id="probability-header" aria-sort="none"><button id="sort-probability" type="button">P(pathology) &#x21c5;</button></th>
<th>decision</th>
<th>region (x,x,y,y,z,z series voxels)</th>
<th>status</th>
<th>error</th>
</tr></thead>
<tbody id="studies">
{chr(10).join(lines)}
</tbody>
</table>
<script>{_SCRIPT}</script>
</body>
</html>
"""


def _row(number: int, row: dict[str, Any], thumbnails: Path, folder: str) -> str:
    ok = row.get("processing_status") == SUCCESS
    probability = row.get("probability_of_pathology")
    has_probability = ok and isinstance(probability, (int, float))
    name = thumbnail_name(str(row.get("path_to_study", "")))
    if ok and (thumbnails / name).is_file():
        link = html.escape(urllib.parse.quote(os.fsencode(f"{folder}/{name}")), quote=True)  # the bytes on disk, any name
        picture = f'<a href="{link}"><img class="thumbnail" src="{link}" alt="montage of study {number}"></a>'
    else:
        picture = "no picture" if ok else ""
    if ok:
        decision = "pathology" if row.get("pathology") else "normal"
        threshold = row.get("threshold")
        if isinstance(threshold, (int, float)):  # the operating point behind this row's decision
            decision += f" (threshold {threshold:g})"
        region = html.escape(printable(str(row.get("pathology_localization") or "none")))
    else:
        decision = region = ""
    classes = "failure" if not ok else ("pathology" if row.get("pathology") else "normal")
    cells = [
        f'<td class="number">{number}</td>',
        f"<td>{picture}</td>",
        f'<td class="probability">{shown_probability(probability, row.get("pathology")) if has_probability else "&mdash;"}</td>',
        f'<td class="decision">{decision}</td>',
        f"<td>{region}</td>",
        f"<td>{html.escape(str(row.get('processing_status') or ''))}</td>",
        f'<td class="error">{html.escape(printable(str(row.get("error") or "")))}</td>',
    ]
    value = f"{float(probability):.6f}" if has_probability else ""
    return f'<tr class="{classes}" data-row="{number}" data-probability="{value}">{"".join(cells)}</tr>'


def summarised_report(page: Path) -> str | None:
    """The report name a page written by a report summarises; None for any other file."""
    try:
        with open(page, "rb") as stream:
            head = stream.read(4096).decode("utf-8", "replace")
    except OSError:
        return None
    found = re.search(f'<meta name="generator" content="{GENERATOR}">\n<meta name="{_REPORT_META}" content="([^"]*)">', head)
    return html.unescape(found.group(1)) if found else None


def write_summary(
    rows: Iterable[dict[str, Any]], page: str | os.PathLike[str], thumbnails: str | os.PathLike[str], *, report_name: str
) -> Path:
    """Write the page atomically (a reader never sees half of it)."""
    target = Path(page)
    text = render(rows, Path(thumbnails), target, report_name=report_name)
    return write_atomically(target, lambda stream: stream.write(text.encode("utf-8")))
