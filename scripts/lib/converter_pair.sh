#!/usr/bin/env bash
# Shared body of scripts/converter_<pair>.sh: `cecai-convert run CONVERTER_DIR --pair PAIR`, exiting with its status.
# It says who is calling (CECAI_ENTRY=pair-script) and the CLI picks the backend: `--backend`, else CECAI_BACKEND,
# else this entry point's default, the pair's image as in the seed flow (cecai_converter.backends.ENTRY_DEFAULTS).
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
CECAI_ENTRY=pair-script exec cecai-convert run "$1" --pair "$pair" "${@:2}"
