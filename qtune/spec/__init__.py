"""The QuantizationJob spec: models, defaults, and validation errors a person can act on."""

from qtune.spec.errors import DataError, ModelLoadError, QtuneError, SpecError
from qtune.spec.load import job_from_dict, load_job, resolve_path
from qtune.spec.models import API_VERSION, KIND, JobSpec, OpConstraint, QuantizationJob, TensorConstraint

__all__ = [
    "API_VERSION",
    "KIND",
    "DataError",
    "JobSpec",
    "ModelLoadError",
    "OpConstraint",
    "QtuneError",
    "QuantizationJob",
    "SpecError",
    "TensorConstraint",
    "job_from_dict",
    "load_job",
    "resolve_path",
]
