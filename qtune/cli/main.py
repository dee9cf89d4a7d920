"""The `qtune` command: tune | status | report | trial | operator | results-gateway."""

from __future__ import annotations

import argparse
import logging
import re
import sys
import traceback
from pathlib import Path

from qtune import __version__
from qtune.protocol import UnitKind
from qtune.spec import QtuneError, load_job
from qtune.tuning import stop

logger = logging.getLogger("qtune")
EXIT_ERROR = 1
"""Bad input (the line names the field and what is allowed), or an unexpected failure (the line names
what failed and where; `-v` prints the traceback)."""
EXIT_NO_CONFIG = stop.EXIT_NO_CONFIG
"""`qtune tune`: no configuration meets the accuracy criterion."""
EXIT_NO_SPEEDUP = stop.EXIT_NO_SPEEDUP
"""`qtune tune`: configurations meet the criterion, but none is faster than fp32 (or minSpeedup)."""
EXIT_FAILED = stop.EXIT_FAILED
"""`qtune tune`: the run failed for another reason (RepeatedFailures, BaselineFailed), as a cluster job would."""


def _tune(args: argparse.Namespace) -> int:
    from rich.console import Console

    from qtune.cli.front_table import front_table
    from qtune.cli.progress import RichProgress
    from qtune.local import tune
    from qtune.tuning.front import session_front

    console = Console(stderr=True)
    job = load_job(args.job)
    console.print(f"[bold]qtune[/bold] tuning [cyan]{job.name}[/cyan] ({job.spec.model.framework}, "
                  f"strategy {job.spec.tuning.strategy}, up to {job.spec.tuning.max_trials} trials, "
                  f"{job.spec.tuning.parallel_trials} at once)")
    with RichProgress(console) as progress:
        outcome = tune(job, args.job, output_dir=Path(args.output).expanduser() if args.output else None,
                       resume=args.resume, fresh=args.fresh, listener=progress)
    session = outcome.session
    code = stop.exit_code(session.outcome())
    colour = "green" if code == 0 else ("yellow" if outcome.best is not None else "red")
    front = session_front(session)
    if front:
        console.print(front_table(front, session.batch_size))
        console.print("another config of the front: its trial number n indexes `trials` in the output's history.json "
                      "(tune_config; model_path: its model, kept in the workspace)")
    console.print(f"[{colour}]{session.verdict()}[/{colour}]")
    console.print(f"{len(outcome.history.trials)} trials in {outcome.elapsed_seconds:.1f}s "
                  f"(search stopped: {outcome.stop_reason})")
    console.print(f"output: {outcome.output_dir} (model/, best_config.json, history.json, report.html)")
    return code


def _status(args: argparse.Namespace) -> int:
    if args.cluster:
        from qtune.cli.cluster_status import print_cluster_status

        return print_cluster_status(args.job, args.namespace)
    from qtune.cli.status import print_status

    return print_status(args.job)


def _report(args: argparse.Namespace) -> int:
    from qtune.cli.status import regenerate_report

    return regenerate_report(args.job, Path(args.output) if args.output else None)


def _trial(argv: list[str]) -> int:
    from qtune.runner.__main__ import RUNNER_KINDS, install_sigterm_handler
    from qtune.runner.__main__ import main as runner_main

    if not argv or argv[0] not in RUNNER_KINDS:
        argv = [UnitKind.TRIAL.value, *argv]
    install_sigterm_handler()  # `qtune trial` is PID 1 of a trial container too
    return runner_main(argv)


def _operator(argv: list[str]) -> int:
    try:
        from qtune.operator.main import main as operator_main
    except ImportError as exc:
        raise QtuneError(f"the operator needs the operator extra (pip install qtune[operator]): {exc}") from None
    return operator_main(argv)


def _results_gateway(argv: list[str]) -> int:
    try:
        from qtune.operator.gateway import main as gateway_main
    except ImportError as exc:
        raise QtuneError(f"the results gateway needs the operator extra (pip install qtune[operator]): {exc}") from None
    try:
        return gateway_main(argv)
    except ValueError as exc:
        raise QtuneError(str(exc)) from None


