"""`cecai-convert card`: a Hugging Face model card from a manifest, its YAML front matter and its files table."""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import tree_digest

from cecai_converter.card import HUB_LICENSES, card_front_matter, files_table, render_card
from cecai_converter.manifest import Manifest
from cecai_converter.source_card import read_source_card, split_front_matter

SHA = "ab" * 32


def _manifest(**source_card: Any) -> dict[str, Any]:
    """A manifest as the pipeline writes it (schema 1), its source card record as ``source_card``."""
    fid = {"kld_mean": 0.0123, "ppl": 10.2, "ppl_base": 10.0, "ppl_delta_pct": 2.0, "top1_agreement": 0.9375}
    source: dict[str, Any] = {"kind": "local", "path": "/models/tiny", "fingerprint": "f" * 64, "files": []}
    if source_card:
        source["card"] = source_card
    return {
        "schema": 1,
        "tool": {"name": "cecai-converter", "version": "9.9.9"},
        "toolchain": {"llama_cpp_python": "0.3.36", "sdist_sha256": "c" * 64},
        "pair": None,
        "model_name": "tiny",
        "source": source,
        "base": {"precision": "F32", "kept": False},
        "imatrix": None,
        "files": [
            {"name": "tiny.q8_0.gguf", "precision": "Q8_0", "bytes": 1234567, "sha256": SHA, "bpw": 8.5,
             "fidelity": dict(fid)},
            {"name": "tiny.q4_k_m.gguf", "precision": "Q4_K_M", "bytes": 765432, "sha256": SHA, "bpw": 4.89,
             "fidelity": None},
        ],
    }  # fmt: skip


def _typed(**source_card: Any) -> Manifest:
    """:func:`_manifest`, read as every reader reads a manifest."""
    return Manifest.from_dict(_manifest(**source_card))


def _front(card: str) -> dict[str, Any]:
    front, body = split_front_matter(card)
    assert front is not None, card[:300]
    assert body.lstrip().startswith("# ")
    return front


def _row(card: str, name: str) -> list[str]:
    lines = [line for line in card.splitlines() if line.startswith(f"| `{name}` |")]
    assert len(lines) == 1, f"no single row for {name}"
    return [c.strip() for c in lines[0].strip("|").split(" | ")]


# -- the front matter ------------------------------------------------------------------------------------------
def test_front_matter_round_trips_and_carries_a_hub_license_id():
    card = render_card(_typed(license="Apache-2.0", base_model=["octo/tiny"], architecture="LlamaForCausalLM"))
    front = _front(card)
    assert front["license"] == "apache-2.0"
    assert "license_name" not in front
    assert front["base_model"] == "octo/tiny"
    assert "base_model_relation" not in front  # a local folder's card names its origin: no relation is claimed
    assert front["tags"] == ["gguf", "llama-cpp", "cecai-converter", "q8_0", "q4_k_m"]
    assert front["quantized_by"] == "cecai-converter 9.9.9"
    assert front["pipeline_tag"] == "text-generation"
    # what yaml.safe_dump wrote is what the Hub reads back
    typed = Manifest.from_dict(yaml.safe_load(json.dumps(_manifest(
        license="Apache-2.0", base_model=["octo/tiny"], architecture="LlamaForCausalLM"))))  # fmt: skip
    assert yaml.safe_load(yaml.safe_dump(front)) == front == card_front_matter(typed)


def test_a_local_source_claims_only_what_its_own_card_says():
    # config.json's _name_or_path names the model a fine-tune was trained from: an older manifest's record of it is
    # no claim, and it never outranks the card's own base_model
    front = _front(render_card(_typed(name_or_path="octo/parent")))
    assert "base_model" not in front and "base_model_relation" not in front
    front = _front(render_card(_typed(name_or_path="octo/parent", base_model=["octo/base"])))
    assert front["base_model"] == "octo/base" and "base_model_relation" not in front
    # the relation the source card states is carried over; one the Hub does not know is not
    front = _front(render_card(_typed(base_model=["octo/base"], base_model_relation="finetune")))
    assert front["base_model_relation"] == "finetune"
    front = _front(render_card(_typed(base_model=["octo/base"], base_model_relation="quantized-ish")))
    assert "base_model_relation" not in front


