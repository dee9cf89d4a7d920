"""`qtune tune` never loses user data (issue 12): it refuses to use, and so never deletes or replaces, a
folder it did not create; its trial processes die with it; the history lists a trial before the trial's
process starts.

The job is tiny (a 4-16-3 ONNX classifier, 2 trials, short benchmarks); its metric is a user module
beside the job file (`probe_metric.py`) that, in a trial process, records its pid and the workspace's
history.json as it saw it at import, sleeps in update() when the test asks it to (QTUNE_PROBE_SLEEP) and
fails every trial when asked (QTUNE_PROBE_FAIL).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from tiny_onnx import save_tiny_classifier

from qtune.cli.main import EXIT_ERROR
from qtune.cli.main import main as qtune_main

NAME = "safety"

PROBE_METRIC = '''
"""Top-1 that reports on the trial process it runs in (see test_local_safety.py)."""
import json
import os
import sys
import time
from pathlib import Path

import numpy as np


def _arg(name):
    return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else None


PROBE = os.environ.get("QTUNE_PROBE_DIR")
TRIAL = _arg("--index") if "trial" in sys.argv else None
if PROBE and TRIAL is not None:
    history = Path(_arg("--workspace")) / "history.json"
    seen = json.loads(history.read_text()) if history.exists() else None
    Path(PROBE, f"trial-{TRIAL}.json").write_text(json.dumps({"pid": os.getpid(), "history": seen}))


class Top1:
    def __init__(self):
        self.reset()

    def reset(self):
        self.correct, self.total = 0, 0

    def update(self, preds, labels):
        if TRIAL is not None and os.environ.get("QTUNE_PROBE_SLEEP"):
            time.sleep(float(os.environ["QTUNE_PROBE_SLEEP"]))
        self.correct += int((np.asarray(preds).argmax(-1) == np.asarray(labels)).sum())
        self.total += len(labels)

    def result(self):
        score = self.correct / max(self.total, 1)
        return score * 0.1 if TRIAL is not None and os.environ.get("QTUNE_PROBE_FAIL") else score
'''


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Model, data and metric module, shared by the jobs (each job file lives in its own folder)."""
    root = tmp_path_factory.mktemp("safety-assets")
    rng = np.random.default_rng(3)
    w1, w2 = save_tiny_classifier(root / "model.onnx", rng)
    x = rng.normal(size=(64, 4)).astype(np.float32)
    np.savez(root / "calib.npz", x=x)
    np.savez(root / "eval.npz", x=x, labels=(np.maximum(x @ w1, 0) @ w2).argmax(1))
    return root


