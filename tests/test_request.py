"""The one options table (request.py): every option reachable from its flag, YAML key and variable, with the
recorded source and the precedence default < YAML < environment < CLI; what derives from the table (the parser,
the configuration keys, the actions' inputs, the container's request); and a real ``run`` whose manifest records
the sources."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from cecai_converter import option_table
from cecai_converter.backends import BACKENDS, default_backend
from cecai_converter.cli import build_parser, main
from cecai_converter.config import OPTIONAL_KEYS, group_jobs, load_converter_dir
from cecai_converter.errors import ConfigError, UsageError
from cecai_converter.option_table import OPTIONS, SOURCES, spec_of
from cecai_converter.pairs import PAIRS
from cecai_converter.request import REQUEST_ENV, Request, resolve
from cecai_converter.runtime import gpu_layers

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = Path("/cfg/configurations")  # YAML paths are relative to it (never read here)
CWD = Path("/work/here")  # flag and variable paths are relative to the working directory

#: Per option, three different values as each source writes them, and what each resolves to:
#: name → (flag arguments, expected; YAML value, expected; variable text, expected). Adjacent sources differ, so the
#: precedence test sees each layer win. ``force`` has no YAML key (a one-off, not a setting of a model).
SAMPLES: dict[str, tuple[list[str], Any, Any, Any, str, Any]] = {
    "force": (["--force"], True, None, None, "0", False),
    "keep_base": (["--keep-base"], True, True, True, "no", False),
    "threads": (["--threads", "3"], 3, 5, 5, "4", 4),
    "allow_pickle": (["--allow-pickle"], True, True, True, "off", False),
    "imatrix": (["--imatrix", "auto"], "auto", "m.dat", CONFIG_DIR / "m.dat", "env.dat", CWD / "env.dat"),
    "calibration_text": (["--calibration-text", "c.txt"], CWD / "c.txt", "../c.txt", Path("/cfg/c.txt"),
                         "/abs/c.txt", Path("/abs/c.txt")),
    "fidelity": (["--no-fidelity"], False, True, True, "false", False),
    "fidelity_on": (["--fidelity-on", "check"], "check", "builder", "builder", "CHECK", "check"),
    "eval_text": (["--eval-text", "/e.txt"], Path("/e.txt"), "e.txt", CONFIG_DIR / "e.txt", "x/e.txt",
                  CWD / "x" / "e.txt"),
    "fidelity_target": (["--fidelity-target", "0.05"], 0.05, 0.2, 0.2, "1", 1.0),
    "fidelity_tokens": (["--fidelity-tokens", "all"], "all", "auto", "auto", "ALL", "all"),
    "thresholds": (["--thresholds", '{"q8_0": {"max_kld": 0.5}}'], {"Q8_0": {"max_kld": 0.5}},
                   {"Q4_K_M": {"max_kld": 1}}, {"Q4_K_M": {"max_kld": 1.0}},
                   '{"F16": {"min_top1": 0.9}}', {"F16": {"min_top1": 0.9}}),
    "reference": (["--reference"], True, False, False, "on", True),
    "n_gpu_layers": (["--n-gpu-layers", "7"], 7, 3, 3, "-1", -1),
    "tensor_types": (["--tensor-type", "ffn_down=q8_0", "--tensor-types", "attn_v=q6_k"],
                     ("ffn_down=Q8_0", "attn_v=Q6_K"), ["attn_v=q8_0"], ("attn_v=Q8_0",),
                     "ffn_down=q6_k output=q8_0", ("ffn_down=Q6_K", "output=Q8_0")),
    "text_only": (["--text-only"], True, False, False, "yes", True),
    "source_check": (["--no-source-check"], False, True, True, "0", False),
    "trust_remote_code": (["--trust-remote-code"], True, False, False, "yes", True),
}  # fmt: skip


def _parse(command: str, *flags: str) -> Any:
    """The CLI's own parser (cli.build_parser), as `cecai-convert run|convert` parses its arguments."""
    head = ["run", "/cfg"] if command == "run" else ["convert", "m", "--precision", "Q8_0", "--outdir", "o"]
    return build_parser().parse_args([*head, *flags])


