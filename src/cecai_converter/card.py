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
from .manifest import MANIFEST_NAME, FileEntry, Manifest, load_manifest
from .manifest_fields import Fidelity, SourceCard
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


def _or_dash(value: str | None) -> str:
    """A recorded string as written (an empty one included), "—" when the record has none."""
    return _DASH if value is None else value


def _hub_link(repo_id: object) -> str:
    """A link to a Hub repo when ``repo_id`` is a valid repo id, else the value as a code span (no link)."""
    if isinstance(repo_id, str) and REPO_ID.match(repo_id):
        return f"[`{repo_id}`](https://huggingface.co/{repo_id})"
    return _code(repo_id)


# -- the front matter ------------------------------------------------------------------------------------------
def _source_card(manifest: Manifest) -> SourceCard:
    return manifest.source_record.card or SourceCard()


def _base_model(manifest: Manifest) -> tuple[str | None, str | None]:
    """The card's ``base_model`` and ``base_model_relation``.

    Only a Hub source is known to be the repo these files were converted from (so ``quantized`` from it). A local
    folder is named by nothing but its own card's ``base_model``: the model it derives from, with the relation that
    card states, if any (``config.json``'s ``_name_or_path`` is no evidence: a fine-tune keeps its parent's there).
    """
    source = manifest.source_record
    if source.is_hub:
        repo = source.repo_id
        return (repo, "quantized") if repo is not None else (None, None)
    card = _source_card(manifest)
    if card.base_model:
        relation = card.base_model_relation
        return card.base_model[0], relation if relation in RELATIONS else None
    return None, None


def _license(manifest: Manifest) -> tuple[dict[str, str], str]:
    """The license fields of the front matter, and a sentence for the card's body."""
    card = _source_card(manifest)
    lic, name, link = card.license, card.license_name, card.license_link
    if link is not None and not _HTTPS_LINK.match(link):
        link = None  # a `javascript:` or relative link is no license link
    declared_unknown = lic is not None and lic.lower() == "unknown"
    if declared_unknown:
        lic = None  # "unknown" declares no license: `other` would claim a custom one
    files = card.license_files
    shown_files = ", ".join(f"{_code(f.name)} (SHA-256 {_code(f.sha256)})" for f in files)
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


def _is_causal_lm(manifest: Manifest) -> bool:
    arch = _source_card(manifest).architecture
    if arch is not None:
        return arch.endswith(("ForCausalLM", "LMHeadModel"))
    # No record of the source architecture (older manifests): a file that generated text is a text generator.
    return any(v.generated_tokens for f in manifest.files if (v := f.verification_record) is not None)


def card_front_matter(manifest: Manifest) -> dict[str, Any]:
    """The card's YAML metadata (``base_model``, ``license``, ``tags``, ``quantized_by``, ``pipeline_tag``)."""
    front: dict[str, Any] = {}
    base, relation = _base_model(manifest)
    if base is not None:
        front["base_model"] = base
        if relation is not None:
            front["base_model_relation"] = relation
    front.update(_license(manifest)[0])
    precisions = [f.precision.lower() for f in manifest.files]
    front["tags"] = list(dict.fromkeys(["gguf", "llama-cpp", "cecai-converter", *(p for p in precisions if p)]))
    version = manifest.tool_record.version or __version__
    front["quantized_by"] = f"cecai-converter {version}"
    if _is_causal_lm(manifest):
        front["pipeline_tag"] = "text-generation"
    multimodal = manifest.multimodal_record
    if multimodal is not None and multimodal.projector is True and manifest.mmproj:
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


def fidelity_measured_by(manifest: Manifest) -> str | None:
    """One sentence naming the runtime that measured the files' fidelity (the builder's, or the check job's a
    published manifest names in ``measured_by``), or None when no file has fidelity."""
    places: list[str] = []
    for entry in manifest.files:
        fid = entry.fidelity_record
        if fid is None or not entry.fidelity:  # an empty record is no measurement
            continue
        device = inline(fid.measured_on or "an unrecorded device")
        pair = fid.measured_by.pair if fid.measured_by is not None else None
        place = f"the {inline(pair)} check ({device})" if pair else f"the builder ({device})"
        if place not in places:
            places.append(place)
    return f"Fidelity measured on {' and '.join(places)}." if places else None


def _ppl_change(fid: Fidelity) -> str:
    ratio = fid.ppl_ratio
    if ratio is not None:
        se = fid.ppl_ratio_se
        pct = f"{(ratio - 1) * 100:+.2f} %"
        return f"{pct} ± {se * 100:.2f} %" if se is not None else f"{pct} ± {_DASH}"
    delta = fid.ppl_delta_pct
    return f"{delta:+.2f} % ± {_DASH}" if delta is not None else _DASH


