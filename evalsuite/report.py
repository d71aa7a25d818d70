"""The loop report (`tunegate report --out DIR`): one HTML page with plots of what the closed loop did.

Owns `write_report` (a database session in, `index.html` + PNG plots + `report.json` out) and
`ReportResult`. It reads, never writes, the database: `online_scores` (quality, flag and override
rates per adapter version and window), `eval_runs` (`online` runs holding a drift report, `gate` runs
holding the promotion record), `review_items` (throughput and queue depth), `audit_log` (adapter
transitions, route weights), `rollouts` (canary steps) and `train` jobs. Missing data gives a
"no data yet" section, never an exception. The page is rendered from `report.html.j2` with Jinja2
autoescape on, so question texts and reasons from the data are escaped; plots are matplotlib (Agg),
each figure closed. The per-window numbers are `evalsuite.scoring.window_quality`'s. May import `core`,
`evalsuite.scoring` and third-party libraries (jinja2, matplotlib, sqlalchemy); never `gateway` or `training`.
"""

from __future__ import annotations

import functools
import io
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jinja2
import sqlalchemy as sa
from sqlalchemy.orm import Session

from core.db import Adapter, AuditLog, EvalRun, Job, ReviewItem, Rollout
from core.io import atomic_write_bytes, atomic_write_json
from core.lifecycle import version_label
from core.vocab import EvalKind, ReviewReason
from evalsuite.scoring import window_quality

TEMPLATE = Path(__file__).with_name("report.html.j2")
# How each lifecycle event is drawn on the timeline: (marker, colour, size).
MARKERS = {
    "trained": ("o", "#656d76", 60), "candidate": ("o", "#656d76", 40), "gate passed": ("^", "#1a7f37", 90),
    "gate rejected": ("v", "#cf222e", 90), "gate not_enough_evidence": ("v", "#bf8700", 90),
    "gated": ("^", "#1a7f37", 40), "canary": ("s", "#0969da", 40), "canary step": ("s", "#0969da", 70),
    "canary step failed": ("s", "#cf222e", 70), "active": ("*", "#1a7f37", 220), "retired": ("D", "#8c959f", 50),
    "rejected": ("X", "#cf222e", 120), "rolled_back": ("X", "#bf3989", 140),
}  # fmt: skip


@dataclass(frozen=True)
class ReportResult:
    html_path: Path
    plots: list[Path] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


def _weights_text(weights: dict | None, labels: dict[int, str]) -> str:
    """`{"3": 0.9, "None": 0.1}` (adapter id -> weight, None the base model) as `support/v3 0.9, base 0.1`."""
    return ", ".join(
        f"{labels.get(int(k), 'base') if k != 'None' else 'base'} {v:g}"
        for k, v in (weights or {}).items()
        if str(k).lstrip("-").isdigit() or k == "None"
    )


@functools.cache
def _template() -> jinja2.Template:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATE.parent), autoescape=True, undefined=jinja2.StrictUndefined,
        trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
    )  # fmt: skip
    return env.get_template(TEMPLATE.name)


