"""HTML of the report: number formatting, tables and the page itself (no external assets)."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np  # noqa: E402

from pe.io import write_text_atomic  # noqa: E402

STAT_KEYS: tuple[str, ...] = ("sensitivity", "specificity", "ppv", "npv", "f1")
# ------------------------------------------------------------------------------------------------
# HTML
# ------------------------------------------------------------------------------------------------
def fmt(v: Any, digits: int = 6) -> str:
    """Table cell text: floats with ``digits`` decimals, NaN as "n/a"."""
    if isinstance(v, (float, np.floating)):
        return "n/a" if not math.isfinite(float(v)) else f"{float(v):.{digits}f}"
    return html.escape(str(v))


def html_table(header: Sequence[str], rows: Sequence[Sequence[Any]], table_id: str = "", digits: int = 6) -> str:
    tid = f' id="{table_id}"' if table_id else ""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "\n".join("<tr>" + "".join(f"<td>{fmt(c, digits)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table{tid}>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"


def metric_table(breakdowns: dict[str, dict[str, Any]]) -> str:
    """Per label: weight share, then loss contribution and AUC for each prediction set; last row the
    total score."""
    sets = list(breakdowns)
    header = ["label", "weight"] + [f"{h} ({s})" for s in sets for h in ("loss", "AUC")]
    first = breakdowns[sets[0]]
    rows: list[list[Any]] = []
    for label in first["labels"]:
        row: list[Any] = [label, first["labels"][label]["weight"]]
        for s in sets:
            v = breakdowns[s]["labels"][label]
            row += [v["loss"], v["auc"]]
        rows.append(row)
    total: list[Any] = ["score (total)", 1.0]
    for s in sets:
        total += [breakdowns[s]["score"], ""]
    rows.append(total)
    return html_table(header, rows, table_id="metric-table")


def stats_table(breakdowns: dict[str, dict[str, Any]]) -> str:
    rows = []
    for s, bd in breakdowns.items():
        for level, key in (("exam PE", "exam_pe_at_0.5"), ("image", "image_at_0.5")):
            st = bd[key]
            rows.append([s, level, *[st[k] for k in STAT_KEYS], f"{st['tp']}/{st['fp']}/{st['tn']}/{st['fn']}"])
        rows.append([s, "AUC (study PE / image)", bd["study_pe_auc"], bd["image_auc"], "", "", "", ""])
    return html_table(["predictions", "level", "sensitivity", "specificity", "PPV", "NPV", "F1", "tp/fp/tn/fn"],
                      rows, table_id="stats-table")


_CSS = """body{font-family:sans-serif;max-width:1250px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}th{background:#eee}img{max-width:100%;border:1px solid #ddd}
.note{color:#555;font-size:13px}pre{background:#f6f6f6;padding:8px}"""


def write_html(path: Path, title: str, sections: Sequence[tuple[str, str]]) -> None:
    body = "\n".join(f"<h2>{html.escape(h)}</h2>\n{content}" for h, content in sections)
    doc = (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
           f"<style>{_CSS}</style></head>\n<body>\n<h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n")
    write_text_atomic(path, doc)


def img(name: str, alt: str) -> str:
    return f'<p><img src="{html.escape(name)}" alt="{html.escape(alt)}"></p>'
