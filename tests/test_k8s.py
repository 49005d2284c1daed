"""The manifests in k8s/: every overlay renders with ``kubectl kustomize``, every rendered
resource validates strictly against the Kubernetes API schemas, and the invariants the runner
relies on hold (exit codes, grace period, limits, Secrets, security context)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from backfill.commands import ADMIN_BUDGET
from backfill.errors import ExitCode
from backfill.export import PUSH_TIMEOUT
from backfill.job import Job, parse_duration, parse_job
from backfill.loop import SAVE_BUDGET
from backfill.pg import CLIENT_SLACK, CLOSE_BUDGET
from backfill.settings import DEFAULT_METRICS_PORT
from tests.conftest import cli
from tests.kube import (
    K8S,
    METRICS_PORT,
    NO_KUBECTL,
    REPO,
    Doc,
    JobController,
    Kubelet,
    container,
    image,
    job,
    kinds,
    kubectl,
    overlays,
    pod_failure_action,
    render,
    render_all,
)

pytestmark = pytest.mark.skipif(kubectl() is None, reason=NO_KUBECTL)

# podFailurePolicy and the DisruptionTarget pod condition are GA since 1.31; validate against
# that and the newest version kubernetes-validate knows.
MIN_KUBERNETES = "1.31"
KUBERNETES_VERSIONS = (MIN_KUBERNETES, str(kubernetes_validate.latest_version()))
# What the runner may spend after SIGTERM besides the batch in flight (statement_timeout +
# CLIENT_SLACK): saving the final state and run history and closing the connection; plus, when
# configured, the final push to a Pushgateway and the metrics linger (backfill/export.py:
# close), see _telemetry_seconds.
BOOKKEEPING_SECONDS = SAVE_BUDGET + CLOSE_BUDGET
EXAMPLE_JOBS = sorted((REPO / "jobs").glob("*.toml"))

OVERLAYS = overlays()
IDS = [str(p.relative_to(K8S)) for p in OVERLAYS]


@pytest.fixture(scope="module", autouse=True)
def _rendered() -> None:
    render_all(OVERLAYS)


def _job_files(job_doc: Doc, docs: tuple[Doc, ...], directory: Path) -> list[Job]:
    """The job file(s) a runner Job runs: from its ConfigMap, baked into its image, or (the
    base, which every overlay shares) each example job."""
    if directory == K8S / "base":
        return [parse_job(tomllib.loads(p.read_text()), source=p.name) for p in EXAMPLE_JOBS]
    volumes = job_doc["spec"]["template"]["spec"].get("volumes", [])
    names = [v["configMap"]["name"] for v in volumes if "configMap" in v]
    if names:
        (cm,) = [d for d in kinds(docs, "ConfigMap") if d["metadata"]["name"] == names[0]]
        return [parse_job(tomllib.loads(cm["data"]["job.toml"]), source=names[0])]
    dockerfile = (directory / "Dockerfile").read_text()
    m = re.search(r"^ARG JOB_FILE=(\S+)$", dockerfile, re.M)
    assert m, f"{directory}: a runner Job without a ConfigMap must bake its job file in"
    return [parse_job(tomllib.loads((REPO / m.group(1)).read_text()), source=m.group(1))]


def _codes(job_doc: Doc, action: str) -> set[int]:
    rules = [r for r in job_doc["spec"]["podFailurePolicy"]["rules"] if r["action"] == action]
    return {c for r in rules for c in r.get("onExitCodes", {}).get("values", [])}


# --- rendering and schema validation ------------------------------------------------------------


def test_every_example_job_has_an_overlay() -> None:
    """One overlay per job file in jobs/, carrying an identical copy of it (kustomize reads only
    files inside the overlay's directory)."""
    for path in EXAMPLE_JOBS:
        name = tomllib.loads(path.read_text())["name"]
        overlay = K8S / "jobs" / name
        assert (overlay / "job.toml").read_bytes() == path.read_bytes(), (
            f"k8s/jobs/{name}/job.toml differs from jobs/{path.name}: regenerate the overlay "
            f"(backfill manifest jobs/{path.name} --out k8s/jobs/{name})"
        )
        runner = job(render(overlay))
        assert runner["metadata"]["name"] == f"backfill-{name}"
        labels = runner["spec"]["template"]["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == name
    assert {p.name for p in (K8S / "jobs").iterdir()} == {
        tomllib.loads(p.read_text())["name"] for p in EXAMPLE_JOBS
    }


@pytest.mark.parametrize("directory", OVERLAYS, ids=IDS)
def test_renders_and_validates_strictly(directory: Path) -> None:
    docs = render(directory)
    assert docs, f"{directory} renders nothing"
    for doc in docs:
        if doc["kind"] == "PodMonitor":
            _check_podmonitor(doc, docs, per_migration=directory != K8S / "base")
            continue
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                where = f"{doc['kind']}/{doc['metadata']['name']} (Kubernetes {version})"
                pytest.fail(f"{where}: {error}")


def _check_podmonitor(monitor: Doc, docs: tuple[Doc, ...], *, per_migration: bool) -> None:
    """No schema for the operator's CRD is bundled: check the fields that matter by hand."""
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    spec = monitor["spec"]
    assert set(spec) <= {"selector", "podMetricsEndpoints", "podTargetLabels", "namespaceSelector"}
    (endpoint,) = spec["podMetricsEndpoints"]
    assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "honorLabels"}
    assert (endpoint["port"], endpoint["path"]) == ("metrics", "/metrics")
    # Series carry the backfill job in `job`: Prometheus must keep it (docs/observability.md).
    assert endpoint["honorLabels"] is True
    # A pod's final state is scraped only if the runner lingers for one scrape interval.
    env = {e["name"]: e.get("value") for e in container(job(docs)).get("env", [])}
    linger = parse_duration(env.get("BACKFILL_METRICS_LINGER_SECONDS") or 0)
    assert linger >= parse_duration(endpoint["interval"]), "linger shorter than the scrape interval"
    selector = spec["selector"]["matchLabels"]
    runner = job(docs)
    labels = runner["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= labels.items(), "the PodMonitor does not select the runner's pods"
    if per_migration:  # else two migrations' PodMonitors would scrape each other's pods
        assert "app.kubernetes.io/instance" in selector
    ports = {p["name"]: p["containerPort"] for p in container(runner)["ports"]}
    assert ports["metrics"] == METRICS_PORT


# --- invariants of every Job --------------------------------------------------------------------

@pytest.mark.parametrize("directory", OVERLAYS, ids=IDS)
def test_job_invariants(directory: Path) -> None:
    docs = render(directory)
    assert kinds(docs, "Job")
    for job_doc in kinds(docs, "Job"):
        _check_job(job_doc, docs, directory)


def _check_job(job_doc: Doc, docs: tuple[Doc, ...], directory: Path) -> None:
    spec = job_doc["spec"]
    pod = spec["template"]["spec"]
    ctr = container(job_doc)
    component = job_doc["metadata"]["labels"]["app.kubernetes.io/component"]

    # Retries are safe and bounded; podFailurePolicy needs restartPolicy Never (an apiserver
    # rule kubernetes-validate cannot see).
    assert pod["restartPolicy"] == "Never"
    for key in ("backoffLimit", "activeDeadlineSeconds", "ttlSecondsAfterFinished"):
        assert spec.get(key, 0) > 0, f"spec.{key} must be set and positive"
    _check_policy_is_valid(job_doc)

    # Exit codes: the policy speaks the runner's language (backfill.errors.ExitCode).
    assert _codes(job_doc, "FailJob") | _codes(job_doc, "Ignore") <= set(ExitCode)
    if component == "runner":
        assert _codes(job_doc, "FailJob") == {ExitCode.DATA, ExitCode.CONFIG}
        assert _codes(job_doc, "Ignore") == {ExitCode.TEMPFAIL}
    else:
        assert _codes(job_doc, "FailJob") == {ExitCode.CONFIG}
    assert pod_failure_action(job_doc, {"backfill": 137}, {"DisruptionTarget"}) == "Ignore"

    # The grace period covers the batch in flight and the bookkeeping after it.
    grace = pod["terminationGracePeriodSeconds"]
    if component == "runner":
        slowest = max(j.limits.statement_timeout for j in _job_files(job_doc, docs, directory))
        budget = slowest + CLIENT_SLACK + BOOKKEEPING_SECONDS + _telemetry_seconds(ctr)
        assert grace > budget, f"grace {grace} s <= {budget} s the runner may need after SIGTERM"
        assert ctr["args"][:2] == ["run", "/etc/backfill/job.toml"]
    else:
        assert grace > ADMIN_BUDGET.statement_timeout + CLIENT_SLACK
        assert ctr["args"] == ["init"]

    # Resources: requests and limits for CPU and memory, limits no lower than requests.
    resources = ctr.get("resources", {})
    for kind in ("cpu", "memory"):
        limit = resources.get("limits", {}).get(kind)
        request = resources.get("requests", {}).get(kind)
        assert limit and request, f"{kind}: requests and limits are both required"
        assert _quantity(limit) >= _quantity(request) > 0, f"{kind}: limit below request"

    # Restricted security context (Pod Security Standards "restricted").
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    sc = ctr["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["runAsNonRoot"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert not sc.get("privileged", False)
    assert pod["automountServiceAccountToken"] is False
    assert str(pod["securityContext"]["runAsUser"]) == image().user.split(":")[0]

    # The database URL comes from a Secret mounted as a file (read again at each reconnection:
    # a rotated password is picked up), never from an environment variable; nothing secret is
    # written inline.
    env = {e["name"]: e for e in ctr.get("env", [])}
    assert "BACKFILL_DATABASE_URL" not in env and "DATABASE_URL" not in env
    url_file = Path(env["BACKFILL_DATABASE_URL_FILE"]["value"])
    [mount] = [m for m in ctr["volumeMounts"] if Path(m["mountPath"]) == url_file.parent]
    assert mount.get("readOnly") is True and "subPath" not in mount  # subPath: no refresh
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    secret = volume["secret"]
    assert secret["secretName"] == ("backfill-db" if component == "runner" else "backfill-db-owner")
    assert {"key": "url", "path": url_file.name} in secret["items"]
    assert secret["defaultMode"] & 0o007 == 0, "the URL file must not be world-readable"
    assert secret["defaultMode"] & 0o040 and pod["securityContext"]["fsGroup"] == (
        pod["securityContext"]["runAsGroup"]), "the runner reads it through the pod's fsGroup"
    for var in ctr.get("env", []):
        if re.search(r"URL|DSN|PASSWORD|SECRET|TOKEN|^PG", var["name"]) and not (
                var["name"].endswith("_FILE") and "value" in var):  # a path, checked above
            assert "secretKeyRef" in var.get("valueFrom", {}), f"{var['name']} is not from a Secret"
        assert not _looks_secret(str(var.get("value", ""))), f"{var['name']} holds a credential"
    assert not kinds(docs, "Secret"), "Secrets are created out of band, never rendered from git"

    # The image is pinned to a tag, never `latest`.
    assert re.fullmatch(r"([^/:@]+(:\d+)?/)?[^:@]+(:[\w.-]+|@sha256:[0-9a-f]{64})", ctr["image"])
    assert not ctr["image"].endswith(":latest")

    if component == "runner":
        _check_metrics(job_doc)


def _telemetry_seconds(ctr: Doc) -> float:
    env = {e["name"]: e.get("value", "") for e in ctr.get("env", [])}
    seconds = 2 * PUSH_TIMEOUT + 1 if "BACKFILL_PUSHGATEWAY_URL" in env else 0.0
    return seconds + parse_duration(env.get("BACKFILL_METRICS_LINGER_SECONDS") or 0)


def _check_policy_is_valid(job_doc: Doc) -> None:
    """The apiserver's own podFailurePolicy rules, which schema validation cannot express."""
    names = {c["name"] for c in job_doc["spec"]["template"]["spec"]["containers"]}
    for rule in job_doc["spec"]["podFailurePolicy"]["rules"]:
        # FailIndex would need backoffLimitPerIndex.
        assert rule["action"] in {"FailJob", "Ignore", "Count"}
        req = rule.get("onExitCodes")
        if req is not None:
            values = req["values"]
            assert values and values == sorted(set(values)), "values must be unique and ordered"
            assert req["operator"] in {"In", "NotIn"}
            assert not (req["operator"] == "In" and 0 in values)
            assert req.get("containerName", next(iter(names))) in names
        for pattern in rule.get("onPodConditions", []):
            assert pattern["status"] in {"True", "False", "Unknown"}
        assert ("onExitCodes" in rule) != ("onPodConditions" in rule)


def _check_metrics(job_doc: Doc) -> None:
    """The metrics port agrees everywhere: flag, container port, annotations."""
    ctr = container(job_doc)
    ports = {p["name"]: p["containerPort"] for p in ctr["ports"]}
    assert ports == {"metrics": METRICS_PORT} and METRICS_PORT == DEFAULT_METRICS_PORT
    assert f"--metrics-port={METRICS_PORT}" in ctr["args"]
    annotations = job_doc["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(METRICS_PORT)
    assert annotations["prometheus.io/path"] == "/metrics"


def _quantity(value: str | int) -> float:
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "": 1}
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(m|Ki|Mi|Gi|)", str(value))
    assert m, f"unexpected quantity {value!r}"
    return float(m.group(1)) * units[m.group(2)]


def _looks_secret(value: str) -> bool:
    return bool(re.search(r"://[^/\s]*:[^/\s]*@|password\s*=", value, re.I))


@pytest.mark.parametrize("directory", OVERLAYS, ids=IDS)
def test_no_credentials_anywhere_in_a_render(directory: Path) -> None:
    for doc in render(directory):
        for value in _strings(doc):
            assert not _looks_secret(value), f"{doc['kind']}/{doc['metadata']['name']}: {value!r}"


def _strings(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [s for v in node.values() for s in _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return [node] if isinstance(node, str) else []


# --- what the Job controller does with each exit code -------------------------------------------


def test_pod_failure_policy_decisions() -> None:
    """Each exit code of the runner, through the base Job's podFailurePolicy and backoffLimit."""
    runner = job(render(K8S / "jobs" / "users-display-name"))
    expected = {
        ExitCode.OK: "Complete",
        ExitCode.DATA: "Failed",  # FailJob: the same row fails every time
        ExitCode.CONFIG: "Failed",  # FailJob: the same configuration fails every time
        ExitCode.TEMPFAIL: "Retry",  # Ignore: resumes, burns no retry
        ExitCode.UNAVAILABLE: "Retry",  # Count
        ExitCode.BUG: "Retry",  # Count
        137: "Retry",  # SIGKILL / OOM: Count
    }
    for code, outcome in expected.items():
        assert JobController(runner).observe(int(code)) == outcome, code

    # Interruptions never exhaust the retries...
    controller = JobController(runner)
    assert all(controller.observe(ExitCode.TEMPFAIL) == "Retry" for _ in range(100))
    # ...nor do disruptions, whatever the exit code...
    assert all(controller.observe(143, {"DisruptionTarget"}) == "Retry" for _ in range(100))
    # ...but counted failures do, after backoffLimit retries.
    limit = runner["spec"]["backoffLimit"]
    outcomes = [controller.observe(ExitCode.UNAVAILABLE) for _ in range(limit + 1)]
    assert outcomes == ["Retry"] * limit + ["Failed"]
    # A permanent error wins over a disruption (FailJob is the first rule).
    assert JobController(runner).observe(ExitCode.CONFIG, {"DisruptionTarget"}) == "Failed"


# --- ordering variants, NetworkPolicy, sharding, baked image ------------------------------------


def _annotations(doc: Doc) -> dict[str, str]:
    return dict(doc["metadata"].get("annotations", {}))


def _by_role(docs: tuple[Doc, ...]) -> dict[str, Doc]:
    return {
        "configmap": kinds(docs, "ConfigMap")[0],
        "podmonitor": kinds(docs, "PodMonitor")[0],
        "init": job(docs, "init"),
        "runner": job(docs, "runner"),
    }


def test_helm_hooks_run_init_then_runner_before_the_release() -> None:
    docs = render(K8S / "variants" / "helm-hooks")
    roles = _by_role(docs)
    assert len(docs) == len(roles), "every resource must be a hook: plain ones come after hooks"
    weights = {}
    for role, doc in roles.items():
        a = _annotations(doc)
        assert a["helm.sh/hook"] == "pre-install,pre-upgrade"
        assert "before-hook-creation" in a["helm.sh/hook-delete-policy"].split(",")
        weights[role] = int(a["helm.sh/hook-weight"])
    assert weights["configmap"] < weights["init"] < weights["runner"]
    assert weights["podmonitor"] < weights["runner"]


def test_argocd_presync_hooks_in_sync_waves() -> None:
    docs = render(K8S / "variants" / "argocd-presync")
    roles = _by_role(docs)
    assert len(docs) == len(roles)
    waves = {}
    for role, doc in roles.items():
        a = _annotations(doc)
        assert a["argocd.argoproj.io/hook"] == "PreSync"
        assert "BeforeHookCreation" in a["argocd.argoproj.io/hook-delete-policy"].split(",")
        waves[role] = int(a["argocd.argoproj.io/sync-wave"])
    assert waves["configmap"] < waves["init"] < waves["runner"]


def test_network_policy_allows_egress_only_to_dns_and_the_database() -> None:
    docs = render(K8S / "variants" / "network-policy")
    (policy,) = kinds(docs, "NetworkPolicy")
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Egress"]
    selected = spec["podSelector"]["matchLabels"].items()
    assert selected <= job(docs)["spec"]["template"]["metadata"]["labels"].items()
    init_labels = job(render(K8S / "init"), "init")["spec"]["template"]["metadata"]["labels"]
    assert selected <= init_labels.items(), "the init Job's pods must be covered too"
    allowed = sorted((p["protocol"], p["port"]) for rule in spec["egress"] for p in rule["ports"])
    assert allowed == [("TCP", 53), ("TCP", 5432), ("UDP", 53)]
    for rule in spec["egress"]:
        assert rule["to"], "an egress rule without `to` would allow every destination"


def test_sharded_variant_is_an_indexed_job_passing_its_shard(tmp_path: Path) -> None:
    """REQUIRES the sharding feature to run; here: it renders, and each pod's --shard is right."""
    directory = K8S / "variants" / "sharded"
    assert "REQUIRES THE SHARDING FEATURE" in (directory / "kustomization.yaml").read_text()
    docs = render(directory)
    runner = job(docs)
    spec = runner["spec"]
    n = spec["completions"]
    assert spec["completionMode"] == "Indexed"
    assert n == spec["parallelism"] > 1
    unsharded = job(render(K8S / "jobs" / "users-display-name"))
    assert runner["metadata"]["name"] == unsharded["metadata"]["name"]
    config_maps = {cm["metadata"]["name"]: cm["data"] for cm in kinds(docs, "ConfigMap")}
    kubelet = Kubelet({"backfill-db": {"url": "postgresql://db/x"}}, config_maps, tmp_path)
    shards = []
    for index in range(n):
        argv = kubelet.pod(runner, index=index).argv
        shards += [a.removeprefix("--shard=") for a in argv if a.startswith("--shard=")]
    assert shards == [f"{i}/{n}" for i in range(n)]


def test_baked_image_variant_mounts_no_configmap() -> None:
    docs = render(K8S / "variants" / "baked-image")
    runner = job(docs)
    assert not kinds(docs, "ConfigMap")
    assert all("configMap" not in v for v in runner["spec"]["template"]["spec"]["volumes"])
    assert container(runner)["image"] != job(render(K8S / "base"))["spec"]["template"]["spec"][
        "containers"
    ][0]["image"]


def test_docs_walk_through_kubernetes() -> None:
    section = (REPO / "docs" / "kubernetes.md").read_text()
    assert "docs/kubernetes.md" in (REPO / "README.md").read_text()
    for needed in (
        "kubectl create secret generic backfill-db-owner",
        "kubectl create secret generic backfill-db ",
        "kubectl apply -k k8s/init",
        "kubectl wait --for=condition=complete job/backfill-init",
        "backfill manifest jobs/users_display_name.toml --out k8s/jobs/users-display-name",
        "kubectl apply -k k8s/jobs/users-display-name",
        "```sql",
    ):
        assert needed in section, needed
    for code in (65, 69, 75, 78, 137):
        assert f"| {code} " in section, f"what to do on exit {code}"


# --- what `backfill manifest` writes --------------------------------------------------------------


@pytest.mark.parametrize("shards", [1, 3])
def test_a_generated_overlay_renders_validates_and_holds(tmp_path: Path, shards: int) -> None:
    """Written by the CLI outside the repository, with an image and (for 3) as an Indexed
    Job: it renders, validates strictly, and keeps every invariant of a runner Job."""
    source = REPO / "jobs" / "orders_status_not_null.toml"
    out = tmp_path / "overlay"
    image_ref = "registry.internal:5000/team/backfill:2.3.4"
    done = cli("manifest", source, "--out", out, "--image", image_ref, "--shards", str(shards),
               env={})
    assert done.returncode == 0, done.stderr
    docs = render(out)
    for doc in docs:
        if doc["kind"] == "PodMonitor":
            _check_podmonitor(doc, docs, per_migration=True)
            continue
        for version in KUBERNETES_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)
    runner = job(docs)
    _check_job(runner, docs, out)
    assert runner["metadata"]["name"] == "backfill-orders-status"
    assert runner["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/instance"] == (
        "orders-status"
    )
    assert container(runner)["image"] == image_ref
    (config_map,) = kinds(docs, "ConfigMap")
    assert config_map["data"]["job.toml"] == source.read_text()
    spec = runner["spec"]
    if shards == 1:
        assert "completionMode" not in spec and "completions" not in spec
        return
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == (
        "Indexed", shards, shards
    )
    kubelet = Kubelet({"backfill-db": {"url": "postgresql://db/x"}},
                      {config_map["metadata"]["name"]: config_map["data"]}, tmp_path)
    argv = [kubelet.pod(runner, index=i).argv for i in range(shards)]
    assert [[a for a in av if a.startswith("--shard=")] for av in argv] == [
        [f"--shard={i}/{shards}"] for i in range(shards)
    ]
