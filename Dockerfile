# kbms: one image for every role; the command migrates the schema, then serves.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app

# Dependencies first, from the lock, so code changes do not reinstall them.
COPY pyproject.toml constraints.txt README.md ./
COPY src ./src
RUN pip install --no-cache-dir -c constraints.txt . \
 && useradd --system --uid 10001 --home-dir /app kbms \
 && mkdir -p /app/data && chown kbms /app/data

USER kbms
ENV KBMS_HOST=0.0.0.0 KBMS_PORT=8000
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/ready', timeout=2)"]
CMD ["sh", "-c", "kbms migrate && exec kbms serve"]
