# mmcore on a CUDA PyTorch image. The base image already has torch and torchvision, so
# scripts/install.sh (the same script and command CI runs, see .ci/run) keeps them and installs
# mmcore, every plugin under plugins/ and the test extras into the image's python.
#
#   cp .env.example .env    # set USERNAME, USER_UID, USER_GID (id -u; id -g) and DATA_DIR
#   docker compose build
#   docker compose run --rm mmcore mmcore run recipes/demo.toml
#
# torch: the image keeps the base image's torch 2.10.0 (built for its CUDA), while
# scripts/install.sh pins torch 2.14.1 everywhere else (TORCH_VERSION in that script). mmcore
# needs torch>=2.4, so both work; the check after the install imports the whole stack (torch,
# torchvision, mmcore, every plugin) and fails the build if this torch does not fit.
FROM pytorch/pytorch:2.10.0-cuda13.0-cudnn9-devel

# DL3064 flags the name USERNAME; it is a login name, not a secret
# hadolint ignore=DL3064
ARG USERNAME=mmcore
ARG USER_UID=1000
ARG USER_GID=1000

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    MMCORE_SYSTEM_PYTHON=1 \
    DATA_DIR=/data \
    HF_HOME=/data/.cache/huggingface \
    TORCH_HOME=/data/.cache/torch \
    MMCORE_CACHE_DIR=/data/.cache/mmcore

# The runtime user gets the host user's UID/GID, so files written to the mounted /workspace
# and /data belong to them. Ubuntu images ship a user "ubuntu" with UID 1000: remove it first.
# A UID/GID the image already has (root, say) is used as it is.
RUN if getent passwd ubuntu >/dev/null; then userdel ubuntu && rm -rf /home/ubuntu; fi \
    && if ! getent group "${USER_GID}" >/dev/null; then groupadd --gid "${USER_GID}" "${USERNAME}"; fi \
    && if ! getent passwd "${USER_UID}" >/dev/null; then \
        useradd --no-log-init --uid "${USER_UID}" --gid "${USER_GID}" --create-home --shell /bin/bash "${USERNAME}"; \
    fi

WORKDIR /workspace
COPY . /workspace

# Editable installs point at /workspace, so the checkout that docker-compose.yml mounts there
# is what runs. --test also installs Tesseract and fonts (scripts/install-ocr-deps.sh).
RUN bash scripts/install.sh --test \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /data \
    && chown -R "${USER_UID}:${USER_GID}" /workspace /data

# The container's stack imports: torch and torchvision as the base image has them, mmcore, and
# every plugin (`mmcore plugins` exits non-zero when one fails to load).
RUN python -c "import torch, torchvision, mmcore; print('torch', torch.__version__, 'torchvision', torchvision.__version__)" \
    && mmcore plugins | tee /tmp/plugins.txt \
    && if grep -q "FAILED TO LOAD" /tmp/plugins.txt; then exit 1; fi \
    && rm /tmp/plugins.txt

USER ${USER_UID}:${USER_GID}
CMD ["bash"]
