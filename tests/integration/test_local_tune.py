"""`qtune tune` end to end on a real ONNX model with real ONNX Runtime quantization.

The model (tests/integration/sensitive_model.py) is an MLP trained on scikit-learn's digits with
a few ops made hostile to int8 (function-preserving), so the tuner must find exactly those.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from qtune.cli.main import main as qtune_main
from qtune.local import tune
from qtune.spec import QtuneError, load_job

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from sensitive_model import build_sensitive_mlp  # noqa: E402

from qtune.tuning import codec  # noqa: E402


@pytest.fixture(scope="module")
def sensitive(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sensitive")
    model, calib, evaluation, sensitive_ops = build_sensitive_mlp(folder)
    return folder, Path(model), Path(calib), Path(evaluation), set(sensitive_ops)


def write_job(folder: Path, sensitive, name: str = "mlp", **tuning) -> Path:
    _, model, calib, evaluation, _ = sensitive
    spec = {
        "apiVersion": "qtune.io/v1alpha1",
        "kind": "QuantizationJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"framework": "onnxruntime", "path": str(model)},
            "data": {"calibration": {"path": str(calib), "samples": 128},
                     "evaluation": {"path": str(evaluation), "metric": "top1"}},
            "quantization": {"approach": "static", "format": "QDQ"},
            "tuning": {"strategy": "basic", "accuracyCriterion": {"relative": 0.01}, "objective": "size",
                       "maxTrials": 16, "seed": 0, **tuning},
            "benchmark": {"batchSizes": [1, 16], "warmupRuns": 2, "runs": 5},
            "output": {"path": str(folder / "out")},
        },
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_tuning_keeps_exactly_the_sensitive_ops_in_fp32(sensitive, tmp_path):
    job_file = write_job(tmp_path, sensitive)
    outcome = tune(load_job(job_file), job_file)
    assert outcome.best is not None, codec.dump(outcome.history)
    fp32 = set(outcome.best.tune_config.fp32_ops())
    # the hostile ops stay fp32, each with (at most) its fused partner: nothing else
    assert sensitive[4] <= fp32, fp32
    assert all(any(op.split("/")[0] == bad.split("/")[0] for bad in sensitive[4]) for op in fp32), fp32
    assert outcome.best.accuracy >= outcome.baseline.accuracy * 0.99
    assert len(outcome.history.trials) <= 12
    out = tmp_path / "out"
    for name in ("best_config.json", "history.json", "report.md", "report.html", "accuracy_latency.png"):
        assert (out / name).is_file(), name
    assert any((out / "model").glob("*.onnx"))
    best = json.loads((out / "best_config.json").read_text())
    assert best["trial"] == outcome.best.index
    # each saved model's sha256, measured in its trial's process, is in history.json: the winner's is its file's
    stored = {t["index"]: t for t in json.loads((out / "history.json").read_text())["trials"]}
    winner = stored[outcome.best.index]
    model_file = Path(winner["model_path"])
    assert winner["model_sha256"] == hashlib.sha256(model_file.read_bytes()).hexdigest()
    assert winner["model_sha256"] == hashlib.sha256((out / "model" / model_file.name).read_bytes()).hexdigest()
    assert all(t["model_sha256"] is None for t in stored.values() if not t["model_path"])
    # calibration ran once: only the first trial of each algorithm spent time on it
    calibration_times = [t.timings.get("calibration", 0) for t in outcome.history.trials if t.ok]
    assert sum(1 for seconds in calibration_times if seconds > 0) <= 3
    # the peak RSS of calibrating is in the history: the baseline's MinMax, and every trial that measured one
    assert outcome.history.baseline.peak_rss_bytes.get("calibration", 0) > 0
    assert outcome.history.baseline.peak_rss_bytes["total"] >= outcome.history.baseline.peak_rss_bytes["calibration"]
    for trial in outcome.history.trials:
        if trial.ok:
            assert trial.peak_rss_bytes.get("total", 0) > 0, trial.index
            assert (trial.timings.get("calibration", 0) > 0) == ("calibration" in trial.peak_rss_bytes), trial.index
    stored = json.loads((out / "history.json").read_text())
    assert stored["baseline"]["peak_rss_bytes"]["calibration"] > 0


def test_status_and_report_read_a_finished_run(sensitive, tmp_path, capsys):
    job_file = write_job(tmp_path, sensitive, maxTrials=2)
    tune(load_job(job_file), job_file)
    capsys.readouterr()
    assert qtune_main(["status", str(job_file)]) == 0
    shown = capsys.readouterr().out
    assert "2/2 trials finished" in shown and "MaxTrialsReached" in shown
    assert qtune_main(["report", str(job_file), "-o", str(tmp_path / "again")]) == 0
    assert "qtune report: mlp" in (tmp_path / "again" / "report.md").read_text()
    assert qtune_main(["status", str(tmp_path / "nowhere.yaml")]) == 1
    again = tune(load_job(job_file), job_file)  # a finished run is replaced by a new one
    assert len(again.history.trials) == 2 and all(t.index < 2 for t in again.history.trials)


def test_parallel_and_sequential_runs_pick_the_same_best(sensitive, tmp_path):
    sequential = write_job(tmp_path / "seq", sensitive, parallelTrials=1)
    parallel = write_job(tmp_path / "par", sensitive, parallelTrials=2)
    first = tune(load_job(sequential), sequential)
    second = tune(load_job(parallel), parallel)
    assert first.best is not None and second.best is not None
    assert first.best.config_key == second.best.config_key


def test_interrupted_run_resumes_without_repeating_a_trial(sensitive, tmp_path):
    job_file = write_job(tmp_path, sensitive)
    history_file = tmp_path / ".qtune" / "mlp" / "history.json"
    process = subprocess.Popen([sys.executable, "-m", "qtune.cli.main", "tune", str(job_file)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 240
    finished_before: list[dict] = []
    while time.monotonic() < deadline and process.poll() is None:
        if history_file.exists():
            trials = json.loads(history_file.read_text())["trials"]
            finished_before = [t for t in trials if t["status"] != "pending"]
            if len(finished_before) >= 2:
                break
        time.sleep(0.2)
    assert process.poll() is None, "the run ended before it could be interrupted"
    os.kill(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert b"--resume" in stderr, stderr.decode(errors="replace")[-3000:]
    assert not (tmp_path / "out").exists()  # no half-written output

    interrupted = json.loads(history_file.read_text())["trials"]
    done_keys = {t["config_key"]: t for t in interrupted if t["status"] != "pending"}
    with pytest.raises(QtuneError, match="unfinished run .* use --resume"):
        tune(load_job(job_file), job_file)
    outcome = tune(load_job(job_file), job_file, resume=True)
    keys = [t.config_key for t in outcome.history.trials]
    assert len(keys) == len(set(keys)), "a trial ran twice"
    for record in outcome.history.trials:
        if record.config_key in done_keys:  # finished trials were kept, not re-run
            assert record.finished_at == done_keys[record.config_key]["finished_at"]
    fp32 = set(outcome.best.tune_config.fp32_ops())
    # the hostile ops stay fp32, each with (at most) its fused partner: nothing else
    assert sensitive[4] <= fp32, fp32
    assert all(any(op.split("/")[0] == bad.split("/")[0] for bad in sensitive[4]) for op in fp32), fp32


def job_with_adaptor(adaptor: str, folder: Path, sensitive, monkeypatch, **tuning) -> Path:
    """A job whose framework is one of the misbehaving third-party adaptors in crashing_adaptor.py
    (importable by the trial processes through PYTHONPATH)."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.syspath_prepend(str(HERE))
    job_file = write_job(folder, sensitive, **tuning)
    document = yaml.safe_load(job_file.read_text())
    document["spec"]["model"]["framework"] = f"crashing_adaptor:{adaptor}"
    job_file.write_text(yaml.safe_dump(document))
    return job_file


