#!/usr/bin/env bash
# Shared body of scripts/converter_<pair>.sh: `cecai-convert run CONVERTER_DIR --pair PAIR`, exiting with its status.
# The CLI picks the backend (CECAI_BACKEND, else local; `--backend docker` after the folder converts in the pair's
# image): this script decides nothing.
#
#   bash scripts/lib/converter_pair.sh PAIR /path/to/<NAME>/Converter [cecai-convert run options]
set -euo pipefail
pair="$1"
shift
if [ "$#" -lt 1 ]; then
    echo "usage: converter_${pair,,}.sh /path/to/<NAME>/Converter [cecai-convert run options]" >&2
    exit 2
fi
if ! command -v cecai-convert >/dev/null 2>&1; then
    echo "error: cecai-convert is not on PATH; install it: pip install 'cecai-converter[docker]'" >&2
    exit 127
fi
exec cecai-convert run "$1" --pair "$pair" "${@:2}"
