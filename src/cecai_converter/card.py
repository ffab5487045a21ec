"""A Hugging Face model card (``README.md``) for a conversion's GGUF files, made from its manifest.

What the card says comes only from records: the manifest (source, toolchain, imatrix, files, fidelity), the source
model's own card as read at conversion time (``source.card``: license, ``base_model``, the license file's name and
hash; see :func:`cecai_converter.source_card.read_source_card`) and, when given, the check records of each pair.
Nothing is invented: a license the records do not carry is reported as unknown and left out of the front matter.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import yaml

from . import __version__
from .errors import UsageError
from .fsutil import atomic_write_text, write_target
from .manifest import MANIFEST_NAME, Manifest, fidelity_error, load_manifest
from .markdown import code, code_block, inline
from .multimodal import describe_kinds
from .output import decimal_size
from .pairs import PAIRS
from .parity_record import summary
from .quant_types import recorded_tensor_types, types_markdown
from .records import CheckRecord, CheckRow, read_records
from .source_card import CARD_NAME, RELATIONS, REPO_ID

__all__ = [
    "HUB_LICENSES",
    "card_front_matter",
    "checks_by_pair",
    "fidelity_measured_by",
    "files_table",
    "hub_card",
    "load_manifest_file",
    "render_card",
    "write_card",
]

#: The license identifiers the Hugging Face Hub knows (its model-card ``license:`` list). Anything else is
#: published as ``license: other`` with ``license_name`` / ``license_link``, as the Hub asks.
HUB_LICENSES: Final = frozenset({
    "apache-2.0", "mit", "openrail", "bigscience-openrail-m", "creativeml-openrail-m", "bigscience-bloom-rail-1.0",
    "bigcode-openrail-m", "afl-3.0", "artistic-2.0", "bsl-1.0", "bsd", "bsd-2-clause", "bsd-3-clause",
    "bsd-3-clause-clear", "c-uda", "cc", "cc0-1.0", "cc-by-2.0", "cc-by-2.5", "cc-by-3.0", "cc-by-4.0",
    "cc-by-sa-3.0", "cc-by-sa-4.0", "cc-by-nc-2.0", "cc-by-nc-3.0", "cc-by-nc-4.0", "cc-by-nd-4.0",
    "cc-by-nc-nd-3.0", "cc-by-nc-nd-4.0", "cc-by-nc-sa-2.0", "cc-by-nc-sa-3.0", "cc-by-nc-sa-4.0",
    "cdla-sharing-1.0", "cdla-permissive-1.0", "cdla-permissive-2.0", "wtfpl", "ecl-2.0", "epl-1.0", "epl-2.0",
    "etalab-2.0", "eupl-1.1", "eupl-1.2", "agpl-3.0", "gfdl", "gpl", "gpl-2.0", "gpl-3.0", "lgpl", "lgpl-2.1",
    "lgpl-3.0", "isc", "h-research", "intel-research", "lppl-1.3c", "ms-pl", "apple-ascl", "apple-amlr", "mpl-2.0",
    "odc-by", "odbl", "openrail++", "osl-3.0", "postgresql", "ofl-1.1", "ncsa", "unlicense", "zlib", "pddl",
    "lgpl-lr", "deepfloyd-if-license", "fair-noncommercial-research-license", "llama2", "llama3", "llama3.1",
    "llama3.2", "llama3.3", "llama4", "gemma", "unknown", "other",
})  # fmt: skip

_DASH: Final = "—"
_HTTPS_LINK: Final = re.compile(r"^https://\S+$")


# -- values from records ----------------------------------------------------------------------------------------
def _code(value: object) -> str:
    """``value`` as a one-line Markdown code span (``markdown.code``): whatever it holds is shown, never rendered."""
    return code(value) or "`?`"


def _hub_link(repo_id: object) -> str:
    """A link to a Hub repo when ``repo_id`` is a valid repo id, else the value as a code span (no link)."""
    if isinstance(repo_id, str) and REPO_ID.match(repo_id):
        return f"[`{repo_id}`](https://huggingface.co/{repo_id})"
    return _code(repo_id)


# -- the front matter ------------------------------------------------------------------------------------------
def _source_card(manifest: Mapping[str, Any]) -> Mapping[str, Any]:
    card = (manifest.get("source") or {}).get("card")
    return card if isinstance(card, Mapping) else {}


def _base_model(manifest: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """The card's ``base_model`` and ``base_model_relation``.

    Only a Hub source is known to be the repo these files were converted from (so ``quantized`` from it). A local
    folder is named by nothing but its own card's ``base_model``: the model it derives from, with the relation that
    card states, if any (``config.json``'s ``_name_or_path`` is no evidence: a fine-tune keeps its parent's there).
    """
    source = manifest.get("source") or {}
    if source.get("kind") == "hub":
        repo = source.get("repo_id")
        return (repo, "quantized") if isinstance(repo, str) else (None, None)
    card = _source_card(manifest)
    bases = card.get("base_model")
    if isinstance(bases, list) and bases and isinstance(bases[0], str):
        relation = card.get("base_model_relation")
        return bases[0], relation if relation in RELATIONS else None
    return None, None


def _license(manifest: Mapping[str, Any]) -> tuple[dict[str, str], str]:
    """The license fields of the front matter, and a sentence for the card's body."""
    card = _source_card(manifest)
    lic = card.get("license") if isinstance(card.get("license"), str) else None
    name = card.get("license_name") if isinstance(card.get("license_name"), str) else None
    link = card.get("license_link") if isinstance(card.get("license_link"), str) else None
    if link is not None and not _HTTPS_LINK.match(link):
        link = None  # a `javascript:` or relative link is no license link
    declared_unknown = lic is not None and lic.lower() == "unknown"
    if declared_unknown:
        lic = None  # "unknown" declares no license: `other` would claim a custom one
    files = [f for f in card.get("license_files") or [] if isinstance(f, Mapping)]
    shown_files = ", ".join(f"{_code(f.get('name'))} (SHA-256 {_code(f.get('sha256'))})" for f in files)
    with_files = f" The source ships its license text as {shown_files}." if files else ""
    if lic is not None and lic.lower() in HUB_LICENSES and lic.lower() != "other":
        return {"license": lic.lower()}, f"`{lic.lower()}`, as the source model's card declares.{with_files}"
    if lic is None and name is None and link is None and not files:
        # Nothing recorded: `other` would claim a custom license the records do not show, so nothing is claimed.
        said = "declares `license: unknown`" if declared_unknown else "and config name no license"
        return {}, f"unknown: the source model's card {said}. Check the source before use."
    fields = {"license": "other"}
    if name is None and lic is not None and lic.lower() != "other":
        name = lic
    if name is not None:
        fields["license_name"] = name
    if link is not None:
        fields["license_link"] = link
    # A hostile card's name or link goes into the body only as a code span: no live link, no HTML.
    described = _code(name or lic) if (name or lic) else "a license of its own"
    where = f" ({_code(link)})" if link else ""
    return fields, f"{described}{where}: not one of the Hub's license ids, so `other`.{with_files}"


