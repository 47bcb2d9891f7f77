"""Server-rendered HTML for the dashboard: plain strings, escaped, inline CSS, no script.

Every page works offline (no CDN, no font, no JavaScript). Functions take the records the
owners' query functions return and give back HTML; nothing here reads the store.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from html import escape
from typing import Any

from aenode.assemble import SeriesRecord
from aenode.audit import AuditRecord
from aenode.infer.cards import ModelCard
from aenode.jobs import STAGE_COLUMNS, JobRecord
from aenode.receive.refusals import Refusal

__all__ = ["DashboardData", "audit_page", "dashboard_page", "job_stage_seconds"]

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;background:#f4f6f8;
color:#1d2733}
header{background:#17324d;color:#fff;padding:12px 24px;display:flex;gap:24px;
align-items:baseline}
header h1{font-size:20px;margin:0}header span{opacity:.8;font-size:13px}
main{padding:16px 24px}section{background:#fff;border-radius:6px;padding:12px 16px;
margin-bottom:16px;box-shadow:0 1px 2px rgba(0,0,0,.08)}
h2{font-size:16px;margin:4px 0 10px}table{border-collapse:collapse;width:100%;font-size:13px}
th,td{text-align:left;padding:4px 8px;border-bottom:1px solid #e3e7eb;vertical-align:top}
th{background:#eef1f4;font-weight:600}code{font-size:12px;word-break:break-all}
.state{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;
font-weight:600}
.done,.complete,.sent,.ok{background:#d5f2dc;color:#17632b}
.running,.inferred,.exporting,.receiving,.queued,.pending{background:#dde9fb;color:#1d4f91}
.failed,.rejected,.quarantined,.failing{background:#fbdcdc;color:#8c1d1d}
.reason{color:#8c1d1d}.muted{color:#66727f}
img.report{max-width:480px;border:1px solid #ccd3da;margin-top:6px}
dl{margin:0}dt{font-weight:600;margin-top:4px}dd{margin:0 0 0 12px}
"""


@dataclass(frozen=True)
class DashboardData:
    """What the dashboard shows, gathered by the app from the owners' queries."""

    node: str
    health: Mapping[str, Any]
    series: Sequence[SeriesRecord]
    jobs: Sequence[JobRecord]
    cards: Sequence[ModelCard]
    refusals: Sequence[Refusal]
    allow_actions: bool


def _t(epoch: float | None) -> str:
    if not epoch:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def _state(value: str) -> str:
    v = escape(value)
    return f'<span class="state {v}">{v}</span>'


def _table(head: Iterable[str], rows: Iterable[Iterable[str]], empty: str) -> str:
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    if not body:
        return f'<p class="muted">{escape(empty)}</p>'
    cols = "".join(f"<th>{escape(h)}</th>" for h in head)
    return f"<table><thead><tr>{cols}</tr></thead><tbody>{body}</tbody></table>"


def _page(title: str, node: str, body: str) -> str:
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)}</title><style>{_CSS}</style></head><body>"
        f"<header><h1>aenode</h1><span>{escape(node)}</span>"
        f'<span><a style="color:#fff" href="/">dashboard</a> · '
        f'<a style="color:#fff" href="/healthz">healthz</a> · '
        f'<a style="color:#fff" href="/metrics">metrics</a></span></header>'
        f"<main>{body}</main></body></html>"
    )


def job_stage_seconds(job: JobRecord) -> dict[str, float]:
    """Seconds of each stage a job has both ends of (:data:`aenode.jobs.STAGE_COLUMNS`)."""
    out: dict[str, float] = {}
    for name, (start, end) in STAGE_COLUMNS.items():
        a, b = getattr(job, start), getattr(job, end)
        if a and b:
            out[name.replace("_", " ")] = round(b - a, 2)
    last = job.t_exported or job.t_written
    if job.t_received and last:
        out["end to end"] = round(last - job.t_received, 2)
    return out