def test_an_unknown_license_id_becomes_other_with_its_name_and_link():
    card = render_card(_typed(license="acme-model-license-1.0", license_link="https://acme.invalid/license"))
    front = _front(card)
    assert "acme-model-license-1.0" not in HUB_LICENSES
    assert front["license"] == "other"
    assert front["license_name"] == "acme-model-license-1.0"
    assert front["license_link"] == "https://acme.invalid/license"


def test_a_license_file_alone_is_other_named_by_the_file_not_an_invented_id():
    files = [{"name": "LICENSE", "bytes": 10, "sha256": "d" * 64}]
    card = render_card(_typed(license_files=files))
    front = _front(card)
    assert front["license"] == "other"
    assert "license_name" not in front and "license_link" not in front
    assert f"`LICENSE` (SHA-256 `{'d' * 64}`)" in card


def test_no_license_anywhere_is_left_out_and_said_unknown():
    # The Hub reads `license: other` as "a custom license": with no record of any license that would be a claim the
    # source never made, so the key is left out and the body says the license is unknown.
    card = render_card(_typed(architecture="LlamaForCausalLM"))
    front = _front(card)
    assert "license" not in front and "license_name" not in front
    assert "License: unknown" in card
    # and no base_model is invented for a local folder that names none
    assert "base_model" not in front


def test_a_hub_source_is_the_base_model():
    manifest = _manifest()
    manifest["source"] = {"kind": "hub", "repo_id": "octo/tiny", "revision": "1" * 40, "fingerprint": "f" * 64}
    card = render_card(Manifest.from_dict(manifest), repo_id="me/tiny-GGUF")
    assert _front(card)["base_model"] == "octo/tiny"
    assert _front(card)["base_model_relation"] == "quantized"  # the repo these files were converted from
    assert 'Llama.from_pretrained(repo_id="me/tiny-GGUF", filename="tiny.q8_0.gguf")' in card
    assert "--revision " + "1" * 40 in card
    assert "cecai-convert reproduce tiny.manifest.json\n" in card


# -- the files table -----------------------------------------------------------------------------------------
def test_every_file_has_a_row_with_error_bars_when_recorded_and_dashes_when_not():
    manifest = _manifest()
    with_bars = manifest["files"][0]["fidelity"]
    with_bars.update(kld_mean_se=0.0011, top1_agreement_se=0.0125, ppl_ratio=1.0213, ppl_ratio_se=0.0042,
                     kld_median=0.004, kld_p99=0.2, kld_p99_9=0.5, kld_max=0.9)  # fmt: skip
    card = render_card(Manifest.from_dict(manifest))
    q8 = _row(card, "tiny.q8_0.gguf")
    assert q8[1:4] == ["Q8_0", "1.2 MB", "8.50"]
    assert q8[4] == "1.23e-02 ± 1.10e-03"
    assert q8[5] == "93.8% ± 1.2%"
    assert q8[6] == "+2.13 % ± 0.42 %"
    assert "- `tiny.q8_0.gguf`: KLD median 4.00e-03, p99 2.00e-01, p99.9 5.00e-01, max 9.00e-01" in card
    q4 = _row(card, "tiny.q4_k_m.gguf")  # not measured: every fidelity cell says so
    assert q4[4:7] == ["—", "—", "—"]


def test_without_error_bars_the_value_is_shown_with_a_dash_for_the_error():
    q8 = _row(render_card(_typed()), "tiny.q8_0.gguf")
    assert q8[4] == "1.23e-02 ± —"
    assert q8[5] == "93.8% ± —"
    assert q8[6] == "+2.00 % ± —"


def test_check_records_add_a_result_and_speed_column_per_pair():
    manifest = _manifest()
    checks = {
        "CPU_LLM_LLAMA": {"pair": "CPU_LLM_LLAMA", "passed": True, "files": [
            {"name": "tiny.q8_0.gguf", "sha256": SHA, "passed": True, "agreement": {"gen_tps": 812.4}},
            {"name": "tiny.q4_k_m.gguf", "sha256": SHA, "passed": False, "agreement": {}}]},
    }  # fmt: skip
    lines = files_table(Manifest.from_dict(manifest), checks)
    assert "CPU_LLM_LLAMA check" in lines[0] and "CPU_LLM_LLAMA tok/s" in lines[0]
    assert lines[1].count("---") == len(lines[0].strip("|").split(" | "))
    card = render_card(Manifest.from_dict(manifest), checks)
    assert _row(card, "tiny.q8_0.gguf")[-2:] == ["✅ pass", "812"]
    assert _row(card, "tiny.q4_k_m.gguf")[-2:] == ["❌ fail", "—"]
    # a published manifest carries its checks itself
    published = {**copy.deepcopy(manifest), "checks": checks}
    assert _row(render_card(Manifest.from_dict(published)), "tiny.q8_0.gguf")[-2:] == ["✅ pass", "812"]
    # a row that passed on other bytes is no pass (issue 16: the verdict comes from rows that checked these bytes)
    checks["CPU_LLM_LLAMA"]["files"][0]["sha256"] = "e" * 64
    assert _row(render_card(Manifest.from_dict(manifest), checks), "tiny.q8_0.gguf")[-2:] == ["❌ fail", "812"]


