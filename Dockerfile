# cocomix on a CUDA machine: `docker build -t cocomix . && docker run --gpus all -v $PWD/ws:/ws -e COCOMIX_WORKSPACE=/ws cocomix extract --corpus openwebtext`
FROM pytorch/pytorch:2.7.1-cuda12.6-cudnn9-runtime

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    COCOMIX_WORKSPACE=/workspace/cocomix-workspace \
    HF_HOME=/workspace/hf-cache

WORKDIR /opt/cocomix
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY storage ./storage
COPY stage1_extract ./stage1_extract
COPY stage2_pretrain ./stage2_pretrain
COPY configs ./configs
# The base image's CUDA torch satisfies the torch range, so pip keeps it.
RUN pip install --no-cache-dir '.[eval]'

WORKDIR /workspace
ENTRYPOINT ["cocomix"]
CMD ["--help"]
