"""Kubernetes without a cluster, for the tests: render the kustomize overlays in k8s/, and stand in
for the two components that decide what a Job's pods do.

* ``Kubelet``: turns a rendered Job's container into a local process the way the kubelet would
  (the image's ENTRYPOINT and ENV from the Dockerfile, the container's args and env, Secrets,
  ConfigMaps and the downward API resolved, ``$(VAR)`` expanded, volumes materialised under a
  temporary directory standing in for the pod's filesystem, its own port for the metrics server
  standing in for the pod's network namespace), and stops it with SIGTERM, then SIGKILL after
  terminationGracePeriodSeconds.
* ``JobController``: decides after each pod whether the Job succeeded, failed, or gets another
  pod, from the Job's podFailurePolicy and backoffLimit (the rules of
  https://kubernetes.io/docs/concepts/workloads/controllers/job/#pod-failure-policy).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import anyio
import yaml
from anyio.abc import Process, TaskGroup

from backfill.pgtemp import free_port

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "k8s"
DOCKERFILE = REPO / "Dockerfile"
# The directories this suite renders (k8s/dashboards and k8s/alerts belong to the metrics work).
OVERLAY_ROOTS = ("base", "init", "jobs", "variants")
METRICS_PORT = 9477
SCRAPE_SECONDS = 0.2  # the PodMonitor's 15 s interval, at a test's pace

Doc = dict[str, Any]


def kubectl() -> str | None:
    return shutil.which("kubectl")


NO_KUBECTL = (
    "kubectl is not installed (.ci/run installs it): the manifests in k8s/ cannot be rendered"
)


def overlays() -> list[Path]:
    """Every kustomization directory this suite owns, base and init included."""
    found: list[Path] = []
    for root in OVERLAY_ROOTS:
        found += sorted(p.parent for p in (K8S / root).rglob("kustomization.yaml"))
    return found


@cache
def render(directory: Path) -> tuple[Doc, ...]:
    """``kubectl kustomize DIR``, parsed (cached: a render is pure)."""
    exe = kubectl()
    assert exe is not None, NO_KUBECTL
    out = subprocess.run(
        [exe, "kustomize", str(directory)], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, f"kubectl kustomize {directory} failed:\n{out.stderr}"
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def render_all(directories: Iterable[Path]) -> None:
    """Render several directories at once (each render is a process; run them side by side)."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(render, directories))


