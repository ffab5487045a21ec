"""Hostile input, second pass (issue 16): one test (or more) per root cause, each named after it.

The Hub and GitHub are stand-ins (tests/hub_stand_in.py, tests/github_stand_in.py): neither is reachable from the
test machines, and a hostile endpoint is what these tests need anyway. Markdown is rendered with markdown-it-py
(CommonMark with tables, raw HTML on, as GitHub and the Hub render it) to see what a reader would get.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import run_cli
from github_stand_in import BODY_LIMIT, FakeGitHubServer
from hub_stand_in import HubStandIn
from markdown_it import MarkdownIt
from test_publish import REPO, TOKEN, make_gguf, make_output
from test_publish_checks import made, uploads, write_record

from cecai_converter import job_summary
from cecai_converter.card import render_card
from cecai_converter.errors import ChecksFailed, ConfigError, PublishFailed, UsageError
from cecai_converter.manifest import Manifest
from cecai_converter.markdown import code, code_block, inline
from cecai_converter.release.notes import release_notes
from cecai_converter.release.publish import publish_release
from cecai_converter.toolchain import cache_root, toolchain_info

# -- helpers --------------------------------------------------------------------------------------------------------

_MD = MarkdownIt("commonmark", {"html": True}).enable(["table", "strikethrough"])
#: What a value from a record must never become once rendered.
_LIVE = {"html_inline", "html_block", "link_open", "image", "s_open", "em_open", "heading_open"}


def _tokens(markdown: str) -> Iterator[Any]:
    for token in _MD.parse(markdown):
        yield token
        yield from token.children or []


def assert_shown_not_rendered(markdown: str, *, headings: int | None = None) -> None:
    """No HTML, link, emphasis from the values; every table row has its header's number of cells."""
    live = [
        (t.type, t.content)
        for t in _tokens(markdown)
        if t.type in _LIVE - {"heading_open"} and not t.content.startswith(("<!-- cecai-converter", "<!-- /cecai"))
    ]
    assert not live, live
    if headings is not None:
        assert sum(t.type == "heading_open" for t in _tokens(markdown)) == headings
    cells, width = 0, None
    for token in _MD.parse(markdown):
        if token.type == "tr_open":
            cells = 0
        elif token.type in ("th_open", "td_open"):
            cells += 1
        elif token.type == "tr_close":
            width = cells if width is None else width
            assert cells == width, markdown
        elif token.type == "table_close":
            width = None


def texts(markdown: str) -> str:
    """What a reader sees: the text and code of every inline token, joined."""
    return " ".join(t.content for t in _tokens(markdown) if t.type in ("text", "code_inline", "fence"))


HOSTILE = "x|y <script>alert(1)</script> [click](https://evil.example) `` ``` *b* # $m$ &amp;"


# -- 5. the Hub's answers are trusted in paths ----------------------------------------------------------------------


@pytest.fixture
def hub() -> Iterator[HubStandIn]:
    with HubStandIn() as server:
        yield server


def _convert_from_hub(hub: HubStandIn, tmp_path: Path) -> Any:
    env = {
        "HF_ENDPOINT": hub.endpoint,
        "HF_HOME": str(tmp_path / "hf-home"),
        "XDG_CACHE_HOME": str(tmp_path / "xdg"),
        "CECAI_TOOLCHAIN_DIR": str(cache_root()),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_ETAG_TIMEOUT": "5",
        "HF_HUB_DOWNLOAD_TIMEOUT": "5",
    }
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"):
        env[name] = ""
    out = tmp_path / "out"
    return run_cli(
        "convert", "octo/tiny", "--precision", "Q8_0", "--outdir", out, "--no-fidelity", env=env, timeout=300
    )


def _files_outside(tmp_path: Path, name: str) -> list[Path]:
    return [p for p in tmp_path.rglob(name) if "hf-home" not in p.parts]


def test_hub_sha_not_a_commit_id_is_refused_hub_stand_in(hub: HubStandIn, tmp_path: Path) -> None:
    # The endpoint answers a `sha` that climbs out of the download folder: it must never become a path.
    empty = tmp_path / "empty"
    empty.mkdir()
    repo = hub.add_repo("octo/tiny", empty, extra_files={"config.json": b"{}", "marker.json": b"{}"})
    repo.sha = "../../../escaped"
    repo.refs = {"main": repo.sha}
    result = _convert_from_hub(hub, tmp_path)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "commit id '../../../escaped' is not 40 lowercase hex digits" in result.stderr
    assert not (tmp_path / "escaped").exists() and not _files_outside(tmp_path, "marker.json")
    assert not hub.resolve_requests("GET"), "nothing may be downloaded"


