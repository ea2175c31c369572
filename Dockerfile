# segnode node image. Build: docker compose build
FROM python:3.11-slim-bookworm

RUN apt-get update \
 && apt-get install -y --no-install-recommends dcmtk dicom3tools \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --create-home --home-dir /home/segnode segnode \
 && mkdir -p /data && chown segnode /data

WORKDIR /app
COPY pyproject.toml README.md ./
COPY segnode ./segnode
# nnU-Net's networks for imported models; --no-deps: its timm dependency is not needed by the U-Nets
RUN pip install --no-cache-dir --no-deps "dynamic-network-architectures==0.4.4" && pip install --no-cache-dir .

USER segnode
VOLUME /data
EXPOSE 11112 8080
# liveness (/livez): a restart helps only a process that no longer answers; docker-compose.yml checks
# readiness (/readyz) instead, for depends_on and for operators (a full disk is not cured by a restart)
HEALTHCHECK --interval=30s --timeout=5s \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/livez', timeout=4)"
CMD ["segnode", "serve", "--config", "/etc/segnode/segnode.yaml"]