def test_a_pipe_in_a_name_cannot_break_the_table():
    manifest = _manifest()
    manifest["files"][0]["precision"] = "Q8|0"
    assert "Q8\\|0" in render_card(Manifest.from_dict(manifest))


# -- the source's own card: hostile input ------------------------------------------------------------------------
def test_source_card_keeps_only_bounded_strings(tmp_path):
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
        for i in range(20)
    )
    (tmp_path / "README.md").write_text(
        "---\n" + bomb + 'license: {nested: object}\nlicense_name: "Acme\\x1b[31m License"\n'
        "base_model: [octo/base, ../../etc/passwd, 42]\n---\n# hi\n"
    )
    (tmp_path / "config.json").write_text(json.dumps({"_name_or_path": "/home/me/models/tiny",
                                                      "architectures": ["LlamaForCausalLM"]}))  # fmt: skip
    (tmp_path / "LICENSE.txt").write_text("terms\n")
    record = read_source_card(tmp_path)
    assert record is not None
    assert "license" not in record  # an object is not a license id
    assert record["license_name"] == "Acme[31m License"  # the escape character is gone
    assert record["base_model"] == ["octo/base"]  # not a path, not a number
    assert "name_or_path" not in record  # a host path, not a repo id
    assert record["license_files"][0]["name"] == "LICENSE.txt"
    assert record["architecture"] == "LlamaForCausalLM"


@pytest.mark.parametrize(
    "text",
    ["---\nlicense: [unclosed\n---\n", "---\n- a list\n---\n", "no front matter\n", "---\nlicense: mit\n"],
)
def test_unusable_front_matter_is_no_front_matter(tmp_path, text):
    (tmp_path / "README.md").write_text(text)
    assert read_source_card(tmp_path) is None


def test_a_huge_readme_is_read_only_up_to_its_limit(tmp_path, monkeypatch):
    from cecai_converter import source_card

    (tmp_path / "README.md").write_text("---\nlicense: mit\n---\n" + "x" * 5_000_000)
    assert read_source_card(tmp_path) == {"license": "mit"}  # a long body after the front matter is fine
    # front matter that ends past the limit is never seen whole: no record (read in full, it would be {license: mit})
    monkeypatch.setattr(source_card, "_MAX_README_BYTES", 64)
    (tmp_path / "README.md").write_text("---\nlicense: mit\nnote: " + "y" * 100 + "\n---\n# body\n")
    assert read_source_card(tmp_path) is None


def test_the_source_cards_own_relation_is_read_and_name_or_path_is_not(tmp_path):
    (tmp_path / "README.md").write_text("---\nbase_model: octo/base\nbase_model_relation: finetune\n---\n")
    (tmp_path / "config.json").write_text(json.dumps({"_name_or_path": "octo/parent"}))
    assert read_source_card(tmp_path) == {"base_model": ["octo/base"], "base_model_relation": "finetune"}


def test_license_unknown_claims_no_license():
    front = _front(card := render_card(_typed(license="unknown")))
    assert "license" not in front and "license_name" not in front
    assert "License: unknown: the source model's card declares `license: unknown`" in card
    # with a name, a link or a license file it is a license of its own: `other`, as the Hub asks
    front = _front(render_card(_typed(license="unknown", license_name="Acme terms")))
    assert front["license"] == "other" and front["license_name"] == "Acme terms"


def test_hostile_license_fields_are_shown_as_text_never_rendered():
    from markdown_it import MarkdownIt

    hostile = "x [accept](https://evil.example) <img src=x onerror=alert(1)>"
    for fields in (
        {"license_name": hostile, "license_link": "https://acme.invalid/`x`\n\n<img src=y>"},
        {"license": hostile},
        {"license_name": "`" + hostile + "`", "license_link": "javascript:alert(1)"},
    ):
        card = render_card(_typed(**fields))
        front, body = split_front_matter(card)
        assert front is not None and front["license"] == "other"
        assert front["license_name"] == fields.get("license_name", hostile)  # metadata: the plain string
        assert "javascript:" not in card  # only an https:// link is kept
        html = MarkdownIt("commonmark", {"html": True}).render(body)
        assert "<img" not in html, html
        assert 'href="https://evil.example"' not in html and "x [accept](https://evil.example)" in html


