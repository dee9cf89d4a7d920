#!/usr/bin/env python3
"""Build qtune's container image for real with buildah, from Debian, without any container registry.

    python3 scripts/build_image.py                 # operator + runner roles (ONNX Runtime trials)
    python3 scripts/build_image.py --with-torch    # + the PyTorch adaptor (the multi-GB CUDA torch wheel)
    python3 scripts/build_image.py --verify        # + run the image's smoke checks (uid 65532, read-only root)

The last line of stdout is the OCI archive of the image, for `ctr -n k8s.io images import FILE`
(the archive names the image, e.g. localhost/qtune:0.1.0-<hash>). Progress goes to stderr.

1. The base image: `debootstrap --variant=minbase bookworm` with python3.11, python3.11-venv and
   ca-certificates, and a virtual environment /opt/venv first on PATH. So `python`, `python -m pip`
   and pip's console scripts work as in the official python:3.11-slim image the Dockerfile expects by
   default (where they live in /usr/local), and the Dockerfile stays unchanged for its users; pip
   installs into the venv, never into Debian's own python (no --break-system-packages).
   Cached as ${QTUNE_CACHE_DIR:-~/.cache/qtune}/images/qtune-base-<recipe hash>.oci.tar, keyed by
   BASE_RECIPE below; rebuilt only when the recipe changes.
2. The repository's Dockerfile, built with `buildah bud --pull-never --layers=false` on that base
   (--build-arg PYTHON_IMAGE=...). Tagged localhost/qtune:<version>[-torch]-<context hash>, where the
   hash covers the build context (the files .dockerignore lets through), the Dockerfile and the
   build args; exported to <cache>/images/qtune-<version>[-torch]-<hash>.oci.tar. Rebuilt only when
   the hash changes (the two newest archives are kept). The Dockerfile's `RUN --mount=type=cache`
   keeps pip's cache across builds (buildah keeps cache mounts under /var/tmp until `buildah prune`).

Builds use the host network (no bridge or firewall rules on a machine that may also run a kubelet)
and the host's CA bundle, bind-mounted read-only into the RUN steps only (a TLS-intercepting proxy's
CA then works for pip; nothing of it lands in a layer).

Measured on a 2-core machine shared with other work (bookworm host, buildah 1.28, runc):
  cold (no base image, no archive): 110 s at load average ~2 (base 56 s, debootstrap ~40 s of it;
    image 43 s; export 10 s), 210 s at load ~25
  warm after a source change (base cached): 55-90 s at load ~2 (build 43-79 s, export 9-13 s), up to
    280 s at load ~25; unchanged context: 0.4 s (the cached archive)
  sizes: base 192 MB unpacked (77 MB archive); image 739 MB unpacked, 223 MB archive (site-packages
  ~540 MB of it: kubernetes 126 MB, onnxruntime 78 MB, sympy, matplotlib, numpy, onnx; ~130 MB .pyc)
  pip's cache mount works under buildah (/var/tmp/buildah-cache) but stays empty where a proxy strips
  PyPI's caching headers; downloads then cost seconds.

Needs root, buildah, debootstrap and runc (scripts/setup.sh installs them). Debian packages come
from debootstrap's default mirror or QTUNE_DEBIAN_MIRROR.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("QTUNE_CACHE_DIR") or Path.home() / ".cache" / "qtune") / "images"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
NONROOT = "65532:65532"
# runc, as on a kubelet's containerd node (requirements/system.txt installs it); crun (buildah's
# default on Debian) refuses the hybrid cgroup layout of cgroup v1 hosts with controllers on the
# cgroup2 hierarchy.
OCI_RUNTIME = "runc"

# Everything the base image is made of: its hash names the base image and its cache archive.
BASE_RECIPE: dict = {
    "suite": "bookworm",
    "variant": "minbase",
    # python3-distutils: provides python3.11-distutils, which python3.11-venv needs and debootstrap's
    # resolver (no virtual packages) would not find by itself
    "include": ["python3.11", "python3.11-venv", "python3-distutils", "ca-certificates"],
    "venv": "/opt/venv",
    "remove": ["var/cache/apt/archives/*.deb", "var/lib/apt/lists/*", "usr/share/man/*", "usr/share/info/*",
               "var/log/*.log", "var/log/apt/*", "var/cache/debconf/*-old"],
    "empty": ["etc/resolv.conf", "etc/hostname"],  # the runtime provides them
    "env": {
        "PATH": "/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "VIRTUAL_ENV": "/opt/venv",
        "LANG": "C.UTF-8",
    },
    "cmd": ["python3"],
    "revision": 1,
}


def log(message: str) -> None:
    sys.stderr.write(f"build-image: {message}\n")
    sys.stderr.flush()


def run(cmd: list[str], *, capture: bool = False, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    log("$ " + " ".join(cmd))
    return subprocess.run(cmd, check=check, text=True, stdout=subprocess.PIPE if capture else sys.stderr, **kwargs)


def buildah(*args: str, capture: bool = True) -> str:
    return run(["buildah", *args], capture=capture).stdout.strip() if capture else run(["buildah", *args]).stdout


def image_exists(name: str) -> bool:
    return subprocess.run(["buildah", "inspect", "--type", "image", name], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, check=False).returncode == 0


def image_id(name: str) -> str | None:
    proc = subprocess.run(["buildah", "images", "--noheading", "--no-trunc", "--format", "{{.ID}}", name],
                          capture_output=True, text=True, check=False)
    return proc.stdout.split()[0].removeprefix("sha256:") if proc.returncode == 0 and proc.stdout.strip() else None


def drop_replaced(old_id: str | None, name: str) -> None:
    """Remove the image a rebuild took the name from (left dangling otherwise); kept while in use."""
    if old_id and old_id != image_id(name):
        subprocess.run(["buildah", "rmi", old_id], capture_output=True, check=False)


def export(name: str, archive: Path) -> None:
    """`buildah push` to an OCI archive whose index names the image (ctr import keeps that name)."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    partial = archive.with_name(archive.name + f".{os.getpid()}.partial")
    partial.unlink(missing_ok=True)
    buildah("push", "--quiet", name, f"oci-archive:{partial}:{name}", capture=False)
    partial.replace(archive)