def test_a_crashing_trial_is_recorded_and_tuning_goes_on(sensitive, tmp_path, monkeypatch):
    job_file = job_with_adaptor("CrashingAdaptor", tmp_path, sensitive, monkeypatch, strategy="random", maxTrials=3)
    outcome = tune(load_job(job_file), job_file)
    assert len(outcome.history.trials) == 3
    crashed = [t for t in outcome.history.trials if t.reason == "Crashed"]
    assert crashed and all(t.status == "failed" for t in crashed)
    assert "exit code" in crashed[0].message or "killed by" in crashed[0].message


def test_a_trial_over_its_time_limit_is_killed_and_recorded(sensitive, tmp_path, monkeypatch):
    job_file = job_with_adaptor("HangingAdaptor", tmp_path, sensitive, monkeypatch, maxTrials=2,
                                trialTimeoutSeconds=2)
    started = time.monotonic()
    outcome = tune(load_job(job_file), job_file)
    assert time.monotonic() - started < 120
    assert outcome.best is None and outcome.outcome == "NoConfigMeetsCriterion"
    assert outcome.history.trials and {t.reason for t in outcome.history.trials} == {"Timeout"}
    assert (tmp_path / "out" / "report.html").exists()


def test_the_job_wall_clock_limit_stops_tuning(sensitive, tmp_path, monkeypatch):
    job_file = job_with_adaptor("HangingAdaptor", tmp_path, sensitive, monkeypatch, timeoutSeconds=30,
                                trialTimeoutSeconds=600, strategy="random")  # random: never out of configs
    started = time.monotonic()
    outcome = tune(load_job(job_file), job_file)
    assert time.monotonic() - started < 90
    assert outcome.stop_reason == "Timeout"
    assert outcome.history.trials[-1].reason == "Timeout"
    assert not outcome.history.pending()
    used, trials = outcome.history.elapsed_seconds, len(outcome.history.trials)
    assert used >= 30
    # --resume with the same limit: the time is spent, the run stays finished (and is reported again)
    again = tune(load_job(job_file), job_file, resume=True)
    assert again.stop_reason == "Timeout" and len(again.history.trials) == trials
    # a raised limit: the run goes on, the time of the first run counted, until the total reaches the new limit
    # (the limit leaves room for one trial as long as the first run's: the session starts none that cannot end)
    hung = max(t.finished_at - t.started_at for t in outcome.history.trials)
    limit = int(again.history.elapsed_seconds + hung) + 3
    document = yaml.safe_load(job_file.read_text())
    document["spec"]["tuning"]["timeoutSeconds"] = limit
    job_file.write_text(yaml.safe_dump(document))
    started = time.monotonic()
    resumed = tune(load_job(job_file), job_file, resume=True)
    assert resumed.stop_reason == "Timeout" and len(resumed.history.trials) == trials + 1
    assert limit <= resumed.history.elapsed_seconds < limit + 15
    assert time.monotonic() - started < limit - again.history.elapsed_seconds + 15
    # the limit counts the baseline step: one shorter than the baseline stops the job in one line
    job_file = job_with_adaptor("HangingAdaptor", tmp_path / "short", sensitive, monkeypatch, timeoutSeconds=1,
                                trialTimeoutSeconds=600)
    with pytest.raises(QtuneError, match="wall-clock limit .*before the baseline finished"):
        tune(load_job(job_file), job_file)


