# One image for every function and process of the project.
#   FUNCTION_TARGET=predict (async_predict, get_result, moderation_consumer): serve that function
#   command `moderation adapter|relay|dlq-recorder|migrate|topics`: run that process
# PYTHON_IMAGE lets the same file build on another (e.g. a local) base with Python 3.11.
ARG PYTHON_IMAGE=python:3.11-slim

# ---- builder: a virtual environment with the runtime dependencies and the project
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies first, read from pyproject.toml alone: a code edit keeps this (slow) layer.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > requirements.txt \
 && pip install -r requirements.txt dumb-init==1.2.5.post1
# The project itself, without extras: no scikit-learn, no embedded servers, no test tools.
COPY README.md ./
COPY shared ./shared
COPY model_export ./model_export
COPY moderation ./moderation
COPY migrations ./migrations
RUN pip install --no-deps . \
 && python -P -c "import moderation.migrations, shared.config" \
 && pip uninstall --yes pip setuptools

# ---- runtime: the virtual environment, the function sources and the model, nothing else
FROM ${PYTHON_IMAGE}
# Logs reach the container runtime at once; no .pyc written at run time. The model is baked in
# at MODEL_PATH: mount another export over /app/model to serve it instead. HOME is writable
# (gunicorn keeps its control socket there) and is the one folder to mount an emptyDir on
# when the root filesystem is read-only. PROMETHEUS_MULTIPROC_DIR: where each worker process
# keeps its metrics so that /metrics adds them up (emptied by the entrypoint at start).
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/tmp \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MODEL_PATH=/app/model/model.onnx \
    PROMETHEUS_MULTIPROC_DIR=/tmp/prometheus \
    PORT=8080
COPY --from=builder /opt/venv /opt/venv
COPY functions /app/functions
COPY shared/default_model/model.onnx shared/default_model/model.json /app/model/
COPY deploy/container/entrypoint.sh /usr/local/bin/moderation-entrypoint
WORKDIR /app
# A numeric non-root user: Kubernetes' runAsNonRoot can check it without a passwd entry.
USER 10001:10001
EXPOSE 8080
# dumb-init as PID 1 forwards signals (SIGTERM stops the server in well under a second) and
# reaps children; exec form, so nothing sits between it and the process.
ENTRYPOINT ["dumb-init", "--", "moderation-entrypoint"]
