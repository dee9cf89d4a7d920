"""Data sets and metrics, independent of any framework."""

from qtune.data.dataset import Batch, DataLoader, Dataset, load_dataset
from qtune.data.metrics import Metric, create_metric

__all__ = ["Batch", "DataLoader", "Dataset", "Metric", "create_metric", "load_dataset"]