def load(archive: Path, name: str) -> None:
    """Put a cached archive back into buildah's storage under its name."""
    image_id = buildah("pull", "--quiet", f"oci-archive:{archive}").splitlines()[-1]
    buildah("tag", image_id, name)


def ensure_tools(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise SystemExit(f"build-image: missing {', '.join(missing)}: run `bash scripts/setup.sh` "
                         "(requirements/system.txt)")
    if os.geteuid() != 0:
        raise SystemExit("build-image: needs root (debootstrap, buildah's rootful storage)")


# ---------------------------------------------------------------------------------- base


def base_image() -> tuple[str, Path]:
    key = hashlib.sha256(json.dumps(BASE_RECIPE, sort_keys=True).encode()).hexdigest()[:12]
    return f"localhost/qtune-base:{BASE_RECIPE['suite']}-py3.11-{key}", CACHE / f"qtune-base-{key}.oci.tar"


def build_base(force: bool = False) -> str:
    name, archive = base_image()
    if not force and image_exists(name):
        log(f"base image {name}: present")
        return name
    if not force and archive.exists():
        log(f"base image {name}: loading {archive}")
        load(archive, name)
        return name
    ensure_tools("buildah", "debootstrap", OCI_RUNTIME)
    started = time.monotonic()
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="qtune-rootfs-", dir=CACHE) as tmp:
        rootfs = Path(tmp) / "rootfs"
        cmd = ["debootstrap", f"--variant={BASE_RECIPE['variant']}", "--include=" + ",".join(BASE_RECIPE["include"]),
               BASE_RECIPE["suite"], str(rootfs)]
        if os.environ.get("QTUNE_DEBIAN_MIRROR"):
            cmd.append(os.environ["QTUNE_DEBIAN_MIRROR"])
        try:
            run(cmd)
        except subprocess.CalledProcessError:
            debootstrap_log = rootfs / "debootstrap" / "debootstrap.log"
            if debootstrap_log.exists():
                shutil.copy(debootstrap_log, CACHE / "debootstrap.log")
                log(f"debootstrap failed: see {CACHE / 'debootstrap.log'}")
            raise
        for pattern in BASE_RECIPE["remove"]:
            for path in rootfs.glob(pattern):
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        for rel in BASE_RECIPE["empty"]:
            (rootfs / rel).unlink(missing_ok=True)
            (rootfs / rel).touch()
        replaced = image_id(name)
        container = buildah("from", "scratch")
        try:
            mount = buildah("mount", container)
            run(["cp", "-a", f"{rootfs}/.", f"{mount}/"])
            venv = BASE_RECIPE["venv"]
            buildah("run", "--runtime", OCI_RUNTIME, "--network", "host", container, "--",
                    "/usr/bin/python3.11", "-m", "venv", venv, capture=False)
            buildah("run", "--runtime", OCI_RUNTIME, container, "--", f"{venv}/bin/python", "-m", "pip", "--version",
                    capture=False)
            config = ["config", "--os", "linux", "--arch", "amd64", "--cmd", json.dumps(BASE_RECIPE["cmd"])]
            for key, value in BASE_RECIPE["env"].items():
                config += ["--env", f"{key}={value}"]
            buildah(*config, container)
            buildah("commit", "--quiet", "--rm", container, name)
            drop_replaced(replaced, name)
        except BaseException:
            subprocess.run(["buildah", "rm", container], check=False, capture_output=True)
            raise
    export(name, archive)
    log(f"base image {name}: built in {time.monotonic() - started:.0f}s, {archive} "
        f"({archive.stat().st_size / 1e6:.0f} MB)")
    return name


