# syntax=docker/dockerfile:1
# byol-ray's runtime image: every Ray node (head, workers), the RayJob submitter, the MLflow server
# and the data-staging Job run it (cluster/). Nothing is installed at node or job start.
#
# Base: Ray 2.60's official GPU image for Python 3.11, the Ray that pyproject.toml pins and the Python
# the test suite runs on (tests/test_cluster_manifests.py checks both). On top, scripts/setup.sh, the
# same script `make setup` and CI run, installs FFCV's system packages (libopencv-dev,
# libturbojpeg0-dev, pkg-config) and byol-ray with every dependency at the exact versions of
# requirements.lock (pip constraints), the lock generated from the environment the tests pass in.
#
#   make image                      # = docker build -t ghcr.io/byol-ray/byol-ray:<version> \
#                                   #     --build-arg BYOL_RAY_IMAGE=<that tag> \
#                                   #     --build-arg BYOL_RAY_GIT_COMMIT=$(git rev-parse HEAD) .
#   docker push ghcr.io/byol-ray/byol-ray:<version>
#
# ghcr.io/byol-ray is a placeholder registry: build with IMAGE=<your registry>/byol-ray:<version>
# and put the same name in cluster/ (docs/cluster.md, step 1).
FROM rayproject/ray:2.60.0-py311-gpu

# Created by the image's user `ray` (a WORKDIR that does not exist yet would be root's, and pip
# builds byol-ray in place).
RUN mkdir -p /home/ray/byol-ray
WORKDIR /home/ray/byol-ray

# 1. System packages and the locked dependencies. Rebuilt only when pyproject.toml, the lock or
#    setup.sh change; the pip cache mount keeps downloads out of the image and across builds.
#    The image's user is `ray` (passwordless sudo): setup.sh runs apt-get through sudo.
COPY --chown=ray:users pyproject.toml requirements.lock ./
COPY --chown=ray:users scripts/setup.sh scripts/setup.sh
RUN --mount=type=cache,target=/home/ray/.cache/pip,uid=1000,gid=100 \
    PYTHON=python bash scripts/setup.sh --system --deps-only

# 2. byol-ray itself, a regular (non-editable) install: the code a job runs is the code in the image.
COPY --chown=ray:users README.md ./
COPY --chown=ray:users byol_ray byol_ray
# byol_ray/tune_configs links to the repository's tune_configs/: the search files ship in the wheel
COPY --chown=ray:users tune_configs tune_configs
RUN --mount=type=cache,target=/home/ray/.cache/pip,uid=1000,gid=100 \
    PYTHON=python bash scripts/setup.sh --system

# 3. What the run records (MLflow tags `image` and `git_commit`; there is no git checkout in here).
#    Both are required: `make image` passes them.
ARG BYOL_RAY_IMAGE
ARG BYOL_RAY_GIT_COMMIT
RUN test -n "$BYOL_RAY_IMAGE" && test -n "$BYOL_RAY_GIT_COMMIT" || \
    { echo "pass --build-arg BYOL_RAY_IMAGE=<tag> --build-arg BYOL_RAY_GIT_COMMIT=<commit> (make image does)" >&2; exit 1; }
# Containers start in the user's home, not in the source tree.
WORKDIR /home/ray
ENV BYOL_RAY_IMAGE=${BYOL_RAY_IMAGE} \
    BYOL_RAY_GIT_COMMIT=${BYOL_RAY_GIT_COMMIT} \
    PYTHONUNBUFFERED=1
