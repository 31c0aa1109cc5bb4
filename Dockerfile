# syntax=docker/dockerfile:1
# byol-ray's runtime image: every Ray node (head, workers), the RayJob submitter and the data-staging
# Job run it (cluster/); the Kubernetes MLflow server runs MLflow's own image. Nothing is installed at
# node or job start.
#
# Base: Ray 2.60's official GPU image for Python 3.11, the Ray that pyproject.toml pins and the Python
# the test suite runs on (tests/test_cluster_manifests.py checks both). On top, scripts/setup.sh, the
# same script `make setup` and CI run, installs FFCV's system packages (libopencv-dev,
# libturbojpeg0-dev, pkg-config) and byol-ray with every dependency at the exact versions of
# requirements.lock (pip constraints), the lock generated from the environment the tests pass in.
#
#   make image              # tags <registry>/byol-ray:<12-hex commit>; refuses uncommitted changes in
#                           # what the image is built from (ALLOW_DIRTY=1: tag <commit>-dirty)
#   docker push <the tag make image printed>
#
# The tag is the commit, never the version: a tag names one build of one tree, and every run records
# it (MLflow tags image, git_commit, git_dirty). ghcr.io/byol-ray is a placeholder registry:
# `make image IMAGE_REPO=<your registry>/byol-ray`, then the same repository in cluster/
# (docs/cluster.md, step 1).
#
# Layer cache: the ~6 GB dependency layer (1) depends on requirements.lock, scripts/setup.sh and
# pyproject.toml's dependency list, not on the package version: it is installed from a copy of
# pyproject.toml whose `version = ...` line is replaced by a constant (stage `deps-spec`). BuildKit keys
# a COPY on the content it copies, so bumping the version leaves that copy, and the layer after it,
# unchanged; only layer 2 (byol-ray itself, seconds) is rebuilt. tests/test_cluster_manifests.py runs
# the stage's sed on two versions and checks the outputs are identical.

# Stage deps-spec: pyproject.toml with its version neutralised (the same base, so nothing else is pulled).
FROM rayproject/ray:2.60.0-py311-gpu AS deps-spec
COPY pyproject.toml /tmp/pyproject.toml
RUN mkdir -p /tmp/deps-spec && \
    sed -E 's/^version = "[^"]*"$/version = "0"/' /tmp/pyproject.toml > /tmp/deps-spec/pyproject.toml

FROM rayproject/ray:2.60.0-py311-gpu

# Created by the image's user `ray` (a WORKDIR that does not exist yet would be root's, and pip
# builds byol-ray in place).
RUN mkdir -p /home/ray/byol-ray
WORKDIR /home/ray/byol-ray

# The CUDA the locked torch was built for (requirements.lock: torch 2.14.1 from the default index, a
# CUDA 13.0 build, 2.14.1+cu130, whose runtime libraries are the pinned cuda-toolkit 13.0.3 and
# nvidia-cuda-runtime 13.0.x wheels). The NVIDIA container
# runtime refuses to start the container on a host whose driver cannot run CUDA 13.0 (R580 or newer)
# with a clear message, instead of torch failing later with "CUDA driver version is insufficient".
# The value overrides the base image's own (its system CUDA, which torch does not use). A test ties it
# to the lock.
ENV NVIDIA_REQUIRE_CUDA="cuda>=13.0"

# 1. System packages and the locked dependencies. Rebuilt only when the dependency list, the lock or
#    setup.sh change (not the version, above); the pip cache mount keeps downloads out of the image
#    and across builds. The image's user is `ray` (passwordless sudo): setup.sh runs apt-get through
#    sudo. `pip check`: the locked set is consistent on top of the base image's own packages.
COPY --from=deps-spec --chown=ray:users /tmp/deps-spec/pyproject.toml ./pyproject.toml
COPY --chown=ray:users requirements.lock ./
COPY --chown=ray:users scripts/setup.sh scripts/setup.sh
RUN --mount=type=cache,target=/home/ray/.cache/pip,uid=1000,gid=100 \
    PYTHON=python bash scripts/setup.sh --system --deps-only && python -m pip check

# 2. byol-ray itself, a regular (non-editable) install: the code a job runs is the code in the image.
#    The real pyproject.toml (with the version) replaces the neutralised copy here.
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users byol_ray byol_ray
# byol_ray/tune_configs links to the repository's tune_configs/: the search files ship in the wheel
COPY --chown=ray:users tune_configs tune_configs
RUN --mount=type=cache,target=/home/ray/.cache/pip,uid=1000,gid=100 \
    PYTHON=python bash scripts/setup.sh --system && python -m pip check

# 3. What the run records (MLflow tags `image`, `git_commit` and `git_dirty`; there is no git checkout
#    in here). All three are required: `make image` passes them. Declared last, so a new commit
#    rebuilds only this step.
ARG BYOL_RAY_IMAGE
ARG BYOL_RAY_GIT_COMMIT
ARG BYOL_RAY_GIT_DIRTY
RUN test -n "$BYOL_RAY_IMAGE" && test -n "$BYOL_RAY_GIT_COMMIT" && \
    { test "$BYOL_RAY_GIT_DIRTY" = true || test "$BYOL_RAY_GIT_DIRTY" = false; } || \
    { echo "pass --build-arg BYOL_RAY_IMAGE=<tag> --build-arg BYOL_RAY_GIT_COMMIT=<commit> --build-arg BYOL_RAY_GIT_DIRTY=true|false (make image does)" >&2; exit 1; }
# Containers start in the user's home, not in the source tree.
WORKDIR /home/ray
ENV BYOL_RAY_IMAGE=${BYOL_RAY_IMAGE} \
    BYOL_RAY_GIT_COMMIT=${BYOL_RAY_GIT_COMMIT} \
    BYOL_RAY_GIT_DIRTY=${BYOL_RAY_GIT_DIRTY} \
    PYTHONUNBUFFERED=1
