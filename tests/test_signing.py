"""``cecai-convert sign`` / ``verify-signature``: OpenSSF model-signing signatures over a real conversion's OUTDIR.

Key-based signing runs for real (an EC P-256 key pair made here with ``cryptography``, the real ``model_signing``
library). Keyless signing needs Sigstore's services and an OIDC token, which are not reachable here: those tests
check only what runs offline and say so in their names (``offline``, ``no_sigstore``).
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require_module, run_cli, tree_digest

from cecai_converter import signing
from cecai_converter.errors import ToolNotFound, UsageError, VerificationFailed
from cecai_converter.fsutil import LOCK_NAME, STAGING_PREFIX
from cecai_converter.signing import GITHUB_OIDC_ISSUER, SIGNATURE_NAME

require_module("signing", "model_signing")

#: Every ambient-credential detector of Sigstore's `id` package switched off (an empty value reads as unset).
NO_CI = {
    "GITHUB_ACTIONS": "",
    "ACTIONS_ID_TOKEN_REQUEST_URL": "",
    "ACTIONS_ID_TOKEN_REQUEST_TOKEN": "",
    "GOOGLE_SERVICE_ACCOUNT_NAME": "",
    "BUILDKITE": "",
    "GITLAB_CI": "",
    "CIRCLECI": "",
}


@pytest.fixture(scope="module")
def made(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real outputs folder: `convert` of the tiny model to Q8_0 (GGUF, manifest.json, reference.json)."""
    out = tmp_path_factory.mktemp("made") / "out"
    result = run_cli("convert", tiny_llama, "--precision", "Q8_0", "--outdir", out, "--model-name", "tiny",
                     "--no-fidelity")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert list(out.glob("*.gguf")), sorted(p.name for p in out.iterdir())
    return out


def _key_pair(folder: Path, name: str) -> tuple[Path, Path]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    private = folder / f"{name}.pem"
    public = folder / f"{name}.pub"
    private.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return private, public


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return _key_pair(tmp_path_factory.mktemp("keys"), "signer")


@pytest.fixture
def signed(made: Path, keys: tuple[Path, Path], tmp_path: Path) -> Path:
    """A copy of ``made`` signed with ``keys`` through the CLI."""
    folder = tmp_path / "files"
    shutil.copytree(made, folder)
    result = run_cli("sign", folder, "--key", keys[0], env=NO_CI)
    assert result.returncode == 0, result.stderr
    return folder


def verify(folder: Path, public: Path, *extra: str | Path):
    return run_cli("verify-signature", folder, "--public-key", public, *extra)


# ---------------------------------------------------------------------------------------------- key-based, real


@pytest.mark.slow
def test_sign_then_verify_a_real_conversion(made, keys, tmp_path):
    folder = tmp_path / "files"
    shutil.copytree(made, folder)
    before = tree_digest(folder)
    result = run_cli("sign", folder, "--key", keys[0], "--format", "json", env=NO_CI)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["method"] == "key"
    assert sorted(data["files"]) == sorted(before), "the signature must cover every file of OUTDIR"
    assert any(f.endswith(".gguf") for f in data["files"])
    assert "manifest.json" in data["files"]
    # the files are untouched; the signature is the one new file, and no lock or partial file is left behind
    after = tree_digest(folder)
    assert {k: v for k, v in after.items() if k != SIGNATURE_NAME} == before
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == []
    assert (folder / SIGNATURE_NAME).stat().st_size > 0

    ok = verify(folder, keys[1])
    assert ok.returncode == 0, ok.stderr
    assert "signature OK" in ok.stdout
    assert tree_digest(folder) == after, "verify-signature changed the folder"


@pytest.mark.slow
def test_the_signature_is_model_signings_own_format(signed, keys):
    """model_signing's own verifier (guessing the hashing settings from the signature, as its CLI does) accepts it."""
    import model_signing

    model_signing.verifying.Config().use_elliptic_key_verifier(public_key=keys[1]).verify(
        signed, signed / SIGNATURE_NAME
    )


