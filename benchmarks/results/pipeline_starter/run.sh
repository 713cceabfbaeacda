#!/usr/bin/env bash
set -euo pipefail
echo -5 > /proc/self/autogroup || true
cd /tmp/fresh
export MOBILELLM_HOME=/tmp/fresh/home TORCH_EXTENSIONS_DIR=/tmp/fresh/torch_ext HF_HOME=/tmp/fresh/hf
start=$(date +%s)
python -m venv venv && source venv/bin/activate
cd mobilellm
pip install -q -c constraints.txt -e ".[pipeline]" 2>&1 | grep -v WARNING || true
t_install=$(date +%s); echo "INSTALL $((t_install-start)) s"
mobilellm pipeline
end=$(date +%s); echo "PIPELINE $((end-t_install)) s; TOTAL $((end-start)) s"
