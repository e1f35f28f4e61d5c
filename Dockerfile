# Pollen on CPU: one image for `pollen server`, `pollen client` and `pollen certs`.
# compose.yaml runs a server and two clients with it; docs/containers.md explains both.
#
#   docker build -t pollen .
#   docker run --rm pollen --help
FROM python:3.11-slim

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1

WORKDIR /src
# Only what the package build reads (tests/test_containers.py builds from exactly these).
COPY pyproject.toml README.md ./
COPY pollen ./pollen

# The install step of .ci/run, in the image's own virtual environment: a venv, a current
# pip, then the project (not editable, and without the dev extras). TensorFlow's CPU
# build comes from pyproject.toml's dependencies.
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install -q --upgrade pip \
    && /opt/venv/bin/pip install -q .
ENV PATH=/opt/venv/bin:$PATH

# Never root at run time. /certs and /runs belong to that user, so named volumes
# mounted there start out writable by it.
RUN useradd --create-home --uid 1000 pollen \
    && mkdir -p /certs /runs /data \
    && chown pollen:pollen /certs /runs
USER pollen
WORKDIR /home/pollen

ENTRYPOINT ["pollen"]
CMD ["--help"]