def _is_causal_lm(manifest: Mapping[str, Any]) -> bool:
    arch = _source_card(manifest).get("architecture")
    if isinstance(arch, str):
        return arch.endswith(("ForCausalLM", "LMHeadModel"))
    # No record of the source architecture (older manifests): a file that generated text is a text generator.
    return any(((f.get("verification") or {}).get("generated_tokens")) for f in manifest.get("files") or [])


def card_front_matter(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The card's YAML metadata (``base_model``, ``license``, ``tags``, ``quantized_by``, ``pipeline_tag``)."""
    front: dict[str, Any] = {}
    base, relation = _base_model(manifest)
    if base is not None:
        front["base_model"] = base
        if relation is not None:
            front["base_model_relation"] = relation
    front.update(_license(manifest)[0])
    precisions = [str(f.get("precision", "")).lower() for f in manifest.get("files") or []]
    front["tags"] = list(dict.fromkeys(["gguf", "llama-cpp", "cecai-converter", *(p for p in precisions if p)]))
    version = (manifest.get("tool") or {}).get("version") or __version__
    front["quantized_by"] = f"cecai-converter {version}"
    if _is_causal_lm(manifest):
        front["pipeline_tag"] = "text-generation"
    if (manifest.get("multimodal") or {}).get("projector") is True and manifest.get("mmproj"):
        # A text model published with its projector answers about images (Hugging Face's task name for it).
        front["pipeline_tag"] = "image-text-to-text"
        front["tags"].append("multimodal")
    return front


# -- the body --------------------------------------------------------------------------------------------------
def _num(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _pm(value: object, error: object, fmt: str) -> str:
    v = _num(value)
    if v is None:
        return _DASH
    e = _num(error)
    return f"{v:{fmt}} ± {e:{fmt}}" if e is not None else f"{v:{fmt}} ± {_DASH}"


def fidelity_measured_by(manifest: Mapping[str, Any]) -> str | None:
    """One sentence naming the runtime that measured the files' fidelity (the builder's, or the check job's a
    published manifest names in ``measured_by``), or None when no file has fidelity."""
    places: list[str] = []
    for entry in manifest.get("files") or []:
        fid = entry.get("fidelity") if isinstance(entry.get("fidelity"), Mapping) else {}
        if not fid:
            continue
        found = fid.get("measured_by")
        by: Mapping[str, Any] = found if isinstance(found, Mapping) else {}
        device = inline(str(by.get("device") or fid.get("device") or "an unrecorded device"))
        place = f"the {inline(str(by['pair']))} check ({device})" if by.get("pair") else f"the builder ({device})"
        if place not in places:
            places.append(place)
    return f"Fidelity measured on {' and '.join(places)}." if places else None


def _ppl_change(fid: Mapping[str, Any]) -> str:
    ratio = _num(fid.get("ppl_ratio"))
    if ratio is not None:
        se = _num(fid.get("ppl_ratio_se"))
        pct = f"{(ratio - 1) * 100:+.2f} %"
        return f"{pct} ± {se * 100:.2f} %" if se is not None else f"{pct} ± {_DASH}"
    delta = _num(fid.get("ppl_delta_pct"))
    return f"{delta:+.2f} % ± {_DASH}" if delta is not None else _DASH


def _size(n: object) -> str:
    v = _num(n)
    return _DASH if v is None else decimal_size(v)


def _check_rows(checks: Mapping[str, CheckRecord | Mapping[str, Any]]) -> dict[str, dict[str, CheckRow]]:
    """pair → file name → that file's row in the pair's check record."""
    return {pair: CheckRecord.of(record).rows_by_name() for pair, record in sorted(checks.items())}


def files_table(
    manifest: Mapping[str, Any], checks: Mapping[str, CheckRecord | Mapping[str, Any]] | None = None
) -> list[str]:
    """Markdown lines: one row per file with size, bits per weight, KLD, top-1 agreement and perplexity change
    (each ± its standard error when the fidelity record has one, "—" when not), and per pair the check result and
    generation speed.

    Args:
        manifest: a run's or a published manifest.
        checks: pair → check record (default: the published manifest's own ``checks``).
    """
    checks = dict(checks if checks is not None else (manifest.get("checks") or {}))
    rows_by_pair = _check_rows(checks)
    head = ["File", "Precision", "Size", "bpw", "KLD ± SE", "Top-1 ± SE", "Perplexity change"]
    for pair in rows_by_pair:
        head += [f"{inline(pair)} check", f"{inline(pair)} tok/s"]
    lines = [
        "| " + " | ".join(head) + " |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |" + " --- | ---: |" * len(rows_by_pair),
    ]
    for entry in manifest.get("files") or []:
        fid = entry.get("fidelity") if isinstance(entry.get("fidelity"), Mapping) else {}
        bpw = _num(entry.get("bpw"))
        top1 = _num(fid.get("top1_agreement"))
        top1_se = fidelity_error(fid, "top1_agreement_se")
        top1_text = _DASH if top1 is None else f"{top1:.1%} ± " + (f"{top1_se:.1%}" if top1_se is not None else _DASH)
        cells = [
            code(entry.get("name"), cell=True),
            inline(entry.get("precision")),
            _size(entry.get("bytes")),
            f"{bpw:.2f}" if bpw is not None else _DASH,
            _pm(fid.get("kld_mean"), fidelity_error(fid, "kld_mean_se"), ".2e"),
            top1_text,
            _ppl_change(fid),
        ]
        for rows in rows_by_pair.values():
            row = rows.get(str(entry.get("name")))
            if row is None:
                cells += [_DASH, _DASH]
                continue
            speed = _num((row.agreement or {}).get("gen_tps"))
            passed = row.vouches_for(entry.get("sha256"))  # as publish judges a row
            cells += ["✅ pass" if passed else "❌ fail", f"{speed:.0f}" if speed is not None else _DASH]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _tail_stats(manifest: Mapping[str, Any]) -> list[str]:
    """KLD distribution lines for files whose fidelity record has them (median, p99, p99.9, max)."""
    keys = (("kld_median", "median"), ("kld_p99", "p99"), ("kld_p99_9", "p99.9"), ("kld_max", "max"))
    lines = []
    for entry in manifest.get("files") or []:
        fid = entry.get("fidelity") if isinstance(entry.get("fidelity"), Mapping) else {}
        parts = [f"{label} {v:.2e}" for key, label in keys if (v := _num(fid.get(key))) is not None]
        if parts:
            lines.append(f"- {_code(entry.get('name'))}: KLD " + ", ".join(parts))
    return lines


def _convert_command(manifest: Mapping[str, Any]) -> str:
    source = manifest.get("source") or {}
    # Never the builder's path: the card is published, and a host path means nothing to a downloader.
    model = source.get("repo_id") if source.get("kind") == "hub" else "MODEL_FOLDER"
    words = ["cecai-convert", "convert", str(model)]
    for entry in manifest.get("files") or []:
        words += ["--precision", str(entry.get("precision"))]
    if source.get("kind") == "hub" and source.get("revision"):
        words += ["--revision", str(source["revision"])]
    imatrix = manifest.get("imatrix") or {}
    if imatrix.get("source") == "given":
        words += ["--imatrix", str(imatrix.get("file"))]
    elif imatrix.get("source") == "computed":
        words += ["--imatrix", "auto"]
    for rule in _tensor_types(manifest):
        words += ["--tensor-type", rule]
    if (manifest.get("multimodal") or {}).get("text_only") is True:
        words.append("--text-only")
    words += ["--model-name", str(manifest.get("model_name")), "--outdir", "OUTDIR"]
    return shlex.join(words)


def multimodal_lines(manifest: Mapping[str, Any]) -> list[str]:
    """The card's section on towers beyond the text model: the projector files and how to load them, or the
    statement that the text model was published alone (``--text-only``); empty for a text model."""
    record = manifest.get("multimodal")
    if not isinstance(record, Mapping):
        return []
    towers = inline(describe_kinds(record.get("towers") or [])) or _DASH
    if record.get("text_only") is True:
        left_out = inline(describe_kinds(record.get("left_out") or [])) or towers
        return [
            "## Text only",
            "",
            f"The source model has {towers} beyond its text model. These files hold **the text model alone**, "
            f"converted with `--text-only`: left out on request: {left_out}. They cannot see images or hear audio.",
        ]
    projectors = [f for f in manifest.get("mmproj") or [] if isinstance(f, Mapping)]
    if not projectors:
        return []
    files = [f for f in manifest.get("files") or [] if isinstance(f, Mapping)]
    model = str(files[0].get("name")) if files else "MODEL.gguf"
    lines = [
        "## Vision: the multimodal projector",
        "",
        f"The source model has {towers}. The projector (vision encoder and its projection) is published as its own "
        "file; load it together with any of the text files above. llama.cpp's `-hf` finds it by its `mmproj-` "
        "prefix.",
        "",
        "| File | Precision | Size | SHA-256 | Test image |",
        "| --- | --- | ---: | --- | --- |",
    ]
    for entry in projectors:
        image = (entry.get("verification") or {}).get("image_tokens")
        seen = f"encoded ({image} image tokens), then generated" if image else _DASH
        lines.append(
            f"| {code(entry.get('name'), cell=True)} | {inline(entry.get('precision'))} | {_size(entry.get('bytes'))} "
            f"| {_code(entry.get('sha256'))} | {seen} |"
        )
    command = ["llama-mtmd-cli", "-m", model, "--mmproj", str(projectors[0].get("name")), "--image", "IMAGE.png",
               "-p", "Describe this image."]  # fmt: skip
    return [*lines, "", *code_block(shlex.join(command), "sh")]


def tensor_types_name(model_name: str) -> str:
    """The published ``llama-quantize --tensor-type-file`` map of a model: ``<model>.tensor-types.txt``."""
    return f"{model_name}.tensor-types.txt"


def _tensor_types(manifest: Mapping[str, Any]) -> tuple[str, ...]:
    """The overrides the files were quantized with, as reproduce reads them; none when the record is malformed
    (a card is still written: the manifest's own reader names the problem)."""
    try:
        return recorded_tensor_types(manifest)
    except UsageError:
        return ()


def render_card(
    manifest: Mapping[str, Any],
    checks: Mapping[str, CheckRecord | Mapping[str, Any]] | None = None,
    *,
    repo_id: str | None = None,
    manifest_name: str | None = None,
) -> str:
    """The model card: YAML front matter (:func:`card_front_matter`) and a Markdown body.

    Args:
        manifest: the run's ``manifest.json`` or a published ``<model>.manifest.json``.
        checks: pair → check record, shown per file; default: the manifest's own ``checks``.
        repo_id: the Hub repo the card is for, used in the ``from_pretrained`` example.
        manifest_name: the manifest as the reproduce command names it, relative to where the card is; default the
            name publish gives it (``<model>.<slug>.manifest.json``), which is right beside a published card.
    """
    model = str(manifest.get("model_name") or "model")
    front = card_front_matter(manifest)
    _, license_text = _license(manifest)
    toolchain = manifest.get("toolchain") or {}
    source = manifest.get("source") or {}
    files = [f for f in manifest.get("files") or [] if isinstance(f, Mapping)]
    example = str(files[0].get("name")) if files else f"{model}.q4_k_m.gguf"
    base, _ = _base_model(manifest)
    lines = [f"# {inline(model)} GGUF", ""]
    if base and source.get("kind") == "hub":
        origin = _hub_link(base)
    elif base:  # a local folder's own card names where it comes from, not what it is
        origin = f"a local model folder whose card names {_hub_link(base)} as its base model"
    else:
        origin = "a local model folder"
    lines += [
        f"GGUF files of {origin}, made and verified with cecai-converter {front['quantized_by'].split()[-1]} "
        f"(llama.cpp from llama-cpp-python {inline(toolchain.get('llama_cpp_python', _DASH))}).",
        "",
        "## Files",
        "",
        *files_table(manifest, checks),
        "",
        "KLD: mean KL-divergence of each file's next-token distribution from the unquantized base on a fixed text; "
        "top-1: how often both predict the same next token; perplexity change: relative to the base. "
        "± is the standard error where it was measured (the larger of the per-token one and the one between the "
        "text's chunks); — means not measured.",
    ]
    measured_by = fidelity_measured_by(manifest)
    if measured_by:
        lines += ["", measured_by]
    tails = _tail_stats(manifest)
    if tails:
        lines += ["", *tails]
    towers = multimodal_lines(manifest)
    if towers:
        lines += ["", *towers]
    lines += types_markdown(files)  # what llama.cpp really wrote: the types, bits per weight and any fallback
    # Names go into the example as Python string literals (JSON's are Python's): a quote in a file name cannot
    # turn the snippet people copy into other code.
    hub_repo = repo_id or "OWNER/REPO"
    usage = [
        "from llama_cpp import Llama",
        "",
        f"llm = Llama(model_path={json.dumps(example)})",
        f"# or straight from the Hub: Llama.from_pretrained(repo_id={json.dumps(hub_repo)}, "
        f"filename={json.dumps(example)})",
        'print(llm("The capital of France is", max_tokens=16)["choices"][0]["text"])',
    ]
    lines += ["", "## Usage with llama-cpp-python", "", *code_block("\n".join(usage), "python")]
    lines += [
        "",
        "## How these files were made",
        "",
        f"- Toolchain: llama-cpp-python {_code(toolchain.get('llama_cpp_python', _DASH))} "
        f"(sdist SHA-256 {_code(toolchain.get('sdist_sha256', _DASH))}).",
    ]
    if source.get("kind") == "hub":
        lines.append(f"- Source: {_code(source.get('repo_id'))} at commit {_code(source.get('revision'))}.")
    else:
        lines.append(f"- Source: a local folder with content fingerprint {_code(source.get('fingerprint', _DASH))}.")
    base_rec = manifest.get("base") or {}
    if base_rec.get("precision"):
        lines.append(f"- Converted once to a {_code(base_rec['precision'])} base, then quantized from it.")
    if "source_parity" in manifest:  # the base against its source model (source_parity.py)
        lines.append(f"- Compared with the source model (transformers): {inline(summary(manifest['source_parity']))}.")
    imatrix = manifest.get("imatrix") or {}
    if imatrix:
        text = ""
        if imatrix.get("calibration_text"):
            sha = imatrix.get("calibration_text_sha256")
            text = f", computed on {_code(imatrix['calibration_text'])}" + (f" (SHA-256 {_code(sha)})" if sha else "")
        lines.append(
            f"- Importance matrix: {_code(imatrix.get('file'))} (SHA-256 {_code(imatrix.get('sha256'))}, "
            f"{inline(imatrix.get('source'))}{text})."
        )
    else:
        lines.append("- Importance matrix: none.")
    overrides = _tensor_types(manifest)
    if overrides:
        lines.append(
            "- Per-tensor types (llama-quantize `--tensor-type`): "
            + ", ".join(_code(rule) for rule in overrides)
            + f"; the same map for `llama-quantize --tensor-type-file`: {_code(tensor_types_name(model))}."
        )
    eval_text = manifest.get("eval_text") or {}
    if isinstance(eval_text, Mapping) and eval_text.get("sha256"):
        lines.append(
            f"- Fidelity measured on {_code(eval_text.get('name'))} (SHA-256 {_code(eval_text.get('sha256'))})."
        )
    needs_source = " --source MODEL_FOLDER" if source.get("kind") != "hub" else ""
    pair = PAIRS.get(manifest["pair"]) if isinstance(manifest.get("pair"), str) else None
    published_name = f"{model}.{pair.slug}.manifest.json" if pair else f"{model}.manifest.json"  # as publish names it
    # Where the card is written next to a run's outputs, the manifest there is manifest.json (write_card says so).
    published_name = manifest_name or published_name
    lines += [
        "",
        "## Reproduce",
        "",
        "Rebuild every file from the recorded inputs and compare SHA-256s (same CPU architecture: quantized bytes "
        "differ between x86-64 and arm64):",
        "",
        *code_block(shlex.join(["cecai-convert", "reproduce", published_name]) + needs_source, "sh"),
        "",
        "The conversion itself:",
        "",
        *code_block(_convert_command(manifest), "sh"),
        "",
        "## License",
        "",
        f"License: {license_text}"
        + (
            f" See the source repository's own card: {_hub_link(source.get('repo_id'))}."
            if source.get("kind") == "hub" and "license" not in front
            else ""
        ),
        "",
    ]
    header = yaml.safe_dump(front, sort_keys=False, allow_unicode=True, default_flow_style=False)
    return f"---\n{header}---\n\n" + "\n".join(lines)


def write_card(
    outdir: Path,
    output: Path | None = None,
    *,
    check_records: Sequence[CheckRecord] | None = None,
    repo_id: str | None = None,
) -> Path:
    """Render the card of the manifest in ``outdir`` (a folder or a manifest file) and write it atomically.

    Args:
        outdir: an outputs folder (``manifest.json``) or a manifest file (``<model>.manifest.json``).
        output: where to write; default ``README.md`` next to the manifest.
        check_records: check records (``records.read_records``); the manifest's model's are shown, by pair.
        repo_id: the Hub repo for the usage example.

    Raises:
        UsageError: no readable manifest, or ``output`` inside the model source folder (its own card).
    """
    manifest_path = outdir / MANIFEST_NAME if outdir.is_dir() else outdir
    manifest = load_manifest_file(manifest_path)
    # Not resolve(): a link planted at README.md would be followed; the safe writer refuses it instead.
    target = write_target(output or manifest_path.parent / CARD_NAME)
    source_path = manifest.source_path
    if source_path:
        src = Path(source_path).resolve()
        if target == src or src in target.parents:
            raise UsageError(
                f"{target} is inside the model source folder {src}: the card would replace or sit beside the "
                "source's own files",
                hint="write it next to the GGUF files (the default) or give -o elsewhere",
            )
    checks = None if check_records is None else checks_by_pair(check_records, str(manifest.model_name))
    # The reproduce command names the manifest that exists where the card is: manifest.json beside it, or the path
    # to it from an -o elsewhere (the published <model>.<slug>.manifest.json exists only on a release or the Hub).
    manifest_name = Path(os.path.relpath(write_target(manifest_path), target.parent)).as_posix()
    document = manifest.to_dict()
    atomic_write_text(target, render_card(document, checks, repo_id=repo_id, manifest_name=manifest_name))
    return target


def load_manifest_file(path: Path) -> Manifest:
    """A run's ``manifest.json`` or a published ``<model>.manifest.json``, checked like every manifest read.

    Raises:
        UsageError: missing, not JSON, or not a cecai-converter manifest (ManifestError names the field).
    """
    try:
        return load_manifest(path)
    except FileNotFoundError:
        raise UsageError(
            f"no manifest at {path}", hint="give an outputs folder of `cecai-convert run/convert` or a manifest file"
        ) from None
    except IsADirectoryError:
        raise UsageError(f"{path} is a folder without a manifest.json") from None


def checks_by_pair(records: Sequence[CheckRecord], model_name: str) -> dict[str, CheckRecord]:
    """The check records of ``model_name``, keyed by pair (other models' records are left out)."""
    return {str(r.pair): r for r in records if r.model_name in (None, model_name)}


def hub_card(
    inputs: Sequence[Path], repo_id: str | None = None, check_paths: Sequence[Path] | None = None
) -> str | None:
    """The card ``publish --hf-repo`` uploads as ``README.md``: that of the one model whose manifests are among
    ``inputs`` (folders holding ``manifest.json`` / ``*.manifest.json``, or manifest files).

    Returns None when the inputs hold no manifest or several models' (one card describes one model).
    """
    found: list[Path] = []
    for item in inputs:
        if item.is_dir():
            found += [p for p in [item / MANIFEST_NAME, *sorted(item.glob("*.manifest.json"))] if p.is_file()]
        elif item.name.endswith(MANIFEST_NAME) and item.is_file():
            found.append(item)
    manifests = [load_manifest_file(p) for p in found]
    models = {str(m.model_name) for m in manifests}
    if len(models) != 1:
        return None
    checks = None
    if check_paths:
        checks = checks_by_pair(read_records(list(check_paths)), models.pop())
    return render_card(manifests[0].to_dict(), checks, repo_id=repo_id)