# -- through a real conversion ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def converted(tmp_path_factory, tiny_llama, cli):
    """A real conversion of a model folder whose own README declares its license and base model."""
    root = tmp_path_factory.mktemp("card")
    model = root / "tiny-src"
    shutil.copytree(tiny_llama, model)
    (model / "README.md").write_text("---\nlicense: llama3.1\nbase_model: meta-llama/Llama-3.1-8B\n---\n# tiny\n")
    (model / "LICENSE").write_text("LLAMA 3.1 COMMUNITY LICENSE (test copy)\n")
    out = root / "out"
    result = cli("convert", model, "--precision", "Q8_0", "--precision", "Q4_K_M", "--outdir", out,
                 "--model-name", "tiny")  # fmt: skip
    assert result.returncode == 0, result.stderr
    return model, out


@pytest.mark.slow
def test_card_of_a_real_conversion(converted, cli):
    model, out = converted
    before = tree_digest(model)
    result = cli("card", out)
    assert result.returncode == 0, result.stderr
    card = (out / "README.md").read_text()
    front = _front(card)
    assert front["license"] == "llama3.1"
    assert front["base_model"] == "meta-llama/Llama-3.1-8B"
    assert "base_model_relation" not in front  # the README's base model is the source's origin, not the source
    assert front["pipeline_tag"] == "text-generation"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["card"]["license_files"][0]["name"] == "LICENSE"
    for entry in manifest["files"]:
        row = _row(card, entry["name"])
        fid = entry["fidelity"]
        assert row[4].startswith(f"{fid['kld_mean']:.2e} ± ")
        assert row[5].startswith(f"{fid['top1_agreement']:.1%} ± ")
        # the error bars, once the fidelity record carries them ("—" until then): the larger of the per-token one
        # and the one between the text's chunks
        kld_se = fid.get("kld_mean_se")
        chunks_se = (fid.get("budget") or {}).get("kld_mean_se_chunks")
        shown = max(kld_se, chunks_se) if isinstance(kld_se, float) and isinstance(chunks_se, float) else kld_se
        assert row[4].endswith(f"{shown:.2e}" if isinstance(shown, float) else "—")
    assert tree_digest(model) == before  # the source's own card is never touched
    # The reproduce command names the manifest beside the card (the published name exists only after publishing).
    assert "cecai-convert reproduce manifest.json --source MODEL_FOLDER\n" in card


@pytest.mark.slow
def test_card_is_made_from_the_records_when_the_source_is_gone(converted, cli, tmp_path):
    model, out = converted
    moved = tmp_path / "gone"
    shutil.copytree(model, moved)  # the record was taken at conversion time: the folder is not read again
    (moved / "README.md").write_text("---\nlicense: mit\n---\n")
    result = cli("card", out, "-o", tmp_path / "card.md")
    assert result.returncode == 0, result.stderr
    card = (tmp_path / "card.md").read_text()
    assert _front(card)["license"] == "llama3.1"
    named = re.search(r"cecai-convert reproduce (\S+) --source", card).group(1)  # type: ignore[union-attr]
    assert (tmp_path / named).resolve() == (out / "manifest.json").resolve(), "a path that exists from the card"


@pytest.mark.slow
def test_card_refuses_to_write_into_the_source_folder(converted, cli):
    model, out = converted
    before = tree_digest(model)
    result = cli("card", out, "-o", model / "README.md")
    assert result.returncode == 2
    assert "inside the model source folder" in result.stderr
    assert tree_digest(model) == before


def test_card_of_a_missing_manifest_is_a_usage_error(cli, tmp_path):
    result = cli("card", tmp_path)
    assert result.returncode == 2
    assert "no manifest at" in result.stderr


