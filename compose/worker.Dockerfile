# The Ferry image: code and dependencies, never weights (those live in the model store, a
# volume mounted read-only into workers, so a new checkpoint needs no image build). One image
# runs every component: `docker run IMAGE worker|router|gateway|deployer ...`.
#
# torch comes from the index named by TORCH_INDEX_URL: CUDA wheels by default, CPU wheels
# (far smaller) with --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# (compose/docker-compose.cpu.yml does that).
FROM python:3.11.11-slim-bookworm

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu132
ARG TORCH_VERSION=2.15.0
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1

# torch first, from its own index: `pip install .` below then finds it satisfied and never
# pulls whichever build PyPI serves.
RUN pip install --index-url "$TORCH_INDEX_URL" "torch==$TORCH_VERSION"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY schemas ./schemas
COPY workers ./workers
COPY streams ./streams
COPY ferry ./ferry
RUN pip install . && rm -rf /src
COPY compose/bootstrap.sh /usr/local/bin/ferry-bootstrap

# A non-root user with a writable home (faust and FERRY_HOME write there). /models and
# /checkpoints exist and belong to it, so named volumes mounted there start writable.
RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin ferry \
    && mkdir -p /models /checkpoints \
    && chown ferry:ferry /models /checkpoints \
    && chmod 0755 /usr/local/bin/ferry-bootstrap
USER 10001
WORKDIR /home/ferry
ENV FERRY_HOME=/home/ferry/.ferry

EXPOSE 8000 9100
ENTRYPOINT ["ferry"]
CMD ["--help"]