def test_hub_sha_file_name_with_dotdot_is_refused_hub_stand_in(hub: HubStandIn, tmp_path: Path) -> None:
    # A listed file name with `..` would land beside the download folder (huggingface_hub itself refuses some).
    empty = tmp_path / "empty"
    empty.mkdir()
    hub.add_repo("octo/tiny", empty, extra_files={"config.json": b"{}", "../../escaped.json": b"{}"})
    result = _convert_from_hub(hub, tmp_path)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "no plain relative path" in result.stderr and "'../../escaped.json'" in result.stderr
    assert not _files_outside(tmp_path, "escaped.json")
    assert not hub.resolve_requests("GET")


def test_hub_sha_answer_checks_accept_real_listings() -> None:
    from cecai_converter.source import _hub_answer_problem

    sha = "0123456789abcdef0123456789abcdef01234567"
    names: list[object] = ["config.json", "sub/tokenizer.json", ".ipynb_checkpoints/x.json", "README.md", None]
    assert _hub_answer_problem(sha, names) is None
    assert _hub_answer_problem(sha.upper(), []) is not None  # the Hub answers lowercase hex
    assert _hub_answer_problem(None, []) is not None
    assert "relative" in str(_hub_answer_problem(sha, ["/etc/x.json"]))
    assert _hub_answer_problem(sha, ["a/./b.json"]) is not None
    assert _hub_answer_problem(sha, ["a\\..\\b.json"]) is not None
    assert _hub_answer_problem(sha, ["../x.pickle"]) is None  # not downloaded: not our business


# -- 6. publish trusts a check record's top-level `passed` ---------------------------------------------------------


def _publish(server: FakeGitHubServer, inputs: list[Path], **kw: Any) -> Any:
    return publish_release(inputs, repo=REPO, tag="v1.0", token=TOKEN, api_url=server.api_url, retries=0, **kw)


def _edit_record(path: Path, change: Any) -> None:
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))


def test_publish_verdict_from_rows_ignores_a_top_level_passed(tmp_path: Path) -> None:
    files = made(tmp_path / "make-tiny")
    record = write_record(tmp_path / "checks", files, "CPU_LLM_LLAMA", passed=False)
    _edit_record(record, lambda r: r.update(passed=True))  # says passed over a failed row
    with FakeGitHubServer(REPO, TOKEN) as server:
        with pytest.raises(ChecksFailed, match="left a draft") as info:
            _publish(server, [files], checks=[tmp_path / "checks"])
        assert server.release_by_tag("v1.0")["draft"]
    assert "below min_top1" in info.value.message


def test_publish_verdict_from_rows_a_record_that_checked_no_file_keeps_the_draft(tmp_path: Path) -> None:
    files = made(tmp_path / "make-tiny")
    record = write_record(tmp_path / "checks", files, "CPU_LLM_LLAMA")
    _edit_record(record, lambda r: r.update(files=[]))
    with FakeGitHubServer(REPO, TOKEN) as server:
        with pytest.raises(ChecksFailed, match="checked no file"):
            _publish(server, [files], checks=[tmp_path / "checks"])
        assert server.release_by_tag("v1.0")["draft"]


