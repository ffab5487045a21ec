#!/usr/bin/env bash
# Convert a Converter folder for AGX_ORIN_LLM_LLAMA, as the original flow did:
#
#   bash scripts/converter_agx_orin_llm_llama.sh /path/to/<NAME>/Converter [cecai-convert run options]
#
# A thin caller of the CLI: it runs `cecai-convert run` for this pair in the pair's image (the docker backend;
# CECAI_BACKEND=local converts on this machine instead) and exits with its status.
set -euo pipefail
if [ "$#" -lt 1 ]; then
    echo "usage: $0 /path/to/<NAME>/Converter [cecai-convert run options]" >&2
    exit 2
fi
if ! command -v cecai-convert >/dev/null 2>&1; then
    echo "error: cecai-convert is not on PATH; install it: pip install 'cecai-converter[docker]'" >&2
    exit 127
fi
exec cecai-convert run "$1" --pair AGX_ORIN_LLM_LLAMA --backend "${CECAI_BACKEND:-docker}" "${@:2}"
