"""Generate the Grafana dashboard for backfill runs: ``python3 k8s/dashboards/generate.py``.

Writes ``backfill.json`` next to this file (importable in Grafana 10+: Dashboards > New >
Import). Plain dictionaries, no SDK: the JSON model is small and stable, and this keeps the
project free of a dashboard dependency. ``tests/test_dashboard.py`` checks that the file is up to
date, that every query parses, and that it names only metrics the runner exports; the live
Prometheus test checks that every query returns data during a real run.

Queries filter on the ``job`` variable (the backfill job's name, the ``job`` label the runner
sets; scrape with ``honor_labels: true``) and take the data source from the ``datasource``
variable.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

OUT = Path(__file__).with_name("backfill.json")
DS = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'job=~"$job"'
RATE = "$__rate_interval"


def target(expr: str, legend: str = "", ref: str = "A", **extra: Any) -> dict[str, Any]:
    return {"datasource": DS, "expr": expr, "legendFormat": legend or "__auto", "refId": ref,
            "range": True, **extra}


def panel(
    kind: str, title: str, targets: list[dict[str, Any]], *, x: int, y: int, w: int, h: int,
    unit: str = "short", description: str = "", options: dict[str, Any] | None = None,
    defaults: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DS,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "targets": targets,
        "fieldConfig": {"defaults": {"unit": unit, **(defaults or {})}, "overrides": []},
        "options": options or {},
    }


def stat(title: str, expr: str, legend: str, *, unit: str, x: int, y: int, w: int = 6,
         description: str = "", decimals: int | None = None,
         text: str = "value_and_name") -> dict[str, Any]:
    defaults: dict[str, Any] = {"color": {"mode": "thresholds"},
                                "thresholds": {"mode": "absolute",
                                               "steps": [{"color": "blue", "value": None}]}}
    if decimals is not None:
        defaults["decimals"] = decimals
    return panel(
        "stat", title, [target(expr, legend, instant=True, range=False)], x=x, y=y, w=w, h=5,
        unit=unit, description=description, defaults=defaults,
        options={"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                 "textMode": text, "colorMode": "none", "graphMode": "none"},
    )


def series(title: str, targets: list[dict[str, Any]], *, unit: str, x: int, y: int,
           w: int = 12, h: int = 8, description: str = "", stack: bool = False) -> dict[str, Any]:
    defaults: dict[str, Any] = {"custom": {"drawStyle": "line", "lineWidth": 1,
                                           "fillOpacity": 20 if stack else 0,
                                           "stacking": {"mode": "normal" if stack else "none"},
                                           "spanNulls": False}}
    return panel(
        "timeseries", title, targets, x=x, y=y, w=w, h=h, unit=unit, description=description,
        defaults=defaults,
        options={"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                 "tooltip": {"mode": "multi", "sort": "desc"}},
    )


def panels() -> list[dict[str, Any]]:
    who = "{{job}}/{{shard}}"
    quantiles = [
        target(
            f"histogram_quantile({q}, sum by (job, le) "
            f"(rate(backfill_batch_duration_seconds_bucket{{{SEL}}}[{RATE}])))",
            f"{{{{job}}}} p{round(q * 100)}", ref,
        )
        for q, ref in ((0.5, "A"), (0.95, "B"), (0.99, "C"))
    ]
    return [
        stat("Progress", f"backfill_progress_ratio{{{SEL}}}", who, unit="percentunit",
             x=0, y=0, decimals=1,
             description="Where the cursor is in the fixed key range (text keys: a page-sample "
             "estimate). 100% when the shard succeeded."),
        stat("ETA", f"backfill_eta_seconds{{{SEL}}} >= 0", who, unit="s", x=6, y=0,
             description="Key space left over the key space covered per second in the last "
             "minute. Empty while unknown."),
        stat("Rows remaining (estimate)", f"backfill_rows_remaining_estimate{{{SEL}}} >= 0", who,
             unit="short", x=12, y=0,
             description="Rows still to update, extrapolated from the rows updated per unit of "
             "key space so far. Empty while unknown."),
        stat("State", f"backfill_state{{{SEL}}} == 1", "{{job}}/{{shard}}: {{state}}",
             unit="none", x=18, y=0, text="name",
             description="running, throttled, paused, interrupted, succeeded or failed."),
        series("Progress", [target(f"backfill_progress_ratio{{{SEL}}}", who)],
               unit="percentunit", x=0, y=5),
        series("Rows updated per second",
               [target(f"sum by (job) (rate(backfill_rows_updated_total{{{SEL}}}[{RATE}]))",
                       "{{job}}")],
               unit="si:rows/s", x=12, y=5,
               description="Rows the UPDATEs reported, not batch size x batches."),
        series("Batch duration p50 / p95 / p99", quantiles, unit="s", x=0, y=13,
               description="Each committed batch's one statement (slice, UPDATE, checkpoint)."),
        series("Batch size", [target(f"backfill_batch_size{{{SEL}}}", who)], unit="short",
               x=12, y=13,
               description="Keys per batch: halves after a statement timeout, grows back."),
        series("Throttle time by reason",
               [target(f"sum by (job, reason) "
                       f"(rate(backfill_throttle_seconds_total{{{SEL}}}[{RATE}]))",
                       "{{job}} {{reason}}")],
               unit="percentunit", x=0, y=21, stack=True,
               description="Share of the time spent waiting between batches, by reason "
               "(sleep, rate_limit, replication_lag, slot_lag, active_sessions, health_query, "
               "app_latency, impact, paused, backoff)."),
        series("Errors by reason",
               [target(f"sum by (job, reason) "
                       f"(rate(backfill_batch_errors_total{{{SEL}}}[{RATE}]))",
                       "{{job}} {{reason}}")],
               unit="ops", x=12, y=21, stack=True,
               description="Rolled-back batch attempts per second: statement_timeout, "
               "lock_timeout, deadlock, serialization, connection, data, ..."),
        series("Batches by outcome",
               [target(f"sum by (job, outcome) "
                       f"(rate(backfill_batches_total{{{SEL}}}[{RATE}]))",
                       "{{job}} {{outcome}}")],
               unit="ops", x=0, y=29,
               description="committed, retried (rolled back and tried again), failed (the "
               "attempt the run gave up on)."),
        series("Time since last commit",
               [target(f"time() - backfill_last_commit_timestamp_seconds{{{SEL}}}", who)],
               unit="s", x=12, y=29,
               description="What the BackfillStalled alert watches."),
        panel("state-timeline", "State over time",
              [target(f"max by (state) (backfill_state{{{SEL}}})", "{{state}}")],
              x=0, y=37, w=12, h=6, unit="none",
              defaults={"mappings": [{"type": "value", "options": {
                  "0": {"text": "-", "color": "transparent"},
                  "1": {"text": "on", "color": "green"}}}]},
              options={"showValue": "never", "mergeValues": True, "rowHeight": 0.8}),
        series("Impact on the application (impact budget)",
               [target(f"backfill_impact_ratio{{{SEL}}}", f"{who} with the run / without"),
                target(f"max by (job) (backfill_impact_limit{{{SEL}}})", "{{job}} limit",
                       "B")],
               unit="none", x=0, y=43, w=8,
               description="The deciding statistic: how much slower the application's "
               "statements (or the canary, a tiny committed write) run while the runner works "
               "than in its idle windows (max_impact), or the share of canary commits over the "
               "tail budget (max_tail_impact); the budget keeps it under the limit."),
        series("Impact budget's rate",
               [target(f"backfill_impact_allowed_rows_per_second{{{SEL}}}", who),
                target(f"rate(backfill_rows_updated_total{{{SEL}}}[{RATE}])",
                       f"{who} written", "B")],
               unit="rows/s", x=8, y=43, w=8,
               description="The rate the budget allows, found by probing (no line: no limit, "
               "as while nobody else is at work), and the rate written."),
        series("Canary latency: now and with the runner idle",
               [target(f"backfill_impact_canary_seconds{{{SEL}}}", f"{who} now"),
                target(f"backfill_impact_baseline_seconds{{{SEL}}}", f"{who} baseline", "B")],
               unit="s", x=16, y=43, w=8,
               description="The canary's latency when it decides (typical: its mean; tail: "
               "its p99) and its baseline, measured in the runner's idle windows."),
        panel("table", "Runners",
              [target(f"max by (job, shard, table, version) (backfill_info{{{SEL}}})", "",
                      format="table", instant=True, range=False)],
              x=12, y=37, w=12, h=6, unit="none",
              description="The job's table and the runner's version, per shard.",
              options={"showHeader": True}),
    ]


def dashboard() -> dict[str, Any]:
    return {
        "uid": "backfill-runs",
        "title": "Backfill runs",
        "description": "Progress, pace, throttling and errors of backfill runs "
        "(github: backfill, k8s/dashboards).",
        "tags": ["backfill", "postgresql"],
        "timezone": "",
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-6h", "to": "now"},
        "timepicker": {},
        "annotations": {"list": []},
        "links": [],
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource",
             "query": "prometheus", "current": {}, "hide": 0, "refresh": 1, "regex": "",
             "options": []},
            {"name": "job", "label": "Job", "type": "query", "datasource": DS,
             "query": {"query": "label_values(backfill_info, job)", "refId": "job"},
             "definition": "label_values(backfill_info, job)", "refresh": 2, "sort": 1,
             "multi": True, "includeAll": True, "allValue": ".*", "current": {},
             "options": [], "regex": "", "hide": 0},
        ]},
        "panels": [dict(p, id=i) for i, p in enumerate(panels(), 1)],
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}")