PASSTHROUGH = {"trial": _trial, "operator": _operator, "results-gateway": _results_gateway}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qtune", description="Accuracy-driven int8 tuning of ONNX Runtime and "
                                     "PyTorch models, locally or on Kubernetes.")
    parser.add_argument("--version", action="version", version=f"qtune {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, and the traceback of an unexpected error")
    commands = parser.add_subparsers(dest="command", required=True)

    tune = commands.add_parser("tune", help="tune a QuantizationJob on this machine")
    tune.add_argument("job", help="job.yaml (kind QuantizationJob)")
    tune.add_argument("-o", "--output", help="output folder (default spec.output.path or ./qtune-output/<name>)")
    mode = tune.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true",
                      help="continue an interrupted run from its history; a finished run goes on only when a budget it "
                           "stopped on was raised above what it used (maxTrials above the trials run, timeoutSeconds "
                           "0 or above the tuning time used so far, maxFailedTrials unset or above the failed trials)")
    mode.add_argument("--fresh", action="store_true", help="discard an earlier run of this job and start over")
    tune.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                      help="debug logging, and the traceback of an unexpected error")
    tune.set_defaults(handler=_tune)

    status = commands.add_parser("status", help="show the progress of a run (local, or --cluster)")
    status.add_argument("job", help="job.yaml, or with --cluster a QuantizationJob name")
    status.add_argument("--cluster", action="store_true", help="read the QuantizationJob's status from Kubernetes")
    status.add_argument("-n", "--namespace", help="namespace (default: the job file's, or the kubeconfig's)")
    status.set_defaults(handler=_status)

    report = commands.add_parser("report", help="write the report of a local run (also mid-run)")
    report.add_argument("job", help="job.yaml")
    report.add_argument("-o", "--output", help="folder for report.md / report.html (default: the workspace)")
    report.set_defaults(handler=_report)

    commands.add_parser("trial", help="run one unit: a trial, the baseline or the confirmation (what pods run); "
                        "see `qtune trial -h`",
                        add_help=False)
    commands.add_parser("operator", help="run the Kubernetes operator; see `qtune operator -h`", add_help=False)
    commands.add_parser("results-gateway", help="run the authenticating front of the Pushgateway (the chart's "
                        "results gateway); see `qtune results-gateway -h`", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `trial`, `operator` and `results-gateway` pass their arguments through untouched
    for position, word in enumerate(argv):
        if word in PASSTHROUGH:
            rest = argv[position + 1:]
            try:
                return PASSTHROUGH[word](rest)
            except QtuneError as exc:
                print(f"qtune: error: {exc}", file=sys.stderr)  # noqa: T201
                return 1
        if not word.startswith("-"):
            break
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except QtuneError as exc:
        print(f"qtune: error: {exc}", file=sys.stderr)  # noqa: T201 - the one-line error a user reads
        return 1
    except KeyboardInterrupt:
        print("qtune: interrupted; continue with --resume", file=sys.stderr)  # noqa: T201
        return 130
    except Exception as exc:  # noqa: BLE001 - anything else is still one line (the traceback with -v)
        if args.verbose:
            traceback.print_exc(file=sys.stderr)
        print(f"qtune: error: {unexpected_error(args.command, exc, args.verbose)}", file=sys.stderr)  # noqa: T201
        return EXIT_ERROR


def unexpected_error(command: str, exc: BaseException, verbose: bool = False) -> str:
    """One line for an exception qtune did not expect: the command, the exception, the frame it came
    from (the innermost one in qtune or the user's code, not in the libraries under it)."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = next((frame for frame in reversed(frames) if _ours(frame.filename)), frames[-1] if frames else None)
    text = " ".join(_ANSI.sub("", str(exc)).split())[:300] or "(no message)"
    place = ""
    if where is not None:
        place = f" in {where.name} ({_short_path(where.filename)}:{where.lineno})"
    hint = "" if verbose else "; run `qtune -v " + command + " ...` for the traceback"
    return f"{command} failed: {type(exc).__name__}{place}: {text}{hint}"


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _ours(filename: str) -> bool:
    """A frame of qtune or of the user's code, not of the standard library or an installed package."""
    parts = Path(filename).parts
    if "qtune" in parts:
        return True
    return "site-packages" not in parts and "dist-packages" not in parts and \
        not any(part.startswith("python3") for part in parts) and not filename.startswith("<")


def _short_path(filename: str) -> str:
    """qtune/local/driver.py for qtune's own files (not the install prefix), else the file name: a
    folder named qtune above the file (a checkout's) does not make it one of qtune's."""
    path = Path(filename)
    package = Path(__file__).resolve().parents[1]
    try:
        return f"{package.name}/{path.resolve().relative_to(package).as_posix()}"
    except ValueError:
        return path.name


if __name__ == "__main__":
    sys.exit(main())
