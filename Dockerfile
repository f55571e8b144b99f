# The image Kubernetes pods (and local_docker) run: this repository at /app (its WORKDIR,
# so train_localsgd.py resolves), installed with its dependencies. The experiment YAML is
# not needed inside: the component embeds it in every role's command (--config-b64).
# Not built in this project's CI (no Docker there).
FROM python:3.11-slim
WORKDIR /app
# CPU wheels shown; for GPUs use a CUDA build of torch (e.g. --index-url .../whl/cu124).
RUN pip install --no-cache-dir torch==2.14.1 torchvision==0.29.1
COPY . /app
RUN pip install --no-cache-dir -e .