# ---------------------------------------------------------------------------------- app image


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go filepath.Match plus ``**``) as a regular expression."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def context_files(root: Path = ROOT) -> list[str]:
    """The build context: what .dockerignore lets through (last matching pattern wins, parents count)."""
    rules = []
    ignore = root / ".dockerignore"
    for raw in ignore.read_text().splitlines() if ignore.exists() else []:
        line = raw.strip()
        if line and not line.startswith("#"):
            rules.append((line.startswith("!"), _pattern_regex(os.path.normpath(line.lstrip("!").strip()).lstrip("/"))))
    files = []
    for top, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d != ".git"]
        rel_top = os.path.relpath(top, root)
        for name in names:
            rel = name if rel_top == "." else f"{rel_top}/{name}"
            parts = rel.split("/")
            candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
            ignored = False
            for negated, regex in rules:
                if any(regex.match(c) for c in candidates):
                    ignored = not negated
            if not ignored:
                files.append(rel)
    return sorted(files)


def context_hash(build_args: dict[str, str], root: Path = ROOT) -> str:
    digest = hashlib.sha256()
    for rel in ["Dockerfile", *context_files(root)]:
        path = root / rel
        digest.update(f"{rel}\0{os.access(path, os.X_OK)}\0".encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    digest.update(json.dumps(build_args, sort_keys=True).encode())
    return digest.hexdigest()[:12]


def app_image(with_torch: bool = False, torch_index_url: str = "") -> tuple[str, Path, dict[str, str]]:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    base, _ = base_image()
    args = {"PYTHON_IMAGE": base, "WITH_TORCH": "true" if with_torch else "false"}
    if torch_index_url:
        args["TORCH_INDEX_URL"] = torch_index_url
    tag = f"{version}{'-torch' if with_torch else ''}-{context_hash(args)}"
    return f"localhost/qtune:{tag}", CACHE / f"qtune-{tag}.oci.tar", args


def build(with_torch: bool = False, torch_index_url: str = "", force: bool = False) -> tuple[str, Path]:
    """Build (or find) the image; returns (name, archive). The image is in buildah's storage afterwards."""
    ensure_tools("buildah", OCI_RUNTIME)
    name, archive, args = app_image(with_torch, torch_index_url)
    if not force and archive.exists():
        if not image_exists(name):
            log(f"{name}: loading {archive}")
            load(archive, name)
        log(f"{name}: up to date ({archive})")
        return name, archive
    build_base()
    started = time.monotonic()
    # No --layers: buildah's cache key for the final stage's RUN --mount=type=bind,from=builder ignores
    # the builder's content (a changed qtune would not be reinstalled); pip's cache mount does the saving.
    cmd = ["bud", "--runtime", OCI_RUNTIME, "--pull-never", "--layers=false", "--network", "host",
           "--tag", name, "--file", str(ROOT / "Dockerfile")]
    for key, value in args.items():
        cmd += ["--build-arg", f"{key}={value}"]
    if HOST_CA_BUNDLE.exists():
        cmd += ["--volume", f"{HOST_CA_BUNDLE}:{HOST_CA_BUNDLE}:ro"]
    replaced = image_id(name)
    buildah(*cmd, str(ROOT), capture=False)
    drop_replaced(replaced, name)
    built = time.monotonic() - started
    export(name, archive)
    prune(archive)
    log(f"{name}: built in {built:.0f}s (export {time.monotonic() - started - built:.0f}s); "
        f"{image_size(name)} unpacked, archive {archive.stat().st_size / 1e6:.0f} MB")
    return name, archive


def prune(current: Path, keep: int = 2) -> None:
    """Drop all but the newest ``keep`` archives (and their images) of this version and flavour."""
    flavour = current.name.rsplit("-", 1)[0]  # qtune-<version>[-torch]
    pattern = re.compile(re.escape(flavour) + r"-[0-9a-f]{12}\.oci\.tar")
    archives = sorted((p for p in CACHE.glob(f"{flavour}-*.oci.tar") if pattern.fullmatch(p.name)),
                      key=lambda p: p.stat().st_mtime, reverse=True)
    for old in [a for a in archives if a != current][keep - 1:]:
        tag = old.name.removeprefix("qtune-").removesuffix(".oci.tar")
        log(f"pruning {old.name}")
        old.unlink(missing_ok=True)
        subprocess.run(["buildah", "rmi", f"localhost/qtune:{tag}"], capture_output=True, check=False)


def image_config(name: str) -> dict:
    """The OCI image config (config.User, Env, Entrypoint, Cmd, WorkingDir, Labels)."""
    return json.loads(buildah("inspect", "--type", "image", name))["OCIv1"]


def image_size(name: str) -> str:
    """The unpacked size as buildah reports it, e.g. "656 MB"."""
    return json.loads(run(["buildah", "images", "--json", name], capture=True).stdout)[0]["size"]


# ---------------------------------------------------------------------------------- run like a pod


def run_in_image(name: str, argv: list[str] | None = None, *, entrypoint: list[str] | None = None,
                 user: str = NONROOT, read_only: bool = True, binds: dict[str, str] | None = None,
                 env: dict[str, str] | None = None, cwd: str | None = None,
                 timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the image as the chart's pods do: uid/gid 65532, no capabilities, no new privileges, a
    read-only root file system, a tmpfs on /tmp (the emptyDir) and no network, with runc and an OCI
    bundle on buildah's mount of the image (what a kubelet's containerd does with runc).

    ``binds``: {host path: container path} ("...:ro" on the container path for read-only).
    ``argv`` replaces the image's CMD, ``entrypoint`` its ENTRYPOINT (Kubernetes' args / command).
    """
    config = image_config(name)["config"]
    process_env = dict(e.split("=", 1) for e in config.get("Env") or [])
    process_env.update(env or {})
    args = (entrypoint if entrypoint is not None else config.get("Entrypoint") or []) + \
        (argv if argv is not None else config.get("Cmd") or [])
    uid, gid = (int(x) for x in user.split(":"))
    container = buildah("from", "--pull-never", name)
    bundle = Path(tempfile.mkdtemp(prefix="qtune-bundle-"))
    try:
        rootfs = buildah("mount", container)
        mounts = [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=1777"]},
        ]
        for source, target in (binds or {}).items():
            ro = target.endswith(":ro")
            mounts.append({"destination": target.removesuffix(":ro"), "type": "bind", "source": str(source),
                           "options": ["rbind", "ro" if ro else "rw"]})
        spec = {
            "ociVersion": "1.0.2",
            "process": {
                "terminal": False, "user": {"uid": uid, "gid": gid}, "args": args,
                "env": [f"{k}={v}" for k, v in process_env.items()],
                "cwd": cwd or config.get("WorkingDir") or "/",
                "capabilities": {k: [] for k in ("bounding", "effective", "inheritable", "permitted", "ambient")}
                if uid else None,
                "noNewPrivileges": True,
            },
            "root": {"path": rootfs, "readonly": read_only},
            "hostname": "qtune",
            "mounts": mounts,
            "linux": {
                "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount", "network")],
                "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"],
                "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
            },
        }
        if spec["process"]["capabilities"] is None:
            del spec["process"]["capabilities"]
        (bundle / "config.json").write_text(json.dumps(spec))
        cid = f"qtune-{uuid.uuid4().hex[:12]}"
        log(f"$ {OCI_RUNTIME} run {cid}: {' '.join(args)} (uid {uid}, read-only root: {read_only})")
        try:
            return subprocess.run([OCI_RUNTIME, "run", "--bundle", str(bundle), cid], capture_output=True, text=True,
                                  stdin=subprocess.DEVNULL, timeout=timeout, check=False)
        finally:
            subprocess.run([OCI_RUNTIME, "delete", "--force", cid], capture_output=True, check=False)
    finally:
        subprocess.run(["buildah", "rm", container], capture_output=True, check=False)
        shutil.rmtree(bundle, ignore_errors=True)


SMOKE = [
    (["--version"], None),
    (["trial", "--help"], None),
    (["--help"], ["python", "-m", "qtune.runner"]),
    (["-P", "-c", "import onnxruntime, onnx, qtune.runner, qtune.operator"], ["python"]),
]


def verify(name: str) -> None:
    for argv, entrypoint in SMOKE:
        proc = run_in_image(name, argv, entrypoint=entrypoint)
        if proc.returncode != 0:
            raise SystemExit(f"build-image: {' '.join((entrypoint or ['qtune']) + argv)} failed in {name} "
                             f"(exit {proc.returncode}):\n{proc.stdout}{proc.stderr}")
        log(f"ok: {' '.join((entrypoint or ['qtune']) + argv)}: {(proc.stdout.strip().splitlines() or [''])[0][:100]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--with-torch", action="store_true", help="also install the PyTorch adaptor (WITH_TORCH=true)")
    parser.add_argument("--torch-index-url", default="", help="TORCH_INDEX_URL build arg")
    parser.add_argument("--force", action="store_true", help="rebuild even when the cached archive is current")
    parser.add_argument("--rebuild-base", action="store_true", help="rebuild the Debian base image too")
    parser.add_argument("--verify", action="store_true", help="run the smoke checks in the built image")
    parser.add_argument("--print-name", action="store_true", help="print the image name and archive, build nothing")
    args = parser.parse_args(argv)
    if args.print_name:
        name, archive, _ = app_image(args.with_torch, args.torch_index_url)
        sys.stdout.write(f"{name}\n{archive}\n")
        return 0
    os.nice(10)
    if args.rebuild_base:
        build_base(force=True)
    name, archive = build(args.with_torch, args.torch_index_url, force=args.force)
    if args.verify:
        verify(name)
    sys.stdout.write(f"{name}\n{archive}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
