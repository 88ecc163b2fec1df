# camserve: explain Keras image classifiers over gRPC, on the official TensorFlow GPU image.
#   docker build -t camserve .
#   docker run --gpus all -p 8500:8500 -p 8501:8501 -p 8080:8080 camserve
# Ports: gRPC 8500, Prometheus /metrics 8501, HTTP API 8080 (REST, Open Inference Protocol, viewer).
# Settings come from CAMSERVE_* variables (see `camserve serve --help`), e.g.
#   docker run -e CAMSERVE_MAX_BATCH_SIZE=64 -v $PWD/my-models:/models:ro camserve
# Accelerator settings (GPU memory growth is on by default, the model runs on /GPU:0 when the
# container sees a GPU), e.g. half precision and XLA on GPUs with tensor cores:
#   docker run --gpus all -e CAMSERVE_PRECISION=mixed_float16 -e CAMSERVE_XLA=true camserve
# TensorFlow's thread pools (0: TensorFlow's choice); on small CPU hosts one thread per op and one
# op at a time leave the other cores to the server's event loop:
#   docker run -e CAMSERVE_INTRA_OP_THREADS=1 -e CAMSERVE_INTER_OP_THREADS=1 camserve
FROM tensorflow/tensorflow:2.21.0-gpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    CAMSERVE_MODELS=/models \
    CAMSERVE_HOST=0.0.0.0 \
    CAMSERVE_PORT=8500 \
    CAMSERVE_METRICS_PORT=8501 \
    CAMSERVE_HTTP_PORT=8080 \
    CAMSERVE_LOG_FORMAT=json

WORKDIR /opt/camserve
COPY pyproject.toml README.md ./
COPY camserve ./camserve
# Optional extras of camserve, e.g. `docker build --build-arg CAMSERVE_EXTRAS=bulk .` for
# `camserve bulk` (Ray Data; the RayJob image of deploy/README.md), or bulk,eval. Default: none.
ARG CAMSERVE_EXTRAS=""
# TensorFlow comes with the base image; pip keeps it (pyproject only asks for >=2.16).
RUN pip install --no-cache-dir "./${CAMSERVE_EXTRAS:+[${CAMSERVE_EXTRAS}]}" \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin camserve

COPY --chown=10001:10001 models /models

USER 10001
EXPOSE 8500 8501 8080

# The gRPC health service: SERVING once every model has loaded and compiled its graphs.
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["sh", "-c", "camserve models --server 127.0.0.1:${CAMSERVE_PORT} --health --timeout 4 || exit 1"]

STOPSIGNAL SIGTERM
ENTRYPOINT ["camserve"]
CMD ["serve"]
