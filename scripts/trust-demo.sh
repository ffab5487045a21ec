#!/usr/bin/env bash
# What a downloader can check, end to end on this project's `small` test model (random weights, no network):
# fidelity with error bars, a model card carrying the source's license, `reproduce`, and a key-based signature that
# refuses a file changed by one byte. About 2 minutes on 2 cores once the llama.cpp tools are built.
#
#   bash scripts/trust-demo.sh [WORKDIR]     (default: a new temporary folder; needs ./dev demo's .venv and openssl)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
D="${1:-$(mktemp -d -t cecai-trust-XXXXXX)}"
mkdir -p "$D"
echo "==> working in $D"

python -c "import sys; from pathlib import Path; from cecai_converter import modelgen; \
modelgen.build_model(Path(sys.argv[1]), 'llama', size='small')" "$D/small"
# The source's own card: the license and base model the model card must carry over, never invent.
printf -- '---\nlicense: apache-2.0\nbase_model: example-org/small-base\n---\n# small\n' >"$D/small/README.md"

cecai-convert convert "$D/small" --model-name small --outdir "$D/out" --imatrix auto --threads 2 \
    --precision Q8_0 --precision Q6_K --precision Q4_K_M --precision Q3_K_M --precision Q2_K --precision IQ2_XXS
cecai-convert report "$D/out" --plot "$D/plots"
cecai-convert card "$D/out" -o "$D/CARD.md"
head -20 "$D/CARD.md"
cecai-convert reproduce "$D/out/manifest.json" --threads 2

openssl ecparam -name prime256v1 -genkey -noout -out "$D/key.pem"
openssl ec -in "$D/key.pem" -pubout -out "$D/key.pub" 2>/dev/null
cp -r "$D/out" "$D/signed"
cecai-convert sign "$D/signed" --key "$D/key.pem"
cecai-convert verify-signature "$D/signed" --public-key "$D/key.pub"
python -c "import sys; p = sys.argv[1]; b = bytearray(open(p, 'rb').read()); b[100000] ^= 0xFF; \
open(p, 'wb').write(b)" "$D/signed/small.q4_k_m.gguf"
if cecai-convert verify-signature "$D/signed" --public-key "$D/key.pub"; then
    echo "FAILED: a file changed by one byte was accepted" >&2
    exit 1
fi
echo "==> the changed file was refused, as it must be; everything is in $D"
