{{/* Labels on every object of the chart. */}}
{{- define "qtune-crds.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: qtune
app.kubernetes.io/component: crd
app.kubernetes.io/part-of: qtune
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- with .Values.labels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
Render every CustomResourceDefinition of a file (copied verbatim from the repository's crds/),
adding the chart's labels and annotations. Call with (dict "file" PATH "root" $).
*/}}
{{- define "qtune-crds.render" -}}
{{- $root := .root -}}
{{- $text := $root.Files.Get .file -}}
{{- if not $text -}}
{{- fail (printf "%s is missing from the chart: run charts/qtune-crds/sync-crds.sh" .file) -}}
{{- end -}}
{{- range $doc := regexSplit "(?m)^---[ \t]*$" $text -1 }}
{{- $crd := fromYaml $doc -}}
{{- if and $crd (eq (get $crd "kind") "CustomResourceDefinition") }}
{{- $meta := $crd.metadata -}}
{{- $labels := merge (include "qtune-crds.labels" $root | fromYaml) (default dict $meta.labels) -}}
{{- $_ := set $meta "labels" $labels -}}
{{- $annotations := merge (dict) (default dict $root.Values.annotations) (default dict $meta.annotations) -}}
{{- if $root.Values.keep -}}
{{- $_ := set $annotations "helm.sh/resource-policy" "keep" -}}
{{- end -}}
{{- if $annotations -}}
{{- $_ := set $meta "annotations" $annotations -}}
{{- end }}
---
{{ toYaml $crd }}
{{- end }}
{{- end }}
{{- end -}}
