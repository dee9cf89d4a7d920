"""`python -m qtune.runner baseline|trial|confirm|cleanup ...`: the process a local unit or a pod runs
(cleanup: see qtune/runner/cleanup.py).

Each command writes its typed result (qtune/protocol.py) to `--result` as JSON and, with a
Pushgateway, pushes it as metrics; a succeeded unit's signed result also goes into its termination
message (the copy the operator prefers: only the kubelet writes it into the pod's status). Exit
codes (protocol): 0 done, 2 the trial ran and failed (its result says why), 1 the job itself is
unusable (bad spec, model or data): the message is the last line of stderr and the termination
message `Reason: message` (the pod's, or the file QTUNE_TERMINATION_LOG names).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import Any


def _exit_on_sigterm(signum: int, _frame: Any) -> None:
    """Stop at once, pushing nothing: the pod was deleted, or its deadline or the node's shutdown came."""
    logging.getLogger("qtune.runner").warning("SIGTERM: stopping without a result")
    logging.shutdown()
    os._exit(128 + signum)


def install_sigterm_handler() -> None:
    """In a container the runner is PID 1, and Linux delivers no signal to a namespace's init that it has
    no handler for (pid_namespaces(7)): without one, a deleted pod's runner ignores the kubelet's SIGTERM
    and runs on (finishing and pushing its result) until SIGKILL at the end of the grace period. A handler
    the process already has (e.g. a test harness calling `qtune trial` in-process) is left alone."""
    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _exit_on_sigterm)


if __name__ == "__main__":
    install_sigterm_handler()  # first: importing qtune (pydantic, ...) takes a second, SIGTERM may come meanwhile

from qtune.protocol import (  # noqa: E402 - after the SIGTERM handler
    EXIT_JOB_UNUSABLE,
    EXIT_OK,
    EXIT_TRIAL_FAILED,
    FAILED,
    INVALID_SPEC,
    TERMINATION_LIMIT,
    BaselineResult,
    ConfirmResult,
    TrialResult,
    UnitKind,
    termination_message,
    trial_unit,
)
from qtune.spec import QtuneError, job_from_dict, load_job  # noqa: E402
from qtune.tuning import codec  # noqa: E402
from qtune.tuning.config import TuneConfig  # noqa: E402
from qtune.tuning.history import write_json_atomic  # noqa: E402

logger = logging.getLogger("qtune.runner")
TERMINATION_LOG = "/dev/termination-log"


