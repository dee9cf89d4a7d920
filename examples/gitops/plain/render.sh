#!/usr/bin/env bash
# Render the charts into plain manifests for a kustomize-only GitOps setup (no Helm in the
# cluster): plain/crds/qtune-crds.yaml and plain/operator/qtune.yaml, from ../values/qtune.yaml.
# tests/install/test_gitops.py fails when these files are not what this script renders.
#
#   bash examples/gitops/plain/render.sh [path/to/helm]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../../.." && pwd)"
helm="${1:-${QTUNE_HELM:-$(bash "$root/tests/install/build_helm.sh" | tail -n 1)}}"
header="# Rendered by examples/gitops/plain/render.sh from charts/ and examples/gitops/values/qtune.yaml: do not edit."
{
  echo "$header"
  "$helm" template qtune-crds "$root/charts/qtune-crds" --namespace qtune-system
} > "$here/crds/qtune-crds.yaml"
{
  echo "$header"
  "$helm" template qtune "$root/charts/qtune" --namespace qtune-system -f "$here/../values/qtune.yaml"
} > "$here/operator/qtune.yaml"
echo "rendered $here/crds/qtune-crds.yaml and $here/operator/qtune.yaml"