def test_publish_verdict_from_rows_every_manifest_file_covered_with_its_sha256(tmp_path: Path) -> None:
    files = made(tmp_path / "make-tiny")
    # A second file in the manifest that the record does not cover.
    extra = make_gguf(files / "tiny.f32.gguf", seed=3)
    manifest = json.loads((files / "manifest.json").read_text())
    write_record(tmp_path / "checks", files, "CPU_LLM_LLAMA")  # covers tiny.q8_0.gguf only
    manifest["files"].append(
        {"name": extra.name, "precision": "F32", "bytes": extra.stat().st_size,
         "sha256": hashlib.sha256(extra.read_bytes()).hexdigest()}
    )  # fmt: skip
    (files / "manifest.json").write_text(json.dumps(manifest))
    with FakeGitHubServer(REPO, TOKEN) as server:
        with pytest.raises(ChecksFailed, match=r"tiny\.f32\.gguf: not checked"):
            _publish(server, [files], checks=[tmp_path / "checks"])
        assert server.release_by_tag("v1.0")["draft"]

    # A row that passed on other bytes (sha256_match false, as a hand-edited record would say) is no evidence.
    files2 = made(tmp_path / "make-other")
    record2 = write_record(tmp_path / "checks2", files2, "CPU_LLM_LLAMA")
    _edit_record(record2, lambda r: r["files"][0].update(sha256="0" * 64, sha256_match=False))
    with FakeGitHubServer(REPO, TOKEN) as server:
        with pytest.raises(ChecksFailed, match="other bytes"):
            _publish(server, [files2], checks=[tmp_path / "checks2"])
        body = server.release_by_tag("v1.0")["body"]
        assert "❌" in body and "✅" not in body


def test_publish_verdict_from_rows_covers_a_vision_models_projector_files(tmp_path: Path) -> None:
    files = made(tmp_path / "make-tiny")
    projector = make_gguf(files / "mmproj-tiny-f16.gguf", seed=4)
    write_record(tmp_path / "checks", files, "CPU_LLM_LLAMA")  # written before the projector was listed: no row
    manifest = json.loads((files / "manifest.json").read_text())
    manifest["mmproj"] = [
        {"name": projector.name, "precision": "F16", "role": "mmproj", "bytes": projector.stat().st_size,
         "sha256": hashlib.sha256(projector.read_bytes()).hexdigest(), "architecture": "clip"}
    ]  # fmt: skip
    manifest["multimodal"] = {"towers": ["vision"], "projector": True, "text_only": False, "left_out": []}
    (files / "manifest.json").write_text(json.dumps(manifest))
    with FakeGitHubServer(REPO, TOKEN) as server:
        with pytest.raises(ChecksFailed, match=r"mmproj-tiny-f16\.gguf: not checked"):
            _publish(server, [files], checks=[tmp_path / "checks"])
        assert server.release_by_tag("v1.0")["draft"]


# -- 7. GitHub's rules learnt too late -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["my model.gguf", "modèle.gguf", "a~b.gguf", "x(1).gguf", ".hidden.gguf"])
def test_asset_names_github_would_rewrite_are_refused_before_the_first_request(tmp_path: Path, name: str) -> None:
    path = make_gguf(tmp_path / name)
    with FakeGitHubServer(REPO, TOKEN) as server:
        with pytest.raises(UsageError, match="GitHub would rename the release asset") as info:
            _publish(server, [path])
        assert server.requests == []
    assert "ASCII letters, digits" in (info.value.hint or "")


def test_asset_names_github_keeps_are_published_unchanged(tmp_path: Path) -> None:
    path = make_gguf(tmp_path / "tiny-v1.0_b+c.gguf")
    with FakeGitHubServer(REPO, TOKEN) as server:
        result = _publish(server, [path])
        assert "tiny-v1.0_b+c.gguf" in server.asset_names(result.release_id)


def _many_files_output(folder: Path, count: int) -> Path:
    """An outputs folder whose manifest lists ``count`` small files: long notes tables."""
    folder.mkdir(parents=True)
    entries = []
    for i in range(count):
        path = folder / f"tiny.part{i:03d}.gguf"
        path.write_bytes(b"GGUF" + i.to_bytes(4, "little"))
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        entries.append({"name": path.name, "precision": "Q8_0", "bytes": 8, "sha256": digest})
    (folder / "manifest.json").write_text(
        json.dumps({"schema": 1, "pair": None, "model_name": "tiny", "files": entries})
    )
    return folder


def test_release_body_limit_long_tables_become_one_row_per_model(tmp_path: Path) -> None:
    out = _many_files_output(tmp_path / "out", 60)
    own_text = "Release notes written by hand.\n" + "x" * 118_000
    with FakeGitHubServer(REPO, TOKEN) as server:
        server.add_release("v1.0", draft=True, body=own_text)
        result = _publish(server, [out])
        release = server.release_by_tag("v1.0")
        assert not result.draft
        body = release["body"]
        assert len(body) <= BODY_LIMIT and body.startswith("Release notes written by hand.")
        assert "| Model | Files | Size | Checks |" in body and "| tiny | 60 |" in body
        assert "tiny.part000.gguf" not in body  # no per-file rows
        assert len(server.asset_names(release["id"])) == 62  # every file, the manifest and SHA256SUMS


