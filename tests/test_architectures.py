"""Three architectures through the real converter and quantizer, loaded by llama-cpp-python, checked against
transformers.

Tolerances: on these models logits are about ±1.5. The F32 GGUF must agree with transformers to 2e-3 absolute
(measured: ~5e-4; the difference is float summation order), the F16 file to 2e-2, and both must pick the same
top token at every position.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

ARCHS = ("llama", "qwen2", "phi3")
PRECISIONS = ("F32", "F16", "Q8_0", "Q4_K_M")
TOLERANCE = {"F32": 2e-3, "F16": 2e-2}
TOKENS = [1, 342, 328, 354, 267, 279, 339, 362, 17, 55, 80, 120]


@pytest.fixture(scope="module", params=ARCHS)
def converted(request, model_factory, tmp_path_factory, cli):
    model = model_factory(request.param)
    outdir = tmp_path_factory.mktemp(f"out-{request.param}")
    # The default conversion, source check included: every architecture's base must be faithful to its source.
    args = ["convert", model, "--outdir", outdir, "--no-fidelity", "--format", "json"]
    for p in PRECISIONS:
        args += ["--precision", p]
    result = cli(*args)
    assert result.returncode == 0, result.stderr
    return request.param, model, outdir, json.loads(result.stdout)


def test_every_precision_is_produced_verified_and_recorded(converted):
    arch, _model, outdir, result = converted
    manifest = json.loads(Path(result["manifest"]).read_text())
    by_precision = {f["precision"]: f for f in manifest["files"]}
    assert set(by_precision) == set(PRECISIONS)
    expected_arch = {"llama": "llama", "qwen2": "qwen2", "phi3": "phi3"}[arch]
    for precision, entry in by_precision.items():
        path = outdir / entry["name"]
        assert entry["name"] == f"{arch}-float32-tiny-0.{precision.lower()}.gguf"
        assert path.stat().st_size == entry["bytes"]
        assert entry["architecture"] == expected_arch
        assert len(entry["verification"]["generated_tokens"]) == 8
        assert entry["tensor_count"] > 0
    # quantized files are smaller, in the order of their bits per weight
    sizes = [by_precision[p]["bytes"] for p in PRECISIONS]
    assert sizes == sorted(sizes, reverse=True)
    assert manifest["toolchain"]["llama_cpp_python"] == "0.3.36"
    assert manifest["base"] == {"precision": "F32", "kept": True}
    parity = manifest["source_parity"]
    assert parity["checked"] and parity["passed"], parity["failures"]
    assert parity["base"] == by_precision["F32"]["name"]
    assert parity["logits"]["nmse"] < 1e-4 and parity["tokenizer"]["n_differing"] == 0
    assert not list(outdir.glob(".cecai-tmp-*"))


@pytest.mark.parametrize("precision", ["F32", "F16"])
def test_logits_match_transformers(converted, precision):
    import llama_cpp
    import torch
    import transformers

    arch, model_dir, outdir, _ = converted
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        reference = model(torch.tensor([TOKENS])).logits[0].numpy()
    gguf = next(outdir.glob(f"*.{precision.lower()}.gguf"))
    llm = llama_cpp.Llama(str(gguf), n_ctx=64, logits_all=True, verbose=False)
    llm.eval(TOKENS)
    ours = np.array(llm.scores[: len(TOKENS)])
    diff = float(np.abs(ours - reference).max())
    assert diff < TOLERANCE[precision], f"{arch} {precision}: max |Δlogit| = {diff}"
    assert (ours.argmax(-1) == reference.argmax(-1)).all()
