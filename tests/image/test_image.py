"""The real image: built from the repository's Dockerfile by scripts/build_image.py (buildah, Debian
base, no registry), then checked the way a kubelet runs it (with runc, as a containerd node does).

The build is cached (an OCI archive under ${QTUNE_CACHE_DIR:-~/.cache/qtune}/images keyed by the
build context): warm, this module takes well under two minutes; cold (first build on a machine) the
base image and the wheels take several minutes. A failed build FAILS the tests. Without buildah,
debootstrap, runc (requirements/system.txt, which scripts/setup.sh installs) and root the module is
skipped, or fails when ``QTUNE_REQUIRE_IMAGE=1`` (scripts/test.sh).

The containers run as the chart's pods do: uid/gid 65532, no capabilities, a read-only root file
system with a tmpfs on /tmp, no network (scripts/build_image.py:run_in_image, runc on an OCI bundle).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import pytest
import system_tools

from qtune.tuning import codec

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "build_image.py"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
DIGITS = ROOT / "examples" / "digits"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]

_spec = importlib.util.spec_from_file_location("qtune_build_image", SCRIPT)
build_image = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_image)


def _missing() -> str | None:
    missing = system_tools.missing("buildah", "debootstrap", "runc")
    if missing:
        return f"not installed: {', '.join(missing)}"
    if os.geteuid() != 0:
        return "building and running the image needs root"
    return None


@pytest.fixture(scope="module")
def image() -> tuple[str, Path]:
    reason = _missing()
    if reason:
        if os.environ.get("QTUNE_REQUIRE_IMAGE") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.fail(f"scripts/build_image.py failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
    name, archive = proc.stdout.strip().splitlines()[-2:]
    return name, Path(archive)


@pytest.fixture(scope="module")
def config(image: tuple[str, Path]) -> dict:
    return build_image.image_config(image[0])


def run(image: tuple[str, Path], argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    proc = build_image.run_in_image(image[0], argv, **kwargs)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_archive_names_the_image(image: tuple[str, Path]) -> None:
    """`ctr -n k8s.io images import ARCHIVE` names the image after the index's ref.name annotation."""
    name, archive = image
    assert archive.name.endswith(".oci.tar") and archive.stat().st_size > 10_000_000
    assert name.startswith(f"localhost/qtune:{VERSION}-")
    with tarfile.open(archive) as tar:
        index = json.load(tar.extractfile("index.json"))
    assert [m["annotations"]["org.opencontainers.image.ref.name"] for m in index["manifests"]] == [name]


def test_config_nonroot_entrypoint_labels(config: dict) -> None:
    cfg = config["config"]
    assert cfg["User"] == "65532:65532"
    assert cfg["Entrypoint"] == ["qtune"]
    assert cfg["Cmd"] == ["operator"]
    assert cfg["WorkingDir"] == "/tmp"
    env = dict(e.split("=", 1) for e in cfg["Env"])
    assert env["HOME"] == "/tmp" and env["TMPDIR"] == "/tmp"
    labels = cfg["Labels"]
    assert labels["org.opencontainers.image.title"] == "qtune"
    assert labels["org.opencontainers.image.version"] == VERSION
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"


def test_no_compiler_no_wheels_no_pip_cache(image: tuple[str, Path]) -> None:
    proc = run(image, ["-c", "import os, shutil\n"
                       "tools = [t for t in ('gcc', 'cc', 'c++', 'g++', 'clang', 'make', 'ld', 'as') "
                       "if shutil.which(t)]\n"
                       "left = [p for p in ('/wheels', '/src', '/var/cache/pip', '/root/.cache/pip') "
                       "if os.path.exists(p) and os.listdir(p)]\n"
                       "print(tools, left)"], entrypoint=["python"])
    assert proc.stdout.strip() == "[] []", proc.stdout


def test_version_as_65532_with_read_only_root(image: tuple[str, Path]) -> None:
    proc = run(image, ["--version"])
    assert VERSION in proc.stdout
    proc = run(image, ["-c", "import os; print(os.getuid(), os.getgid(), os.path.expanduser('~'))"],
               entrypoint=["python"])
    assert proc.stdout.split() == ["65532", "65532", "/tmp"]
    proc = build_image.run_in_image(image[0], ["-c", "open('/opt/x', 'w')"], entrypoint=["python"])
    assert proc.returncode != 0 and "Read-only file system" in proc.stderr


def test_both_roles_start(image: tuple[str, Path]) -> None:
    run(image, ["-P", "-c", "import onnxruntime, onnx, matplotlib, qtune.runner, kopf, kubernetes, qtune.operator"],
        entrypoint=["python"])
    assert "baseline" in run(image, ["--help"], entrypoint=["python", "-m", "qtune.runner"]).stdout
    run(image, ["trial", "--help"])
    run(image, ["operator", "--help"])


def test_digits_baseline_and_trial_like_a_pod(image: tuple[str, Path], tmp_path: Path) -> None:
    """The pods' command line (python -m qtune.runner, qtune/operator/builders.py): the job folder
    read-only, the workspace on a volume owned by 65532 as the working directory, nothing else writable
    but /tmp. Catches writes outside /tmp (onnxruntime, numpy, matplotlib caches, ...)."""
    if not (DIGITS / "model.onnx").exists():
        subprocess.run([sys.executable, str(DIGITS / "build.py")], check=True)
    job = tmp_path / "job"
    job.mkdir()
    for name in ("job.yaml", "model.onnx", "calib.npz", "eval.npz"):
        shutil.copy(DIGITS / name, job / name)
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    os.chown(workspace, 65532, 65532)
    binds = {str(job): "/job:ro", str(workspace): "/workspace"}
    command = ["python", "-m", "qtune.runner"]
    common = ["--job", "/job/job.yaml", "--workspace", "/workspace/ws", "--threads", "1"]
    run(image, ["baseline", *common, "--result", "/workspace/baseline.result.json"],
        entrypoint=command, binds=binds, cwd="/workspace", env={"QTUNE_TERMINATION_LOG": "/tmp/termination"})
    assert json.loads((workspace / "baseline.result.json").read_text())["status"] == "succeeded"

    from qtune.tuning.space import TuningSpace

    space = codec.load(TuningSpace, json.loads((workspace / "ws" / "space.json").read_text()))
    (job / "config.json").write_text(json.dumps(codec.dump(space.default_config())))
    run(image, ["trial", *common, "--index", "1", "--config", "/job/config.json", "--result", "/workspace/t1.json"],
        entrypoint=command, binds=binds, cwd="/workspace", env={"QTUNE_TERMINATION_LOG": "/tmp/termination"})
    result = json.loads((workspace / "t1.json").read_text())
    assert result["status"] == "succeeded", result
    assert result["accuracy"] > 0.9
