# The notifier image: one image for the migrate job, the workers, beat, Flower and the API
# (docker-compose.yml picks the command). The project is installed as a wheel, which
# carries the migrations inside the package.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY migrations ./migrations
COPY notifier ./notifier
RUN pip install ".[server]" && rm -rf /src

# Never run as root. Beat keeps its schedule file in /var/lib/notifier (compose mounts a
# volume there; a new named volume takes this directory's owner).
RUN useradd --create-home --uid 10001 notifier \
    && mkdir -p /var/lib/notifier && chown notifier /var/lib/notifier
USER notifier
WORKDIR /home/notifier

CMD ["celery", "-A", "notifier", "worker", "-l", "info"]