RUNNER_KINDS = (UnitKind.BASELINE, UnitKind.TRIAL, UnitKind.CONFIRM)
"""The units this command runs (each its kind's command); the cleanup is `python -m qtune.runner cleanup`."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m qtune.runner", description=__doc__)
    parser.add_argument("command", choices=[kind.value for kind in RUNNER_KINDS])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--job", help="QuantizationJob YAML file")
    source.add_argument("--job-json", help="QuantizationJob as JSON (or env QTUNE_JOB_JSON)")
    parser.add_argument("--base-dir", help="folder the job's relative paths start from")
    parser.add_argument("--workspace", required=True, help="the job's shared workspace folder")
    parser.add_argument("--index", default="0", help="trial number")
    parser.add_argument("--config", help="trial: the tune config, a JSON file; confirm: {trial index: tune config}")
    parser.add_argument("--candidates", help="confirm: the trial indices to re-measure, e.g. 3,5,7")
    parser.add_argument("--full-evaluation", action="store_true",
                        help="trial: evaluate in full even once the accuracy criterion cannot be met")
    parser.add_argument("--result", help="write the typed result here (JSON)")
    parser.add_argument("--threads", type=int, help="CPUs this unit owns")
    parser.add_argument("--pushgateway", default=os.environ.get("QTUNE_PUSHGATEWAY_URL"))
    parser.add_argument("--job-uid", default=os.environ.get("QTUNE_JOB_UID", "local"))
    parser.add_argument("--log-level", default=os.environ.get("QTUNE_LOG_LEVEL", "INFO"))
    parser.add_argument("--publish-configmap", metavar="NAME",
                        help="baseline: also write space.json and baseline.json to this ConfigMap (operator)")
    return parser


def write_termination(text: str) -> None:
    path = Path(os.environ.get("QTUNE_TERMINATION_LOG", TERMINATION_LOG))
    try:
        if path.parent.is_dir():
            path.write_bytes(text.encode()[:TERMINATION_LIMIT])
    except OSError:
        pass


def _terminate_with_result(unit: str, result: BaselineResult | TrialResult | ConfirmResult, signature: str) -> bool:
    """A succeeded unit's signed result also in its termination message: the operator prefers that copy (only
    the kubelet writes a pod's status), so a poisoned or deleted Pushgateway group cannot spoil it. False when
    it does not fit (the pushed copy alone carries it)."""
    from qtune.runner.metrics import termination_result

    text = termination_result(unit, result, signature)
    if text is None:
        logger.info("the result of %s is over %d bytes encoded: the pushed copy alone carries it", unit,
                    TERMINATION_LIMIT)
        return False
    write_termination(text)
    return True


def _terminate_unpushed(job_uid: str, unit: str, result: BaselineResult | TrialResult | ConfirmResult) -> bool:
    """After a push that failed for good (e.g. the Pushgateway refused it, 400, because someone pushed a group
    whose series clash with the result's): the signed result in the termination message alone, when the unit
    has its secret and the result fits. The operator believes that copy first, so the unit need not fail."""
    from qtune.protocol import sign_result
    from qtune.runner.metrics import SECRET_ENV

    secret = os.environ.get(SECRET_ENV)
    return bool(secret) and _terminate_with_result(unit, result, sign_result(job_uid, unit, result, secret or ""))


def _read_json(value: str, what: str) -> Any:
    try:
        return json.loads(Path(value).read_text())
    except (OSError, ValueError) as exc:
        raise QtuneError(f"{what}: cannot read {value}: {exc}") from None


def _context(args: argparse.Namespace) -> Any:
    from qtune.runner.context import JobContext, default_threads

    if args.job:
        job = load_job(args.job)
        base_dir = Path(args.base_dir or Path(args.job).resolve().parent)
    else:
        job = job_from_dict(json.loads(args.job_json))
        base_dir = Path(args.base_dir or ".")
    workspace = Path(args.workspace)
    workspace.mkdir(parents=True, exist_ok=True)
    return JobContext(job, base_dir.resolve(), workspace.resolve(), args.threads or default_threads())


def _run(args: argparse.Namespace) -> BaselineResult | TrialResult | ConfirmResult:
    context = _context(args)
    if args.command == UnitKind.BASELINE:
        from qtune.runner.baseline import run_baseline

        _, baseline = run_baseline(context)
        digest = None
        if args.publish_configmap:
            from qtune.runner.publish import publish_baseline

            digest = publish_baseline(args.publish_configmap, context.workspace)
        return BaselineResult(accuracy=baseline.accuracy, metric=baseline.metric, latency_ms=baseline.latency_ms,
                              latency_p90_ms=baseline.latency_p90_ms, model_size_bytes=baseline.model_size_bytes,
                              seconds=baseline.seconds, peak_rss_bytes=baseline.peak_rss_bytes, space_sha256=digest)
    if args.command == UnitKind.CONFIRM:
        from qtune.runner.confirm import run_confirm

        if not args.config:
            raise QtuneError("--config is required for confirm")
        configs = _read_json(args.config, "--config")
        if args.candidates:
            wanted = {c.strip() for c in args.candidates.split(",") if c.strip()}
            configs = {k: v for k, v in configs.items() if k in wanted}
        return run_confirm(context, configs)
    from qtune.runner.trial import run_trial

    if not args.config:
        raise QtuneError("--config is required for a trial")
    config = codec.load(TuneConfig, _read_json(args.config, "--config"))
    return run_trial(context, config, int(args.index), early_stopping=not args.full_evaluation)


def _failed(command: str, index: str, reason: str, message: str) -> BaselineResult | TrialResult | ConfirmResult:
    if command == UnitKind.BASELINE:
        return BaselineResult(status=FAILED, reason=reason, message=message)
    if command == UnitKind.CONFIRM:
        return ConfirmResult(status=FAILED, reason=reason, message=message)
    return TrialResult(trial=int(index) if str(index).isdigit() else 0, status=FAILED, reason=reason, message=message)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == [UnitKind.CLEANUP]:  # no job, no result: deletes the models of non-winning trials
        from qtune.runner.cleanup import main as cleanup

        return cleanup(argv[1:])
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    code = EXIT_OK
    try:
        result = _run(args)
    except QtuneError as exc:
        logger.error("%s", exc)
        result, code = _failed(args.command, args.index, INVALID_SPEC, str(exc)), EXIT_JOB_UNUSABLE
    except Exception as exc:  # noqa: BLE001 - any other failure is reported, never a silent crash
        logger.error("%s crashed:\n%s", args.command, traceback.format_exc())
        result = _failed(args.command, args.index, "Crashed", f"{type(exc).__name__}: {exc}"[:2000])
        code = EXIT_JOB_UNUSABLE if args.command == UnitKind.BASELINE else EXIT_TRIAL_FAILED
    if code == EXIT_OK and result.status != "succeeded":
        code = EXIT_TRIAL_FAILED
    payload = result.model_dump(mode="json")
    if args.result:
        write_json_atomic(Path(args.result), payload)
    if args.pushgateway:
        from qtune.runner.metrics import push_result

        unit = args.command if args.command in (UnitKind.BASELINE, UnitKind.CONFIRM) else trial_unit(int(args.index))
        # Every unit's result must reach the operator signed: pushed, and (when it fits) in the termination
        # message, which the operator believes first. A push that never gets through fails the unit now, naming
        # why (instead of leaving the job to wait for its results deadline), unless the termination message
        # carries the signed result alone.
        try:
            signature = push_result(args.pushgateway, args.job_uid, unit, result)
        except Exception as exc:  # noqa: BLE001 - after push_result's retries
            logger.error("could not push the result of %s to %s: %s", unit, args.pushgateway, exc)
            if code == EXIT_OK and _terminate_unpushed(args.job_uid, unit, result):
                logger.warning("the signed result of %s travels in the pod's termination message alone", unit)
                return code
            text = f"the result could not be pushed to {args.pushgateway}: {type(exc).__name__}: {exc}"[:2000]
            write_termination(termination_message("PushFailed", text))
            print(f"error: {text}", file=sys.stderr)  # noqa: T201 - the last line the caller reads
            return code if code != EXIT_OK else EXIT_TRIAL_FAILED
        if code == EXIT_OK and signature:
            _terminate_with_result(unit, result, signature)
    if code != EXIT_OK:
        message = result.message or result.reason or "failed"
        write_termination(termination_message(result.reason or "Failed", message))
        if code == EXIT_JOB_UNUSABLE:
            print(f"error: {message}", file=sys.stderr)  # noqa: T201 - the last line the caller reads
    return code


if __name__ == "__main__":
    sys.exit(main())
