"""Signatures over a folder of outputs in the OpenSSF model-signing format (PyPI ``model-signing``).

``sign`` writes one signature, ``model.sig``, next to the files: a Sigstore bundle whose payload lists every file of
the folder with its SHA-256. ``verify-signature`` hashes the folder again and refuses it when a file changed, is
missing or was added, or when the signature was not made by the expected key or identity. The signature is the one
``model_signing verify`` (sigstore/model-transparency's CLI) checks too.

What the signature covers: every regular file under the folder, git metadata included, except the signature itself
and the builder's transient files when signing (the lock file, :data:`fsutil.LOCK_NAME`, and staging folders,
:data:`fsutil.STAGING_PREFIX`). ``verify-signature`` leaves out only the signature and a lock file: a file the
signature does not list is refused wherever it is (a staging or ``.github`` folder too), whatever the signed
statement says it ignored (``model_signing verify`` honours that list; ``verify-signature`` does not). So sign the
folder as it is distributed, once every file in it is final: the release flow signs the release's assets as
published (GGUF files, manifests with their check records, ``SHA256SUMS``); locally, a check record that
``cecai-convert check`` writes into OUTDIR after ``sign`` is reported as an extra file, so check before signing,
and a staging folder left by a killed conversion is reported too. Symbolic links are refused (they could point
outside the folder).

Two ways to sign:

* **keyless** (Sigstore): a short-lived certificate for the workflow's OIDC identity, logged in Rekor. Only the
  ambient credential of a CI job is used (GitHub Actions with ``permissions: id-token: write``); an interactive
  browser login is never started.
* **key**: an elliptic-curve private key in PEM (P-256, P-384 or P-521); the verifier needs its public key.

``model_signing`` is imported only when signing or verifying, so the package works without the ``sign`` extra.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Final

from .errors import ConverterError, SignatureRefused, SigningFailed, ToolNotFound, UsageError, VerificationFailed
from .fsutil import (
    LOCK_NAME,
    STAGING_PREFIX,
    install_file,
    outputs_lock,
    refuse_symlink,
    refuse_unsafe_target,
    write_target,
)

__all__ = [
    "GITHUB_OIDC_ISSUER",
    "INSTALL_HINT",
    "SIGNATURE_NAME",
    "SignatureRefused",
    "SignedFolder",
    "SigningFailed",
    "covered_files",
    "keyless_available",
    "sign_folder",
    "signing_mode",
    "verify_folder",
]

SIGNATURE_NAME: Final = "model.sig"
#: The OIDC issuer of GitHub Actions' workflow identities (what a keyless signature made in the release flow names).
GITHUB_OIDC_ISSUER: Final = "https://token.actions.githubusercontent.com"
INSTALL_HINT: Final = "pip install 'cecai-converter[sign]'"
_KEY_HINT: Final = (
    "sign with your own key: `openssl ecparam -name prime256v1 -genkey -noout -out key.pem && openssl ec -in key.pem "
    "-pubout -out key.pub`, then `cecai-convert sign OUTDIR --key key.pem`; or sign keyless in GitHub Actions "
    "(the job needs `permissions: id-token: write`)"
)


@dataclass(frozen=True)
class SignedFolder:
    """What :func:`sign_folder` or :func:`verify_folder` covered.

    Attributes:
        folder: the signed folder.
        signature: the signature file.
        files: the covered files, relative to ``folder``, sorted.
        method: ``key`` or ``keyless``.
    """

    folder: Path
    signature: Path
    files: tuple[str, ...]
    method: str

    def as_dict(self) -> dict[str, Any]:
        """A JSON-friendly copy."""
        return {
            "folder": str(self.folder),
            "signature": str(self.signature),
            "files": list(self.files),
            "method": self.method,
        }


def _model_signing() -> ModuleType:
    """The ``model_signing`` package (its ``signing``, ``verifying`` and ``hashing`` modules loaded)."""
    try:
        for name in ("model_signing.hashing", "model_signing.signing", "model_signing.verifying"):
            importlib.import_module(name)
        return importlib.import_module("model_signing")
    except ImportError as exc:
        raise ToolNotFound(
            f"signing needs the `model-signing` package, which is not installed ({exc})",
            hint=f"install it with: {INSTALL_HINT}",
        ) from None


def keyless_available(env: Mapping[str, str] | None = None) -> bool:
    """Whether this is a GitHub Actions job that may ask for an OIDC token (``permissions: id-token: write``)."""
    env = os.environ if env is None else env
    return env.get("GITHUB_ACTIONS") == "true" and bool(env.get("ACTIONS_ID_TOKEN_REQUEST_URL"))


def signing_mode(key: Path | None, keyless: bool, env: Mapping[str, str] | None = None) -> str:
    """``key`` or ``keyless``: the one asked for, else keyless in a GitHub Actions job with an OIDC token.

    Raises:
        UsageError: both were asked for, or neither and no OIDC token is available.
    """
    if key is not None and keyless:
        raise UsageError("give either --key or --keyless, not both")
    if key is not None:
        return "key"
    if keyless or keyless_available(env):
        return "keyless"
    raise UsageError(
        "no signing key: pass --key PRIVATE_KEY_PEM (keyless signing is the default only in a GitHub Actions job "
        "that may request an OIDC token)",
        hint=_KEY_HINT,
    )


def _excluded(folder: Path, signature: Path, *, signing: bool) -> list[Path]:
    """Paths under ``folder`` (relative) left out, as they are now.

    Signing leaves out the builder's transient files: the signature, the lock ``sign`` holds meanwhile and the
    staging folders of a conversion. Verifying leaves out only the signature and a lock *file* (of a conversion
    started since): any other file the signature does not list, in whatever folder, is refused.
    """
    out = []
    with contextlib.suppress(ValueError):  # a signature kept outside the folder needs no exclusion
        out.append(write_target(signature).relative_to(folder.resolve()))
    if not (folder / LOCK_NAME).is_dir():  # a folder of that name would hide what is in it
        out.append(Path(LOCK_NAME))
    if signing:
        out += sorted(Path(p.name) for p in folder.iterdir() if p.name.startswith(STAGING_PREFIX) and p.is_dir())
    return out


def covered_files(folder: Path, signature: Path | None = None, *, signing: bool = True) -> list[str]:
    """The files (relative, sorted) a signature of ``folder`` covers when made (``signing``) or checked: see
    :func:`_excluded`."""
    excluded = _excluded(folder, signature or folder / SIGNATURE_NAME, signing=signing)
    files = []
    for path in folder.rglob("*"):
        rel = path.relative_to(folder)
        if any(rel == e or e in rel.parents for e in excluded):
            continue
        if path.is_file() or path.is_symlink():
            files.append(rel.as_posix())
    return sorted(files)


def _hashing_config(ms: ModuleType, folder: Path, signature: Path, *, signing: bool) -> Any:
    config = (
        ms.hashing.Config()
        .use_file_serialization(hashing_algorithm="sha256", allow_symlinks=False)
        .set_ignored_paths(paths=_excluded(folder, signature, signing=signing), ignore_git_paths=False)
    )
    if not signing:
        # model_signing's verifier adds the paths the signed statement lists as ignored (what the signer left out,
        # whole folders included) to these, so a file added under one of them would pass: only ours count.
        config.add_ignored_paths = lambda **_: None
    return config


def _check_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise UsageError(
            f"{folder} is not a folder", hint="pass an output folder (the --outdir of `cecai-convert convert`)"
        )
    for name in covered_files(folder):
        refuse_symlink(folder / name, why="a signature covers regular files only")


def _check_ec_key(key: Path, password: str | None) -> None:
    """Refuse what model_signing's key signer would fail on with an AttributeError: a non-EC key, another curve."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    hint = (
        "pass an elliptic-curve private key (P-256, P-384 or P-521) in PEM; its password in CECAI_SIGNING_KEY_PASSWORD"
    )
    try:
        loaded = serialization.load_pem_private_key(key.read_bytes(), password.encode() if password else None)
    except (ValueError, TypeError, OSError) as exc:
        raise SigningFailed(f"{key} is not a usable private key: {exc}", hint=hint) from None
    if not isinstance(loaded, ec.EllipticCurvePrivateKey):
        raise SigningFailed(f"{key} is not a usable private key: a {type(loaded).__name__}, not an EC key", hint=hint)
    if loaded.curve.name not in ("secp256r1", "secp384r1", "secp521r1"):
        raise SigningFailed(f"{key} is not a usable private key: curve {loaded.curve.name}", hint=hint)


