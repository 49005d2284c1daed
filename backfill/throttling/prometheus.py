"""The application's own latency, asked of its Prometheus (``[throttle.app_latency]``): one
instant query over the HTTP API, under a time budget, answering one number.
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import anyio

from backfill.errors import ConfigError
from backfill.job import AppLatency


class Unreadable(Exception):
    """The application's latency could not be read (the message says why)."""


class BadQuery(Unreadable):
    """The query itself cannot work: Prometheus refused it, or it answers no single number."""


async def app_latency(config: AppLatency, budget: float) -> float:
    """The query's value now (seconds; NaN when the application had no requests to measure).
    ``budget`` (seconds) bounds the request and Prometheus's own evaluation of the query."""
    url = (f"{config.prometheus.rstrip('/')}/api/v1/query?"
           + urllib.parse.urlencode({"query": config.query, "timeout": f"{budget:g}s"}))
    try:
        with anyio.fail_after(budget + 1):
            answer = await anyio.to_thread.run_sync(_get, url, budget, abandon_on_cancel=True)
    except TimeoutError:
        raise Unreadable(f"Prometheus did not answer within {budget:g}s") from None
    return value(answer)


def _get(url: str, timeout: float) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:  # Prometheus says why in its body (a bad query: 400)
        try:
            return json.loads(exc.read())
        except ValueError:
            raise Unreadable(f"Prometheus answered HTTP {exc.code}") from exc
    except (OSError, ValueError) as exc:
        raise Unreadable(f"cannot ask Prometheus: {exc}") from exc


def value(answer: Any) -> float:
    """The one number of an instant query's answer (a scalar, or a vector of one sample)."""
    if not isinstance(answer, dict) or answer.get("status") != "success":
        error = answer.get("error", answer) if isinstance(answer, dict) else answer
        raise BadQuery(f"Prometheus refused the app_latency query: {error}")
    data = answer["data"]
    if data["resultType"] == "scalar":
        return float(data["result"][1])
    result = data["result"] if data["resultType"] == "vector" else None
    if result is None or len(result) != 1:
        found = "no series" if not result else f"{len(result)} series"
        raise BadQuery(f"the app_latency query returned {found}, not one number"
                         + (" (aggregate it: sum by (le) (...))" if result else ""))
    number = float(result[0]["value"][1])
    if math.isinf(number):
        raise BadQuery("the app_latency query returned an infinite value")
    return number


async def preflight(config: AppLatency | None, budget: float) -> None:
    """Before a run: a query that cannot work is the job's error (a Prometheus out of reach is
    not: the gate holds the run, or not, as ``on_check_error`` says)."""
    if config is None:
        return
    try:
        await app_latency(config, budget)
    except BadQuery as exc:
        raise ConfigError(f"[throttle.app_latency] {exc}") from None
    except Unreadable:
        pass
