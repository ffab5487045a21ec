#!/usr/bin/env bash
# Convert a Converter folder for CPU_LLM_LLAMA, as the original flow did:
#
#   bash scripts/converter_cpu_llm_llama.sh /path/to/<NAME>/Converter [cecai-convert run options]
#
# A thin caller of the CLI (see lib/converter_pair.sh), which picks the backend (CECAI_BACKEND=docker: the
# pair's image).
exec bash "$(dirname "$0")/lib/converter_pair.sh" CPU_LLM_LLAMA "$@"
