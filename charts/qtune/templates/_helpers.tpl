{{/* Chart name, truncated for label values. */}}
{{- define "qtune.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Release-scoped name of the operator's objects. */}}
{{- define "qtune.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "qtune.selectorLabels" -}}
app.kubernetes.io/name: {{ include "qtune.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{/* Labels of every object, without the component. */}}
{{- define "qtune.commonLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "qtune.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/part-of: qtune
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Labels of the operator's objects. */}}
{{- define "qtune.labels" -}}
{{ include "qtune.commonLabels" . }}
app.kubernetes.io/component: operator
{{- end -}}

{{/* The operator's ServiceAccount name. */}}
{{- define "qtune.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "qtune.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The image reference (digest wins over tag; tag defaults to the appVersion). */}}
{{- define "qtune.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* Namespaces served, as a JSON list (the release namespace when none is listed). */}}
{{- define "qtune.namespaces" -}}
{{- $ns := .Values.watch.namespaces | default (list .Release.Namespace) -}}
{{- $ns | uniq | toJson -}}
{{- end -}}

{{/* "true" when Kopf peering is on: forced by peering.enabled, else when replicaCount > 1. */}}
{{- define "qtune.peering" -}}
{{- if kindIs "bool" .Values.peering.enabled -}}
{{- .Values.peering.enabled -}}
{{- else -}}
{{- gt (int .Values.replicaCount) 1 -}}
{{- end -}}
{{- end -}}

{{/*
The rules the operator needs in every namespace it serves: QuantizationJobs (+status), the pods
and ConfigMaps of their trials, the per-job ServiceAccount/Role/RoleBinding of the baseline pod
(which may only update its own ConfigMap: the operator can grant only what it holds itself),
events, and Kopf's namespaced peering objects; each unit's result Secret is created and deleted, never
read. Deletion only of pods and of the per-unit ConfigMaps and Secrets.
*/}}
{{- define "qtune.namespacedRules" -}}
- apiGroups: [qtune.io]
  resources: [quantizationjobs]
  verbs: [get, list, watch, patch]
- apiGroups: [qtune.io]
  resources: [quantizationjobs/status]
  verbs: [get, patch]
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch, create, delete]
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, create, update, patch, delete]
# each unit's result secret: created for its pod, deleted once recorded; never read back
- apiGroups: [""]
  resources: [secrets]
  verbs: [create, delete]
# each job's own ServiceAccount, Role and RoleBinding; get: whether an existing one of that name is
# the job's (owner uid), and whether an account a job names is opted in (qtune.io/job-account label)
- apiGroups: [""]
  resources: [serviceaccounts]
  verbs: [get, create]
- apiGroups: [rbac.authorization.k8s.io]
  resources: [roles]
  verbs: [get, create]
# delete: a job's RoleBinding goes once its baseline is recorded and when the job ends (a shared
# account keeps no right over a job's baseline ConfigMap)
- apiGroups: [rbac.authorization.k8s.io]
  resources: [rolebindings]
  verbs: [get, create, delete]
# get: a job's workspace PVC must carry the opt-in label (trial.workspaceClaimLabel)
- apiGroups: [""]
  resources: [persistentvolumeclaims]
  verbs: [get]
- apiGroups: [""]
  resources: [events]
  verbs: [create]
# list: Kueue's reason in the status while a unit waits for admission (spec.trial.queueName, docs/kueue.md)
- apiGroups: [kueue.x-k8s.io]
  resources: [workloads]
  verbs: [list]
{{- if eq (include "qtune.peering" .) "true" }}
- apiGroups: [kopf.dev]
  resources: [kopfpeerings]
  verbs: [get, list, watch, patch, create]
{{- end }}
{{- end -}}

{{/* `qtune operator` arguments (see `qtune operator --help`). */}}
{{- define "qtune.operatorArgs" -}}
- operator
{{- if .Values.watch.allNamespaces }}
- --all-namespaces
{{- else }}
{{- range $ns := include "qtune.namespaces" . | fromJsonArray }}
- --namespace={{ $ns }}
{{- end }}
{{- end }}
{{- if eq (include "qtune.peering" .) "true" }}
- --peering={{ .Values.peering.name }}
- --priority=$(QTUNE_PEERING_PRIORITY)
{{- end }}
- --health-port={{ .Values.health.port }}
- --metrics-port={{ .Values.metrics.port }}
- --isa-label={{ .Values.trial.nodeAffinity.isaLabel }}
- --log-level={{ .Values.operator.logLevel }}
{{- with .Values.operator.extraArgs }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* The operator's environment: endpoints and trial defaults (QTUNE_* variables). */}}
{{/* The Secret (key `key`) holding the operator's signing key. */}}
{{- define "qtune.signingKeySecret" -}}
{{- .Values.signingKey.existingSecret | default (printf "%s-signing-key" (include "qtune.fullname" .)) -}}
{{- end -}}

{{/* "true" when the results gateway runs (resultsGateway.enabled and a Pushgateway behind it). */}}
{{- define "qtune.gateway.enabled" -}}
{{- if and .Values.resultsGateway.enabled .Values.pushgateway.url -}}true{{- else -}}false{{- end -}}
{{- end -}}

{{- define "qtune.gateway.fullname" -}}
{{- printf "%s-results-gateway" (include "qtune.fullname" . | trunc 47 | trimSuffix "-") -}}
{{- end -}}

{{- define "qtune.gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "qtune.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: results-gateway
{{- end -}}

{{/* The results gateway's address (what the operator and unit pods use when it runs): resultsGateway.url, else
its Service's cluster DNS name. */}}
{{- define "qtune.gateway.url" -}}
{{- .Values.resultsGateway.url | default (printf "http://%s.%s.svc:%d" (include "qtune.gateway.fullname" .) .Release.Namespace (int .Values.resultsGateway.port)) -}}
{{- end -}}

{{- define "qtune.operatorEnv" -}}
- name: QTUNE_SIGNING_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "qtune.signingKeySecret" . }}
      key: key
- name: QTUNE_TRIAL_IMAGE
  value: {{ default (include "qtune.image" .) .Values.trial.image | quote }}
- name: QTUNE_TRIAL_IMAGE_PULL_POLICY
  value: {{ default .Values.image.pullPolicy .Values.trial.imagePullPolicy | quote }}
{{- with .Values.trial.queueName }}
- name: QTUNE_TRIAL_QUEUE_NAME
  value: {{ . | quote }}
{{- end }}
{{- with .Values.prometheus.url }}
- name: QTUNE_PROMETHEUS_URL
  value: {{ . | quote }}
{{- end }}
{{- if eq (include "qtune.gateway.enabled" .) "true" }}
- name: QTUNE_PUSHGATEWAY_URL
  value: {{ include "qtune.gateway.url" . | quote }}
{{- else }}
{{- with .Values.pushgateway.url }}
- name: QTUNE_PUSHGATEWAY_URL
  value: {{ . | quote }}
{{- end }}
{{- end }}
{{- with .Values.pushgateway.podUrl }}
- name: QTUNE_POD_PUSHGATEWAY_URL
  value: {{ . | quote }}
{{- end }}
- name: QTUNE_TRIAL_VENDOR
  value: {{ .Values.trial.nodeAffinity.vendor | quote }}
- name: QTUNE_RESULTS_DEADLINE_SECONDS
  value: {{ .Values.lifecycle.resultsDeadlineSeconds | quote }}
- name: QTUNE_UNSCHEDULABLE_SECONDS
  value: {{ .Values.lifecycle.unschedulableSeconds | quote }}
- name: QTUNE_TERMINATING_MARGIN_SECONDS
  value: {{ .Values.lifecycle.terminatingMarginSeconds | quote }}
- name: QTUNE_NODE_LOST_SECONDS
  value: {{ .Values.lifecycle.nodeLostSeconds | quote }}
- name: QTUNE_SWEEP_INTERVAL
  value: {{ .Values.lifecycle.sweepIntervalSeconds | quote }}
- name: QTUNE_SPACE_LIMIT_BYTES
  value: {{ .Values.limits.spaceBytes | int64 | quote }}
- name: QTUNE_SPACE_LIMIT_ELEMENTS
  value: {{ .Values.limits.spaceElements | int64 | quote }}
- name: QTUNE_RESULTS_MAX_BYTES
  value: {{ .Values.limits.resultsMaxBytes | int64 | quote }}
- name: QTUNE_RESULTS_MAX_SERIES
  value: {{ .Values.limits.resultsMaxSeries | int64 | quote }}
- name: QTUNE_BIND_ADDRESS
  value: {{ .Values.operator.bindAddress | quote }}
- name: QTUNE_IMPORT_TIMEOUT
  value: {{ .Values.operator.importTimeoutSeconds | quote }}
- name: QTUNE_CLEANUP_FAILED_PODS
  value: {{ .Values.cleanup.failedPods | quote }}
- name: QTUNE_CLEANUP_TRIAL_MODELS
  value: {{ .Values.cleanup.trialModels | quote }}
- name: QTUNE_CLEANUP_DELETED_JOB_FOLDERS
  value: {{ .Values.cleanup.deletedJobFolders | quote }}
{{- with .Values.allowedModules }}
- name: QTUNE_ALLOWED_MODULES
  value: {{ join "," . | quote }}
{{- end }}
{{- with .Values.trial.allowedImages }}
- name: QTUNE_ALLOWED_IMAGES
  value: {{ join "," . | quote }}
{{- end }}
- name: QTUNE_WORKSPACE_CLAIM_LABEL
  value: {{ .Values.trial.workspaceClaimLabel | default "none" | quote }}
- name: QTUNE_ALLOWED_TOLERATION_KEYS
  value: {{ join "," .Values.trial.allowedTolerationKeys | quote }}
- name: QTUNE_TRIAL_TOLERATIONS
  value: {{ .Values.trial.tolerations | toJson | quote }}
- name: QTUNE_EPHEMERAL_STORAGE_REQUEST
  value: {{ .Values.trial.ephemeralStorage.request | default "none" | quote }}
- name: QTUNE_EPHEMERAL_STORAGE_LIMIT
  value: {{ .Values.trial.ephemeralStorage.limit | default "none" | quote }}
- name: QTUNE_TMP_SIZE_LIMIT
  value: {{ .Values.trial.tmpSizeLimit | default "none" | quote }}
{{- with .Values.trial.env }}
- name: QTUNE_POD_ENV
  value: {{ toJson . | quote }}
{{- end }}
{{- if eq (include "qtune.peering" .) "true" }}
- name: QTUNE_PEERING_PRIORITY
  valueFrom:
    fieldRef:
      fieldPath: metadata.labels['apps.kubernetes.io/pod-index']
{{- end }}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: HOME
  value: /tmp
{{- with .Values.operator.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}