def _run_cli(job_file: Path, capsys) -> tuple[int, str]:
    """Exit code and the error line (the last line on stderr; progress lines come before it)."""
    code = qtune_main(["tune", str(job_file)])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("qtune: error: "), last
    return code, last


@pytest.mark.parametrize(("case", "expected"), [
    ("malformed", "malformed YAML at line"),
    ("unknown-field", "spec.tuning.maxTrails: unknown field"),
    ("unknown-op", "spec.quantization.opWise.no_such_op: no quantizable op named 'no_such_op'"),
])
def test_bad_job_files_fail_in_one_line_and_write_nothing(sensitive, tmp_path, capsys, case, expected):
    job_file = write_job(tmp_path, sensitive)
    text = job_file.read_text()
    if case == "malformed":
        text = "spec: [unclosed\n" + text
    elif case == "unknown-field":
        text = text.replace("maxTrials:", "maxTrails:")
    else:
        document = yaml.safe_load(text)
        document["spec"]["quantization"]["opWise"] = {"no_such_op": {"activation": {"dtype": "fp32"}}}
        text = yaml.safe_dump(document)
    job_file.write_text(text)
    code, err = _run_cli(job_file, capsys)
    assert code == 1
    assert expected in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists() and not (tmp_path / ".qtune").exists()


