"""A run that stops RepeatedFailures after a passing trial: `qtune tune` exits 5 (EXIT_FAILED), as the same
job ends `Failed` on the cluster (one rule, qtune.tuning.stop.succeeded), and both say why: the verdict names
RepeatedFailures and the best passing config found before it, which is still written."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import yaml

from qtune.cli.main import EXIT_FAILED
from qtune.cli.main import main as qtune_main
from qtune.operator.status import FAILED_STATE, state_for_outcome

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE / "onnxrt"))

from onnx_builders import INPUT, digits, mlp_proto, save  # noqa: E402

# an evalFunc beside the job file: the baseline and trial 0 score, every later trial fails the same way
EVAL_CODE = textwrap.dedent('''
    import sys

    import numpy as np

    def score(model):
        index = sys.argv[sys.argv.index("--index") + 1] if "--index" in sys.argv else None
        if index not in (None, "0"):
            raise RuntimeError("the evaluation service is down")
        data = np.load(__file__.replace("broken_eval.py", "eval.npz"))
        logits = model({"INPUT": data["INPUT"]})[0]
        return float((logits.argmax(1) == data["labels"]).mean())
''').replace("INPUT", INPUT)


def test_repeated_failures_after_a_passing_trial_exit_5_with_the_best_written(tmp_path: Path, capsys) -> None:
    data = digits()
    np.savez(tmp_path / "calib.npz", **{INPUT: data["x_train"][:100]})
    np.savez(tmp_path / "eval.npz", **{INPUT: data["x_eval"], "labels": data["y_eval"]})
    save(mlp_proto(hidden=(16,)), tmp_path / "mlp.onnx")
    (tmp_path / "broken_eval.py").write_text(EVAL_CODE)
    document = {
        "apiVersion": "qtune.io/v1alpha1", "kind": "QuantizationJob", "metadata": {"name": "repeated"},
        "spec": {
            "model": {"framework": "onnxruntime", "path": "mlp.onnx"},
            "data": {"calibration": {"path": "calib.npz"}, "evaluation": {"evalFunc": "broken_eval:score"}},
            # no config can reach a 50x speedup: a passing trial 0 does not end the search
            "tuning": {"strategy": "random", "seed": 0, "accuracyCriterion": {"relative": 0.5}, "maxTrials": 6,
                       "parallelTrials": 1,
                       "maxConsecutiveFailures": 2, "minSpeedup": 50},
            "benchmark": {"batchSizes": [1], "maxSeconds": 2, "minRounds": 3, "warmupRuns": 2, "runs": 10},
            "output": {"path": "out"},
        },
    }
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(document))

    assert qtune_main(["tune", str(job_file)]) == EXIT_FAILED == 5
    console = capsys.readouterr().err
    assert "RepeatedFailures: 2 trials in a row were TrialError (trials 1, 2)" in console, console[-3000:]
    assert "Best passing config so far: trial 0" in console, console[-3000:]
    history = json.loads((tmp_path / "out" / "history.json").read_text())
    assert history["outcome"] == "RepeatedFailures"
    assert state_for_outcome(history["outcome"]) == FAILED_STATE  # what the operator makes of the same outcome
    best = json.loads((tmp_path / "out" / "best_config.json").read_text())
    assert best["trial"] == 0 and best["outcome"] == "RepeatedFailures", best