def _health(health: Mapping[str, Any]) -> str:
    ok = health.get("status") == "ok"
    items = "".join(f'<li class="reason">{escape(str(f))}</li>' for f in health.get("failing", []))
    disk = health.get("disk", {})
    recv = health.get("receivers", {})
    models = health.get("models", {})
    return (
        f'<section id="health"><h2>Health {_state("ok" if ok else "failing")}</h2>'
        f"<p>receivers listening: {recv.get('listening')} of {recv.get('expected')} · "
        f"disk free: {disk.get('free_mb', 0):.0f} MB (floor {disk.get('min_free_mb')} MB) · "
        f"models: {escape(', '.join(models.get('loaded', [])))}</p>"
        + (f"<ul>{items}</ul>" if items else "")
        + "</section>"
    )


def _studies(series: Sequence[SeriesRecord]) -> str:
    studies: dict[str, list[SeriesRecord]] = {}
    for s in series:
        studies.setdefault(s.study_uid, []).append(s)
    rows = []
    for study, items in studies.items():
        states = sorted({s.state.value for s in items})
        rows.append(
            [
                f'<a href="/studies/{escape(study)}"><code>{escape(study)}</code></a>',
                str(len(items)),
                str(sum(s.instance_count for s in items)),
                " ".join(_state(st) for st in states),
                _t(max(s.last_arrival for s in items)),
            ]
        )
    series_rows = [
        [
            f"<code>{escape(s.series_uid)}</code>",
            escape(s.modality or ""),
            escape(s.description or ""),
            f"{s.instance_count}" + (f" of {s.expected}" if s.expected else ""),
            _state(s.state.value),
            escape(s.completed_by or ""),
            f'<span class="reason">{escape(s.reason or "")}</span>',
        ]
        for s in series
    ]
    return (
        '<section id="studies"><h2>Recent studies</h2>'
        + _table(["study", "series", "instances", "states", "last arrival"], rows, "no study yet")
        + '</section><section id="series"><h2>Recent series</h2>'
        + _table(
            ["series", "modality", "description", "instances", "state", "completed by", "why"],
            series_rows,
            "no series yet",
        )
        + "</section>"
    )


def _volumes(job: JobRecord) -> str:
    if not job.volumes_mm3:
        return ""
    cells = ", ".join(
        f'<span class="volume" data-label="{escape(k)}">{escape(k)}: {v:,.0f} mm³</span>'
        for k, v in job.volumes_mm3.items()
    )
    return f'<div class="volumes">{cells}</div>'


def _jobs(jobs: Sequence[JobRecord], allow_actions: bool) -> str:
    blocks = []
    for job in jobs:
        stages = job_stage_seconds(job)
        timing = " · ".join(f"{k} {v:.2f} s" for k, v in stages.items())
        report = ""
        if job.result_dir and job.t_written:
            report = (
                f'<img class="report" alt="report of job {job.id}" src="/jobs/{job.id}/report.png">'
            )
        action = ""
        if allow_actions and job.state.value in ("failed", "rejected", "quarantined"):
            action = (
                f'<form method="post" action="/jobs/{job.id}/retry">'
                '<input type="password" name="token" placeholder="token">'
                "<button>retry</button></form>"
            )
        reason = f'<div class="reason">{escape(job.reason)}</div>' if job.reason else ""
        blocks.append(
            f'<tr class="job" id="job-{job.id}" data-model="{escape(job.model)}" '
            f'data-state="{escape(job.state.value)}"><td>{job.id}</td>'
            f"<td>{escape(job.model)}<br><span class='muted'>rule {escape(job.rule)}</span></td>"
            f"<td>{_state(job.state.value)}{reason}{action}</td>"
            f'<td><a href="/studies/{escape(job.study_uid)}"><code>{escape(job.study_uid)}'
            f"</code></a></td><td>{_volumes(job)}<div class='muted'>{escape(timing)}</div>"
            f"{report}</td></tr>"
        )
    if not blocks:
        return '<section id="jobs"><h2>Jobs</h2><p class="muted">no job yet</p></section>'
    return (
        '<section id="jobs"><h2>Jobs</h2><table><thead><tr><th>id</th><th>model</th>'
        "<th>state</th><th>study</th><th>results and stage times</th></tr></thead><tbody>"
        + "".join(blocks)
        + "</tbody></table></section>"
    )