def test_missing_corrupt_model_and_mismatched_data_fail_in_one_line(sensitive, tmp_path, capsys):
    import numpy as np

    job_file = write_job(tmp_path, sensitive)
    document = yaml.safe_load(job_file.read_text())

    document["spec"]["model"]["path"] = str(tmp_path / "absent.onnx")
    job_file.write_text(yaml.safe_dump(document))
    code, err = _run_cli(job_file, capsys)
    assert code == 1 and "absent.onnx" in err and "not found" in err and len(err.splitlines()) == 1

    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"this is not a protobuf" * 10)
    document["spec"]["model"]["path"] = str(corrupt)
    job_file.write_text(yaml.safe_dump(document))
    code, err = _run_cli(job_file, capsys)
    assert code == 1 and "corrupt.onnx" in err and len(err.splitlines()) == 1

    with np.load(sensitive[3]) as archive:
        arrays = dict(archive)
    name = next(k for k in arrays if k != "labels")
    arrays[name] = arrays[name][:, :10]  # wrong feature count
    bad = tmp_path / "bad_eval.npz"
    np.savez(bad, **arrays)
    document["spec"]["model"]["path"] = str(sensitive[1])
    document["spec"]["data"]["evaluation"]["path"] = str(bad)
    job_file.write_text(yaml.safe_dump(document))
    code, err = _run_cli(job_file, capsys)
    assert code == 1 and "spec.data.evaluation" in err and name in err, err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists() and not (tmp_path / ".qtune").exists()


def test_resume_refuses_a_changed_model_file(sensitive, tmp_path, capsys):
    import shutil

    model_copy = tmp_path / "model.onnx"
    shutil.copy(sensitive[1], model_copy)
    job_file = write_job(tmp_path, sensitive, maxTrials=1)
    document = yaml.safe_load(job_file.read_text())
    document["spec"]["model"]["path"] = str(model_copy)
    job_file.write_text(yaml.safe_dump(document))
    tune(load_job(job_file), job_file)
    model_copy.write_bytes(model_copy.read_bytes() + b"\0")  # rebuilt model (still loads: trailing byte)
    assert qtune_main(["tune", "--resume", str(job_file)]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "spec.model.path (or the file it names) changed" in error and "--fresh" in error


def test_qtune_never_uses_or_deletes_a_folder_it_did_not_create(sensitive, tmp_path, capsys, monkeypatch):
    job_file = write_job(tmp_path, sensitive, maxTrials=1)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not qtune's")
    monkeypatch.chdir(tmp_path)
    for argv, field in ((["-o", "."], "spec.output.path"), (["-o", str(foreign)], "spec.output.path")):
        assert qtune_main(["tune", str(job_file), *argv]) == 1
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert field in last, last
    document = yaml.safe_load(job_file.read_text())
    document["spec"]["workspace"] = {"path": str(foreign)}
    job_file.write_text(yaml.safe_dump(document))
    assert qtune_main(["tune", str(job_file), "--fresh"]) == 1
    assert "spec.workspace.path" in capsys.readouterr().err and (foreign / "notes.txt").exists()


def test_trial_processes_die_with_a_killed_qtune_tune(sensitive, tmp_path, monkeypatch):
    job_file = job_with_adaptor("HangingAdaptor", tmp_path, sensitive, monkeypatch, trialTimeoutSeconds=600)
    process = subprocess.Popen([sys.executable, "-m", "qtune.cli.main", "tune", str(job_file)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    history_file = tmp_path / ".qtune" / "mlp" / "history.json"
    deadline = time.monotonic() + 180
    trial_pids: list[int] = []
    while time.monotonic() < deadline and not trial_pids:
        time.sleep(0.5)
        children = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
        if history_file.exists() and json.loads(history_file.read_text())["trials"]:
            trial_pids = [int(pid) for pid in children]
    assert trial_pids, "no trial process started"
    # the history already holds the running trial (saved before its process was launched)
    assert json.loads(history_file.read_text())["trials"][0]["status"] == "pending"
    process.kill()
    process.wait(timeout=30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(os.path.exists(f"/proc/{pid}") for pid in trial_pids):
        time.sleep(0.2)
    alive = [pid for pid in trial_pids if os.path.exists(f"/proc/{pid}")
             and "Z" not in open(f"/proc/{pid}/stat").read().split()[2]]
    assert not alive, f"trial processes outlived qtune tune: {alive}"
