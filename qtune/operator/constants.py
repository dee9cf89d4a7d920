"""Names shared by the operator modules: API group, labels, annotations, object names."""

from __future__ import annotations

from qtune.protocol import UnitKind

GROUP = "qtune.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "QuantizationJob"
PLURAL = "quantizationjobs"
SINGULAR = "quantizationjob"
SHORT_NAMES = ("qj",)
CATEGORIES = ("qtune",)

# labels on every pod (and ConfigMap) the operator creates for a job
LABEL_JOB = f"{GROUP}/job"
LABEL_TRIAL = f"{GROUP}/trial"
LABEL_UNIT = f"{GROUP}/unit"
"""The unit a pod runs: `baseline`, `trial-<n>` or `confirm` (qtune.protocol unit ids)."""
LABEL_ATTEMPT = f"{GROUP}/attempt"
"""Which start of its unit a pod is (0 first); part of the pod's name and of its secret."""
LABEL_JOB_UID = f"{GROUP}/job-uid"
LABEL_ROLE = f"{GROUP}/role"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "qtune-operator"

ROLE_BASELINE, ROLE_TRIAL, ROLE_CONFIRM, ROLE_CLEANUP = (kind.value for kind in (
    UnitKind.BASELINE, UnitKind.TRIAL, UnitKind.CONFIRM, UnitKind.CLEANUP))
"""A unit's pod (and the baseline's own objects) carry its kind as their role."""
ROLE_HISTORY = "history"
ROLE_INPUT = "input"
ROLE_KEY = "key"

FINALIZER = f"{GROUP}/finalizer"
ANNOTATION_PREFIX = GROUP

# keys of the ConfigMap the baseline pod publishes (qtune/runner/publish.py writes them)
SPACE_KEY = "space.json"

# the history ConfigMap
HISTORY_KEY = "history.json"
HISTORY_GZ_KEY = "history.json.gz"
HISTORY_SIGNATURE = f"{GROUP}/history-signature"
"""Annotation of the history ConfigMap: the operator's HMAC over the job's uid and the stored history."""

# the NFD labels of the Intel Xeon pool: vendor plus an int8 ISA (VNNI; AMX parts have it too)
NFD = "feature.node.kubernetes.io"
NFD_VENDOR = f"{NFD}/cpu-model.vendor_id"
DEFAULT_ISA_LABEL = f"{NFD}/cpu-cpuid.AVX512VNNI"

TRIAL_UID = 65532
"""The non-root user of trial pods (the distroless 'nonroot' uid)."""


def baseline_configmap(job: str) -> str:
    return f"{job}-baseline"


def history_configmap(job: str) -> str:
    return f"{job}-history"


def runner_account(job: str) -> str:
    """The job's own ServiceAccount (every pod of the job runs as it unless the job names an opted-in
    account), and the Role/RoleBinding letting the baseline pod publish its ConfigMap."""
    return f"{job}-runner"


JOB_ACCOUNT_LABEL = f"{GROUP}/job-account"
"""A ServiceAccount a job may name in spec.trial.serviceAccountName must carry this label with
value "true" (the namespace's administrator opts it in); the operator never creates or changes it."""
JOB_ACCOUNT_VALUE = "true"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
"""Kueue's label naming the LocalQueue of a pod (spec.trial.queueName): Kueue's pod webhook gates such a pod
(scheduling gate kueue.x-k8s.io/admission) until its Workload is admitted (docs/kueue.md)."""
KUEUE_ADMISSION_GATE = "kueue.x-k8s.io/admission"
"""The scheduling gate Kueue's pod webhook adds to a queued pod and removes when it admits it."""
KUEUE_TERMINATION_TARGET = "TerminationTarget"
"""The pod condition Kueue sets (reason: its stop reason, e.g. WorkloadEvictedDueToPreempted; message: why, e.g.
"Preempted to accommodate a workload ...") on a pod it is about to delete: a preemption or eviction, not the unit's
failure."""
DEFAULT_WORKSPACE_LABEL = f"{GROUP}/workspace=true"
"""The label a PVC carries when its namespace's administrator lets jobs use it as their workspace."""

DECODED_PAYLOAD_LIMIT = 16 * 1024 * 1024
"""The most bytes of JSON the operator inflates from a ConfigMap the job's pods (or an earlier
operator) wrote: the baseline's published tuning space, the history. More fails the job."""


def unit_pod(job: str, unit: str, attempt: int = 0) -> str:
    """The pod of one start of a unit: `<job>-<unit>`, then `<job>-<unit>-a<attempt>`."""
    return f"{job}-{unit}" if attempt == 0 else f"{job}-{unit}-a{attempt}"


def unit_inputs(pod: str) -> str:
    """ConfigMap holding the job document and the unit's config, mounted into pod `pod`."""
    return f"{pod}-input"


def input_annotation(file: str) -> str:
    """Pod annotation carrying one input file of a unit whose inputs fit in the pod (builders.inline_inputs)."""
    return f"{GROUP}/input.{file}"


def unit_key(pod: str) -> str:
    """Secret holding pod `pod`'s result secret (only that pod reads it)."""
    return f"{pod}-key"


SECRET_KEY = "secret"
"""Key of the result secret in a unit's Secret."""
INPUT_MOUNT = "/etc/qtune/unit"
INPUTS_VOLUME = "inputs"
"""The unit pod's volume of input files (its annotations through the downward API, or its inputs ConfigMap)."""
JOB_FILE = "job.json"
CONFIG_FILE = "config.json"
