FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY lua ./lua
COPY worker ./worker
RUN pip install --no-cache-dir '.[postgres]' && mkdir /data && chown nobody /data
# Writable state (the audit file; the SQLite file in embedded mode) lives in /data.
ENV CREDIT_AUDIT_PATH=/data/credit-audit.jsonl CREDIT_SQLITE_PATH=/data/credit-gateway.sqlite3
WORKDIR /data
USER nobody
EXPOSE 8000
CMD ["credit-gateway", "serve", "--host", "0.0.0.0", "--port", "8000"]
