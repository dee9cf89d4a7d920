"""Operator settings, each defined once: default, environment variable, command-line flag and help
come from one field declaration; `from_env` and `add_arguments` are generated from them."""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from qtune.operator import constants as c
from qtune.spec.cel import QUEUE_NAME_RE

RESULTS_DEADLINE_DEFAULT = 1800.0
RESULTS_DEADLINE_MIN = 600.0
"""A succeeded unit's result survives a metrics outage of at least this long (issue 12)."""
SPACE_LIMIT_BYTES = 4 * 1024 * 1024
"""The default cap of a published tuning space, decoded: about 12,000 ops at ~350 bytes each (PP-OCRv4's
282 ops are 97 KB: 43x headroom; the bundled examples' spaces are at most a few KB)."""
SPACE_LIMIT_ELEMENTS = 200_000
"""The default cap of a published space's JSON elements ({[,: counted before parsing): about 4,700 ops at ~42
each (PP-OCRv4: 11,807, 17x headroom); bounds the objects one decode builds to some tens of MB."""

DEFAULT_IMAGE = "qtune:0.1.0"
"""Trial image when neither spec.trial.image nor QTUNE_TRIAL_IMAGE says otherwise."""


def _json_tuple(text: str) -> tuple[dict[str, Any], ...]:
    return tuple(dict(item) for item in (json.loads(text or "[]") or []))


def _json_map(text: str) -> dict[str, str]:
    return {str(k): str(v) for k, v in (json.loads(text or "{}") or {}).items()}


def _module_prefixes(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in (text or "").split(",") if part.strip())


def module_allowed(module: str, prefixes: tuple[str, ...]) -> bool:
    """`module` is one of `prefixes` or inside one of them (package prefix `a.b` allows `a.b.c`, not `a.bc`)."""
    return any(module == p or module.startswith(p.rstrip(".") + ".") for p in prefixes)


def _patterns(text: str) -> tuple[str, ...]:
    """Comma-separated exact values or prefix patterns ending in '*'."""
    return tuple(part.strip() for part in (text or "").split(",") if part.strip())


def matches_pattern(value: str, patterns: tuple[str, ...]) -> bool:
    """`value` equals one of `patterns`, or starts with the part before the final '*' of one."""
    return any(value == p or (p.endswith("*") and value.startswith(p[:-1])) for p in patterns)


def _label(text: str) -> str:
    """`key=value` (a label a PVC must carry), or "none" (any PVC: a single-tenant install)."""
    text = (text or "").strip()
    if text.lower() == "none":
        return ""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"not a label key=value (or none): {text!r}")
    return f"{key.strip()}={value.strip()}"


def _quantity(text: str) -> str:
    """A Kubernetes quantity such as 2Gi or 500M ("none" = none); ValueError otherwise."""
    import re

    text = (text or "").strip()
    if text.lower() == "none":
        return ""
    if text and not re.fullmatch(r"(\d+(\.\d+)?|\.\d+)([EPTGMK]i|[EPTGMkm]|[eE][+-]?\d+)?", text):
        raise ValueError(f"not a Kubernetes quantity (e.g. 2Gi, 500M): {text!r}")
    return text


KEEP_BEST, KEEP_ALL = "keep-best", "keep-all"


def _trial_models_policy(text: str) -> str:
    value = text.strip().lower()
    if value not in (KEEP_BEST, KEEP_ALL):
        raise ValueError(f"cleanup_trial_models (QTUNE_CLEANUP_TRIAL_MODELS) is {text!r}; allowed: {KEEP_BEST}, "
                         f"{KEEP_ALL}")
    return value


def _flag_bool(text: str) -> bool:
    return text.strip().lower() in ("1", "true", "yes", "on")


PULL_POLICIES = ("Always", "IfNotPresent", "Never")


def _pull_policy(text: str) -> str | None:
    if text.lower() in ("", "none"):
        return None
    if text not in PULL_POLICIES:
        raise ValueError(f"{text!r} is not an imagePullPolicy: allowed {', '.join(PULL_POLICIES)} (or empty)")
    return text