def _resolve(command: str, flags: list[str], yaml_value: Any, env_text: str | None, name: str) -> Request:
    spec = spec_of(name)
    mapping = {spec.yaml_key: yaml_value} if spec.yaml_key and yaml_value is not None else {}
    environ = {spec.env: env_text} if env_text is not None else {}
    return resolve(_parse(command, *flags), mapping, environ, command=command, config_dir=CONFIG_DIR, cwd=CWD)  # type: ignore[arg-type]


def test_every_option_has_samples_and_the_names_follow_one_rule() -> None:
    assert set(SAMPLES) == {spec.name for spec in OPTIONS}, "a new option needs its row in SAMPLES"
    for spec in OPTIONS:
        assert spec.env == "CECAI_" + spec.name.upper()
        assert spec.flag == "--" + spec.name.replace("_", "-") == "--" + spec.action_input
        assert spec.yaml_key in (None, spec.name.upper())


@pytest.mark.parametrize("command", ["run", "convert"])
@pytest.mark.parametrize("name", list(SAMPLES))
def test_each_source_reaches_the_option_and_is_recorded(name: str, command: str) -> None:
    flags, from_flag, yaml_value, from_yaml, env_text, from_env = SAMPLES[name]
    spec = spec_of(name)
    default = _resolve(command, [], None, None, name)
    assert default[name] == spec.default_for(command) and default.sources[name] == "default"
    cli = _resolve(command, flags, None, None, name)
    assert (cli[name], cli.sources[name]) == (from_flag, "cli")
    env = _resolve(command, [], None, env_text, name)
    assert (env[name], env.sources[name]) == (from_env, "env")
    if spec.yaml_key is not None:
        from_file = _resolve(command, [], yaml_value, None, name)
        assert (from_file[name], from_file.sources[name]) == (from_yaml, "yaml")
    # Every other option keeps its default and says so.
    assert all(cli.sources[n] == "default" for n in SAMPLES if n != name)


@pytest.mark.parametrize("name", list(SAMPLES))
def test_precedence_default_yaml_env_cli(name: str) -> None:
    flags, from_flag, yaml_value, from_yaml, env_text, from_env = SAMPLES[name]
    has_yaml = spec_of(name).yaml_key is not None
    layers = [
        (flags, yaml_value, env_text, from_flag, "cli"),
        ([], yaml_value, env_text, from_env, "env"),
    ]
    if has_yaml:
        layers.append(([], yaml_value, None, from_yaml, "yaml"))
    layers.append(([], None, None, spec_of(name).default_for("run"), "default"))
    for flag_args, y, e, expected, source in layers:
        got = _resolve("run", flag_args, y, e, name)
        assert (got[name], got.sources[name]) == (expected, source), (flag_args, y, e)
    assert SOURCES == ("default", "yaml", "env", "cli")


def test_an_empty_variable_is_unset() -> None:
    # A composite action passes every input as its variable; an input left empty is "not given".
    got = resolve({}, {"THREADS": 2}, {"CECAI_THREADS": "", "CECAI_FIDELITY": "  "}, config_dir=CONFIG_DIR)
    assert (got["threads"], got.sources["threads"]) == (2, "yaml")
    assert got.sources["fidelity"] == "default"


@pytest.mark.parametrize(
    ("name", "text", "phrase"),
    [
        ("threads", "many", "CECAI_THREADS: 'many' is not a whole number of threads"),
        ("threads", "9999", "CECAI_THREADS: 9999 threads: give 1 to 512"),
        ("keep_base", "maybe", "CECAI_KEEP_BASE='maybe' is not a yes/no value"),
        ("n_gpu_layers", "all", "CECAI_N_GPU_LAYERS: 'all' is not a whole number"),
        ("thresholds", "{", "CECAI_THRESHOLDS: not valid JSON"),
        ("thresholds", '{"Q9": {"max_kld": 1}}', "CECAI_THRESHOLDS: unknown precision"),
    ],
)
def test_a_bad_variable_names_itself(name: str, text: str, phrase: str) -> None:
    with pytest.raises(UsageError) as info:
        resolve({}, {}, {spec_of(name).env: text})
    assert phrase in info.value.message


