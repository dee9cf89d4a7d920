"""What a failed pod's failure says (podstatus.failure_of on pod dicts): an OOM kill names the memory limit
and the unit, whatever log line the termination message holds; text that is not the runner's own
`Reason: message` is labelled as log output and bounded."""

from __future__ import annotations

from typing import Any

from qtune import protocol
from qtune.operator import constants as c
from qtune.operator.podstatus import LOG_TAIL_CHARS, MESSAGE_LIMIT, failure_of, summarize_pod

LOG_TAIL = "\n".join(f"2026-12-02 INFO loading batch {i}" for i in range(40)) + "\nimporting onnxruntime"


def _pod(exit_code: int, reason: str, message: str | None, memory: str | None = "600Mi") -> dict[str, Any]:
    container: dict[str, Any] = {"name": "runner", "image": "qtune:test"}
    if memory is not None:
        container["resources"] = {"limits": {"memory": memory, "cpu": "1"}, "requests": {"memory": memory}}
    terminated: dict[str, Any] = {"exitCode": exit_code, "reason": reason}
    if message is not None:
        terminated["message"] = message
    return {"metadata": {"name": "digits-trial-4-0", "namespace": "ml",
                         "labels": {c.LABEL_UNIT: "trial-4", c.LABEL_ATTEMPT: "0"}},
            "spec": {"containers": [{"name": "sidecar"}, container]},
            "status": {"phase": "Failed", "containerStatuses": [{"name": "runner",
                                                                 "state": {"terminated": terminated}}]}}


def test_an_oom_kill_names_the_limit_and_the_unit_not_an_unrelated_log_line() -> None:
    reason, message = failure_of(summarize_pod(_pod(137, "OOMKilled", LOG_TAIL)))
    assert reason == "OOMKilled"
    assert message.startswith("trial-4 (pod digits-trial-4-0) was killed (OOMKilled, exit code 137) for exceeding "
                              "its memory limit of 600Mi (spec.trial.resources.memory)")
    # the log tail is appended, labelled, and only its last lines
    assert "; log output (last lines): " in message and message.endswith("importing onnxruntime")
    assert "loading batch 0 " not in message and len(message.split("log output (last lines): ")[1]) <= LOG_TAIL_CHARS


def test_an_oom_kill_without_a_termination_message_or_a_known_limit() -> None:
    reason, message = failure_of(summarize_pod(_pod(137, "OOMKilled", None, memory=None)))
    assert reason == "OOMKilled"
    assert message == ("trial-4 (pod digits-trial-4-0) was killed (OOMKilled, exit code 137) for exceeding its "
                       "memory limit (spec.trial.resources.memory)")


def test_a_trial_error_without_the_runner_form_is_labelled_as_log_output() -> None:
    reason, message = failure_of(summarize_pod(_pod(protocol.EXIT_TRIAL_FAILED, "Error", "Traceback ...\nboom")))
    assert reason == "TrialError" and message == "log output (last lines): Traceback ... | boom"
    reason, message = failure_of(summarize_pod(_pod(protocol.EXIT_TRIAL_FAILED, "Error", "TrialError: bad scale")))
    assert (reason, message) == ("TrialError", "bad scale")  # the runner's own message stays as it is


def test_a_runner_error_and_a_crash_label_log_output_too() -> None:
    reason, message = failure_of(summarize_pod(_pod(protocol.EXIT_JOB_UNUSABLE, "Error", "x" * 10_000)))
    assert reason == "RunnerError" and message.startswith("log output (last lines): ...")
    assert len(message) <= MESSAGE_LIMIT
    reason, message = failure_of(summarize_pod(_pod(protocol.EXIT_JOB_UNUSABLE, "Error", "spec.data: no file")))
    assert (reason, message) == (protocol.INVALID_SPEC, "spec.data: no file")
    reason, message = failure_of(summarize_pod(_pod(139, "Error", LOG_TAIL)))
    assert reason == "Crashed" and message.startswith("exit code 139; log output (last lines): ")
