# The worker image: code and dependencies only. Weights come from the model store, mounted
# as a volume at run time (see docker-compose.yml).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY schemas ./schemas
COPY workers ./workers
COPY streams ./streams
COPY ferry ./ferry
COPY compose ./compose
RUN pip install --no-cache-dir .
ENTRYPOINT []
