"""The GitHub Actions adapter, and the composite actions' steps run the way a runner runs them."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from github_stand_in import FakeGitHubServer
from test_publish import make_output

from cecai_converter import gha, job_summary
from cecai_converter.errors import ConfigError
from cecai_converter.manifest import Manifest

ROOT = Path(__file__).resolve().parents[1]


def read_outputs(path: Path) -> dict[str, str]:
    """Parse $GITHUB_OUTPUT the way the runner does: key=value lines and key<<DELIM heredocs."""
    values: dict[str, str] = {}
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if "<<" in line and ("=" not in line or line.index("<<") < line.index("=")):
            key, delim = line.split("<<", 1)
            end = lines.index(delim, i + 1)
            values[key] = "\n".join(lines[i + 1 : end])
            i = end + 1
        else:
            key, value = line.split("=", 1)
            values[key] = value
            i += 1
    return values


# ----------------------------------------------------------------------------------------- the protocol


def test_annotations_escape_newlines_and_properties():
    line = gha.annotation("error", "50% done\nnext line\r", title="bad: input, really")
    assert line == "::error title=bad%3A input%2C really::50%25 done%0Anext line%0D"
    assert "\n" not in line


def test_error_annotation_carries_title_message_and_hint():
    line = gha.error_annotation(ConfigError("unknown key 'modles'", hint="known keys: models"))
    assert line == "::error title=cecai-converter%3A bad configuration::unknown key 'modles'%0Ahint: known keys: models"


def test_outputs_use_a_delimiter_for_multiline_values(tmp_path):
    out = tmp_path / "out"
    gha.write_outputs(out, {"one": "a=b", "many": "x\ny\nz"})
    text = out.read_text()
    assert text.startswith("one=a=b\nmany<<ghadelimiter_")
    assert read_outputs(out) == {"one": "a=b", "many": "x\ny\nz"}
    with pytest.raises(Exception, match="GITHUB_OUTPUT is not set"):
        gha.write_outputs(None, {"a": "b"})


def test_tokens_are_masked_first():
    stream = io.StringIO()
    gha.mask_secrets({"HF_TOKEN": "hf_secret", "GITHUB_TOKEN": "", "INPUT_HF_TOKEN": "l1\nl2", "OTHER": "x"}, stream)
    lines = stream.getvalue().splitlines()
    assert lines == ["::add-mask::hf_secret", "::add-mask::l1", "::add-mask::l2"]


def test_split_list_accepts_spaces_commas_and_newlines():
    assert gha.split_list("Q8_0, Q4_K_M\n Q5_K_M  ") == ["Q8_0", "Q4_K_M", "Q5_K_M"]
    assert gha.split_list("") == []


def test_conversion_summary_table():
    result = {
        "files": [
            {"name": "m.q8_0.gguf", "precision": "Q8_0", "bytes": 1_500_000, "sha256": "ab" * 32},
            {"name": "m.q4_k_m.gguf", "precision": "Q4_K_M", "bytes": 900, "sha256": "cd" * 32},
        ]
    }
    # verify_s and fidelity_s are keyed by runtime label, as the pipeline writes them ("all" for one runtime)
    timings = {"convert_s": 2.0, "quantize_s": {"Q4_K_M": 3.0}, "verify_s": {"all": 1.5}, "fidelity_s": {"all": 4.4}}
    manifest = Manifest.from_dict({"schema": 1, "timings": {**timings, "total_s": 9}})
    md = job_summary.conversion_summary(result, manifest, title="m (CPU_LLM_LLAMA)")
    assert "| File | Precision | Size | SHA-256 | Time |" in md
    assert "| `m.q8_0.gguf` | Q8_0 | 1.5 MB | `abababababab` | 2.0 s |" in md  # written by the converter
    assert "| `m.q4_k_m.gguf` | Q4_K_M | 900 B | `cdcdcdcdcdcd` | 3.0 s |" in md
    assert "Verification (load and generate, every file): 1.5 s." in md
    assert "Fidelity (against the base, every new file): 4.4 s." in md
    assert "Total: 9.0 s." in md


def test_conversion_summary_names_each_runtime_verified_on():
    timings = {"verify_s": {"n_gpu_layers=0": 1.0, "n_gpu_layers=-1": 2.0}}
    md = job_summary.conversion_summary({"files": []}, Manifest.from_dict({"schema": 1, "timings": timings}), title="t")
    assert "Verification (load and generate, every file): 1.0 s (n_gpu_layers=0), 2.0 s (n_gpu_layers=-1)." in md


# ------------------------------------------------------------------------------------------ the commands


def runner_env(tmp_path: Path, **inputs: str) -> dict[str, str]:
    (tmp_path / "summary.md").touch()
    (tmp_path / "output").touch()
    env = {"GITHUB_OUTPUT": str(tmp_path / "output"), "GITHUB_STEP_SUMMARY": str(tmp_path / "summary.md")}
    env.update({f"INPUT_{k.upper()}": v for k, v in inputs.items()})
    return env


def test_plan_writes_the_matrix_and_a_summary(tmp_path):
    batch = tmp_path / "conversions.yaml"
    batch.write_text("models: [{repo: o/tiny, precisions: [Q8_0], pairs: [cpu, agx-orin]}]\n")
    env = runner_env(tmp_path, batch=str(batch))
    assert gha.main(["plan"], env=env, stdout=io.StringIO()) == 0
    outputs = read_outputs(tmp_path / "output")
    matrix = json.loads(outputs["matrix"])
    assert outputs["count"] == outputs["check-count"] == "2" and outputs["make-count"] == "1"
    assert json.loads(outputs["check"]) == matrix
    assert matrix["include"][1]["runner_labels"] == ["self-hosted", "linux", "ARM64", "agx-orin"]
    assert [e["id"] for e in json.loads(outputs["make"])["include"]] == ["tiny"]
    assert "### Conversion plan: 1 make job(s), 2 check job(s)" in (tmp_path / "summary.md").read_text()


def test_the_adapter_shares_the_cli_boundary_without_importing_the_cli(tmp_path):
    """gha.main turns a ConverterError into an annotation, a summary and the CLI's exit code through the same
    errors.boundary as cli.main, and never imports cli (which registers gha as a command)."""
    env = {**os.environ, **runner_env(tmp_path, model=str(tmp_path / "missing"), precisions="Q8_0")}
    code = (
        "import sys; from cecai_converter import gha; rc = gha.main(['convert']); "
        "sys.exit(rc + 100 * ('cecai_converter.cli' in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr  # a usage error; and cli was never imported
    assert "::error title=cecai-converter%3A bad input::model not found" in proc.stdout  # raised by the handler
    assert "bad input" in (tmp_path / "summary.md").read_text()


def test_plan_can_skip_a_missing_batch_file(tmp_path):
    env = runner_env(tmp_path, batch=str(tmp_path / "none.yaml"), if_missing="skip")
    stdout = io.StringIO()
    assert gha.main(["plan"], env=env, stdout=stdout) == 0
    assert read_outputs(tmp_path / "output")["count"] == "0"
    assert stdout.getvalue().startswith("::notice::")


def test_a_bad_batch_file_becomes_an_annotation_and_a_summary(tmp_path):
    batch = tmp_path / "conversions.yaml"
    batch.write_text("modles: []\n")
    stdout = io.StringIO()
    assert gha.main(["plan"], env=runner_env(tmp_path, batch=str(batch)), stdout=stdout) == 2
    line = stdout.getvalue().splitlines()[-1]
    assert line.startswith("::error title=cecai-converter%3A bad configuration::")
    assert "Did you mean 'models'?" in line
    summary = (tmp_path / "summary.md").read_text()
    assert "planning failed" in summary and "**What to do:**" in summary


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"model": "", "precisions": "Q8_0"}, "the `model` input is empty"),
        ({"model": "m", "precisions": " , "}, "the `precisions` input is empty"),
        ({"model": "m", "precisions": "Q8_0", "backend": "podman"}, "must be local or docker"),
        ({"model": "m", "precisions": "Q8_0", "backend": "docker"}, "neither a local folder nor a Hub repo id"),
    ],
)
def test_convert_rejects_bad_inputs_before_working(tmp_path, inputs, message):
    stdout = io.StringIO()
    assert gha.main(["convert"], env=runner_env(tmp_path, **inputs), stdout=stdout) == 2
    assert message.replace("`", "") in stdout.getvalue().replace("`", "")


def test_publish_masks_the_token_and_reports_the_release(tmp_path):
    with FakeGitHubServer("octo/models", "ghs_secret_value") as server:
        out = make_output(tmp_path / "artifacts" / "gguf-tiny-cpu")
        env = runner_env(tmp_path, path=str(tmp_path / "artifacts" / "*"), tag="v3")
        env.update({"GITHUB_TOKEN": "ghs_secret_value", "GITHUB_API_URL": server.api_url})
        env["GITHUB_REPOSITORY"] = "octo/models"
        stdout = io.StringIO()
        assert gha.main(["publish"], env=env, stdout=stdout) == 0, stdout.getvalue()
        log = stdout.getvalue()
        assert log.splitlines()[0] == "::add-mask::ghs_secret_value"
        assert log.count("ghs_secret_value") == 1
        outputs = read_outputs(tmp_path / "output")
        assert "tiny.q8_0.gguf" in json.loads(outputs["uploaded"])
        assert "| `tiny.q8_0.gguf` | uploaded |" in (tmp_path / "summary.md").read_text()
        assert out.is_dir()


# ------------------------------------------------------------------ composite steps, run as a runner would


_EXPR = re.compile(r"\$\{\{\s*([^}]+?)\s*\}\}")


def run_composite(
    action: Path,
    inputs: dict[str, str],
    tmp_path: Path,
    *,
    path_dir: Path | None = None,
    env: dict[str, str] | None = None,
    github: dict[str, str] | None = None,
) -> dict:
    """Run a composite action's `run:` steps like the runner: defaults applied, `${{ inputs.* }}` (and the
    `${{ github.* }}` values in ``github``, by default an action used as `cecai/cecai-converter@v1`) evaluated into
    env:, `if: inputs.x == 'y'` (or `steps.s.outputs.o != ''`) honoured, GITHUB_OUTPUT per step, one
    GITHUB_STEP_SUMMARY, GITHUB_ACTION_PATH.
    ``env`` is the job's environment (e.g. GITHUB_API_URL), under each step's own env:."""
    job_env = dict(env or {})
    context = {"action_repository": "cecai/cecai-converter", "action_ref": "v1", **(github or {})}
    doc = yaml.safe_load(action.read_text(encoding="utf-8"))
    values = {name: str(spec.get("default", "")) for name, spec in doc["inputs"].items()}
    values.update(inputs)
    summary = tmp_path / "summary.md"
    summary.touch()
    steps: dict[str, dict[str, str]] = {}
    stdout = []

    def evaluate(text: str) -> str:
        def one(m: re.Match[str]) -> str:
            expr = m[1]
            if expr.startswith("inputs."):
                return values[expr.removeprefix("inputs.")]
            if expr.startswith("steps."):
                step_id, _, key = expr.removeprefix("steps.").split(".", 2)
                return steps.get(step_id, {}).get(key, "")
            if expr.startswith("github.") and expr.removeprefix("github.") in context:
                return context[expr.removeprefix("github.")]
            if expr == "runner.environment":  # these steps run on this machine, as on a self-hosted runner
                return "self-hosted"
            raise AssertionError(f"unsupported expression {expr}")

        return _EXPR.sub(one, str(text))

    for index, step in enumerate(doc["runs"]["steps"]):
        condition = step.get("if")
        if condition:
            holds = True
            for part in condition.strip().split(" && "):  # comparisons joined by &&
                m = re.fullmatch(r"((?:inputs|steps|runner)\.[\w.-]+) (==|!=) '([^']*)'", part)
                assert m, f"unsupported condition {condition}"
                holds &= (evaluate("${{ " + m[1] + " }}") == m[3]) == (m[2] == "==")
            if not holds:
                continue
        output = tmp_path / f"output-{index}"
        output.touch()
        step_env = {k: v for k, v in os.environ.items() if not k.startswith(("INPUT_", "GITHUB_"))}
        step_env.update(job_env)
        step_env.update({k: evaluate(v) for k, v in (step.get("env") or {}).items()})
        step_env.update(
            {
                "GITHUB_OUTPUT": str(output),
                "GITHUB_STEP_SUMMARY": str(summary),
                "GITHUB_ACTION_PATH": str(action.parent),
                "GITHUB_PATH": str(tmp_path / "path"),
                "RUNNER_OS": "Linux",
                "RUNNER_TEMP": str(tmp_path),
            }
        )
        if path_dir is not None:
            step_env["PATH"] = f"{path_dir}{os.pathsep}{step_env['PATH']}"
        assert "${{" not in step["run"]
        proc = subprocess.run(
            ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", step["run"]],
            env=step_env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            check=False,
        )
        stdout.append(proc.stdout)
        if proc.returncode != 0:
            return {"returncode": proc.returncode, "stdout": "".join(stdout), "stderr": proc.stderr, "steps": steps}
        if step.get("id"):
            steps[step["id"]] = read_outputs(output)
    outputs = {name: evaluate(spec["value"]) for name, spec in (doc.get("outputs") or {}).items()}
    return {"returncode": 0, "stdout": "".join(stdout), "outputs": outputs, "summary": summary.read_text()}


def test_plan_action_runs_as_on_a_runner(tmp_path, cli_on_path):
    (tmp_path / "conversions.yaml").write_text("models: [{repo: o/tiny, precisions: Q8_0, pairs: [cpu, gpu]}]\n")
    result = run_composite(
        ROOT / "actions" / "plan" / "action.yml", {"install": "false"}, tmp_path, path_dir=cli_on_path
    )
    assert result["returncode"] == 0, result
    assert result["outputs"]["count"] == "2"
    assert [e["id"] for e in json.loads(result["outputs"]["matrix"])["include"]] == ["tiny-cpu", "tiny-gpu"]


def test_convert_action_fails_with_an_annotation_on_a_bad_precision(tmp_path, cli_on_path):
    inputs = {"model": "o/m", "precisions": "Q4_K_MM", "install": "false"}
    result = run_composite(ROOT / "action.yml", inputs, tmp_path, path_dir=cli_on_path)
    assert result["returncode"] == 2
    assert "::error title=cecai-converter%3A bad configuration::" in result["stdout"]
    assert "Q4_K_MM" in result["stdout"]


@pytest.mark.slow
def test_convert_action_on_a_real_model_with_the_local_backend(tmp_path, cli_on_path):
    from cecai_converter.modelgen import build_model

    model = build_model(tmp_path / "models" / "tiny", "llama", seed=0, size="tiny")
    inputs = {
        "model": str(model),
        "precisions": "Q8_0, Q4_K_M",
        "pair": "CPU_LLM_LLAMA",
        "outdir": "out",
        "install": "false",
    }
    result = run_composite(ROOT / "actions" / "convert" / "action.yml", inputs, tmp_path, path_dir=cli_on_path)
    assert result["returncode"] == 0, result
    files = result["outputs"]["files"].splitlines()
    assert len(files) == 2 and all(f.endswith(".gguf") for f in files)
    assert json.loads(result["outputs"]["files-json"]) == files
    manifest = json.loads((tmp_path / result["outputs"]["manifest"]).read_text())
    assert {f["precision"] for f in manifest["files"]} == {"Q8_0", "Q4_K_M"}
    summary = result["summary"]
    assert "| File | Precision | Size | SHA-256 | Time |" in summary
    for entry in manifest["files"]:
        assert f"`{entry['sha256'][:12]}`" in summary


@pytest.mark.slow
def test_a_gpu_pair_on_a_cpu_only_runtime_is_a_warning_annotation_and_a_summary_line(tmp_path, tiny_llama, monkeypatch):
    import llama_cpp

    if llama_cpp.llama_supports_gpu_offload():
        pytest.skip("this llama-cpp-python can offload to a GPU")
    env = runner_env(
        tmp_path, model=str(tiny_llama), precisions="Q8_0", pair="GPU_LLM_LLAMA", outdir="gguf-out", model_name="tiny"
    )
    stdout = io.StringIO()
    monkeypatch.chdir(tmp_path)  # a runner's workspace: outdir relative to it
    assert gha.main(["convert"], env=env, stdout=stdout) == 0
    annotations = [line for line in stdout.getvalue().splitlines() if line.startswith("::warning")]
    assert len(annotations) == 1
    assert "GPU_LLM_LLAMA is a GPU pair but this llama-cpp-python has no GPU" in annotations[0]
    assert "> [!WARNING]" in (tmp_path / "summary.md").read_text()
    outputs = read_outputs(tmp_path / "output")
    assert outputs["outdir"] == "gguf-out" and outputs["manifest"] == "gguf-out/manifest.json"
    assert outputs["files"] == "gguf-out/tiny.q8_0.gguf"


def test_an_empty_option_input_leaves_the_callers_variable_in_force() -> None:
    """A workflow's `env: CECAI_THREADS: 2` survives an action input left empty; a given input wins."""
    environ = {"CECAI_THREADS": "2", "CECAI_KEEP_BASE": "1"}
    gha.options_from_inputs({"INPUT_THREADS": "", "INPUT_KEEP_BASE": "  ", "INPUT_FIDELITY": "false"}, environ)
    assert environ == {"CECAI_THREADS": "2", "CECAI_KEEP_BASE": "1", "CECAI_FIDELITY": "false"}