def _ambient_token() -> str:
    """The CI job's OIDC token for Sigstore; never an interactive login."""
    from sigstore.oidc import IdentityError, detect_credential

    try:
        token = detect_credential()
    except IdentityError as exc:
        raise SigningFailed(
            f"could not get an OIDC token for keyless signing: {exc}",
            hint="give the job `permissions: id-token: write` (GitHub Actions), or sign with --key",
        ) from None
    if not token:
        raise UsageError(
            "keyless signing needs the OIDC credential of a CI job (GitHub Actions with `permissions: id-token: "
            "write`), and none was found here",
            hint=_KEY_HINT,
        )
    return str(token)


def sign_folder(
    folder: Path,
    *,
    key: Path | None = None,
    keyless: bool = False,
    signature: Path | None = None,
    password: str | None = None,
    env: Mapping[str, str] | None = None,
) -> SignedFolder:
    """Sign every file of ``folder`` (see the module docstring) into ``signature`` (default ``folder/model.sig``).

    The folder's lock is held while hashing, so a conversion into it cannot change files meanwhile; the signature
    appears at its path only when complete (an old one is replaced).

    Args:
        folder: the folder to sign.
        key: an elliptic-curve private key (PEM) for key-based signing.
        keyless: sign with Sigstore using the CI job's OIDC credential.
        signature: where to write the signature.
        password: the key's password, if it is encrypted.
        env: the environment that decides the default mode (:func:`signing_mode`).

    Raises:
        UsageError: bad arguments, not a folder, a symbolic link in it, no key and no CI credential.
        ToolNotFound: ``model-signing`` is not installed.
        SigningFailed: the key could not be used, or Sigstore refused or could not be reached.
    """
    mode = signing_mode(key, keyless, env)
    folder = folder.resolve()
    # The folder resolved, the signature's own name not: a link planted at model.sig is refused, not written through.
    signature = write_target(signature or folder / SIGNATURE_NAME)
    refuse_unsafe_target(signature)  # before hashing, not after it
    _check_folder(folder)
    if key is not None and not key.is_file():
        raise UsageError(f"no private key at {key}", hint=_KEY_HINT)
    ms = _model_signing()
    config = ms.signing.Config()
    if mode == "key":
        assert key is not None  # signing_mode said so
        _check_ec_key(key, password)
        config.use_elliptic_key_signer(private_key=key, password=password)
    else:
        token = _ambient_token()
        try:
            config.use_sigstore_signer(identity_token=token, use_ambient_credentials=False)
        except Exception as exc:  # Sigstore's trust root comes over the network: any failure there is a service one
            raise SigningFailed(
                f"could not reach Sigstore to sign keyless: {exc}",
                hint="re-run the job; if it keeps failing, see https://status.sigstore.dev",
            ) from exc
    with outputs_lock(folder), tempfile.TemporaryDirectory(prefix="cecai-sign-") as tmp:
        files = covered_files(folder, signature)
        if not files:
            raise UsageError(f"{folder} holds no file to sign")
        staged = Path(tmp) / SIGNATURE_NAME
        try:
            config.set_hashing_config(_hashing_config(ms, folder, signature, signing=True)).sign(folder, staged)
        except ConverterError:
            raise
        except Exception as exc:  # hashing (unreadable file) or Sigstore (network, refused certificate)
            raise SigningFailed(f"could not sign {folder}: {exc}") from exc
        install_file(staged, signature)
    return SignedFolder(folder, signature, tuple(files), mode)


