"""Towers beyond the text model: found, converted whole (a projector file, ``mmproj-…``), or refused by name.

``convert_hf_to_gguf.py`` writes only the text model of a vision-language checkpoint unless it is run a second time
with ``--mmproj``; without that, the vision tower and projector are dropped without a word. So before converting,
:func:`detect_towers` reads ``config.json`` (``vision_config``, ``audio_config``, ``mm_*``, multi-token-prediction
counts) and the weights' tensor names (``vision_tower.*``, ``multi_modal_projector.*``, ``audio_tower.*``,
``mtp.*``), and :func:`plan_towers` decides:

- the pinned converter registers a projector for the architecture (its ``MMPROJ_MODEL_MAP``) → the conversion
  also writes ``mmproj-<model>-f16.gguf`` (and ``-q8_0`` when Q8_0 is asked), named as llama.cpp's ``-hf`` finds
  projectors;
- otherwise (or for multi-token-prediction heads, never published as their own file) → :class:`UnsupportedModel`
  naming the towers, unless the explicit ``--text-only`` / ``TEXT_ONLY`` opt-in is given, which the manifest and
  the card record.

The projector is then checked as a text model is: :func:`image_check_many` loads the text model with its projector
through llama-cpp-python's multimodal library (``libmtmd``) in a worker process, encodes a shipped test image
(:func:`shipped_image`, a red square), and generates a few tokens after it.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Final

from .errors import UnsupportedModel, VerificationFailed, WorkerFailed
from .processes import WorkerUsage, run_worker, serve_job, worker_failure_why
from .runtime import runtime_env, runtime_name
from .source import converter_map_keys

__all__ = [
    "MMPROJ_ROLE",
    "TEST_IMAGE_NAME",
    "ImageCheck",
    "Tower",
    "Towers",
    "describe_kinds",
    "detect_towers",
    "image_check_many",
    "mmproj_architectures",
    "mmproj_file_name",
    "mmproj_precisions",
    "mtp_refusal",
    "plan_towers",
    "shipped_image",
]

#: The kind of file a projector is, where a listing mixes it with text models.
MMPROJ_ROLE: Final = "mmproj"
TEST_IMAGE_NAME: Final = "test_image.png"
IMAGE_PROMPT: Final = "What is in this image?"
GENERATE_TOKENS: Final = 8

# Tensor-name prefixes of each tower, as checkpoints on the Hub write them (with or without a leading ``model.``).
_TENSOR_PREFIXES: Final[Mapping[str, tuple[str, ...]]] = {
    "vision": ("vision_tower.", "vision_model.", "visual.", "vision_encoder.", "image_encoder.", "vpm."),
    "projector": ("multi_modal_projector.", "multimodal_projector.", "mm_projector.", "connector.", "resampler."),
    "audio": ("audio_tower.", "audio_encoder.", "audio_model.", "audio."),
    "mtp": ("mtp.", "mtp_layers.", "nextn."),
}
# config.json keys that announce a tower (a non-empty mapping, a true value or a positive count).
_CONFIG_KEYS: Final[Mapping[str, tuple[str, ...]]] = {
    "vision": ("vision_config", "mm_vision_tower", "vision_tower", "visual"),
    "projector": ("mm_projector_type", "mm_hidden_size"),
    "audio": ("audio_config",),
    "mtp": ("num_nextn_predict_layers", "mtp_num_hidden_layers", "num_mtp_layers", "mtp"),
}
_WHAT: Final[Mapping[str, str]] = {
    "vision": "a vision tower",
    "projector": "a multimodal projector",
    "audio": "an audio tower",
    "mtp": "multi-token-prediction heads",
}


@dataclass(frozen=True)
class Tower:
    """One part of a checkpoint beyond its text model.

    Attributes:
        kind: ``vision``, ``projector``, ``audio`` or ``mtp``.
        evidence: where it was seen (``config.json: vision_config``, ``tensors: vision_tower.* (12)``).
    """

    kind: str
    evidence: tuple[str, ...]

    def describe(self) -> str:
        """``a vision tower (config.json: vision_config; tensors: vision_tower.* (12))``."""
        return f"{_WHAT.get(self.kind, self.kind)} ({'; '.join(self.evidence)})"


@dataclass(frozen=True)
class Towers:
    """What a model folder holds beyond its text model, and what the pinned converter can do with it.

    Attributes:
        architecture: ``config.json``'s first ``architectures`` entry.
        towers: every tower found (empty for a text model).
        projector: the pinned converter exports a projector (``--mmproj``) for this architecture.
    """

    architecture: str
    towers: tuple[Tower, ...] = ()
    projector: bool = False

    @property
    def kinds(self) -> list[str]:
        """The kinds found, in a fixed order."""
        return [t.kind for t in self.towers]

    @property
    def wants_projector(self) -> bool:
        """Whether a projector file is to be written: a vision or audio tower the converter can export."""
        return self.projector and any(t.kind in ("vision", "audio", "projector") for t in self.towers)

    @property
    def unconverted(self) -> tuple[Tower, ...]:
        """The towers no file of a default conversion would hold, as far as is known before converting.

        Multi-token-prediction heads are not among them: for some architectures the converter keeps them in the
        text file itself (``<arch>.nextn_predict_layers``), which only the converted file tells
        (:func:`mtp_refusal`).
        """
        if self.wants_projector:
            return ()
        return tuple(t for t in self.towers if t.kind != "mtp")


def _truthy(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return value > 0
    if isinstance(value, Mapping | list | str):
        return len(value) > 0
    return value is not None


def _tensor_names(model_dir: Path) -> list[str]:
    """Every tensor name of the checkpoint: from ``model.safetensors.index.json``, else the safetensors headers."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
        except (OSError, ValueError, RecursionError):
            weight_map = None
        if isinstance(weight_map, dict):
            return [str(k) for k in weight_map]
    names: list[str] = []
    for path in sorted(model_dir.glob("*.safetensors")):
        try:
            with path.open("rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                if n > 100_000_000:  # source.check_model_dir refuses such a header; never read it whole here
                    continue
                header = json.loads(fh.read(n))
        except (OSError, ValueError, RecursionError, struct.error):
            continue  # a damaged file is source.py's to report
        if isinstance(header, dict):
            names += [k for k in header if k != "__metadata__"]
    return names


def _tower_of(name: str) -> str | None:
    stripped = name.removeprefix("model.")
    for kind, prefixes in _TENSOR_PREFIXES.items():
        if stripped.startswith(prefixes):
            return kind
    return None


@cache
def mmproj_architectures(converter_dir: Path) -> frozenset[str]:
    """The architectures the pinned converter exports a projector for (``--mmproj``), read without importing it.

    The converter lists them in ``conversion/__init__.py`` as ``MMPROJ_MODEL_MAP`` (architecture → module of its
    ``MmprojModel`` subclass).
    """
    try:
        return converter_map_keys(converter_dir, "MMPROJ_MODEL_MAP")
    except (OSError, SyntaxError):
        return frozenset()


def detect_towers(model_dir: Path, config: Mapping[str, Any], converter_dir: Path) -> Towers:
    """Find the towers of the model in ``model_dir`` (``config`` is its ``config.json``)."""
    archs = config.get("architectures")
    architecture = str(archs[0]) if isinstance(archs, list) and archs else ""
    evidence: dict[str, list[str]] = {}
    for kind, keys in _CONFIG_KEYS.items():
        for key in keys:
            if _truthy(config.get(key)):
                evidence.setdefault(kind, []).append(f"config.json: {key}")
    counts: dict[str, dict[str, int]] = {}
    for name in _tensor_names(model_dir):
        found = _tower_of(name)
        if found is not None:
            prefix = name.removeprefix("model.").split(".", 1)[0]
            per_kind = counts.setdefault(found, {})
            per_kind[prefix] = per_kind.get(prefix, 0) + 1
    for kind, prefixes in counts.items():
        for prefix, n in sorted(prefixes.items()):
            evidence.setdefault(kind, []).append(f"tensors: {prefix}.* ({n})")
    towers = tuple(Tower(kind, tuple(evidence[kind])) for kind in _TENSOR_PREFIXES if kind in evidence)
    return Towers(architecture, towers, projector=architecture in mmproj_architectures(converter_dir))


def plan_towers(towers: Towers, *, text_only: bool) -> dict[str, Any] | None:
    """What the manifest records under ``multimodal`` (None for a plain text model).

    ``{"towers": [...], "projector": bool (a projector file is written), "text_only": bool, "left_out": [...]}``.

    Raises:
        UnsupportedModel: towers that no file would hold, without the ``text_only`` opt-in; the message names each.
    """
    if not towers.towers:
        return None
    left_out = [t.kind for t in towers.towers] if text_only else [t.kind for t in towers.unconverted]
    if towers.unconverted and not text_only:
        names = "; ".join(t.describe() for t in towers.unconverted)
        why = (
            f"The pinned llama.cpp converter cannot export a projector for {towers.architecture or 'it'} "
            "(convert_hf_to_gguf.py --mmproj does not know the architecture)."
        )
        raise UnsupportedModel(
            f"this model has parts beyond its text model that the conversion would drop: {names}. {why} "
            "Nothing was converted.",
            hint=_TEXT_ONLY_HINT,
        )
    return {
        "towers": towers.kinds,
        "projector": towers.wants_projector and not text_only,
        "text_only": bool(text_only),
        "left_out": left_out,
    }


_TEXT_ONLY_HINT: Final = (
    "to publish the text model alone, say so: --text-only (TEXT_ONLY: true, CECAI_TEXT_ONLY=1); the manifest and the "
    "model card then record that the other towers were left out"
)


def mtp_refusal(towers: Towers, metadata: Mapping[str, Any], *, text_only: bool) -> UnsupportedModel | None:
    """The refusal for multi-token-prediction heads that the converted text file (its header ``metadata``) does not
    hold; None when there are none, the file keeps them (``<arch>.nextn_predict_layers`` > 0), or ``text_only``."""
    mtp = [t for t in towers.towers if t.kind == "mtp"]
    if not mtp or text_only:
        return None
    kept = any(k.endswith(".nextn_predict_layers") and isinstance(v, int) and v > 0 for k, v in metadata.items())
    if kept:
        return None
    return UnsupportedModel(
        f"this model has parts beyond its text model that the conversion would drop: {mtp[0].describe()}. The "
        f"pinned llama.cpp converter does not keep them in the {towers.architecture or 'text'} GGUF (it has no "
        "nextn_predict_layers); nothing was published.",
        hint=_TEXT_ONLY_HINT,
    )


def describe_kinds(kinds: Sequence[object]) -> str:
    """``a vision tower and a multimodal projector``: tower kinds (as a manifest records them) in words."""
    words = [_WHAT.get(str(k), str(k)) for k in kinds]
    return " and ".join([", ".join(words[:-1]), words[-1]] if len(words) > 1 else words)


def mmproj_precisions(requested: Sequence[str]) -> list[str]:
    """The projector files to write: F16 always, Q8_0 too when it is among the ``requested`` precisions."""
    return ["F16"] + (["Q8_0"] if "Q8_0" in requested else [])


def mmproj_file_name(model_name: str, precision: str) -> str:
    """``mmproj-<model>-f16.gguf``: the ``mmproj-`` prefix is how llama.cpp's ``-hf`` finds a projector."""
    return f"mmproj-{model_name}-{precision.lower()}.gguf"


def shipped_image() -> Path:
    """The shipped test image (64×64 PNG, a red square on white)."""
    path = Path(str(resources.files("cecai_converter") / "data" / TEST_IMAGE_NAME))
    return path


# -- the image check ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageCheck:
    """A text model loaded with its projector, shown the test image, and made to generate.

    Attributes:
        runtime: ``cpu`` or ``cuda``.
        mmproj: the projector's file name.
        image: the image's file name.
        prompt: the text around the image.
        image_tokens: positions the image took in the context (the projector's output embeddings).
        embedding_values: how many numbers the projector produced; all were finite.
        embedding_rms: their root mean square (a projector that writes zeros shows 0).
        generated_tokens: greedy tokens after the image and the prompt.
        text: their text.
    """

    runtime: str
    mmproj: str
    image: str
    prompt: str
    image_tokens: int
    embedding_values: int
    embedding_rms: float
    generated_tokens: list[int]
    text: str

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready copy for the manifest (``image`` in a file's ``verification``)."""
        return {
            "runtime": self.runtime, "mmproj": self.mmproj, "image": self.image, "prompt": self.prompt,
            "image_tokens": self.image_tokens, "embedding_values": self.embedding_values,
            "embedding_rms": self.embedding_rms, "generated_tokens": list(self.generated_tokens), "text": self.text,
        }  # fmt: skip


#: The line the worker prints before it loads a pair of files.
_LOADING: Final = "cecai-image-check: loading "


def image_check_many(
    pairs: Sequence[tuple[Path, Path]],
    *,
    n_gpu_layers: int = 0,
    threads: int | None = None,
    timeout: float | None = None,
    image: Path | None = None,
) -> dict[tuple[Path, Path], ImageCheck]:
    """Load each (text model, projector) pair, encode ``image`` (default: :func:`shipped_image`) and generate after it.

    All pairs run in one worker process; llama.cpp may abort on a broken file, and the message then names the pair.

    Raises:
        VerificationFailed: a pair could not be loaded, the image could not be encoded, the projector produced
            non-finite numbers, or nothing was generated.
    """
    job = {
        "pairs": [[str(model), str(mmproj)] for model, mmproj in pairs],
        "image": str(image or shipped_image()),
        "n_gpu_layers": n_gpu_layers,
        "threads": threads,  # None: the cores this worker is granted (threads.py; processes.serve_job fills it in)
    }
    loading: list[str] = []

    def on_line(line: str) -> None:
        if line.startswith(_LOADING):
            loading.append(line[len(_LOADING) :])

    try:
        run = run_worker(
            "cecai_converter.multimodal", job, timeout=timeout, name="image check", env=runtime_env(n_gpu_layers),
            on_line=on_line, threads=threads,
        )  # fmt: skip
    except WorkerFailed as exc:
        failing = loading[-1] if loading else ", ".join(f"{m.name} + {p.name}" for m, p in pairs)
        why = worker_failure_why(exc, progress_prefix=_LOADING)
        raise VerificationFailed(
            f"llama-cpp-python could not answer about the test image with {failing} ({why}",
            hint="the files were not published; the log has the runtime's full output",
        ) from None
    done: dict[tuple[Path, Path], ImageCheck] = {}
    for item in run.data["checks"]:
        key = (Path(item.pop("model")), Path(item.pop("mmproj_path")))
        done[key] = ImageCheck(**item)
    for model, mmproj in pairs:
        check = done.get((model, mmproj))
        if check is None:
            raise VerificationFailed(f"the image check reported nothing for {model.name} + {mmproj.name}")
        if check.image_tokens <= 0 or check.embedding_values <= 0:
            raise VerificationFailed(f"{mmproj.name} produced no image embeddings for the test image")
        if not check.generated_tokens:
            raise VerificationFailed(f"{model.name} with {mmproj.name} generated no tokens after the test image")
    return done


def _image_worker(job: Mapping[str, Any]) -> dict[str, Any]:
    """The worker: for each pair, load, encode the image, evaluate image + prompt, generate greedily."""
    import ctypes

    import llama_cpp
    import llama_cpp.mtmd_cpp as mtmd
    import numpy as np

    n_gpu_layers = int(job["n_gpu_layers"])
    image_bytes = Path(job["image"]).read_bytes()
    checks: list[dict[str, Any]] = []
    for model_path, mmproj_path in job["pairs"]:
        print(f"{_LOADING}{Path(model_path).name} + {Path(mmproj_path).name}", flush=True)
        llm = llama_cpp.Llama(
            model_path, n_ctx=1024, n_batch=512, n_gpu_layers=n_gpu_layers, n_threads=job["threads"] or None,
            n_threads_batch=job["threads"] or None, seed=0, verbose=False,
        )  # fmt: skip
        params = mtmd.mtmd_context_params_default()
        params.use_gpu = n_gpu_layers != 0
        params.print_timings = False
        params.n_threads = int(job["threads"] or 1)
        ctx = mtmd.mtmd_init_from_file(mmproj_path.encode(), llm.model, params)
        if not ctx:
            raise WorkerUsage(f"libmtmd could not load the projector {Path(mmproj_path).name} with this model")
        chunks = None
        bitmap = None
        try:
            if not mtmd.mtmd_support_vision(ctx):
                raise WorkerUsage(f"{Path(mmproj_path).name} has no vision encoder")
            buf = (ctypes.c_uint8 * len(image_bytes)).from_buffer(bytearray(image_bytes))
            bitmap = mtmd.mtmd_helper_bitmap_init_from_buf(ctx, buf, len(image_bytes), False)
            if not bitmap:
                raise WorkerUsage(f"libmtmd could not read the image {Path(job['image']).name}")
            marker = mtmd.mtmd_default_marker().decode()
            prompt = f"{marker}\n{IMAGE_PROMPT}\n"
            text = mtmd.mtmd_input_text()
            encoded = prompt.encode()
            text.text, text.text_len, text.add_special, text.parse_special = encoded, len(encoded), True, True
            chunks = mtmd.mtmd_input_chunks_init()
            bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
            rc = mtmd.mtmd_tokenize(ctx, chunks, ctypes.byref(text), bitmaps, 1)
            if rc != 0:
                raise WorkerUsage(f"libmtmd could not tokenize the prompt with the image (error {rc})")
            # Encode the image chunk on its own first, to look at what the projector produced.
            image_tokens, values, rms = 0, 0, 0.0
            n_embd = int(llama_cpp.llama_model_n_embd(llm.model))
            for i in range(mtmd.mtmd_input_chunks_size(chunks)):
                chunk = mtmd.mtmd_input_chunks_get(chunks, i)
                if mtmd.mtmd_input_chunk_get_type(chunk) != mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                    continue
                n_tokens = int(mtmd.mtmd_input_chunk_get_n_tokens(chunk))
                if mtmd.mtmd_encode_chunk(ctx, chunk) != 0:
                    raise WorkerUsage("the projector failed to encode the test image")
                embd = np.ctypeslib.as_array(mtmd.mtmd_get_output_embd(ctx), shape=(n_tokens * n_embd,)).copy()
                if not np.isfinite(embd).all():
                    raise WorkerUsage("the projector produced non-finite image embeddings (NaN or inf)")
                image_tokens += n_tokens
                values += int(embd.size)
                rms = float(math.sqrt(float(np.mean(np.square(embd.astype(np.float64))))))
            new_n_past = llama_cpp.llama_pos(0)
            rc = mtmd.mtmd_helper_eval_chunks(
                ctx, llm._ctx.ctx, chunks, llama_cpp.llama_pos(0), llama_cpp.llama_seq_id(0), llm.n_batch, True,
                ctypes.byref(new_n_past),
            )  # fmt: skip
            if rc != 0:
                raise WorkerUsage(f"evaluating the image and the prompt failed (error {rc})")
            n_vocab = int(llm.n_vocab())
            generated: list[int] = []
            eos = int(llm.token_eos())
            for _ in range(GENERATE_TOKENS):
                logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(n_vocab,))
                if not np.isfinite(logits).all():
                    raise WorkerUsage("the model produced non-finite logits after the image")
                token = int(np.argmax(logits))
                generated.append(token)
                if token == eos:
                    break
                one = (llama_cpp.llama_token * 1)(token)
                if llama_cpp.llama_decode(llm._ctx.ctx, llama_cpp.llama_batch_get_one(one, 1)) != 0:
                    raise WorkerUsage("decoding after the image failed")
            checks.append({
                "model": model_path, "mmproj_path": mmproj_path, "runtime": runtime_name(n_gpu_layers),
                "mmproj": Path(mmproj_path).name, "image": Path(job["image"]).name, "prompt": IMAGE_PROMPT,
                "image_tokens": image_tokens, "embedding_values": values, "embedding_rms": round(rms, 6),
                "generated_tokens": generated,
                "text": llm.detokenize(generated).decode("utf-8", errors="replace"),
            })  # fmt: skip
        finally:
            if chunks is not None:
                mtmd.mtmd_input_chunks_free(chunks)
            if bitmap:
                mtmd.mtmd_bitmap_free(bitmap)
            mtmd.mtmd_free(ctx)
            llm.close()
    return {"checks": checks}


if __name__ == "__main__":
    sys.exit(serve_job(_image_worker))
