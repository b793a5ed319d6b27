# One image recipe for every imgpipe service; SERVICE picks which one is built.
# Build context: the repository root. docker-compose.yml passes both arguments; by hand:
#   docker build --build-arg SERVICE=ingest    --build-arg PORT=8001 -t imgpipe-ingest .
#   docker build --build-arg SERVICE=status    --build-arg PORT=8002 -t imgpipe-status .
#   docker build --build-arg SERVICE=notifier  --build-arg PORT=8003 -t imgpipe-notifier .
#   docker build --build-arg SERVICE=processor --build-arg PORT=8004 -t imgpipe-processor .
# SERVICE is the directory under services/; the package is imgpipe-$SERVICE, and so is
# its command. PORT is only the EXPOSEd port, which must be the service's default port
# in imgpipe.contracts.settings (a Dockerfile cannot derive EXPOSE from another value).
# Dependencies come pinned and hashed from uv.lock; nothing is fetched at run time.

FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN pip install "uv>=0.5,<1"
WORKDIR /src
# uv needs every workspace member's pyproject.toml to read the lock file.
COPY pyproject.toml uv.lock ./
COPY libs/contracts/pyproject.toml libs/contracts/
COPY launcher/pyproject.toml launcher/
COPY services/ingest/pyproject.toml services/ingest/
COPY services/processor/pyproject.toml services/processor/
COPY services/status/pyproject.toml services/status/
COPY services/notifier/pyproject.toml services/notifier/
# Declared here, not earlier: every layer above is the same for all four services and
# is built once; only the layers below differ per service.
ARG SERVICE
ARG PORT
# Fail at once, with a clear message, on a missing or unknown service or a port that is
# not that service's (a typo would otherwise surface later as a puzzling COPY or uv error).
RUN case "$SERVICE:$PORT" in \
        ingest:8001 | status:8002 | notifier:8003 | processor:8004) ;; \
        *) echo "SERVICE:PORT must be one of ingest:8001 status:8002 notifier:8003" \
                "processor:8004, not '$SERVICE:$PORT'" >&2; \
           exit 1 ;; \
    esac
# Only this service's dependencies (the processor's include Pillow), not the workspace's.
RUN uv export --frozen --no-dev --no-emit-workspace --no-header \
        --package "imgpipe-$SERVICE" -o requirements.txt \
    && python -m venv /opt/venv \
    && /opt/venv/bin/pip install --require-hashes -r requirements.txt
# The code last, so that editing it does not reinstall the dependencies.
COPY libs/contracts libs/contracts
COPY services/${SERVICE} services/${SERVICE}
RUN /opt/venv/bin/pip install --no-deps ./libs/contracts "./services/$SERVICE"

FROM python:3.11-slim
# One fixed uid in every image: processor writes and status reads the shared media volume.
RUN useradd --system --uid 10001 --create-home imgpipe \
    && mkdir /data && chown imgpipe:imgpipe /data
COPY --from=build /opt/venv /opt/venv
# A stage sees only the arguments it declares itself.
ARG SERVICE
ARG PORT
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    IMGPIPE_HOST=0.0.0.0 \
    IMGPIPE_DATA_DIR=/data \
    IMGPIPE_SERVICE=${SERVICE}
USER imgpipe
WORKDIR /home/imgpipe
EXPOSE ${PORT}
# The command is the package's console script, imgpipe-$SERVICE. An exec-form CMD does
# not expand variables, so a shell expands it and then `exec`s the service, which stays
# PID 1 and receives docker's SIGTERM itself.
CMD ["/bin/sh", "-c", "exec \"imgpipe-$IMGPIPE_SERVICE\""]
