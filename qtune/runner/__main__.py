"""`python -m qtune.runner baseline|trial ...`: the process a local worker or a trial pod runs.

Exit codes: 0 done, 2 the trial ran and failed (its result says why), 1 the job itself is
unusable (bad spec, model or data): the message is the last line of stderr and, in a pod, the
container's termination message.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from qtune.spec import QtuneError, job_from_dict, load_job
from qtune.tuning.config import TuneConfig

logger = logging.getLogger("qtune.runner")
TERMINATION_LOG = "/dev/termination-log"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m qtune.runner", description=__doc__)
    parser.add_argument("command", choices=["baseline", "trial"])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--job", help="QuantizationJob YAML file")
    source.add_argument("--job-json", help="QuantizationJob as JSON (or env QTUNE_JOB_JSON)")
    parser.add_argument("--base-dir", help="folder the job's relative paths start from")
    parser.add_argument("--workspace", required=True, help="the job's shared workspace folder")
    parser.add_argument("--index", default="0", help="trial number")
    parser.add_argument("--config", help="tune config: a JSON file or a JSON string")
    parser.add_argument("--threads", type=int, help="CPUs this trial owns")
    parser.add_argument("--pushgateway", default=os.environ.get("QTUNE_PUSHGATEWAY_URL"))
    parser.add_argument("--job-uid", default=os.environ.get("QTUNE_JOB_UID", "local"))
    parser.add_argument("--log-level", default=os.environ.get("QTUNE_LOG_LEVEL", "INFO"))
    parser.add_argument("--publish-configmap", metavar="NAME",
                        help="baseline: also write space.json and baseline.json to this ConfigMap (operator)")
    return parser


def _termination_message(text: str) -> None:
    path = Path(os.environ.get("QTUNE_TERMINATION_LOG", TERMINATION_LOG))
    try:
        if path.parent.is_dir():
            path.write_text(text[:4000])
    except OSError:
        pass


def _load_config(value: str) -> TuneConfig:
    text = Path(value).read_text() if not value.lstrip().startswith("{") else value
    return TuneConfig.from_dict(json.loads(text))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    from qtune.runner.baseline import run_baseline
    from qtune.runner.context import JobContext, default_threads
    from qtune.runner.metrics import push_result
    from qtune.runner.trial import run_trial

    try:
        if args.job:
            job = load_job(args.job)
            base_dir = Path(args.base_dir or Path(args.job).resolve().parent)
        else:
            job = job_from_dict(json.loads(args.job_json))
            base_dir = Path(args.base_dir or ".")
        workspace = Path(args.workspace)
        workspace.mkdir(parents=True, exist_ok=True)
        context = JobContext(job, base_dir.resolve(), workspace.resolve(), args.threads or default_threads())
        if args.command == "baseline":
            _, baseline = run_baseline(context)
            if args.publish_configmap:
                from qtune.runner.publish import publish_baseline

                publish_baseline(args.publish_configmap, workspace)
            if args.pushgateway:
                push_result(args.pushgateway, args.job_uid, "baseline",
                            {"status": "succeeded", "accuracy": baseline.accuracy,
                             "latency_ms": baseline.latency_ms, "latency_p90_ms": baseline.latency_p90_ms,
                             "model_size_bytes": baseline.model_size_bytes,
                             "timings": {"total": baseline.seconds}})
            return 0
        if not args.config:
            raise QtuneError("--config is required for a trial")
        result = run_trial(context, _load_config(args.config), args.index)
    except QtuneError as exc:
        logger.error("%s", exc)
        _termination_message(str(exc))
        print(f"error: {exc}", file=sys.stderr)  # noqa: T201 - the last line the caller reads
        return 1
    if args.pushgateway:
        push_result(args.pushgateway, args.job_uid, args.index, result)
    if result["status"] != "succeeded":
        _termination_message(f"{result.get('reason')}: {result.get('message')}")
        return 2
    _termination_message(json.dumps({"model_path": result.get("model_path")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