@pytest.mark.parametrize(
    ("key", "value", "phrase"),
    [
        ("KEEP_BASE", "yes", "KEEP_BASE must be a bool (true/false), got 'yes'"),
        ("THREADS", 0, "THREADS: 0 threads: give 1 to 512"),
        ("THREADS", "4", "THREADS must be an int, got '4'"),
        ("N_GPU_LAYERS", True, "N_GPU_LAYERS must be an int, got True"),
        ("EVAL_TEXT", 3, "EVAL_TEXT must be a file name (a string), got 3"),
        ("EVAL_TEXT", " ", "EVAL_TEXT is empty"),
        ("IMATRIX", "", "IMATRIX is empty"),
        ("THRESHOLDS", [1], "THRESHOLDS: expected a mapping PRECISION -> limits"),
    ],
)
def test_a_bad_yaml_value_names_the_file_and_key(tmp_path: Path, key: str, value: object, phrase: str) -> None:
    converter = _layout(tmp_path, pair_extra={key: value})
    with pytest.raises(ConfigError) as info:
        load_converter_dir(converter)
    assert phrase in info.value.message and "converter_args_cpu_llm_llama.yaml" in info.value.message


def test_a_bad_value_in_the_general_file_names_the_general_file(tmp_path: Path) -> None:
    converter = _layout(tmp_path, general_extra={"THREADS": 0})
    with pytest.raises(ConfigError) as info:
        load_converter_dir(converter)
    assert "converter_args.yaml: THREADS: 0 threads" in info.value.message
    assert "converter_args_cpu_llm_llama.yaml" not in info.value.message


def test_a_no_flag_overrides_a_yaml_yes(tmp_path: Path) -> None:
    """The flag wins both ways: a shipped ALLOW_PICKLE: true is undone by --no-allow-pickle."""
    converter = _layout(tmp_path, pair_extra={"ALLOW_PICKLE": True, "KEEP_BASE": True})
    (job,) = load_converter_dir(converter, ["CPU_LLM_LLAMA"])
    args = build_parser().parse_args(["run", str(converter), "--no-allow-pickle", "--no-keep-base"])
    request = resolve(args, job.settings, {}, config_dir=job.config_dir)
    assert request["allow_pickle"] is False and request["keep_base"] is False
    assert request.sources["allow_pickle"] == "cli" and request.sources["keep_base"] == "cli"


def test_a_bad_flag_is_a_usage_error_naming_it(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["run", "/nowhere", "--threads", "0"])
    assert info.value.code == 2
    assert "argument --threads: 0 threads: give 1 to 512" in capsys.readouterr().err


def test_the_parser_and_the_configuration_derive_from_the_table() -> None:
    for command in ("run", "convert", "demo"):
        parser = build_parser()
        sub = next(a for a in parser._subparsers._group_actions if a.dest == "command")  # type: ignore[union-attr]
        options = {o for a in sub.choices[command]._actions for o in a.option_strings}
        assert {spec.flag for spec in OPTIONS} <= options, command
        assert "--request" in options
    assert {k: v for k, v in OPTIONAL_KEYS.items()} == {s.yaml_key: s.help for s in OPTIONS if s.yaml_key}
    # The keys of the original layout keep their meaning; the new ones are optional.
    assert {"KEEP_BASE", "IMATRIX", "CALIBRATION_TEXT", "FIDELITY", "EVAL_TEXT", "THRESHOLDS", "ALLOW_PICKLE"} <= set(
        OPTIONAL_KEYS
    )