def test_release_body_limit_refused_before_any_upload(tmp_path: Path) -> None:
    out = make_output(tmp_path / "out")
    with FakeGitHubServer(REPO, TOKEN) as server:
        release = server.add_release("v1.0", draft=True, body="y" * (BODY_LIMIT - 50))
        with pytest.raises(PublishFailed, match="more than GitHub accepts for a release description"):
            _publish(server, [out])
        assert uploads(server) == 0 and server.asset_names(release["id"]) == []


# -- 8. Markdown and HTML from manifests rendered raw: one escaper ---------------------------------------------------


def test_markdown_escaper_inline_and_code_show_every_character() -> None:
    for value in (HOSTILE, "- list", "1. one", "# title", "> quote", "a\nb\r\nc\u2028d", "~~s~~", "_e_ **s**"):
        line = f"| {inline(value)} | {code(value, cell=True)} |"
        table = f"| A | B |\n| --- | --- |\n{line}\n"
        assert_shown_not_rendered(table)
        assert_shown_not_rendered(f"- {inline(value)}\n\nText {inline(value)} and {code(value)}.\n", headings=0)
        cells = [t.content for t in _tokens(table) if t.type in ("text", "code_inline")][2:]
        shown = " ".join(value.split())
        assert cells == [shown, shown], (value, cells)
    assert inline("Q4_K_M") == "Q4_K_M"  # plain names stay readable in the raw text
    block = "\n".join(code_block("a\n```\n<script>x</script>\n````", "sh"))
    fences = [t for t in _MD.parse(block) if t.type == "fence"]
    assert len(fences) == 1 and fences[0].content == "a\n```\n<script>x</script>\n````\n"


def _hostile_manifest() -> dict[str, Any]:
    return {
        "schema": 1,
        "model_name": "tiny",
        "pair": None,
        "toolchain": {"llama_cpp_python": "0.3.36 <b>x</b>", "sdist_sha256": "`` ``` <img src=x>"},
        "source": {"kind": "hub", "repo_id": "octo/tiny)[x](https://evil", "revision": "r`<i>"},
        "base": {"precision": "F32"},
        "imatrix": {"file": "m`x`.dat", "sha256": "</code><script>", "source": "<u>given</u>"},
        "files": [
            {"name": "a|b`<x>.gguf", "precision": HOSTILE, "bytes": 10, "sha256": "0" * 64, "bpw": 8.5,
             "fidelity": {"kld_mean": 0.1, "device": "<script>cpu</script>"}},
        ],
    }  # fmt: skip


def test_markdown_escaper_model_card() -> None:
    card = render_card(Manifest.from_dict(_hostile_manifest()), {"CPU_LLM_LLAMA": {"files": []}})
    body = card.split("---\n", 2)[2]
    assert_shown_not_rendered(body)
    assert " ".join(HOSTILE.split()) in texts(body)  # shown as written (runs of spaces as one)
    assert "a|b`<x>.gguf" in texts(body)
    links = [t for t in _tokens(body) if t.type == "link_open"]
    assert not links  # the repo id is no valid id: shown as code, not made a link


def test_markdown_escaper_release_notes() -> None:
    manifest = Manifest.from_dict(
        {
            **_hostile_manifest(),
            "files": [{"name": "a|b`<x>.gguf", "precision": HOSTILE, "bytes": 10, "sha256": "0" * 64}],
        }
    )
    record = {
        "pair": "CPU_LLM_LLAMA",
        "runtime": {"device": "<img src=x onerror=alert(1)>", "machine": "[m](https://evil)"},
        "files": [{"name": "a|b`<x>.gguf", "sha256": "1" * 64, "passed": False, "problems": [HOSTILE]}],
    }
    manifest = Manifest.from_dict({**manifest.to_dict(), "checks": {"CPU_LLM_LLAMA": record}})
    notes = release_notes(None, [("a|b`<x>.gguf", 10, "0" * 64, HOSTILE)], {}, {"tiny": manifest})
    assert_shown_not_rendered(notes)
    assert "<img src=x onerror=alert(1)>" in texts(notes) and "a|b`<x>.gguf" in texts(notes)


