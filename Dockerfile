# The runner image: `backfill` and its pinned dependencies in a virtualenv, run as a non-root
# user, nothing else. Build from the repository root:
#
#   docker build -t registry.example.com/backfill:0.1.0 .
#
# The job file is not in this image. Mount it from a ConfigMap at /etc/backfill/job.toml while
# iterating (k8s/jobs/<job>/), or bake it into a per-migration image tagged with the commit
# (k8s/variants/baked-image/Dockerfile) for a run you can reproduce from its tag.
#
# Pin the base by digest for reproducible builds (python:3.11-slim-bookworm@sha256:...): the
# tag moves with every Python patch release and Debian security update.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: resolve nothing, install exactly requirements.lock (hash-checked) -------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
# A virtualenv without pip: the build stage's pip installs into it, so the final image carries
# no installer at all. Every dependency ships manylinux wheels: no compiler is needed, here or
# later.
RUN python -m venv --without-pip /opt/backfill
WORKDIR /src
COPY requirements.lock ./
RUN pip --python /opt/backfill/bin/python install --only-binary=:all: --require-hashes \
        --no-deps -r requirements.lock
COPY pyproject.toml README.md LICENSE ./
COPY backfill/ backfill/
# The package itself, without touching the locked dependencies.
RUN pip --python /opt/backfill/bin/python install --no-deps .

# --- runtime ------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
# The base image's own pip and setuptools are not needed to run: remove them.
RUN python -m pip uninstall --yes pip setuptools wheel \
    && groupadd --system --gid 10001 backfill \
    && useradd --system --uid 10001 --gid backfill --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin backfill
COPY --from=build /opt/backfill /opt/backfill
ENV PATH=/opt/backfill/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
LABEL org.opencontainers.image.title="backfill" \
      org.opencontainers.image.description="Batched, resumable, gentle backfill jobs for PostgreSQL"
# Numeric, so that Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
WORKDIR /tmp
# `backfill run` serves Prometheus metrics here (--metrics-port).
EXPOSE 9477
ENTRYPOINT ["backfill"]
CMD ["--help"]
