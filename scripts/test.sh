#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite: lint, unit, integration and cluster tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export QTUNE_REQUIRE_HELM=1      # the chart tests fail, not skip, without helm
export QTUNE_REQUIRE_CLUSTER=1   # the cluster tests fail, not skip, without the control plane
export QTUNE_REQUIRE_HADOLINT=1  # the Dockerfile lint fails, not skips, without hadolint
export QTUNE_REQUIRE_IMAGE=1     # the image tests fail, not skip, without buildah and root
python3 -m ruff check .
# the layering of docs/engine.md (pyproject.toml [tool.importlinter]): the script pip installed for python3
# (its scheme's scripts folder), else the one on PATH
lint_imports="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/lint-imports"
[ -x "$lint_imports" ] || lint_imports=lint-imports
"$lint_imports"
python3 -m pytest -q -p no:cacheprovider "$@"
