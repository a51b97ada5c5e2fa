# syntax=docker/dockerfile:1
# One image for every node type: `docker run swarmlm node --type training --node-id t1 ...`.
#
# torch is installed first and pinned, from the CPU wheel index: from PyPI, any torch pulls
# gigabytes of CUDA libraries that a CPU node never uses. The package itself comes after, so
# editing src/ rebuilds only the last layers.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

# A fixed uid/gid so volume ownership is predictable on every host and in Kubernetes
# (fsGroup 10001 in deploy/kubernetes/statefulset.yaml). A writable home gives torch and
# matplotlib a cache directory.
RUN groupadd --system --gid 10001 swarmlm \
    && useradd --system --uid 10001 --gid swarmlm --create-home --home-dir /home/swarmlm \
        --shell /usr/sbin/nologin swarmlm

WORKDIR /app
COPY pyproject.toml README.md LICENSE ./
COPY src ./src
RUN pip install . && rm -rf build src/*.egg-info

# Relative paths in the shipped configs (configs/swarm-tiny.json reads runs/data/kjv) resolve
# against /app, so the corpus, the configs and the working directory stay together.
COPY configs ./configs
COPY data ./data
# /data/node is where node dirs are mounted; creating it here (owned by the node user) makes a
# fresh named volume inherit that ownership instead of root's.
RUN mkdir -p /app/runs /data/node && chown -R swarmlm:swarmlm /app/runs /data/node
USER swarmlm:swarmlm

# Tokenize the bundled corpus once at build time: training nodes need it before they start, and
# every container then shares the same shards (the swarm's data-shard assignment assumes it).
RUN swarmlm data prepare --input data/kjv.txt.gz --out runs/data/kjv --vocab-size 2048

VOLUME ["/data/node"]
EXPOSE 7777 8080

# The web server answers /api/health on 8080 on every node type; `swarmlm status` exits 0 when
# the node is ok and non-zero when it is degraded, down or unreachable.
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["swarmlm", "status", "--node", "http://127.0.0.1:8080"]

ENTRYPOINT ["swarmlm"]
# Binding 0.0.0.0 is only right for a single container with published ports; docker-compose.yml
# and the StatefulSet bind each node to its own resolvable name instead, because a node
# advertises the address it binds (see docs/deployment.md, "Addresses").
CMD ["node", "--type", "full", "--node-id", "node-1", "--host", "0.0.0.0", \
     "--p2p-port", "7777", "--web-port", "8080", "--node-dir", "/data/node"]