def _queue_name(text: str) -> str | None:
    """A Kueue LocalQueue name (the value of the pod label kueue.x-k8s.io/queue-name), or None for ""."""
    if not text:
        return None
    if len(text) > 63 or not re.match(QUEUE_NAME_RE, text):
        raise ValueError(f"{text!r} is not a LocalQueue name usable as a label value (lowercase letters, digits, "
                         "'-' and '.', at most 63 characters, starting and ending alphanumeric)")
    return text


def setting(default: Any = None, help: str = "", *, env: str | None = "", flag: bool = True,  # noqa: A002
            parse: Callable[[str], Any] = str, factory: Callable[[], Any] | None = None) -> Any:
    """A field of OperatorConfig. env "" = QTUNE_<NAME>; None = no environment variable; flag: a
    `--name` command-line option (never for secrets, which would show in the process list)."""
    metadata = {"help": help, "env": env, "flag": flag, "parse": parse}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class OperatorConfig:
    prometheus_url: str | None = setting(None, "Prometheus HTTP API the operator reads results from")
    pushgateway_url: str | None = setting(None, "Pushgateway (or the results gateway in front of it: the operator "
                                                "always sends its token) the operator deletes result groups from")
    pod_pushgateway_url: str | None = setting(None, "Pushgateway (or results gateway) address as pods reach it "
                                                    "(default: --pushgateway-url)")
    trial_image: str = setting(DEFAULT_IMAGE, "image of baseline, trial and confirm pods when the job names none")
    trial_image_pull_policy: str | None = setting(
        None, "imagePullPolicy of unit pods when the job sets none (Always, IfNotPresent or Never; none: "
              "Kubernetes' default, Always for a :latest tag)", parse=_pull_policy)
    trial_queue_name: str | None = setting(
        None, "Kueue LocalQueue of unit pods when the job names none in spec.trial.queueName (docs/kueue.md); "
              "none: pods are not queued", parse=_queue_name)
    runner_command: tuple[str, ...] = setting(("python", "-P", "-m", "qtune.runner"),
                                              "what pods run before `baseline|trial|confirm ...` (shell words)",
                                              flag=False, parse=lambda text: tuple(shlex.split(text)))
    poll_interval: float = setting(1.0, "seconds between two steps of a job's loop when nothing wakes it",
                                   parse=float)
    metrics_poll_interval: float = setting(0.25, "loop period while a finished unit's result is awaited",
                                           parse=float)
    results_poll_interval: float = setting(0.25, "period of the operator-wide query of every job's results "
                                                 "(0: each job queries alone)", parse=float)
    results_max_bytes: int = setting(8 * 1024 * 1024, "largest Prometheus answer to a results query read (bytes); a "
                                                     "larger one is an error, counted", parse=int)
    results_max_series: int = setting(100_000, "most series one results query may return", parse=int)
    results_deadline_seconds: float = setting(
        RESULTS_DEADLINE_DEFAULT, "seconds a succeeded unit's result may take to become queryable (Prometheus "
                                  "or the Pushgateway down) before the unit fails MetricsUnavailable; at least "
                                  f"{RESULTS_DEADLINE_MIN:g}", parse=float)
    unschedulable_seconds: float = setting(120.0, "a unit's pod the scheduler cannot place for this long puts "
                                                  "reason Unschedulable (the scheduler's message) in the status",
                                           parse=float)
    terminating_margin_seconds: float = setting(60.0, "a pod still terminating this long after its grace period "
                                                      "(its node is gone) is force-deleted; its unit starts again",
                                                parse=float)
    node_lost_seconds: float = setting(120.0, "a unit's pod whose node is gone or NotReady for this long is "
                                              "force-deleted; its unit starts again", parse=float)
    sweep_interval: float = setting(300.0, "seconds between two sweeps of Pushgateway groups of deleted jobs "
                                           "(0: off)", parse=float)
    trial_grace_seconds: float = setting(60.0, "a pod still running this long after its unit's time limit is "
                                               "deleted", parse=float)
    recent_trials: int = setting(20, "trials kept in status.recentTrials (the full history is in a ConfigMap)",
                                 parse=int)
    vendor: str = setting("Intel", "CPU vendor the default node affinity requires (NFD vendor_id label)",
                          env="QTUNE_TRIAL_VENDOR")
    isa_label: str = setting(c.DEFAULT_ISA_LABEL, "NFD label (value \"true\") the default node affinity "
                                                  "requires besides the vendor")
    pushed_results_only: bool = setting(False, "believe a result only from Prometheus (the Pushgateway copy), never "
                                               "from the pod's termination message (tests of the Prometheus path)",
                                        parse=_flag_bool)
    keep_succeeded_pods: bool = setting(False, "keep pods whose results are recorded (failed pods are kept)",
                                        parse=_flag_bool)
    pod_env: dict[str, str] = setting(help="extra environment of every pod the operator creates (JSON object)",
                                      flag=False, parse=_json_map, factory=dict)
    default_tolerations: tuple[dict[str, Any], ...] = setting(
        (), "tolerations of pods of jobs that set no spec.trial.tolerations (JSON list)",
        env="QTUNE_TRIAL_TOLERATIONS", flag=False, parse=_json_tuple)
    ephemeral_storage_request: str = setting("1Gi", "ephemeral-storage request of every unit pod's container "
                                                    "(a Kubernetes quantity; none: no request)", parse=_quantity)
    ephemeral_storage_limit: str = setting("4Gi", "ephemeral-storage limit of every unit pod's container (logs, "
                                                  "and the /tmp emptyDir counts against the pod's total; none: "
                                                  "no limit)", parse=_quantity)
    tmp_size_limit: str = setting("2Gi", "sizeLimit of the /tmp emptyDir of every unit pod (none: no limit)",
                                  parse=_quantity)
    history_plain_limit: int = setting(256 * 1024, "history JSON larger than this is stored gzip-compressed",
                                       env=None, flag=False, parse=int)
    space_limit_bytes: int = setting(
        SPACE_LIMIT_BYTES, "most bytes of JSON a job's published tuning space may inflate to; more fails the job "
                           "PayloadTooLarge", parse=int)
    space_limit_elements: int = setting(
        SPACE_LIMIT_ELEMENTS, "most JSON elements (structural characters {[,: counted before parsing) a job's "
                              "published tuning space may hold; more fails the job PayloadTooLarge", parse=int)
    signing_key: str = setting("", "the key every unit's result secret is derived from (the chart keeps it in a "
                                   "Secret, stable across upgrades); empty: a random key per process", flag=False)
    allowed_modules: tuple[str, ...] = setting(
        (), "comma-separated module prefixes whose `module:Class` strategies the operator may import (chart "
            "value allowedModules); empty: built-in strategies only", parse=_module_prefixes)
    api_retries: int = setting(5, "a step failing with the same API 4xx answer this many times in a row fails "
                                  "the job", parse=int)
    bind_address: str = setting("0.0.0.0", "address /healthz and /metrics listen on (in a pod the kubelet probes "
                                           "the pod IP: keep 0.0.0.0; 127.0.0.1 for a local run)")
    cleanup_failed_pods: int = setting(3, "failed pods kept per job (the newest); older ones are deleted once "
                                          "recorded (their reason and message are in the history)", parse=int)
    cleanup_trial_models: str = setting(
        KEEP_BEST, f"{KEEP_BEST}: when a job ends, a short pod deletes the models of all trials but the winner "
                   f"and the accuracy-speed front from the job's workspace; {KEEP_ALL}: keep every trial's model",
        parse=_trial_models_policy)
    import_timeout: float = setting(30.0, "seconds the import of an allowed `module:Class` strategy module may "
                                          "take; longer fails the job InvalidSpec (other jobs never wait on it)",
                                    parse=float)
    cleanup_deleted_job_folders: bool = setting(
        True, "when a job is deleted, a short pod deletes its folder (.qtune/<job>-<uid8>) from its workspace claim "
              "(false: the folder stays)", flag=False, parse=_flag_bool)

    allowed_images: tuple[str, ...] = setting(
        (), "comma-separated images a job may name in spec.trial.image: exact references, or prefixes ending in "
            "'*' (registry.example/team/*); empty: only the operator's trial image (--trial-image)",
        parse=_patterns)
    workspace_claim_label: str = setting(
        c.DEFAULT_WORKSPACE_LABEL, "label key=value a PVC must carry to be a job's spec.workspace."
                                   "persistentVolumeClaim (set by the namespace's administrator); none: any PVC "
                                   "of the namespace (single-tenant installs only)", parse=_label)
    allowed_toleration_keys: tuple[str, ...] = setting(
        (), "comma-separated taint keys a job's spec.trial.tolerations may tolerate (exact, or prefixes ending in "
            "'*'; '*' alone also allows a toleration without a key, which tolerates every taint); empty: none (the "
            "operator's own --trial-tolerations still apply to jobs that set none)", parse=_patterns)

    def __post_init__(self) -> None:
        if self.results_deadline_seconds < RESULTS_DEADLINE_MIN:
            raise ValueError(f"results_deadline_seconds (QTUNE_RESULTS_DEADLINE_SECONDS, --results-deadline-seconds) "
                             f"is {self.results_deadline_seconds:g}: it must be at least {RESULTS_DEADLINE_MIN:g} "
                             "(results must survive a metrics outage of 10 minutes)")
        if self.cleanup_failed_pods < 0:
            raise ValueError(f"cleanup_failed_pods (QTUNE_CLEANUP_FAILED_PODS) is {self.cleanup_failed_pods}: it must "
                             "be 0 or more")
        _trial_models_policy(self.cleanup_trial_models)
        if self.space_limit_bytes < 1 or self.space_limit_elements < 1:
            raise ValueError(f"space_limit_bytes ({self.space_limit_bytes}) and space_limit_elements "
                             f"({self.space_limit_elements}) (QTUNE_SPACE_LIMIT_*) must be at least 1")
        if not self.import_timeout > 0:
            raise ValueError(f"import_timeout (QTUNE_IMPORT_TIMEOUT) is {self.import_timeout:g}: it must be above 0")

    @property
    def pushgateway_for_pods(self) -> str | None:
        return self.pod_pushgateway_url or self.pushgateway_url

    @staticmethod
    def env_name(name: str) -> str | None:
        env = OperatorConfig.__dataclass_fields__[name].metadata.get("env", "")
        return None if env is None else (env or f"QTUNE_{name.upper()}")

    @classmethod
    def from_env(cls, **overrides: object) -> OperatorConfig:
        """Defaults, then QTUNE_* environment variables, then keyword arguments that are not None."""
        values: dict[str, object] = {}
        for item in fields(cls):
            env = cls.env_name(item.name)
            text = os.environ.get(env) if env else None
            if text:
                try:
                    values[item.name] = item.metadata["parse"](text)
                except ValueError as exc:
                    raise ValueError(f"{env}={text!r}: {exc}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        if isinstance(values.get("runner_command"), list):
            values["runner_command"] = tuple(values["runner_command"])  # type: ignore[arg-type]
        return cls(**values)  # type: ignore[arg-type]

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """One `--name` option per setting that has a flag; the help names the env variable and default."""
        for item in fields(cls):
            if not item.metadata.get("flag"):
                continue
            default = item.default if item.default is not MISSING else None
            env = cls.env_name(item.name)
            extra = ", ".join(part for part in (f"env {env}" if env else "",
                                                f"default {default}" if default not in (None, "", ()) else "")
                              if part)
            help_text = item.metadata["help"] + (f" ({extra})" if extra else "")
            option = "--" + item.name.replace("_", "-")
            if item.metadata["parse"] is _flag_bool:
                parser.add_argument(option, action="store_true", default=None, help=help_text)
            else:
                parser.add_argument(option, type=item.metadata["parse"], default=None, help=help_text)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> OperatorConfig:
        flagged = [item.name for item in fields(cls) if item.metadata.get("flag")]
        return cls.from_env(**{name: getattr(args, name, None) for name in flagged})