@pytest.mark.parametrize("path", ["action.yml", "actions/convert/action.yml"])
def test_the_action_inputs_match_the_table(path: str) -> None:
    action = yaml.safe_load((ROOT / path).read_text())
    inputs = action["inputs"]
    (convert,) = [step for step in action["runs"]["steps"] if step.get("id") == "convert"]
    option_vars = {k: v for k, v in convert["env"].items() if k.startswith("CECAI_") and k != "CECAI_NO_PROGRESS"}
    assert option_vars == {}, "a step-level CECAI_<NAME> would hide the caller's own when the input is empty"
    inputs_env = {spec.action_env: convert["env"].get(spec.action_env) for spec in OPTIONS}
    assert inputs_env == {spec.action_env: f"${{{{ inputs.{spec.action_input} }}}}" for spec in OPTIONS}
    for spec in OPTIONS:
        entry = inputs[spec.action_input]
        assert entry["default"] == "" and entry["required"] is False, spec.name
        assert " ".join(entry["description"].split()) == spec.help, spec.name


def test_the_request_round_trips_through_json() -> None:
    request = resolve(
        _parse("run", "--threads", "2", "--calibration-text", "c.txt"),
        {"THRESHOLDS": {"q8_0": {"max_kld": 1}}, "IMATRIX": "auto"},
        {"CECAI_FIDELITY": "0"},
        config_dir=CONFIG_DIR,
        cwd=CWD,
    )
    back = Request.from_json(request.to_json())
    assert back == request
    record = json.loads(request.to_json())
    assert record["values"]["calibration_text"] == str(CWD / "c.txt") and record["values"]["imatrix"] == "auto"
    assert record["sources"] == {
        **{spec.name: "default" for spec in OPTIONS},
        "threads": "cli", "calibration_text": "cli", "thresholds": "yaml", "imatrix": "yaml", "fidelity": "env",
    }  # fmt: skip
    with pytest.raises(UsageError, match="unknown options colour"):
        Request.from_json(json.dumps({"values": {"colour": 1}, "sources": {}}))
    with pytest.raises(UsageError, match="not a cecai-converter request"):
        Request.from_json("[]")
    options = request.to_options(n_gpu_layers=-1)
    assert options.compute_imatrix and options.imatrix is None and options.threads == 2 and options.n_gpu_layers == -1


def test_gpu_layer_policy_lives_with_the_request() -> None:
    warnings: list[str] = []
    given = resolve({"n_gpu_layers": 5}, {}, {})
    assert gpu_layers(given, PAIRS["GPU_LLM_LLAMA"], warnings.append) == 5 and warnings == []
    unset = resolve({}, {}, {})
    assert gpu_layers(unset, PAIRS["CPU_LLM_LLAMA"], warnings.append) == 0 and warnings == []
    import llama_cpp

    if not llama_cpp.llama_supports_gpu_offload():  # this machine: a CPU runtime verifies a GPU pair on the CPU
        assert gpu_layers(unset, PAIRS["GPU_LLM_LLAMA"], warnings.append) == 0
        assert warnings and "GPU_LLM_LLAMA is a GPU pair" in warnings[0]


def _layout(
    root: Path, *, general_extra: dict[str, Any] | None = None, pair_extra: dict[str, Any] | None = None
) -> Path:
    converter = root / "M" / "Converter"
    config = converter / "configurations"
    for pair in ("CPU_LLM_LLAMA", "ARM_LLM_LLAMA"):
        (config / pair).mkdir(parents=True)
        extra = pair_extra if pair == "CPU_LLM_LLAMA" else {}
        (config / pair / PAIRS[pair].config_filename).write_text(yaml.safe_dump({"PRECISION": "Q8_0", **(extra or {})}))
    (config / "converter_args.yaml").write_text(yaml.safe_dump({"MODEL_NAME": "tiny", **(general_extra or {})}))
    (converter / "models" / "tiny").mkdir(parents=True)
    return converter


def _requests(converter: Path) -> list[tuple[Any, Request]]:
    jobs = load_converter_dir(converter)
    return [(j, resolve({}, j.settings, {}, config_dir=j.config_dir)) for j in jobs]


