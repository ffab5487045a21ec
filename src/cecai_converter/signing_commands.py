"""``cecai-convert sign`` and ``cecai-convert verify-signature``: OpenSSF model-signing signatures over OUTDIR.

See :mod:`cecai_converter.signing` for what a signature covers and the two ways to sign.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from . import environment
from .output import Output
from .signing import GITHUB_OIDC_ISSUER, SIGNATURE_NAME, sign_folder, verify_folder

__all__ = ["register"]


def _sign(args: argparse.Namespace, out: Output) -> int:
    done = sign_folder(
        Path(args.outdir),
        key=Path(args.key) if args.key else None,
        keyless=args.keyless,
        signature=Path(args.signature) if args.signature else None,
        password=environment.text(environment.SIGNING_KEY_PASSWORD) or None,
    )
    human = f"signed {len(done.files)} file(s) of {done.folder} ({done.method}): {done.signature}"
    out.result("\n".join([human, *(f"  {f}" for f in done.files)]), done.as_dict())
    return 0


def _verify(args: argparse.Namespace, out: Output) -> int:
    done = verify_folder(
        Path(args.outdir),
        public_key=Path(args.public_key) if args.public_key else None,
        identity=args.identity,
        issuer=args.issuer,
        signature=Path(args.signature) if args.signature else None,
    )
    human = f"signature OK: {len(done.files)} file(s) of {done.folder} match {done.signature}"
    out.result("\n".join([human, *(f"  {f}" for f in done.files)]), {**done.as_dict(), "verified": True})
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``sign`` and ``verify-signature`` commands."""
    sign = subparsers.add_parser(
        "sign",
        help=f"sign every file of OUTDIR into {SIGNATURE_NAME} (OpenSSF model-signing format)",
        description=f"Write {SIGNATURE_NAME} next to the files of OUTDIR: a signature over every file's SHA-256 "
        "(not the signature, the lock file or staging folders). Keyless (Sigstore, the CI job's OIDC identity) in "
        "a GitHub Actions job with `permissions: id-token: write`; elsewhere give --key. Needs the `sign` extra: "
        "pip install 'cecai-converter[sign]'. A key's password, if any, comes from CECAI_SIGNING_KEY_PASSWORD.",
    )
    sign.add_argument("outdir", metavar="OUTDIR", help="the folder to sign (as it is distributed)")
    mode = sign.add_mutually_exclusive_group()
    mode.add_argument("--key", metavar="PRIVATE_KEY_PEM", help="sign with this elliptic-curve private key")
    mode.add_argument("--keyless", action="store_true", help="sign with Sigstore, using the CI job's OIDC credential")
    sign.add_argument(
        "--signature", metavar="PATH", help=f"where to write the signature (default OUTDIR/{SIGNATURE_NAME})"
    )
    sign.set_defaults(handler=_sign)

    verify = subparsers.add_parser(
        "verify-signature",
        help=f"check OUTDIR against its {SIGNATURE_NAME}: every file, no file missing or added",
        description=f"Hash every file of OUTDIR again and check it against {SIGNATURE_NAME}: exit 0 when all match "
        "and the signature is the key's (--public-key) or the identity's (--identity, --issuer); exit 1 naming "
        "the file that changed, is missing or was added, or the key or identity that does not match.",
    )
    verify.add_argument("outdir", metavar="OUTDIR", help="the folder to check")
    verify.add_argument("--public-key", metavar="PEM", help="the signer's public key (a key-based signature)")
    verify.add_argument(
        "--identity",
        metavar="ID",
        help="the signer's identity (a keyless signature); for a release the release workflow made at its tag "
        "(it signs only there) https://github.com/OWNER/REPO/.github/workflows/release-convert.yml@refs/tags/TAG",
    )
    verify.add_argument(
        "--issuer", metavar="URL", help=f"the identity's OIDC issuer (GitHub Actions: {GITHUB_OIDC_ISSUER})"
    )
    verify.add_argument("--signature", metavar="PATH", help=f"the signature (default OUTDIR/{SIGNATURE_NAME})")
    verify.set_defaults(handler=_verify)