def _size(n: object) -> str:
    v = _num(n)
    return _DASH if v is None else decimal_size(v)


def _check_rows(checks: Mapping[str, CheckRecord | Mapping[str, Any]]) -> dict[str, dict[str, CheckRow]]:
    """pair → file name → that file's row in the pair's check record."""
    return {pair: CheckRecord.of(record).rows_by_name() for pair, record in sorted(checks.items())}


def files_table(manifest: Manifest, checks: Mapping[str, CheckRecord | Mapping[str, Any]] | None = None) -> list[str]:
    """Markdown lines: one row per file with size, bits per weight, KLD, top-1 agreement and perplexity change
    (each ± its standard error when the fidelity record has one, "—" when not), and per pair the check result and
    generation speed.

    Args:
        manifest: a run's or a published manifest.
        checks: pair → check record (default: the published manifest's own ``checks``).
    """
    checks = dict(checks if checks is not None else manifest.check_records)
    rows_by_pair = _check_rows(checks)
    head = ["File", "Precision", "Size", "bpw", "KLD ± SE", "Top-1 ± SE", "Perplexity change"]
    for pair in rows_by_pair:
        head += [f"{inline(pair)} check", f"{inline(pair)} tok/s"]
    lines = [
        "| " + " | ".join(head) + " |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |" + " --- | ---: |" * len(rows_by_pair),
    ]
    for entry in manifest.files:
        fid = _fidelity(entry)
        bpw = _num(entry.bpw)
        top1 = fid.top1_agreement
        top1_se = fid.error("top1_agreement_se")
        top1_text = _DASH if top1 is None else f"{top1:.1%} ± " + (f"{top1_se:.1%}" if top1_se is not None else _DASH)
        cells = [
            code(entry.name, cell=True),
            inline(entry.precision),
            _size(entry.bytes),
            f"{bpw:.2f}" if bpw is not None else _DASH,
            _pm(fid.kld_mean, fid.error("kld_mean_se"), ".2e"),
            top1_text,
            _ppl_change(fid),
        ]
        for rows in rows_by_pair.values():
            row = rows.get(entry.name)
            if row is None:
                cells += [_DASH, _DASH]
                continue
            agreement = row.agreement_record
            speed = _num(agreement.gen_tps) if agreement is not None else None
            passed = row.vouches_for(entry.sha256)  # as publish judges a row
            cells += ["✅ pass" if passed else "❌ fail", f"{speed:.0f}" if speed is not None else _DASH]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _fidelity(entry: FileEntry) -> Fidelity:
    """A file's fidelity record; one with nothing measured (every cell a dash) when it has none."""
    return entry.fidelity_record or Fidelity()


def _tail_stats(manifest: Manifest) -> list[str]:
    """KLD distribution lines for files whose fidelity record has them (median, p99, p99.9, max)."""
    lines = []
    for entry in manifest.files:
        fid = _fidelity(entry)
        values = ((fid.kld_median, "median"), (fid.kld_p99, "p99"), (fid.kld_p99_9, "p99.9"), (fid.kld_max, "max"))
        parts = [f"{label} {v:.2e}" for v, label in values if v is not None]
        if parts:
            lines.append(f"- {_code(entry.name)}: KLD " + ", ".join(parts))
    return lines


def _convert_command(manifest: Manifest) -> str:
    source = manifest.source_record
    # Never the builder's path: the card is published, and a host path means nothing to a downloader.
    model = source.repo_id if source.is_hub else "MODEL_FOLDER"
    words = ["cecai-convert", "convert", str(model)]
    for entry in manifest.files:
        words += ["--precision", entry.precision]
    if source.is_hub and source.revision:
        words += ["--revision", source.revision]
    imatrix = manifest.imatrix_record
    if imatrix is not None and imatrix.source == "given":
        words += ["--imatrix", str(imatrix.file)]
    elif imatrix is not None and imatrix.source == "computed":
        words += ["--imatrix", "auto"]
    for rule in _tensor_types(manifest):
        words += ["--tensor-type", rule]
    multimodal = manifest.multimodal_record
    if multimodal is not None and multimodal.text_only is True:
        words.append("--text-only")
    words += ["--model-name", str(manifest.model_name), "--outdir", "OUTDIR"]
    return shlex.join(words)


