"""The curation report as a web page: `render_html()` fills the Jinja2 template `report.html.j2`.

Owns `render_html` (a `report.json` dict in, a self-contained HTML page out, with an inline SVG bar
chart of the rejections per rule). The template is rendered with autoescape on, so every string
from the data (file names, roles, rejection messages) is escaped. Imports jinja2; nothing of ours.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import jinja2

TEMPLATE = Path(__file__).with_name("report.html.j2")

# Bar chart geometry, in pixels.
_ROW_H, _LABEL_W, _BAR_W, _PAD = 24, 150, 420, 60


@functools.cache
def _template() -> jinja2.Template:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATE.parent),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    return env.get_template(TEMPLATE.name)


def _chart(counts: dict[str, int]) -> dict[str, Any]:
    """Where the bars of the horizontal bar chart of `counts` go."""
    peak = max(counts.values(), default=0) or 1
    bars = [
        {"rule": rule, "count": n, "y": 4 + i * _ROW_H, "width": round(_BAR_W * n / peak) if n else 0}
        for i, (rule, n) in enumerate(counts.items())
    ]
    return {
        "width": _LABEL_W + _BAR_W + _PAD,
        "height": _ROW_H * len(counts) + 8,
        "label_x": _LABEL_W - 8,
        "bar_x": _LABEL_W,
        "bar_height": _ROW_H - 8,
        "bars": bars,
    }


def render_html(report: dict[str, Any]) -> str:
    """A self-contained HTML page for a `report.json` dict; every user-supplied string is escaped."""
    s = report["summary"]
    return _template().render(
        length_unit=report["length_unit"],
        dataset_hash=str(report.get("dataset_hash", "")),
        summary=[
            ("rows read", s["rows_in"]),
            ("rejected", s["rejected"]),
            ("kept", s["kept"]),
            ("train", s["train"]),
            ("validation", s["validation"]),
            ("examples with PII masked", s["examples_with_pii"]),
        ],
        chart=_chart(report["rejected_by_rule"]),
        steps=[(st["name"], st["in"], st["out"], st["removed"], st["note"]) for st in report["steps"]],
        pii=[(kind, f"[{kind}]", n) for kind, n in report["pii_masked"].items()],
        max_samples_per_rule=report["config"]["max_samples_per_rule"],
        samples=[
            (rule, r["source"], r["line"], r["message"])
            for rule, items in report["sample_rejections"].items()
            for r in items
        ],
        inputs=[(i["path"], i["format"], i["rows"], i["sha256"][:16]) for i in report["inputs"]],
        outputs=[(name, o["rows"], o["sha256"]) for name, o in report["outputs"].items()],
        config_json=json.dumps(report["config"], indent=2),
    )