def test_markdown_escaper_job_summary() -> None:
    result = {"files": [{"name": "a|b`<x>.gguf", "precision": HOSTILE, "bytes": 10, "sha256": "</code>" * 3}]}
    summary = job_summary.conversion_summary(result, None, title="tiny <script>")
    record = {
        "pair": "CPU<b>",
        "passed": False,
        "runtime": {"device": "<img src=x>", "machine": "[m](https://e)", "image": "img`x"},
        "files": [{"name": "a|b`<x>.gguf", "passed": False, "problems": [HOSTILE]}],
        "problems": ["# not a heading <script>"],
    }
    check = job_summary.check_summary(record)
    assert_shown_not_rendered(summary, headings=1)
    assert_shown_not_rendered(check, headings=1)
    assert "a|b`<x>.gguf" in texts(summary) and "# not a heading <script>" in texts(check)


def test_markdown_escaper_report() -> None:
    from cecai_converter.report import render_markdown

    manifest = Manifest.from_dict(_hostile_manifest())
    markdown = render_markdown([manifest])
    assert_shown_not_rendered(markdown, headings=1)
    assert "a|b`<x>.gguf" in texts(markdown) and "<script>cpu</script>" in texts(markdown)


def test_markdown_escaper_is_the_only_one() -> None:
    # The four escapers of old (card, notes, summary, report) each had their own rules; now there is one.
    src = Path(__file__).resolve().parents[1] / "src" / "cecai_converter"
    for name in ("card.py", "release/notes.py", "gha.py", "report.py"):
        text = (src / name).read_text(encoding="utf-8")
        assert 'replace("|"' not in text, name
        up = "." * name.count("/")  # a module in a subpackage imports it from one level up
        assert f"from .{up}markdown import" in text, name


# -- 9. EVAL_TEXT / CALIBRATION_TEXT checked too late, unbounded -----------------------------------------------------


def _resolve(**cli: Any) -> Any:
    """The options as `run`/`convert` resolve them: flags, YAML and variables, then the texts checked."""
    from cecai_converter.request import check_texts, resolve

    request = resolve(cli, {}, {}, command="convert")
    check_texts(request)
    return request


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (None, "does not exist"),
        (b"\x00" * 5_000_000, r"control character U\+0000"),
        (b"caf\xe9 " * 100, "not UTF-8"),
        (b"Too short.", "must give at least"),
        (b"   \n\n  " * 40, "must give at least"),
    ],
)
def test_eval_text_checked_early_when_the_options_are_resolved(tmp_path: Path, content: bytes | None, why: str) -> None:
    text = tmp_path / "eval.txt"
    if content is not None:
        text.write_bytes(content)
    with pytest.raises(UsageError, match=why) as info:
        _resolve(eval_text=str(text))
    assert info.value.message.startswith("--eval-text: ") and info.value.exit_code == 2
    with pytest.raises(UsageError, match=why):
        _resolve(calibration_text=str(text))


def test_eval_text_checked_early_folder_fifo_and_size(tmp_path: Path) -> None:
    from cecai_converter.request import check_texts, resolve
    from cecai_converter.texts import MAX_TEXT_BYTES

    with pytest.raises(UsageError, match="not a regular file"):
        _resolve(eval_text=str(tmp_path))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(UsageError, match="not a regular file"):  # and does not block on the open
        check_texts(resolve({}, {}, {"CECAI_EVAL_TEXT": str(fifo)}, command="convert"))
    big = tmp_path / "big.txt"
    with big.open("wb") as fh:
        fh.truncate(MAX_TEXT_BYTES + 1)
    with pytest.raises(UsageError, match="more than the"):
        _resolve(eval_text=str(big))
    good = tmp_path / "good.txt"
    good.write_text("A sentence of ordinary prose, long enough to count. " * 40, encoding="utf-8")
    assert _resolve(eval_text=str(good), calibration_text=str(good)).values["eval_text"] == good.resolve()


def test_eval_text_checked_early_in_the_converter_folder(tmp_path: Path) -> None:
    from cecai_converter.request import check_texts, resolve

    configs = tmp_path / "converter" / "configurations"
    configs.mkdir(parents=True)
    (configs / "calib.txt").write_bytes(b"\x00\x01\x02" * 1000)
    where = str(configs / "converter_args.yaml")
    with pytest.raises(ConfigError, match=r"converter_args\.yaml: CALIBRATION_TEXT: .*binary data") as info:
        check_texts(resolve({}, {"CALIBRATION_TEXT": "calib.txt"}, {}, config_dir=configs, yaml_where=where), where)
    assert info.value.exit_code == 2


