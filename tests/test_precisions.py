"""The precision table agrees with llama.cpp (its gguf-py and the installed runtime) and parses users' names."""

from __future__ import annotations

import importlib.util
import sys

import pytest
from conftest import require_module

from cecai_converter.errors import ConfigError
from cecai_converter.precisions import ALIASES, CONVERTER_OUTTYPES, PRECISIONS, parse_precision, parse_precisions
from cecai_converter.toolchain import ensure_converter


def _converter_gguf():
    """The converter's own gguf-py (the pinned llama.cpp's), loaded under another name."""
    path = ensure_converter() / "gguf-py" / "gguf" / "constants.py"
    spec = importlib.util.spec_from_file_location("pinned_gguf_constants", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["pinned_gguf_constants"] = module
    spec.loader.exec_module(module)
    return module


def test_ftypes_match_the_pinned_gguf_py():
    constants = _converter_gguf()
    for info in PRECISIONS.values():
        member = "ALL_F32" if info.name == "F32" else f"MOSTLY_{info.name}"
        assert constants.LlamaFileType[member] == info.ftype, info.name


def test_ftypes_match_the_installed_runtime():
    llama_cpp = require_module("llama", "llama_cpp")
    for info in PRECISIONS.values():
        const = "LLAMA_FTYPE_ALL_F32" if info.name == "F32" else f"LLAMA_FTYPE_MOSTLY_{info.name}"
        assert getattr(llama_cpp, const) == info.ftype, info.name


def test_converter_outtypes_are_what_the_converter_accepts():
    text = (ensure_converter() / "convert_hf_to_gguf.py").read_text()
    for name in CONVERTER_OUTTYPES:
        assert f'"{PRECISIONS[name].converter_outtype}"' in text


def test_imatrix_requirement_matches_llama_cpp_table():
    # llama.cpp's tensor_requires_imatrix: IQ1_S/M, IQ2_XXS/XS/S (and IQ2_M, whose base type is IQ2_S),
    # IQ3_XXS, and Q2_K inside Q2_K_S.
    assert {p.name for p in PRECISIONS.values() if p.needs_imatrix} == {
        "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "Q2_K_S",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("written", "expected"),
    [("q4_k_m", "Q4_K_M"), ("FP16", "F16"), ("fp32", "F32"), ("Q4_K", "Q4_K_M"), (" bf16 ", "BF16"), ("q8-0", "Q8_0")],
)
def test_parse_accepts_old_and_llama_cpp_spellings(written, expected):
    assert parse_precision(written).name == expected


def test_unknown_precision_is_an_error_listing_valid_ones():
    with pytest.raises(ConfigError) as info:
        parse_precision("Q4_KM")
    assert "unknown precision 'Q4_KM'" in info.value.message
    assert "Did you mean Q4_K_M?" in info.value.message
    assert "Q8_0" in info.value.hint and "IQ4_XS" in info.value.hint


@pytest.mark.parametrize("bad", ["", None, 16, []])
def test_non_names_are_rejected(bad):
    with pytest.raises(ConfigError):
        parse_precisions(bad)


def test_list_keeps_order_and_drops_repeats():
    assert [p.name for p in parse_precisions(["q4_k_m", "Q8_0", "Q4_K"])] == ["Q4_K_M", "Q8_0"]


def test_table_is_ordered_by_size_and_aliases_resolve():
    measured = [p.bpw for p in PRECISIONS.values() if p.bpw_measured]
    assert measured == sorted(measured, reverse=True)
    assert all(target in PRECISIONS for target in ALIASES.values())
    assert PRECISIONS["Q4_K_M"].suffix == "q4_k_m"
