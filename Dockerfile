# One image for the API, the worker and the migrations (docker-compose.yml picks the command).
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /srv
RUN apt-get update && apt-get install -y --no-install-recommends curl && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md ./
COPY app ./app
COPY worker ./worker
COPY migrations ./migrations
COPY alembic.ini ./
RUN pip install --no-cache-dir .
# The chat templates the API renders (.dockerignore keeps only the files app/templates.py reads).
COPY triton_models ./triton_models
ENV CHAT_TEMPLATES_DIRS=/srv/triton_models
RUN useradd --system --uid 10001 llmq
USER llmq
EXPOSE 8887
# --limit-concurrency: past 1000 open connections a request is answered 503 (JSON, Retry-After), so
# that file descriptors (1024 by default) and memory (a connection holds at most ~0.4 MB) never run out.
CMD ["uvicorn", "app.asgi:app", "--host", "0.0.0.0", "--port", "8887", "--timeout-graceful-shutdown", "8", "--limit-concurrency", "1000"]
