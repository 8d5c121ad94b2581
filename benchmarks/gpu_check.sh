#!/usr/bin/env bash
# The GPU check (see benchmarks/gpu_check.py): exactness tests on CUDA, then S3T vs PEFT throughput and peak memory.
set -euo pipefail
cd "$(dirname "$0")/.." && PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} exec "${PYTHON:-.venv/bin/python}" benchmarks/gpu_check.py "$@"