def _problems(
    series: Sequence[SeriesRecord], jobs: Sequence[JobRecord], refusals: Sequence[Refusal]
) -> str:
    bad_series = [
        [f"<code>{escape(s.series_uid)}</code>", _state(s.state.value), escape(s.reason or "")]
        for s in series
        if s.state.value in ("rejected", "quarantined")
    ]
    bad_jobs = [
        [str(j.id), escape(j.model), _state(j.state.value), escape(j.reason or "")]
        for j in jobs
        if j.state.value in ("failed", "rejected", "quarantined")
    ]
    refused = [
        [_t(r.at), f"0x{r.status:04X}", escape(r.calling_ae or ""), escape(r.reason or "")]
        for r in refusals
    ]
    return (
        '<section id="problems"><h2>Rejected series</h2>'
        + _table(["series", "state", "reason"], bad_series, "none")
        + "<h2>Failed jobs</h2>"
        + _table(["job", "model", "state", "reason"], bad_jobs, "none")
        + "<h2>Refused C-STOREs</h2>"
        + _table(["when", "status", "calling AE", "reason"], refused, "none")
        + "</section>"
    )


def _metrics(value: Any) -> str:
    if isinstance(value, Mapping):
        return (
            "<dl>"
            + "".join(f"<dt>{escape(str(k))}</dt><dd>{_metrics(v)}</dd>" for k, v in value.items())
            + "</dl>"
        )
    if isinstance(value, list):
        return escape(", ".join(str(v) for v in value))
    return escape(str(value))


def _models(cards: Sequence[ModelCard]) -> str:
    blocks = []
    for card in cards:
        limits = "".join(f"<li>{escape(line)}</li>" for line in card.limits)
        blocks.append(
            f'<div class="model" id="model-{escape(card.name)}"><h3>{escape(card.name)} '
            f"<span class='muted'>{escape(card.version)} · {escape(card.task)}</span></h3>"
            f"<p>{escape(card.description)}</p><p><b>Intended use:</b> "
            f"{escape(card.intended_use)}</p>"
            + (f"<p><b>Limits:</b></p><ul>{limits}</ul>" if limits else "")
            + (
                f"<details><summary>held-out metrics</summary>{_metrics(card.metrics)}</details>"
                if card.metrics
                else ""
            )
            + "</div>"
        )
    return '<section id="models"><h2>Models</h2>' + "".join(blocks) + "</section>"


def _destinations(health: Mapping[str, Any]) -> str:
    rows = [
        [
            f"<code>{escape(d['destination'])}</code>",
            str(d["pending"]),
            str(d["retries"]),
            _t(d["last_success_at"]),
            _t(d["last_failure_at"]),
            f'<span class="reason">{escape(d["last_error"] or "")}</span>',
        ]
        for d in health.get("destinations", [])
    ]
    return (
        '<section id="destinations"><h2>Destinations</h2>'
        + _table(
            ["destination", "pending", "retries", "last success", "last failure", "last error"],
            rows,
            "no destination configured (export.destinations)",
        )
        + "</section>"
    )


def dashboard_page(data: DashboardData) -> str:
    """The dashboard at ``GET /``."""
    body = (
        _health(data.health)
        + _jobs(data.jobs, data.allow_actions)
        + _studies(data.series)
        + _problems(data.series, data.jobs, data.refusals)
        + _destinations(data.health)
        + _models(data.cards)
    )
    return _page("aenode dashboard", data.node, body)


def audit_page(node: str, study_uid: str, events: Sequence[AuditRecord]) -> str:
    """A study's audit trail at ``GET /studies/{uid}``."""
    rows = [[_t(e.at), escape(e.event.value), escape(e.describe())] for e in events]
    body = (
        f'<section id="audit"><h2>Audit trail of study <code>{escape(study_uid)}</code></h2>'
        + _table(["when", "event", "what"], rows, "the node never saw this study")
        + f'<p><a href="/studies/{escape(study_uid)}.json">as JSON</a></p></section>'
    )
    return _page(f"aenode audit {study_uid}", node, body)