def multimodal_lines(manifest: Manifest) -> list[str]:
    """The card's section on towers beyond the text model: the projector files and how to load them, or the
    statement that the text model was published alone (``--text-only``); empty for a text model."""
    record = manifest.multimodal_record
    if record is None:
        return []
    towers = inline(describe_kinds(record.towers)) or _DASH
    if record.text_only is True:
        left_out = inline(describe_kinds(record.left_out)) or towers
        return [
            "## Text only",
            "",
            f"The source model has {towers} beyond its text model. These files hold **the text model alone**, "
            f"converted with `--text-only`: left out on request: {left_out}. They cannot see images or hear audio.",
        ]
    projectors = manifest.mmproj or []
    if not projectors:
        return []
    model = manifest.files[0].name if manifest.files else "MODEL.gguf"
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
        verification = entry.verification_record
        image = verification.image_tokens if verification is not None else None
        seen = f"encoded ({image} image tokens), then generated" if image else _DASH
        lines.append(
            f"| {code(entry.name, cell=True)} | {inline(entry.precision)} | {_size(entry.bytes)} "
            f"| {_code(entry.sha256)} | {seen} |"
        )
    command = ["llama-mtmd-cli", "-m", model, "--mmproj", projectors[0].name, "--image", "IMAGE.png",
               "-p", "Describe this image."]  # fmt: skip
    return [*lines, "", *code_block(shlex.join(command), "sh")]


def tensor_types_name(model_name: str) -> str:
    """The published ``llama-quantize --tensor-type-file`` map of a model: ``<model>.tensor-types.txt``."""
    return f"{model_name}.tensor-types.txt"


def _tensor_types(manifest: Manifest) -> tuple[str, ...]:
    """The overrides the files were quantized with, as reproduce reads them; none when the record is malformed
    (a card is still written: the manifest's own reader names the problem)."""
    try:
        return recorded_tensor_types(manifest.to_dict())  # quant_types reads the JSON, as reproduce passes it
    except UsageError:
        return ()


def render_card(
    manifest: Manifest,
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
    model = manifest.model_name or "model"
    front = card_front_matter(manifest)
    _, license_text = _license(manifest)
    toolchain = manifest.toolchain_record
    source = manifest.source_record
    files = manifest.files
    example = files[0].name if files else f"{model}.q4_k_m.gguf"
    base, _ = _base_model(manifest)
    lines = [f"# {inline(model)} GGUF", ""]
    if base and source.is_hub:
        origin = _hub_link(base)
    elif base:  # a local folder's own card names where it comes from, not what it is
        origin = f"a local model folder whose card names {_hub_link(base)} as its base model"
    else:
        origin = "a local model folder"
    lines += [
        f"GGUF files of {origin}, made and verified with cecai-converter {front['quantized_by'].split()[-1]} "
        f"(llama.cpp from llama-cpp-python {inline(_or_dash(toolchain.llama_cpp_python))}).",
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
    # What llama.cpp really wrote: the types, bits per weight and any fallback (quant_types reads the JSON entries).
    lines += types_markdown([f.to_dict() for f in files])
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
        f"- Toolchain: llama-cpp-python {_code(_or_dash(toolchain.llama_cpp_python))} "
        f"(sdist SHA-256 {_code(_or_dash(toolchain.sdist_sha256))}).",
    ]
    if source.is_hub:
        lines.append(f"- Source: {_code(source.repo_id)} at commit {_code(source.revision)}.")
    else:
        lines.append(f"- Source: a local folder with content fingerprint {_code(_or_dash(source.fingerprint))}.")
    base_precision = manifest.base_record.precision
    if base_precision:
        lines.append(f"- Converted once to a {_code(base_precision)} base, then quantized from it.")
    if manifest.has("source_parity"):  # the base against its source model (source_parity.py)
        lines.append(f"- Compared with the source model (transformers): {inline(summary(manifest.source_parity))}.")
    imatrix = manifest.imatrix_record if manifest.imatrix else None  # an empty record is no matrix
    if imatrix is not None:
        text = ""
        if imatrix.calibration_text:
            sha = imatrix.calibration_text_sha256
            text = f", computed on {_code(imatrix.calibration_text)}" + (f" (SHA-256 {_code(sha)})" if sha else "")
        lines.append(
            f"- Importance matrix: {_code(imatrix.file)} (SHA-256 {_code(imatrix.sha256)}, "
            f"{inline(imatrix.source)}{text})."
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
    eval_text = manifest.eval_text_record
    if eval_text is not None and eval_text.sha256:
        lines.append(f"- Fidelity measured on {_code(eval_text.name)} (SHA-256 {_code(eval_text.sha256)}).")
    needs_source = " --source MODEL_FOLDER" if not source.is_hub else ""
    pair = PAIRS.get(manifest.pair) if manifest.pair is not None else None
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
            f" See the source repository's own card: {_hub_link(source.repo_id)}."
            if source.is_hub and "license" not in front
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
    atomic_write_text(target, render_card(manifest, checks, repo_id=repo_id, manifest_name=manifest_name))
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
    return render_card(manifests[0], checks, repo_id=repo_id)