@pytest.mark.slow
def test_eval_text_checked_early_cli_refuses_before_converting(tiny_llama: Path, tmp_path: Path) -> None:
    nul = tmp_path / "nul.txt"
    nul.write_bytes(b"\x00" * 5_000_000)
    out = tmp_path / "out"
    result = run_cli("convert", tiny_llama, "--precision", "Q8_0", "--outdir", out, "--eval-text", nul, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "--eval-text" in result.stderr and "binary data" in result.stderr and "Traceback" not in result.stderr
    assert not list(out.rglob("*.gguf")) if out.exists() else True


# -- 10. report: damaged GGUF, mathtext labels ---------------------------------------------------------------------


def test_report_damaged_gguf_is_a_row_not_a_traceback(tmp_path: Path) -> None:
    good = make_gguf(tmp_path / "good.gguf").read_bytes()
    (tmp_path / "tiny.q8_0.gguf").write_bytes(good[:35])  # gguf.GGUFReader raised IndexError on this one
    entry = {"name": "tiny.q8_0.gguf", "precision": "Q8_0", "bytes": 35, "sha256": "0" * 64}
    manifest = {"schema": 1, "model_name": "tiny", "pair": None, "files": [entry]}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    result = run_cli("report", tmp_path / "manifest.json", timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "unreadable GGUF" in result.stdout


def test_plot_labels_plain_text_not_mathtext(tmp_path: Path) -> None:
    from cecai_converter.report import _figure, plot

    manifest = Manifest.from_dict({
        "schema": 1,
        "model_name": "tiny",
        "pair": "$\\frac{a}{",  # an unbalanced mathtext expression: savefig raised ValueError
        "base": {"precision": "F$32"},
        "files": [
            {"name": "a.gguf", "precision": "$\\sqrt{x", "bytes": 2**20, "sha256": "0" * 64,
             "fidelity": {"kld_mean": 0.1}},
            {"name": "b.gguf", "precision": "$x^2$", "bytes": 2**21, "sha256": "0" * 64,
             "fidelity": {"kld_mean": 0.01}},
        ],
    })  # fmt: skip
    png = plot(manifest, tmp_path / "plot.png")
    assert png.read_bytes().startswith(b"\x89PNG")
    fig = _figure(manifest)
    labels = [t.get_text() for t in fig.axes[0].texts]
    assert sorted(labels) == ["$\\sqrt{x", "$x^2$"]
    assert all(not t.get_parse_math() for t in [*fig.axes[0].texts, fig.axes[0].title])


# -- reproduce: refuse a bad source before fetching the pinned sdist -------------------------------------------------


def test_reproduce_bad_source_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Fetching the pinned llama.cpp cannot be afforded here: stand in for it with a call that must not come.
    from cecai_converter.output import Output
    from cecai_converter.pipeline import source_step
    from cecai_converter.reproduce import reproduce

    fetched: list[str] = []
    monkeypatch.setattr(source_step, "ensure_converter", lambda *a, **k: fetched.append("sdist") or tmp_path)
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    (not_a_model / "notes.txt").write_text("no config.json here")
    manifest = {
        "schema": 1,
        "model_name": "tiny",
        "pair": None,
        "toolchain": toolchain_info().as_manifest(),
        "source": {"kind": "local", "path": str(not_a_model), "fingerprint": "f" * 64, "files": []},
        "files": [{"name": "tiny.q8_0.gguf", "precision": "Q8_0", "bytes": 1, "sha256": "0" * 64}],
    }
    path = tmp_path / "outputs" / "manifest.json"
    path.parent.mkdir()
    path.write_text(json.dumps(manifest))
    with pytest.raises(UsageError, match=r"no config\.json"):
        reproduce(path, Output("human"), workdir=tmp_path / "work")
    assert fetched == []
    hub_manifest = {**manifest, "source": {"kind": "hub", "repo_id": "octo/tiny", "revision": "../../x"}}
    path.write_text(json.dumps(hub_manifest))
    with pytest.raises(UsageError, match="not a commit id"):
        reproduce(path, Output("human"), workdir=tmp_path / "work2")
    assert fetched == []
