#!/usr/bin/env bash
# One set-up command: CPU torch 2.13.0 when no torch is installed (GPU machines bring their own),
# then mea with every integration and the test tools.
set -euo pipefail
cd "$(dirname "$0")"
python3 -c "import torch" 2>/dev/null || python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e ".[all,dev]"