def write_job(folder: Path, assets: Path, *, workspace: str | None = None, output: str | None = "out",
              max_trials: int = 1) -> Path:
    spec: dict = {
        "model": {"framework": "onnxruntime", "path": str(assets / "model.onnx")},
        "data": {"calibration": {"path": str(assets / "calib.npz"), "samples": 32},
                 "evaluation": {"path": str(assets / "eval.npz"), "metric": "probe_metric:Top1",
                                "batchSize": 16}},
        "quantization": {"approach": "static", "format": "QDQ"},
        "tuning": {"strategy": "basic", "accuracyCriterion": {"relative": 0.5}, "objective": "size",
                   "maxTrials": max_trials, "seed": 0},
        "benchmark": {"batchSizes": [1], "warmupRuns": 1, "runs": 2},
    }
    if workspace is not None:
        spec["workspace"] = {"path": workspace}
    if output is not None:
        spec["output"] = {"path": output}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "probe_metric.py").write_text(PROBE_METRIC)
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump({"apiVersion": "qtune.io/v1alpha1", "kind": "QuantizationJob",
                                    "metadata": {"name": NAME}, "spec": spec}))
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its content."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    """Exit code and the lines qtune wrote to stderr."""
    capsys.readouterr()
    code = qtune_main(argv)
    return code, capsys.readouterr().err.strip().splitlines()


# --- 1. folders qtune did not create ---------------------------------------------------------------------
WORKSPACE_FIELD = "spec.workspace.path"
OUTPUT_FIELD = "spec.output.path"


def _current_folder_spellings(cwd: Path) -> list[str]:
    link = cwd.parent / "link-to-project"
    link.symlink_to(cwd)
    return [".", "./", str(cwd), str(cwd) + "/", str(link), "..", str(cwd.parent), "~", "/"]


@pytest.mark.parametrize("where", ["workspace", "output", "-o"])
def test_the_current_folder_its_parents_home_and_root_are_refused(assets, tmp_path, monkeypatch, capsys, where):
    """Each spelling of the current folder (and its parents, ~, /) is refused in one line naming the field,
    exit code 1, before anything is written or deleted."""
    project = tmp_path / "project"
    job_file = write_job(project, assets, output=str(tmp_path / "elsewhere-out"))
    (project / "notes.txt").write_text("user data")
    (project / "src").mkdir()
    (project / "src" / "main.py").write_text("print('user code')")
    home = tmp_path / "home"
    (home / "keep").mkdir(parents=True)
    (home / "keep" / "file").write_text("home data")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(project)  # a relative path in the job means the job's folder, which is the cwd here
    before, home_before = snapshot(project), snapshot(home)
    for spelling in _current_folder_spellings(project):
        argv = ["tune", str(job_file)]
        if where == "-o":
            argv += ["-o", spelling]
        else:
            job_file = write_job(project, assets, **{"output": str(tmp_path / "elsewhere-out"), where: spelling})
            before = snapshot(project)
        code, err = run_cli(argv, capsys)
        field = WORKSPACE_FIELD if where == "workspace" else OUTPUT_FIELD
        assert code == EXIT_ERROR, (spelling, err)
        assert err[-1].startswith(f"qtune: error: {field}"), (spelling, err)
        assert "folder" in err[-1], (spelling, err)
        assert sum(line.startswith("qtune: error") for line in err) == 1, err
        assert snapshot(project) == before, spelling
        assert snapshot(home) == home_before, spelling
        assert not (tmp_path / "elsewhere-out").exists()
        assert not (project / ".qtune").exists() and not (project / "qtune-output").exists()


@pytest.mark.parametrize("where", ["workspace", "output", "-o"])
def test_a_non_empty_folder_without_the_marker_is_refused(assets, tmp_path, capsys, where):
    job_folder = tmp_path / "job"
    theirs = tmp_path / "theirs"
    (theirs / "deep").mkdir(parents=True)
    (theirs / "results.csv").write_text("a,b\n1,2\n")
    (theirs / "deep" / "model.onnx").write_bytes(b"precious")
    before = snapshot(theirs)
    argv_extra: list[str] = []
    if where == "workspace":
        job_file = write_job(job_folder, assets, workspace=str(theirs))
    elif where == "output":
        job_file = write_job(job_folder, assets, output=str(theirs))
    else:
        job_file = write_job(job_folder, assets)
        argv_extra = ["-o", str(theirs)]
    for extra in ([], ["--fresh"]):
        code, err = run_cli(["tune", str(job_file), *argv_extra, *extra], capsys)
        field = WORKSPACE_FIELD if where == "workspace" else OUTPUT_FIELD
        assert code == EXIT_ERROR, err
        assert err[-1] == f"qtune: error: {field}{' (or -o)' if field == OUTPUT_FIELD else ''}: {theirs} exists " \
                          "and was not created by qtune; choose a new or empty folder", err
        assert snapshot(theirs) == before
        assert not (job_folder / "out").exists() and not (job_folder / ".qtune").exists()
    # a file is not a folder either
    target = theirs / "results.csv"
    if where == "-o":
        argv_extra = ["-o", str(target)]
    else:
        job_file = write_job(job_folder, assets, **{where: str(target)})
    code, err = run_cli(["tune", str(job_file), *argv_extra], capsys)
    assert code == EXIT_ERROR and "was not created by qtune" in err[-1], err
    assert snapshot(theirs) == before


def test_fresh_and_a_second_run_replace_only_what_qtune_created(assets, tmp_path, capsys):
    """The workspace qtune made is deleted by --fresh and by a run after a finished one; files the user put
    beside the workspace and the output (in the same parent folders) stay."""
    project = tmp_path / "project"
    job_file = write_job(project, assets, workspace="runs/ws", output="runs/out")
    (project / "runs").mkdir()
    (project / "runs" / "user-notes.txt").write_text("next to the workspace")
    (project / "data.txt").write_text("user data")
    code, err = run_cli(["tune", str(job_file)], capsys)
    assert code in (0, 3, 4), err
    workspace, output = project / "runs" / "ws", project / "runs" / "out"
    assert (workspace / ".qtune-workspace").exists() and (output / ".qtune-output").exists()
    first = json.loads((workspace / "history.json").read_text())
    stale = workspace / "stale-from-the-first-run"
    stale.write_text("x")
    (output / "stale").write_text("x")

    code, err = run_cli(["tune", str(job_file)], capsys)  # after a finished run: starts over
    assert code in (0, 3, 4), err
    assert not stale.exists() and not (output / "stale").exists()  # ours, replaced
    second = json.loads((workspace / "history.json").read_text())
    assert second["trials"][0]["started_at"] > first["trials"][0]["started_at"]  # a new run, not the old history
    assert (project / "runs" / "user-notes.txt").read_text() == "next to the workspace"
    assert (project / "data.txt").read_text() == "user data"
    assert (project / "job.yaml").exists() and (project / "probe_metric.py").exists()

    stale.write_text("x")
    code, err = run_cli(["tune", str(job_file), "--fresh"], capsys)
    assert code in (0, 3, 4), err
    assert not stale.exists()
    assert json.loads((workspace / "history.json").read_text())["trials"][0]["started_at"] > \
        second["trials"][0]["started_at"]
    assert (project / "runs" / "user-notes.txt").exists() and (project / "data.txt").exists()
    assert sorted(p.name for p in project.iterdir() if p.name != "__pycache__") == \
        ["data.txt", "job.yaml", "probe_metric.py", "runs"]


# --- 2. trial processes die with `qtune tune` ------------------------------------------------------------
def _alive(pid: int) -> bool:
    """A process that exists and is not a zombie (a zombie has exited; only its parent has not reaped it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _start_slow_run(assets: Path, folder: Path) -> tuple[subprocess.Popen[bytes], Path, Path]:
    job_file = write_job(folder, assets)
    probe = folder / "probe"
    probe.mkdir()
    env = {**os.environ, "QTUNE_PROBE_DIR": str(probe), "QTUNE_PROBE_SLEEP": "30"}
    process = subprocess.Popen([sys.executable, "-m", "qtune.cli.main", "tune", str(job_file)], cwd=folder,
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return process, probe, job_file


def _wait_for_trial(process: subprocess.Popen[bytes], probe: Path) -> dict:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        found = sorted(probe.glob("trial-*.json"))
        if found:
            try:
                return json.loads(found[0].read_text())
            except json.JSONDecodeError:  # being written
                pass
        assert process.poll() is None, process.communicate()[1].decode(errors="replace")[-3000:]
        time.sleep(0.1)
    process.kill()
    raise AssertionError("no trial process started within 60 s")


def _assert_gone(pid: int, seconds: float = 5) -> None:
    deadline = time.monotonic() + seconds
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)
        raise AssertionError(f"trial process {pid} outlived qtune tune")


def test_a_trial_process_dies_when_qtune_tune_is_killed(assets, tmp_path):
    process, probe, _ = _start_slow_run(assets, tmp_path / "job")
    trial = _wait_for_trial(process, probe)
    assert _alive(trial["pid"])
    process.kill()  # SIGKILL: no handler runs, only the kernel's parent-death signal can stop the trial
    process.wait(timeout=10)
    _assert_gone(trial["pid"])


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGTERM], ids=["SIGHUP", "SIGTERM"])
def test_a_hangup_or_terminate_stops_the_trial_and_keeps_it_for_resume(assets, tmp_path, sig):
    process, probe, _ = _start_slow_run(assets, tmp_path / "job")
    trial = _wait_for_trial(process, probe)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=20)
    assert process.returncode == 130, stderr.decode(errors="replace")[-3000:]
    assert b"--resume" in stderr
    _assert_gone(trial["pid"])
    history = json.loads((tmp_path / "job" / ".qtune" / NAME / "history.json").read_text())
    assert [t["status"] for t in history["trials"]] == ["pending"]  # runs again on --resume
    assert not (tmp_path / "job" / "out").exists()


