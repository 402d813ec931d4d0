# Passerelle node image: `docker build -t passerelle .`; docker-compose.yml runs two of them
# behind nginx on PostgreSQL. No secret is in any layer: the master key is mounted at run time
# (a compose secret at /run/secrets/master.key), and the database password comes from a pgpass
# secret. See deploy/README.md ("Containers").
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/passerelle/.venv/bin:$PATH

# A fixed, unprivileged uid: the mounted master key must be readable by it alone (mode 0600).
RUN groupadd --system --gid 10001 passerelle \
    && useradd --system --uid 10001 --gid passerelle --home-dir /var/lib/passerelle --shell /usr/sbin/nologin passerelle \
    && install -d -o passerelle -g passerelle -m 0700 /var/lib/passerelle

WORKDIR /opt/passerelle
# Dependencies first, so that a code change does not reinstall them.
COPY requirements.txt ./
RUN python -m venv .venv && .venv/bin/pip install -r requirements.txt

# The code belongs to root: the service cannot change it. Compiled now, since the
# containers run on a read-only file system.
COPY . .
RUN python -m compileall -q service consent policies wsgi.py

USER 10001:10001
ENV PASSERELLE_INSTANCE_DIR=/var/lib/passerelle \
    PASSERELLE_BIND=0.0.0.0:8000 \
    PASSERELLE_MASTER_KEY_FILE=/run/secrets/master.key
EXPOSE 8000

# deploy/healthcheck.py asks /healthz with the Host the node accepts (urllib: no curl in the image).
HEALTHCHECK --interval=10s --timeout=6s --start-period=60s --retries=3 \
    CMD ["python", "deploy/healthcheck.py", "--timeout", "5"]

CMD ["gunicorn", "-c", "deploy/gunicorn.conf.py", "wsgi:app"]