@pytest.mark.slow
def test_push_to_hub_uploads_the_card_as_readme(converted, tmp_path):
    """huggingface_hub.HfApi stand-in: the Hub is not reachable here."""
    from cecai_converter.release.assets import CHECKSUMS_NAME
    from cecai_converter.release.hub_push import push_to_hub
    from cecai_converter.release.notes import release_notes

    _, out = converted
    calls: dict[str, Any] = {}

    class FakeHfApi:
        def create_repo(self, repo_id: str, **kw: Any) -> None:
            pass

        def create_commit(self, repo_id: str, operations: Any, commit_message: str, revision: Any = None) -> Any:
            calls["ops"] = {op.path_in_repo: op.path_or_fileobj for op in operations}
            return type("CommitInfo", (), {"commit_url": "https://hub.invalid/commit/1"})()

    card = render_card(Manifest.from_dict(json.loads((out / "manifest.json").read_text())), repo_id="me/tiny-GGUF")
    push_to_hub([out], "me/tiny-GGUF", token="hf_x", api=FakeHfApi(), card=card)
    assert {"README.md", CHECKSUMS_NAME, "tiny.q8_0.gguf", "tiny.q4_k_m.gguf"} <= set(calls["ops"])
    uploaded = calls["ops"]["README.md"]
    text = uploaded.decode() if isinstance(uploaded, bytes) else Path(uploaded).read_text()
    assert text == card

    from cecai_converter.manifest import load_manifest

    notes = release_notes(None, [], {}, {"tiny": load_manifest(out / "manifest.json")})
    assert "| `tiny.q8_0.gguf` | Q8_0 |" in notes and "KLD ± SE" in notes


@pytest.mark.slow
def test_publish_hf_repo_pushes_the_card_fake_hub(converted, monkeypatch, capsys):
    """`publish --hf-repo` through the CLI; huggingface_hub.HfApi replaced by a fake (the Hub is not reachable)."""
    import huggingface_hub

    from cecai_converter import cli

    _, out = converted
    pushed: dict[str, Any] = {}

    class FakeHfApi:
        def __init__(self, token: str | None = None) -> None:
            pass

        def create_repo(self, repo_id: str, **kw: Any) -> None:
            pass

        def create_commit(self, repo_id: str, operations: Any, commit_message: str, revision: Any = None) -> Any:
            pushed.update({op.path_in_repo: op.path_or_fileobj for op in operations})
            return type("CommitInfo", (), {"commit_url": "https://hub.invalid/commit/2"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    assert cli.main(["publish", str(out), "--hf-repo", "me/tiny-GGUF"]) == 0, capsys.readouterr().err
    card = pushed["README.md"]
    text = card.decode() if isinstance(card, bytes) else Path(card).read_text()
    assert _front(text)["license"] == "llama3.1"
    assert 'Llama.from_pretrained(repo_id="me/tiny-GGUF", filename="tiny.q8_0.gguf")' in text


def test_the_card_shows_the_wider_error_and_who_measured() -> None:
    """A budgeted record's error between chunks is wider than llama-perplexity's per-token one: the card shows it,
    and says which runtime measured the numbers (the builder's, or the check job a published manifest names)."""
    from cecai_converter.card import fidelity_measured_by, files_table

    fid = {
        "kld_mean": 0.05, "kld_mean_se": 0.0001, "top1_agreement": 0.9, "top1_agreement_se": 0.005,
        "device": "cpu", "budget": {"mode": "auto", "stopped": "target", "text_tokens": 4096,
                                    "kld_mean_se_chunks": 0.004, "top1_agreement_se_chunks": 0.001},
    }  # fmt: skip
    manifest = {
        "schema": 1,
        "files": [{"name": "m.q4_k_m.gguf", "precision": "Q4_K_M", "bytes": 10, "sha256": SHA, "fidelity": fid}],
    }
    row = files_table(Manifest.from_dict(manifest), {})[2]
    assert "5.00e-02 ± 4.00e-03" in row  # the chunks' error, the larger
    assert "90.0% ± 0.5%" in row  # per-token error, the larger here
    assert fidelity_measured_by(Manifest.from_dict(manifest)) == "Fidelity measured on the builder (cpu)."
    published = {
        "schema": 1,
        "files": [
            {**manifest["files"][0], "fidelity": {**fid, "measured_by": {"pair": "GPU_LLM_LLAMA", "device": "cuda"}}}
        ],
    }
    assert fidelity_measured_by(Manifest.from_dict(published)) == "Fidelity measured on the GPU_LLM_LLAMA check (cuda)."
    unmeasured = {"schema": 1, "files": [{"name": "x", "precision": "Q8_0", "bytes": 1, "sha256": SHA}]}
    assert fidelity_measured_by(Manifest.from_dict(unmeasured)) is None