# --- 3. the history lists a trial before its process starts ----------------------------------------------
def test_history_lists_each_trial_before_its_process_starts(assets, tmp_path, capsys, monkeypatch):
    """Read at two moments: when the driver hands the unit to the executor (deterministic: a subclass of the
    real executor reads history.json from disk first), and in the trial process itself (its metric module)."""
    from qtune.local import driver
    from qtune.local.executor import LocalExecutor

    at_start: dict[str, dict | None] = {}

    class Probing(LocalExecutor):
        def start(self, unit):  # noqa: ANN001, ANN202
            history = self.workspace / "history.json"
            at_start[unit.id] = json.loads(history.read_text()) if history.exists() else None
            super().start(unit)

    monkeypatch.setattr(driver, "LocalExecutor", Probing)
    probe = tmp_path / "probe"
    probe.mkdir()
    monkeypatch.setenv("QTUNE_PROBE_DIR", str(probe))
    monkeypatch.setenv("QTUNE_PROBE_FAIL", "1")  # no trial meets the criterion: the search goes on to trial 1
    job_file = write_job(tmp_path / "job", assets, max_trials=2)
    code, err = run_cli(["tune", str(job_file)], capsys)
    assert code == 3, err
    in_process = {int(p.stem.split("-")[1]): json.loads(p.read_text())["history"] for p in probe.glob("trial-*.json")}
    assert sorted(in_process) == [0, 1], in_process
    assert sorted(at_start) == ["baseline", "trial-0", "trial-1"], at_start
    assert at_start["baseline"] is not None, "the baseline started before any history.json was written"
    for index in (0, 1):
        for moment, history in (("executor.start", at_start[f"trial-{index}"]), ("the trial", in_process[index])):
            assert history is not None, f"{moment}: trial {index} started before any history.json was written"
            listed = {t["index"]: t for t in history["trials"]}
            assert index in listed, f"{moment}: trial {index} started before the history listed it: {list(listed)}"
            assert listed[index]["status"] == "pending" and listed[index]["tune_config"], listed[index]