def kinds(docs: Iterable[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def job(docs: Iterable[Doc], component: str = "runner") -> Doc:
    (found,) = [
        d for d in kinds(docs, "Job")
        if d["metadata"]["labels"].get("app.kubernetes.io/component") == component
    ]
    return found


def container(job_doc: Doc, name: str = "backfill") -> Doc:
    (found,) = [c for c in job_doc["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return found


# --- the image ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Image:
    """The final stage of the Dockerfile, as far as running a container is concerned."""

    entrypoint: tuple[str, ...]
    cmd: tuple[str, ...]
    env: Mapping[str, str]
    user: str
    stages: int


def image(dockerfile: Path = DOCKERFILE) -> Image:
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    stages = 0
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: dict[str, str] = {}
    user = "root"
    for line in text.splitlines():
        word, _, rest = line.strip().partition(" ")
        word = word.upper()
        if word == "FROM":
            stages += 1
            entrypoint, cmd, env, user = (), (), {}, "root"
        elif word == "ENTRYPOINT":
            entrypoint = tuple(json.loads(rest))
        elif word == "CMD":
            cmd = tuple(json.loads(rest))
        elif word == "ENV":
            env.update(dict(pair.split("=", 1) for pair in rest.split()))
        elif word == "USER":
            user = rest.strip()
    return Image(entrypoint, cmd, env, user, stages)


# --- the kubelet --------------------------------------------------------------------------------

_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(value: str, env: Mapping[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion: known variables are replaced, ``$$`` escapes a ``$``,
    unknown references stay as written."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return _VAR.sub(sub, value)


def _field(pod: Mapping[str, Any], path: str) -> str:
    m = re.fullmatch(r"metadata\.(annotations|labels)\['([^']+)'\]", path)
    if m:
        return str(pod[m.group(1)][m.group(2)])
    if path in ("metadata.name", "metadata.namespace"):
        return str(pod[path.split(".")[1]])
    raise AssertionError(f"the kubelet emulation does not resolve fieldRef {path}")


def _executable(name: str) -> list[str]:
    """The image's PATH lookup: ``backfill`` is the console script of this environment."""
    if name == "backfill":
        script = Path(sys.executable).parent / "backfill"
        return [str(script)] if script.exists() else [sys.executable, "-m", "backfill"]
    raise AssertionError(f"the image has no executable {name!r}")


@dataclass
class Pod:
    """One pod of a Job, run as a local process."""

    name: str
    argv: list[str]
    env: dict[str, str]
    root: Path
    grace: float
    log: Path
    metrics_port: int | None = None  # where this pod's `metrics` port is, on this host
    scraper: TaskGroup | None = None  # Prometheus, if the pod is to be scraped
    process: Process | None = None
    exit_code: int | None = None
    killed: bool = False  # SIGKILL was needed
    stop_seconds: float | None = None  # SIGTERM to exit
    scrapes: int = 0  # successful scrapes of /metrics

    async def start(self) -> Pod:
        with self.log.open("ab") as log:
            self.process = await anyio.open_process(
                self.argv, env=self.env, cwd=self.root, stdin=subprocess.DEVNULL,
                stdout=log, stderr=log,
            )
        if self.scraper is not None and self.metrics_port is not None:
            self.scraper.start_soon(self._scrape)
        return self

    async def _scrape(self) -> None:
        """What the PodMonitor has Prometheus do, at a test's pace: GET /metrics on the pod's
        `metrics` port every SCRAPE_SECONDS while it runs (which also ends the runner's linger
        as soon as its final state has been seen)."""
        assert self.process is not None and self.metrics_port is not None
        while self.process.returncode is None:
            with anyio.move_on_after(2):
                try:
                    async with await anyio.connect_tcp("127.0.0.1", self.metrics_port) as stream:
                        await stream.send(b"GET /metrics HTTP/1.0\r\nHost: pod\r\n\r\n")
                        response = b""
                        with contextlib.suppress(anyio.EndOfStream):
                            while True:
                                response += await stream.receive()
                        if response.startswith(b"HTTP/1.0 200"):
                            self.scrapes += 1
                except (OSError, anyio.BrokenResourceError):
                    pass  # not listening yet, or gone
            await anyio.sleep(SCRAPE_SECONDS)

    @staticmethod
    def _code(returncode: int) -> int:
        # A container killed by a signal reports 128 + the signal's number, as the runtime does.
        return 128 - returncode if returncode < 0 else returncode

    async def wait(self) -> int:
        """Until the pod ends by itself (callers bound it with ``anyio.fail_after``)."""
        assert self.process is not None
        self.exit_code = self._code(await self.process.wait())
        return self.exit_code

    async def stop(self) -> int:
        """What the kubelet does to a pod being deleted, evicted or past its deadline: SIGTERM,
        then SIGKILL once terminationGracePeriodSeconds have passed."""
        assert self.process is not None
        start = anyio.current_time()
        self.process.send_signal(signal.SIGTERM)
        with anyio.move_on_after(self.grace):
            self.exit_code = self._code(await self.process.wait())
            self.stop_seconds = anyio.current_time() - start
            return self.exit_code
        self.killed = True
        self.process.kill()
        self.exit_code = self._code(await self.process.wait())
        return self.exit_code

    async def kill(self) -> int:
        """SIGKILL with no warning: the OOM killer, a node that vanished."""
        assert self.process is not None
        self.killed = True
        self.process.kill()
        self.exit_code = self._code(await self.process.wait())
        return self.exit_code

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class Kubelet:
    """Creates pods from a Job's template with the cluster objects it references. As an async
    context manager it also scrapes each running pod's metrics port, as the PodMonitor would,
    and at the end kills whatever pod is still running (a failed test)."""

    secrets: Mapping[str, Mapping[str, str]]
    config_maps: Mapping[str, Mapping[str, str]]
    workdir: Path
    image: Image = field(default_factory=image)
    pods: list[Pod] = field(default_factory=list)
    _scraper: TaskGroup | None = field(default=None, init=False, repr=False)

    async def __aenter__(self) -> Kubelet:
        self._scraper = anyio.create_task_group()
        await self._scraper.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        for pod in self.pods:
            if pod.process is not None and pod.process.returncode is None:
                await pod.kill()
        assert self._scraper is not None
        self._scraper.cancel_scope.cancel()
        await self._scraper.__aexit__(None, None, None)

    def pod(self, job_doc: Doc, *, index: int | None = None) -> Pod:
        name = f"{job_doc['metadata']['name']}-{len(self.pods) + 1}"
        template = job_doc["spec"]["template"]
        pod_meta = {
            "name": name,
            "namespace": "default",
            "labels": dict(template["metadata"].get("labels", {})),
            "annotations": dict(template["metadata"].get("annotations", {})),
        }
        if index is not None:
            pod_meta["annotations"]["batch.kubernetes.io/job-completion-index"] = str(index)
            pod_meta["labels"]["batch.kubernetes.io/job-completion-index"] = str(index)
        spec = template["spec"]
        ctr = spec["containers"][0]
        root = self.workdir / name
        root.mkdir(parents=True)
        mounts = self._mount(spec.get("volumes", []), ctr.get("volumeMounts", []), root)

        # The container's environment: the image's ENV, then the container's env in order
        # (each entry may refer to the ones before it), and nothing from this test process
        # except PATH (to find the interpreter) and PYTHONPATH.
        env: dict[str, str] = {"PATH": os.environ["PATH"], "HOSTNAME": name}
        if "PYTHONPATH" in os.environ:  # the code under test, when not the installed one
            env["PYTHONPATH"] = os.environ["PYTHONPATH"]
        env.update({k: v for k, v in self.image.env.items() if k != "PATH"})
        for source in ctr.get("envFrom", []):
            ref = source.get("secretRef") or source.get("configMapRef")
            store = self.secrets if "secretRef" in source else self.config_maps
            for k, v in store[ref["name"]].items():
                env[source.get("prefix", "") + k] = v
        for var in ctr.get("env", []):
            # A path into a mounted volume points at its local copy.
            env[var["name"]] = self._remap(self._value(var, env, pod_meta), mounts)

        command = list(ctr.get("command") or self.image.entrypoint)
        args = list(ctr["args"]) if "args" in ctr else (
            [] if "command" in ctr else list(self.image.cmd)
        )
        argv = [expand(a, env) for a in command + args]
        argv = [self._remap(a, mounts) for a in argv]
        argv, metrics_port = self._own_network(argv, ctr)
        pod = Pod(
            name=name,
            argv=_executable(argv[0]) + argv[1:],
            env=env,
            root=root,
            grace=float(spec.get("terminationGracePeriodSeconds", 30)),
            log=self.workdir / f"{name}.log",
            metrics_port=metrics_port,
            scraper=self._scraper,
        )
        self.pods.append(pod)
        return pod

    def _value(self, var: Doc, env: Mapping[str, str], pod_meta: Mapping[str, Any]) -> str:
        if "value" in var:
            return expand(var["value"], env)
        source = var["valueFrom"]
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            return self.secrets[ref["name"]][ref["key"]]  # missing: CreateContainerConfigError
        if "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            return self.config_maps[ref["name"]][ref["key"]]
        if "fieldRef" in source:
            return _field(pod_meta, source["fieldRef"]["fieldPath"])
        raise AssertionError(f"the kubelet emulation does not resolve {source}")

    def _mount(self, volumes: list[Doc], mounts: list[Doc], root: Path) -> dict[str, Path]:
        """Materialise each mounted volume under ``root``; returns mountPath -> local path."""
        by_name = {v["name"]: v for v in volumes}
        out: dict[str, Path] = {}
        for mount in mounts:
            volume = by_name[mount["name"]]
            local = root / mount["mountPath"].lstrip("/")
            local.mkdir(parents=True, exist_ok=True)
            if "configMap" in volume:
                data = self.config_maps[volume["configMap"]["name"]]
                items = volume["configMap"].get("items") or [{"key": k, "path": k} for k in data]
                for item in items:
                    (local / item["path"]).write_text(data[item["key"]])
            elif "secret" in volume:
                data = self.secrets[volume["secret"]["secretName"]]
                items = volume["secret"].get("items") or [{"key": k, "path": k} for k in data]
                for item in items:
                    path = local / item["path"]
                    path.write_text(data[item["key"]])
                    path.chmod(volume["secret"].get("defaultMode", 0o644) & 0o700)
            elif "emptyDir" not in volume:
                raise AssertionError(f"the kubelet emulation does not mount {volume}")
            out[mount["mountPath"]] = local
        return out

    @staticmethod
    def _remap(arg: str, mounts: Mapping[str, Path]) -> str:
        for mount_path, local in sorted(mounts.items(), key=lambda m: -len(m[0])):
            if arg == mount_path or arg.startswith(mount_path.rstrip("/") + "/"):
                return str(local) + arg[len(mount_path.rstrip("/")):]
        return arg

    @staticmethod
    def _own_network(argv: list[str], ctr: Doc) -> tuple[list[str], int | None]:
        """A pod has its own network namespace; processes on one host share one. Give each pod
        its own free port for what the manifest serves on the `metrics` port; returns the
        arguments and that port."""
        ports = {p["containerPort"] for p in ctr.get("ports", []) if p.get("name") == "metrics"}
        out: list[str] = []
        local: int | None = None
        for arg in argv:
            flag, eq, value = arg.partition("=")
            if flag == "--metrics-port" and eq and int(value) in ports:
                local = free_port()
                arg = f"{flag}={local}"
            out.append(arg)
        return out, local


# --- the Job controller -------------------------------------------------------------------------


def pod_failure_action(
    job_doc: Doc, exit_codes: Mapping[str, int], conditions: Iterable[str] = ()
) -> str:
    """The first podFailurePolicy rule that matches a failed pod (``FailJob``, ``Ignore``,
    ``Count``, ``FailIndex``), else ``Count``. ``exit_codes`` maps container name to exit code;
    ``conditions`` are the pod's conditions with status True."""
    conditions = set(conditions)
    for rule in job_doc["spec"].get("podFailurePolicy", {}).get("rules", []):
        if "onExitCodes" in rule:
            req = rule["onExitCodes"]
            for name, code in exit_codes.items():
                if req.get("containerName", name) != name or code == 0:
                    continue
                if (code in req["values"]) == (req["operator"] == "In"):
                    return str(rule["action"])
        for pattern in rule.get("onPodConditions", []):
            if pattern.get("status", "True") == "True" and pattern["type"] in conditions:
                return str(rule["action"])
    return "Count"


@dataclass
class JobController:
    """The Job controller's decision after each pod of a non-indexed Job."""

    job: Doc
    failed: int = 0
    decisions: list[tuple[int, str]] = field(default_factory=list)

    def observe(self, exit_code: int, conditions: Iterable[str] = ()) -> str:
        """``Complete``, ``Failed`` or ``Retry`` after a pod ended with ``exit_code``."""
        if exit_code == 0:
            outcome = "Complete"
        else:
            action = pod_failure_action(self.job, {"backfill": exit_code}, conditions)
            if action == "Count":
                self.failed += 1
            failed = action == "FailJob" or self.failed > self.job["spec"].get("backoffLimit", 6)
            outcome = "Failed" if failed else "Retry"
        self.decisions.append((exit_code, outcome))
        return outcome
