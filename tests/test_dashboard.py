"""The Grafana dashboard: generated file up to date, importable shape, every query parses and
names only metrics the runner exports. (That each query returns data during a real run is
checked against a real Prometheus in test_prometheus.py.)"""

from __future__ import annotations

import importlib.util
import json

import pytest

from tests.observability import DASHBOARD, dashboard_queries, exported_names, panels, substitute

promql = pytest.importorskip("promql_parser", reason="promql-parser is not installed (test extra)")


def test_generated_file_is_current() -> None:
    spec = importlib.util.spec_from_file_location("generate", DASHBOARD.with_name("generate.py"))
    assert spec is not None and spec.loader is not None
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    assert DASHBOARD.read_text() == generate.render(), "run python3 k8s/dashboards/generate.py"


def test_importable_with_datasource_and_job_variables() -> None:
    d = json.loads(DASHBOARD.read_text())
    assert d["uid"] and d["title"] and d["schemaVersion"] >= 36
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    job = variables["job"]
    assert job["type"] == "query" and job["datasource"]["uid"] == "${datasource}"
    assert "label_values(backfill_info, job)" in job["definition"]
    ids = [p["id"] for p in panels(d)]
    assert len(ids) == len(set(ids))
    for p in panels(d):
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}" and t["refId"], p["title"]
    titles = " | ".join(p["title"] for p in panels(d)).lower()
    for topic in ("progress", "eta", "rows updated per second", "p50 / p95 / p99",
                  "batch size", "throttle time by reason", "errors by reason", "state"):
        assert topic in titles


def test_every_query_parses_and_names_exported_metrics_only() -> None:
    exported = exported_names()
    seen: set[str] = set()
    for title, expr in dashboard_queries():
        selectors = _selectors(promql.parse(substitute(expr, job="users-display-name|other")))
        assert selectors, title
        for s in selectors:
            name = s.name  # type: ignore[attr-defined]
            assert name in exported, f"{title}: {name} is not exported by the runner"
            matchers = {(m.name, str(m.op)) for m in s.matchers.matchers}  # type: ignore[attr-defined]
            assert ("job", "MatchOp.Re") in matchers, f"{title}: {name} ignores the job variable"
            seen.add(name)
    # The panels the issue asks for, by metric.
    assert {
        "backfill_progress_ratio", "backfill_eta_seconds", "backfill_rows_updated_total",
        "backfill_batch_duration_seconds_bucket", "backfill_batch_size",
        "backfill_throttle_seconds_total", "backfill_batch_errors_total", "backfill_state",
    } <= seen


def _selectors(tree: object) -> list[object]:
    found: list[object] = []

    def visit(node: object) -> None:
        if isinstance(node, promql.VectorSelector):
            found.append(node)

    promql.walk(tree, visit)
    return found