def _aware(value: Any) -> datetime | None:
    """A timezone-aware UTC datetime from a datetime or an ISO string; None for anything else."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return None
    if not isinstance(value, datetime):
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _iso(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M UTC") if value else ""


def _num(value: Any, fmt: str = ".3f") -> str:
    """A number for a table cell; a blank for None, NaN or anything not a number."""
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        return "" if value is None else str(value)
    return format(value, fmt)


def _finite(value: Any) -> float | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


# ---- data ------------------------------------------------------------------------------------------


def _quality(session: Session) -> list[dict[str, Any]]:
    """Per (route, adapter version, window): n, quality (mean of judged `correct`), flag and override rates."""
    rows = [row.to_dict() for row in window_quality(session)]
    for row in rows:
        row["version"], row["window_start"] = row.pop("adapter_version"), _aware(row["window_start"])
    return rows


def _drift(session: Session) -> list[dict[str, Any]]:
    runs = session.scalars(
        sa.select(EvalRun).where(EvalRun.kind == EvalKind.ONLINE).order_by(EvalRun.started_at, EvalRun.id)
    )
    out = []
    for run in runs:
        summary = run.summary or {}
        drift = summary.get("drift")
        if not isinstance(drift, dict):
            continue
        risk, flags, emb = (drift.get(k) if isinstance(drift.get(k), dict) else {} for k in
                            ("risk", "flag_rate", "embedding"))  # fmt: skip
        typical = [t for t in emb.get("typical_drifted") or [] if isinstance(t, dict)]
        out.append({
            "at": _aware(run.started_at), "route": str(summary.get("route", "")),
            "auroc": _finite(emb.get("auroc")), "threshold": _finite(emb.get("threshold")),
            "embedding_drifted": bool(emb.get("drifted")), "risk_statistic": _finite(risk.get("statistic")),
            "risk_method": str(risk.get("method", "")), "risk_p": _finite(risk.get("p_value")),
            "risk_psi": _finite(risk.get("psi")), "risk_drifted": bool(risk.get("drifted")),
            "flag_p": _finite(flags.get("p_value")), "flag_drifted": bool(flags.get("drifted")),
            "typical": [(str(t.get("text", "")), _num(t.get("score"))) for t in typical],
        })  # fmt: skip
    return out


def _reviews(session: Session) -> list[tuple[datetime | None, datetime | None, str]]:
    rows = session.execute(sa.select(ReviewItem.created_at, ReviewItem.decided_at, ReviewItem.reason)).all()
    return [(_aware(c), _aware(d), r) for c, d, r in rows]


def _events(session: Session) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """The adapter timeline (every event with its time and version), the gate records and the rollouts."""
    labels = {a.id: version_label(a) for a in session.scalars(sa.select(Adapter))}
    events: list[dict[str, Any]] = []

    def add(at: Any, version: str, kind: str, detail: str, route: str = "") -> None:
        events.append({"at": _aware(at), "version": version, "kind": kind, "detail": detail, "route": route})

    for job in session.scalars(sa.select(Job).where(Job.kind == "train").order_by(Job.created_at, Job.id)):
        res = job.result or {}
        label = labels.get(res.get("adapter_id"), f"train job {job.id}")  # the version the job registered
        add(job.finished_at or job.created_at, label, "trained" if job.status == "succeeded" else f"train {job.status}",
            f"job {job.id} {job.status}" + (f": {job.error}" if job.error else ""))  # fmt: skip
    for row in session.scalars(
        sa.select(AuditLog).where(AuditLog.object_type.in_(("adapter", "route"))).order_by(AuditLog.at, AuditLog.id)
    ):
        d = row.detail or {}
        if row.object_type == "adapter" and row.action.startswith("adapter."):
            label = str(d.get("version") or labels.get(int(row.object_id or 0), f"adapter {row.object_id}"))
            frm = f"{d['from']} → " if d.get("from") else ""
            add(row.at, label, row.action.removeprefix("adapter."), f"{frm}{d.get('to', row.action[8:])} by "
                f"{row.actor}: {d.get('why', '')}")  # fmt: skip
        elif row.action == "route.weights":
            before, after = _weights_text(d.get("before"), labels), _weights_text(d.get("after"), labels)
            add(row.at, "", "route.weights", f"{before} ⇒ {after}: {d.get('why', '')}", str(row.object_id))
        elif row.action == "route.seeded":
            add(row.at, "", "route.seeded", ", ".join(f"{k} {v:g}" for k, v in (d.get("targets") or {}).items()),
                str(row.object_id))  # fmt: skip
    gates = []
    for run in session.scalars(sa.select(EvalRun).where(EvalRun.kind == EvalKind.GATE).order_by(EvalRun.started_at)):
        s = run.summary or {}
        test, hold = s.get("test") or {}, s.get("holdout") or {}
        label = str(s.get("candidate") or labels.get(run.adapter_id, f"adapter {run.adapter_id}"))
        gate = {
            "at": _aware(run.finished_at or run.started_at), "candidate": label, "baseline": str(s.get("baseline", "")),
            "decision": str(s.get("decision", run.status)), "cand_acc": _num(test.get("candidate_accuracy")),
            "base_acc": _num(test.get("baseline_accuracy")), "p_value": _num(test.get("p_value"), ".4g"),
            "hold_diff": _num(hold.get("difference")), "hold_bound": _num(hold.get("lower_bound")),
            "margin": _num(hold.get("margin")), "items": test.get("n", ""), "required": s.get("required_items", ""),
        }  # fmt: skip
        gates.append(gate)
        add(gate["at"], label, f"gate {gate['decision']}", f"accuracy {gate['cand_acc']} vs {gate['base_acc']} "
            f"({gate['baseline']}), p={gate['p_value']}, holdout {gate['hold_diff']} (bound {gate['hold_bound']}), "
            f"items {gate['items']}/{gate['required']}")  # fmt: skip
    rollouts = []
    for r in session.scalars(sa.select(Rollout).order_by(Rollout.created_at, Rollout.id)):
        label, steps = labels.get(r.candidate_id, f"adapter {r.candidate_id}"), []
        for h in r.history or []:
            if not isinstance(h, dict):
                continue
            reasons = "; ".join(str(x) for x in h.get("reasons") or [])
            steps.append({"step": h.get("step", ""), "weight": _num(h.get("weight"), ".0%"),
                          "at": _aware(h.get("judged_at")), "passed": h.get("passed"), "reasons": reasons})  # fmt: skip
            add(h.get("judged_at"), label, "canary step" if h.get("passed") is not False else "canary step failed",
                f"step {h.get('step')} at {_num(h.get('weight'), '.0%')}: "
                f"{'passed' if h.get('passed') else 'failed'} {reasons}", r.route)  # fmt: skip
        rollouts.append({"id": r.id, "route": r.route, "candidate": label,
                         "baseline": labels.get(r.baseline_id, "base") if r.baseline_id else "base",
                         "status": r.status, "step": r.step, "weights": list(r.weights or []), "steps": steps,
                         "started": _aware(r.created_at), "finished": _aware(r.finished_at)})  # fmt: skip
    far = datetime.max.replace(tzinfo=UTC)
    events.sort(key=lambda e: e["at"] or far)
    return events, gates, rollouts


# ---- plots -----------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    buf = io.BytesIO()
    try:
        fig.autofmt_xdate()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=110)
    finally:
        _pyplot().close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def _plot_quality(quality: list[dict[str, Any]], out: Path) -> list[Path]:
    plt = _pyplot()
    series: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in quality:
        series[f"{row['route']} · {row['version']}"].append(row)
    fig, ax = plt.subplots(figsize=(8, 3.6))
    for name, rows in series.items():
        pts = [(r["window_start"], r["quality"]) for r in rows if r["quality"] is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=name)
    ax.set_ylim(-0.05, 1.05)
    ax.set(ylabel="quality (share correct)", title="Quality per adapter version over time")
    ax.legend(fontsize=8)
    paths = [_save(fig, out / "quality.png")]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 4.8), sharex=True)
    for name, rows in series.items():
        top.plot([r["window_start"] for r in rows], [r["flag_rate"] for r in rows], marker=".", label=name)
        pts = [(r["window_start"], r["override_rate"]) for r in rows if r["override_rate"] is not None]
        if pts:
            bottom.plot(*zip(*pts, strict=True), marker=".", label=name)
    top.set(ylabel="flag rate", title="Flag and override rates per adapter version")
    bottom.set(ylabel="override rate")
    top.legend(fontsize=8)
    paths.append(_save(fig, out / "rates.png"))
    return paths


def _plot_drift(drift: list[dict[str, Any]], out: Path) -> Path:
    fig, (top, bottom) = _pyplot().subplots(2, 1, figsize=(8, 4.8), sharex=True)
    for route in sorted({d["route"] for d in drift}):
        rows = [d for d in drift if d["route"] == route]
        pts = [(d["at"], d["auroc"]) for d in rows if d["auroc"] is not None]
        if pts:
            top.plot(*zip(*pts, strict=True), marker="o", label=f"{route} embedding AUROC")
        pts = [(d["at"], d["risk_statistic"]) for d in rows if d["risk_statistic"] is not None]
        if pts:
            bottom.plot(*zip(*pts, strict=True), marker="o", label=f"{route} risk statistic")
        for d in rows:
            for ax, key, drifted in ((top, "auroc", "embedding_drifted"), (bottom, "risk_statistic", "risk_drifted")):
                if d[drifted] and d[key] is not None:
                    ax.scatter([d["at"]], [d[key]], color="#cf222e", zorder=3, s=50)
    thresholds = sorted({d["threshold"] for d in drift if d["threshold"] is not None})
    for i, t in enumerate(thresholds):
        top.axhline(t, color="#cf222e", linestyle="--", linewidth=1, label="AUROC threshold" if i == 0 else None)
    top.set(ylabel="AUROC", title="Drift (red points: drifted)")
    bottom.set(ylabel="risk statistic")
    for ax in (top, bottom):
        if ax.has_data():
            ax.legend(fontsize=8)
    return _save(fig, out / "drift.png")


def _plot_reviews(reviews: list[tuple[datetime | None, datetime | None, str]], out: Path) -> Path:
    hour = lambda t: t.replace(minute=0, second=0, microsecond=0)  # noqa: E731
    decided = [(hour(d), r) for _, d, r in reviews if d is not None]
    hours = sorted({h for h, _ in decided})
    fig, (top, bottom) = _pyplot().subplots(2, 1, figsize=(8, 4.8))
    counts = Counter(decided)
    bottom_of = [0] * len(hours)
    for reason in [r.value for r in ReviewReason] + sorted({r for _, r in decided} - {r.value for r in ReviewReason}):
        heights = [counts[(h, reason)] for h in hours]
        if any(heights):
            top.bar(hours, heights, width=1 / 26, bottom=bottom_of, label=reason, align="edge")
            bottom_of = [a + b for a, b in zip(bottom_of, heights, strict=True)]
    top.set(ylabel="decided per hour", title="Review throughput by reason")
    if hours:
        top.legend(fontsize=8)
    steps = sorted([(c, 1) for c, _, _ in reviews if c] + [(d, -1) for _, d, _ in reviews if d], key=lambda s: s[0])
    depth, xs, ys = 0, [], []
    for at, delta in steps:
        depth += delta
        xs.append(at)
        ys.append(depth)
    bottom.step(xs, ys, where="post", color="#0969da")
    bottom.set(ylabel="queue depth", title="Open review items (created − decided)")
    return _save(fig, out / "reviews.png")


def _plot_timeline(events: list[dict[str, Any]], out: Path) -> Path:
    lanes = list(dict.fromkeys(e["version"] for e in events if e["version"] and e["at"]))
    fig, ax = _pyplot().subplots(figsize=(9, 1.2 + 0.55 * max(len(lanes), 1)))
    seen: set[str] = set()
    for e in events:
        if e["version"] not in lanes or e["at"] is None:
            continue
        marker, colour, size = MARKERS.get(e["kind"], ("o", "#8c959f", 40))
        ax.scatter([e["at"]], [lanes.index(e["version"])], marker=marker, color=colour, s=size, zorder=3,
                   label=None if e["kind"] in seen else e["kind"])  # fmt: skip
        seen.add(e["kind"])
    for i in range(len(lanes)):
        ax.axhline(i, color="#d0d7de", linewidth=0.8, zorder=1)
    ax.set_yticks(range(len(lanes)), lanes)
    ax.set_ylim(-0.6, len(lanes) - 0.4)
    ax.set_title("Adapter timeline")
    if seen:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    return _save(fig, out / "timeline.png")


# ---- the page --------------------------------------------------------------------------------------


def _latest_quality(quality: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    latest: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for row in quality:  # ordered by window_start: the last one wins
        latest[row["route"]][row["version"]] = {
            "window_start": row["window_start"].isoformat() if row["window_start"] else None,
            **{k: row[k] for k in ("n", "quality", "judged", "flag_rate", "override_rate", "error_rate")},
        }
    return dict(latest)


def write_report(session: Session, out_dir: Path, title: str = "tunegate loop report") -> ReportResult:
    """Write `index.html`, its PNG plots and `report.json` into `out_dir` (created); read-only on the database."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    quality, drift, reviews = _quality(session), _drift(session), _reviews(session)
    events, gates, rollouts = _events(session)
    plots: dict[str, Path | None] = {"quality": None, "rates": None, "drift": None, "reviews": None, "timeline": None}
    if quality:
        plots["quality"], plots["rates"] = _plot_quality(quality, out_dir)
    if drift:
        plots["drift"] = _plot_drift(drift, out_dir)
    if reviews:
        plots["reviews"] = _plot_reviews(reviews, out_dir)
    if any(e["version"] and e["at"] for e in events):
        plots["timeline"] = _plot_timeline(events, out_dir)
    latest_typical = next((d for d in reversed(drift) if d["typical"]), None)
    decided = [r for r in reviews if r[1] is not None]
    summary = {
        "title": title,
        "generated_at": datetime.now(UTC).isoformat(),
        "counts": {
            "online_scores": sum(r["n"] for r in quality),
            "windows": len({r["window_start"] for r in quality}),
            "drift_runs": len(drift),
            "drifted_runs": sum(d["embedding_drifted"] or d["risk_drifted"] for d in drift),
            "review_items": len(reviews),
            "reviews_decided": len(decided),
            "gates": len(gates),
            "rollouts": len(rollouts),
            "timeline_events": len(events),
        },  # fmt: skip
        "latest_quality": _latest_quality(quality),
        "gates": [{k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in g.items()} for g in gates],
        "rollouts": [
            {
                "id": r["id"],
                "route": r["route"],
                "candidate": r["candidate"],
                "baseline": r["baseline"],
                "status": r["status"],
                "step": r["step"],
                "weights": r["weights"],
                "judged_steps": len(r["steps"]),
            }
            for r in rollouts
        ],  # fmt: skip
        "plots": sorted(p.name for p in plots.values() if p),
    }
    by_reason = Counter(r for _, _, r in decided)
    html = _template().render(
        title=title, generated=_iso(datetime.now(UTC)), plots={k: (p.name if p else None) for k, p in plots.items()},
        counts=list(summary["counts"].items()),
        latest=[(route, v, _num(q["quality"], ".1%"), q["judged"], _num(q["flag_rate"], ".1%"),
                 _num(q["override_rate"], ".1%"), q["n"]) for route, vs in summary["latest_quality"].items()
                for v, q in vs.items()],
        drift=[(_iso(d["at"]), d["route"], _num(d["auroc"]), _num(d["threshold"]), "yes" if d["embedding_drifted"]
                else "no", f"{d['risk_method']} {_num(d['risk_statistic'])}", _num(d["risk_p"], ".3g"),
                _num(d["risk_psi"]), "yes" if d["risk_drifted"] else "no", "yes" if d["flag_drifted"] else "no")
               for d in drift],
        typical=latest_typical, typical_at=_iso(latest_typical["at"]) if latest_typical else "",
        review_counts=[(reason, n) for reason, n in sorted(by_reason.items())], reviews_total=len(reviews),
        reviews_open=len(reviews) - len(decided),
        gates=[(_iso(g["at"]), g["candidate"], g["baseline"], g["decision"], g["cand_acc"], g["base_acc"],
                g["p_value"], g["hold_diff"], g["hold_bound"], g["margin"], f"{g['items']} / {g['required']}")
               for g in gates],
        rollouts=rollouts, iso=_iso,
        events=[(_iso(e["at"]), e["version"] or e["route"], e["kind"], e["detail"]) for e in events],
    )  # fmt: skip
    atomic_write_json(out_dir / "report.json", summary)
    html_path = atomic_write_bytes(out_dir / "index.html", html.encode("utf-8"))
    return ReportResult(html_path, [p for p in plots.values() if p], summary)
