FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential git \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY events ./events
COPY services ./services
ARG GPU_EXTRA=1
RUN pip install --no-cache-dir torch && pip install --no-cache-dir ".[train]"
# vllm, deepspeed and flash-attn need CUDA; flash-attn compiles for a while.
RUN if [ "$GPU_EXTRA" = "1" ]; then pip install --no-cache-dir ".[gpu]"; fi
