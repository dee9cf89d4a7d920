"""Names shared by the operator modules: API group, labels, annotations, object names."""

from __future__ import annotations

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
LABEL_JOB_UID = f"{GROUP}/job-uid"
LABEL_ROLE = f"{GROUP}/role"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "qtune-operator"

ROLE_BASELINE = "baseline"
ROLE_TRIAL = "trial"
ROLE_HISTORY = "history"
BASELINE_TRIAL = "baseline"
"""Value of the trial label (and of the Pushgateway `trial` key) for the baseline pod."""

FINALIZER = f"{GROUP}/finalizer"
ANNOTATION_PREFIX = GROUP

# keys of the ConfigMap the baseline pod publishes (qtune/runner/publish.py writes them)
SPACE_KEY = "space.json"
BASELINE_KEY = "baseline.json"

# the history ConfigMap
HISTORY_KEY = "history.json"
HISTORY_GZ_KEY = "history.json.gz"

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
    """ServiceAccount (and Role/RoleBinding) the baseline pod uses to publish its ConfigMap."""
    return f"{job}-runner"


def baseline_pod(job: str) -> str:
    return f"{job}-baseline"


def trial_pod(job: str, index: int) -> str:
    return f"{job}-trial-{index}"