def test_pairs_share_a_conversion_unless_their_requests_differ(tmp_path: Path) -> None:
    same = _requests(_layout(tmp_path / "a", general_extra={"THREADS": 2}))
    assert [len(g) for g in group_jobs(same)] == [2]
    per_target = _requests(_layout(tmp_path / "b", pair_extra={"N_GPU_LAYERS": -1}))
    assert [len(g) for g in group_jobs(per_target)] == [2], "each pair's runtime applies its own n_gpu_layers"
    different = _requests(_layout(tmp_path / "c", pair_extra={"KEEP_BASE": True}))
    assert [len(g) for g in group_jobs(different)] == [1, 1]


def test_one_list_and_one_default_of_backends(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert default_backend({}) == "local" and default_backend({"CECAI_BACKEND": "docker"}) == "docker"
    # The seed flow's entry points (per-pair scripts, nox convert sessions) convert in the pair's image.
    assert default_backend({"CECAI_ENTRY": "pair-script"}) == "docker"
    assert default_backend({"CECAI_ENTRY": "pair-script", "CECAI_BACKEND": "local"}) == "local"
    parser = build_parser()
    sub = next(a for a in parser._subparsers._group_actions if a.dest == "command")  # type: ignore[union-attr]
    for command in ("run", "convert"):
        (backend,) = [a for a in sub.choices[command]._actions if "--backend" in a.option_strings]
        assert tuple(backend.choices) == BACKENDS and backend.default is None, "the handler asks backends.py"
    assert REQUEST_ENV == "CECAI_REQUEST"


@pytest.mark.slow
def test_a_real_run_records_the_sources_in_its_manifest(cli: Any, tiny_llama: Path, tmp_path: Path) -> None:
    converter = tmp_path / "GPT_2" / "Converter"
    config = converter / "configurations"
    (config / "CPU_LLM_LLAMA").mkdir(parents=True)
    (config / "converter_args.yaml").write_text("MODEL_NAME: tiny\nFIDELITY: false\n")
    (config / "CPU_LLM_LLAMA" / "converter_args_cpu_llm_llama.yaml").write_text("PRECISION: Q8_0\nTHREADS: 1\n")
    shutil.copytree(tiny_llama, converter / "models" / "tiny")
    result = cli("run", converter, "--n-gpu-layers", "0", "--format", "json", env={"CECAI_THREADS": "2"})
    assert result.returncode == 0, result.stderr
    manifest = json.loads((converter / "outputs" / "CPU_LLM_LLAMA" / "manifest.json").read_text())
    recorded = manifest["request"]
    assert recorded["sources"] == {
        **{spec.name: "default" for spec in OPTIONS},
        "fidelity": "yaml", "threads": "env", "n_gpu_layers": "cli",
    }  # fmt: skip
    assert recorded["values"]["fidelity"] is False and recorded["values"]["threads"] == 2
    assert recorded["values"]["n_gpu_layers"] == 0 and recorded["values"]["reference"] is False
    assert [f["precision"] for f in manifest["files"]] == ["Q8_0"] and manifest["files"][0]["fidelity"] is None


def test_docs_options_table_is_current() -> None:
    text = (ROOT / "docs" / "options.md").read_text()
    table = text[text.index(option_table.DOC_BEGIN) + len(option_table.DOC_BEGIN) : text.index(option_table.DOC_END)]
    assert table.strip() == option_table.markdown_table(), "regenerate the table from option_table.markdown_table()"


def test_request_flag_refuses_other_options_and_names_a_missing_source(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    converter = _layout(tmp_path)
    saved = tmp_path / "request.json"
    saved.write_text(resolve({}, {}, {}).to_json())
    assert main(["run", str(converter), "--request", str(saved), "--threads", "2"]) == 2
    assert "--request carries every option; --threads would be ignored" in capsys.readouterr().err
    monkeypatch.delenv("CECAI_NO_SUCH_REQUEST", raising=False)
    assert main(["run", str(converter), "--request", "env:CECAI_NO_SUCH_REQUEST"]) == 2
    assert "the variable CECAI_NO_SUCH_REQUEST is not set" in capsys.readouterr().err
    saved.write_text('{"values": {"threads": 2}}')
    assert main(["run", str(converter), "--request", str(saved)]) == 2
    assert "is not a cecai-converter request" in capsys.readouterr().err
