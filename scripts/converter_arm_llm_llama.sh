#!/usr/bin/env bash
# Convert a Converter folder for ARM_LLM_LLAMA, as the original flow did:
#
#   bash scripts/converter_arm_llm_llama.sh /path/to/<NAME>/Converter [cecai-convert run options]
#
# A thin caller of the CLI (see lib/converter_pair.sh), which picks the backend (CECAI_BACKEND=docker: the
# pair's image).
exec bash "$(dirname "$0")/lib/converter_pair.sh" ARM_LLM_LLAMA "$@"