@pytest.mark.slow
def test_a_flipped_byte_in_a_gguf_is_refused_naming_the_file(signed, keys):
    gguf = sorted(signed.glob("*.gguf"))[0]
    data = bytearray(gguf.read_bytes())
    data[len(data) // 2] ^= 0x01
    gguf.write_bytes(bytes(data))
    result = verify(signed, keys[1])
    assert result.returncode == 1, result.stdout
    assert f"{gguf.name} changed since it was signed" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_a_missing_file_is_refused(signed, keys):
    (signed / "reference.json").unlink()
    result = verify(signed, keys[1])
    assert result.returncode == 1
    assert "signed but missing: reference.json" in result.stderr


@pytest.mark.slow
def test_an_extra_file_is_refused(signed, keys):
    (signed / "notes.txt").write_text("added later\n")
    result = verify(signed, keys[1])
    assert result.returncode == 1
    assert "not covered by the signature (added after signing): notes.txt" in result.stderr


@pytest.mark.slow
def test_a_wrong_public_key_is_refused(signed, tmp_path):
    _, other = _key_pair(tmp_path, "someone-else")
    result = verify(signed, other)
    assert result.returncode == 1
    assert f"not made with the private key of {other}" in result.stderr


@pytest.mark.slow
def test_a_tampered_signature_is_refused(signed, keys):
    """The signed statement edited to vouch for other bytes: the signature over it no longer holds."""
    sig = signed / SIGNATURE_NAME
    bundle = json.loads(sig.read_text())
    statement = base64.b64decode(bundle["dsseEnvelope"]["payload"])
    digest = json.loads(statement)["predicate"]["resources"][0]["digest"]
    edited = statement.replace(digest.encode(), b"0" * len(digest))
    assert edited != statement
    bundle["dsseEnvelope"]["payload"] = base64.b64encode(edited).decode()
    sig.write_text(json.dumps(bundle))
    result = verify(signed, keys[1])
    assert result.returncode == 1, result.stdout
    assert "the signed statement was altered" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_lock_and_staging_folders_are_not_covered(made, keys, tmp_path):
    folder = tmp_path / "files"
    shutil.copytree(made, folder)
    staging = folder / f"{STAGING_PREFIX}left"
    staging.mkdir()
    (staging / "part.gguf").write_bytes(b"half")
    done = signing.sign_folder(folder, key=keys[0])
    assert not any(f.startswith(STAGING_PREFIX) or f == LOCK_NAME for f in done.files), done.files
    shutil.rmtree(staging)
    # a lock file (a conversion started since, or one left behind) and an empty folder do not break the signature
    (folder / LOCK_NAME).write_text("{}\n")
    (folder / f"{STAGING_PREFIX}new").mkdir()
    assert signing.verify_folder(folder, public_key=keys[1]).files == done.files


@pytest.mark.slow
@pytest.mark.parametrize("extra", [f"{STAGING_PREFIX}left/evil.gguf", ".github/evil.gguf", ".git/evil.gguf",
                                   f"{LOCK_NAME}/evil.gguf"])  # fmt: skip
def test_an_extra_file_in_a_folder_the_signer_left_out_is_refused(made, keys, tmp_path, extra):
    """The signed statement lists what the signer ignored (a staging folder there): verify does not ignore it."""
    folder = tmp_path / "files"
    shutil.copytree(made, folder)
    (folder / f"{STAGING_PREFIX}left").mkdir()
    (folder / f"{STAGING_PREFIX}left" / "part.gguf").write_bytes(b"half")
    signing.sign_folder(folder, key=keys[0])
    shutil.rmtree(folder / f"{STAGING_PREFIX}left")
    assert signing.verify_folder(folder, public_key=keys[1])  # as distributed: the staging folder is gone
    (folder / extra).parent.mkdir(exist_ok=True)
    (folder / extra).write_bytes(b"GGUF evil")
    result = verify(folder, keys[1])
    assert result.returncode == 1, result.stdout
    assert f"not covered by the signature (added after signing): {extra}" in result.stderr


@pytest.mark.slow
def test_git_files_are_signed_like_any_other(made, keys, tmp_path):
    folder = tmp_path / "files"
    shutil.copytree(made, folder)
    (folder / ".github").mkdir()
    (folder / ".github" / "notes.md").write_text("shipped\n")
    (folder / ".gitattributes").write_text("*.gguf filter=lfs\n")
    done = signing.sign_folder(folder, key=keys[0])
    assert {".github/notes.md", ".gitattributes"} <= set(done.files)
    (folder / ".gitattributes").write_text("*.gguf -filter\n")
    result = verify(folder, keys[1])
    assert result.returncode == 1
    assert ".gitattributes changed since it was signed" in result.stderr


@pytest.mark.slow
def test_a_signature_kept_elsewhere(made, keys, tmp_path):
    folder = tmp_path / "files"
    shutil.copytree(made, folder)
    outside = tmp_path / "elsewhere.sig"
    result = run_cli("sign", folder, "--key", keys[0], "--signature", outside, env=NO_CI)
    assert result.returncode == 0, result.stderr
    assert not (folder / SIGNATURE_NAME).exists()
    ok = verify(folder, keys[1], "--signature", outside)
    assert ok.returncode == 0, ok.stderr
    missing = verify(folder, keys[1])  # no model.sig in the folder: a usage error, not a refusal
    assert missing.returncode == 2
    assert "no signature at" in missing.stderr


def test_a_symbolic_link_is_refused(keys, tmp_path):
    folder = tmp_path / "files"
    folder.mkdir()
    (folder / "a.gguf").write_bytes(b"GGUF")
    (folder / "b.gguf").symlink_to(folder / "a.gguf")
    with pytest.raises(UsageError, match="symbolic link"):
        signing.sign_folder(folder, key=keys[0])
    assert not (folder / SIGNATURE_NAME).exists()


def test_a_key_that_is_not_an_ec_key_leaves_no_signature(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    folder = tmp_path / "files"
    folder.mkdir()
    (folder / "a.gguf").write_bytes(b"GGUF")
    rsa_key = tmp_path / "rsa.pem"
    rsa_key.write_bytes(
        rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    result = run_cli("sign", folder, "--key", rsa_key, env=NO_CI)
    assert result.returncode == 1, result.stderr
    assert "not a usable private key" in result.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["a.gguf"]


def test_sign_without_a_key_outside_ci_says_what_to_pass_offline(tmp_path):
    folder = tmp_path / "files"
    folder.mkdir()
    (folder / "a.gguf").write_bytes(b"GGUF")
    result = run_cli("sign", folder, env=NO_CI)
    assert result.returncode == 2
    assert "--key PRIVATE_KEY_PEM" in result.stderr
    assert not (folder / SIGNATURE_NAME).exists()


def test_verify_needs_a_key_or_an_identity(tmp_path):
    result = run_cli("verify-signature", tmp_path)
    assert result.returncode == 2
    assert "--public-key" in result.stderr and "--identity" in result.stderr
    result = run_cli("verify-signature", tmp_path, "--identity", "someone@example.com")
    assert result.returncode == 2
    assert "--issuer" in result.stderr


# ------------------------------------------------------------------------------------ keyless: offline parts only


def test_keyless_default_only_in_actions_with_an_oidc_token_offline():
    actions = {"GITHUB_ACTIONS": "true", "ACTIONS_ID_TOKEN_REQUEST_URL": "https://token.example/"}
    assert signing.signing_mode(None, False, actions) == "keyless"
    assert signing.signing_mode(Path("k.pem"), False, actions) == "key"
    with pytest.raises(UsageError, match="--key"):
        signing.signing_mode(None, False, {"GITHUB_ACTIONS": "true"})  # no `id-token: write`
    with pytest.raises(UsageError, match="not both"):
        signing.signing_mode(Path("k.pem"), True, actions)


def test_keyless_outside_ci_without_credentials_is_refused_offline_no_sigstore(tmp_path):
    folder = tmp_path / "files"
    folder.mkdir()
    (folder / "a.gguf").write_bytes(b"GGUF")
    result = run_cli("sign", folder, "--keyless", env=NO_CI, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "OIDC credential of a CI job" in result.stderr
    assert not (folder / SIGNATURE_NAME).exists()


def test_keyless_in_actions_without_id_token_permission_offline_no_sigstore(tmp_path):
    folder = tmp_path / "files"
    folder.mkdir()
    (folder / "a.gguf").write_bytes(b"GGUF")
    result = run_cli("sign", folder, "--keyless", env={**NO_CI, "GITHUB_ACTIONS": "true"}, timeout=120)
    assert result.returncode == 1, result.stderr
    assert "id-token: write" in result.stderr
    assert not (folder / SIGNATURE_NAME).exists()


def test_keyless_verify_builds_the_sigstore_verifier_offline_no_sigstore(monkeypatch, tmp_path):
    """The Sigstore verifier fetches its trust root over the network: stand in for it (failing as it does offline,
    with TUFError) and check what it is given and what the user is told."""
    import model_signing
    from sigstore.errors import TUFError

    seen: dict[str, object] = {}

    def fake(self, **kwargs):
        seen.update(kwargs)
        raise TUFError("Failed to refresh TUF metadata")

    monkeypatch.setattr(model_signing.verifying.Config, "use_sigstore_verifier", fake)
    (tmp_path / "a.gguf").write_bytes(b"GGUF")
    (tmp_path / SIGNATURE_NAME).write_text("{}")
    identity = "https://github.com/octo/models/.github/workflows/release-convert.yml@refs/tags/v1.0"
    with pytest.raises(VerificationFailed, match="Sigstore's trust root") as caught:
        signing.verify_folder(tmp_path, identity=identity, issuer=GITHUB_OIDC_ISSUER)
    assert caught.value.exit_code == 1
    assert seen == {"identity": identity, "oidc_issuer": GITHUB_OIDC_ISSUER}


# ------------------------------------------------------------------------------------------ without the extra


def test_without_model_signing_the_error_names_the_extra(monkeypatch, tmp_path):
    (tmp_path / "a.gguf").write_bytes(b"GGUF")
    for name in [m for m in sys.modules if m == "model_signing" or m.startswith("model_signing.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "model_signing", None)  # what an absent package looks like to `import`
    with pytest.raises(ToolNotFound) as caught:
        signing.sign_folder(tmp_path, key=tmp_path / "a.gguf")
    assert caught.value.hint is not None and "pip install 'cecai-converter[sign]'" in caught.value.hint
    with pytest.raises(ToolNotFound):
        signing.verify_folder(tmp_path, public_key=tmp_path / "a.gguf", signature=tmp_path / "a.gguf")


def test_the_cli_does_not_import_model_signing():
    code = "import sys, cecai_converter.cli as c; c.build_parser(); print('model_signing' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