def _mismatch(exc: BaseException) -> str:
    """model_signing's ``Signature mismatch: [...]`` as one line per problem."""
    text = str(exc)
    detail = text.removeprefix("Signature mismatch: ")
    if detail == text:
        return text
    try:
        items = ast.literal_eval(detail)
    except (ValueError, SyntaxError):
        return detail
    if not isinstance(items, list):
        return detail
    lines = []
    for item in map(str, items):
        # model_signing's wording, with the digests' Python reprs (raw bytes) left out
        if m := _CHANGED.match(item):
            lines.append(f"{m[1]} changed since it was signed (its SHA-256 differs)")
        elif m := _EXTRA.match(item):
            lines.append(f"not covered by the signature (added after signing): {m[1]}")
        elif m := _MISSING.match(item):
            lines.append(f"signed but missing: {m[1]}")
        else:
            lines.append(item)
    return "; ".join(lines)


_CHANGED: Final = re.compile(r"Hash mismatch for '(.+?)': Expected ")
_EXTRA: Final = re.compile(r"Extra files found in model '.*?': (.+)$", re.S)
_MISSING: Final = re.compile(r"Missing files in model '.*?': (.+)$", re.S)


def verify_folder(
    folder: Path,
    *,
    public_key: Path | None = None,
    identity: str | None = None,
    issuer: str | None = None,
    signature: Path | None = None,
) -> SignedFolder:
    """Check ``folder`` against its signature: with the signer's ``public_key``, or keyless with the signer's
    ``identity`` and OIDC ``issuer`` (for the release flow: the workflow's URL at the tag, and
    :data:`GITHUB_OIDC_ISSUER`).

    Raises:
        UsageError: bad arguments, no folder or no signature.
        ToolNotFound: ``model-signing`` is not installed.
        SignatureRefused: a file changed, is missing or was added, or the signature is not the key's or the
            identity's (the message names what).
    """
    if (public_key is None) == (identity is None):
        raise UsageError(
            "give either --public-key PEM, or --identity and --issuer (a keyless signature)",
            hint=f"a release the release workflow signed (it signs only in a run at the release's tag) is verified "
            f"with --identity "
            f"https://github.com/OWNER/REPO/.github/workflows/release-convert.yml@refs/tags/TAG --issuer "
            f"{GITHUB_OIDC_ISSUER}",
        )
    if identity is not None and not issuer:
        raise UsageError("--identity needs --issuer (GitHub Actions: " + GITHUB_OIDC_ISSUER + ")")
    folder = folder.resolve()
    signature = (signature or folder / SIGNATURE_NAME).resolve()
    if not folder.is_dir():
        raise UsageError(f"{folder} is not a folder")
    if not signature.is_file():
        raise UsageError(
            f"no signature at {signature}",
            hint="download model.sig from the release into the folder, or pass --signature PATH",
        )
    if public_key is not None and not public_key.is_file():
        raise UsageError(f"no public key at {public_key}")
    ms = _model_signing()
    config = ms.verifying.Config()
    if public_key is not None:
        method = "key"
        try:
            config.use_elliptic_key_verifier(public_key=public_key)
        except (ValueError, TypeError) as exc:
            raise UsageError(f"{public_key} is not a usable public key: {exc}") from None
    else:
        method = "keyless"
        try:
            config.use_sigstore_verifier(identity=identity, oidc_issuer=issuer)
        except Exception as exc:  # Sigstore's trust root comes over the network (TUF): any failure is a service one
            raise VerificationFailed(
                f"could not load Sigstore's trust root to check a keyless signature: {exc}",
                hint="keyless signatures are checked against Sigstore's public trust root, fetched from "
                "tuf-repo-cdn.sigstore.dev: check the network, then re-run",
            ) from exc
    config.set_hashing_config(_hashing_config(ms, folder, signature, signing=False))
    try:
        config.verify(folder, signature)
    except Exception as exc:  # the signature is untrusted input: every way model_signing refuses it is a refusal
        detail = _mismatch(exc) or type(exc).__name__
        if detail.startswith("Key mismatch"):
            detail = f"the signature was not made with the private key of {public_key}"
        elif type(exc).__name__ == "InvalidSignature":  # the key's hint matched: the signed statement was altered
            detail = f"the signature is invalid for {public_key}: the signed statement was altered"
        raise SignatureRefused(
            f"{folder} does not match {signature}: {detail}",
            hint="download the files again (a changed, missing or extra file is refused), and check that the "
            "key or identity is the publisher's",
        ) from exc
    return SignedFolder(folder, signature, tuple(covered_files(folder, signature, signing=False)), method)
