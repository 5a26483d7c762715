# billing-ingestor, single node. The steps are those of `make run`: a venv
# with the project installed into it, then `billing-ingestor serve`.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    INGESTOR_BIND=0.0.0.0:8081 \
    INGESTOR_DATA_DIR=/data

RUN useradd --system --uid 10001 --home-dir /app ingestor
WORKDIR /app
COPY pyproject.toml README.md ./
COPY ingestor ./ingestor
RUN python -m venv /app/.venv \
    && /app/.venv/bin/python -m pip install --no-cache-dir --upgrade pip \
    && /app/.venv/bin/python -m pip install --no-cache-dir . \
    && mkdir -p /data && chown ingestor /data

USER ingestor
VOLUME ["/data"]
EXPOSE 8081
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["/app/.venv/bin/python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8081/readyz', timeout=2).status == 200 else 1)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/app/.venv/bin/billing-ingestor"]
CMD ["serve"]
