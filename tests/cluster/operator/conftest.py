"""Fixtures of the operator's cluster tests (the `cluster` fixture comes from tests/cluster)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import opcluster  # noqa: E402


@pytest.fixture(scope="session")
def crds(cluster: Any) -> None:
    """The QuantizationJob and Kopf peering CRDs of crds/, installed once."""
    opcluster.install_crds(cluster.api_client())


@pytest.fixture
def op_namespace(cluster: Any, crds: None) -> Iterator[str]:
    """A fresh namespace (prefix qtune-op-), deleted afterwards."""
    name = cluster.create_namespace(prefix="qtune-op-")
    yield name
    cluster.delete_namespace(name)


@pytest.fixture
def workspace(cluster: Any, op_namespace: str) -> Path:
    """PVC qtune-work in the namespace, holding the digits model and data."""
    if cluster.state_dir is None:
        pytest.skip("needs the test plane's node agent (PVC host folders)")
    return opcluster.prepare_workspace(cluster, op_namespace)


@pytest.fixture
def start_operator(cluster: Any, tmp_path: Path) -> Iterator[Callable[..., opcluster.OperatorProcess]]:
    """start_operator([namespaces], *extra_args, name=...) -> a running operator; all stopped at the end."""
    started: list[opcluster.OperatorProcess] = []

    def start(namespaces: list[str], *extra: str, name: str = "operator") -> opcluster.OperatorProcess:
        operator = opcluster.OperatorProcess(cluster, namespaces, tmp_path, *extra, name=name)
        started.append(operator)
        return operator.start()

    yield start
    for operator in started:
        operator.stop()
        sys.stderr.write(f"--- {operator.log_path} (tail)\n{operator.log_tail(25)}\n")
