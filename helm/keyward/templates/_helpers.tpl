{{/* Names: one place for every object name. */}}
{{- define "keyward.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}{{ .Release.Name | trunc 40 | trimSuffix "-" }}{{- else -}}{{ printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" }}{{- end -}}
{{- end -}}
{{- define "keyward.ca" -}}{{ include "keyward.fullname" . }}-ca{{- end -}}
{{- define "keyward.pg" -}}{{ include "keyward.fullname" . }}-postgres{{- end -}}
{{- define "keyward.bypass" -}}{{ include "keyward.fullname" . }}-bypass{{- end -}}
{{- define "keyward.operator" -}}{{ include "keyward.fullname" . }}-operator{{- end -}}
{{- /* The Secret of the master secret and the database passwords: the user's, or the one the chart makes. */ -}}
{{- define "keyward.secrets" -}}{{ .Values.secrets.existingSecret | default (printf "%s-secrets" (include "keyward.fullname" .)) }}{{- end -}}
{{- define "keyward.image" -}}{{ .root.Values.image.registry }}keyward/{{ .name }}:{{ .root.Values.image.tag }}{{- end -}}

{{- define "keyward.labels" -}}
app.kubernetes.io/name: keyward
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end -}}

{{- define "keyward.selector" -}}
app.kubernetes.io/name: keyward
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Restricted pod security by default. */}}
{{- define "keyward.podSecurity" -}}
runAsNonRoot: true
runAsUser: {{ .uid | default 10001 }}
runAsGroup: {{ .uid | default 10001 }}
fsGroup: {{ .uid | default 10001 }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "keyward.containerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
  {{- with .add }}
  add: {{ toJson . }}
  {{- end }}
{{- end -}}

{{/* "true" when the chart's PodDisruptionBudgets (CA, Postgres) are rendered: see values podDisruptionBudgets.
Counted: nodes with no NoSchedule/NoExecute taint (kind's control-plane node is tainted). */}}
{{- define "keyward.pdbWanted" -}}
{{- $mode := .Values.podDisruptionBudgets.mode -}}
{{- if eq $mode "always" -}}true
{{- else if eq $mode "auto" -}}
{{- $nodes := lookup "v1" "Node" "" "" -}}
{{- $usable := 0 -}}
{{- range (get ($nodes | default dict) "items" | default list) -}}
{{- $blocked := false -}}
{{- range (.spec.taints | default list) -}}
{{- if has .effect (list "NoSchedule" "NoExecute") -}}{{- $blocked = true -}}{{- end -}}
{{- end -}}
{{- if not $blocked -}}{{- $usable = add1 $usable -}}{{- end -}}
{{- end -}}
{{- if or (not $nodes) (gt $usable 1) -}}true{{- end -}}
{{- end -}}
{{- end -}}
