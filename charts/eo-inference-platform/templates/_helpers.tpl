{{/* Names, labels and the security settings shared by every workload. */}}

{{- define "eoml.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "eoml.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "eoml.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels: stable across upgrades. Call with (dict "root" $ "component" "wrapper"). */}}
{{- define "eoml.selectorLabels" -}}
app.kubernetes.io/name: {{ include "eoml.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "eoml.labels" -}}
{{ include "eoml.selectorLabels" . }}
helm.sh/chart: {{ include "eoml.chart" .root }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: eo-inference-platform
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "eoml.controllerName" -}}
{{- printf "%s-controller" (include "eoml.fullname" .) -}}
{{- end -}}

{{- define "eoml.controllerServiceAccount" -}}
{{- printf "%s-controller" (include "eoml.fullname" .) -}}
{{- end -}}

{{- define "eoml.wrapperServiceAccount" -}}
{{- printf "%s-wrapper" (include "eoml.fullname" .) -}}
{{- end -}}

{{- define "eoml.inferenceServiceAccount" -}}
{{- printf "%s-inference" (include "eoml.fullname" .) -}}
{{- end -}}

{{- define "eoml.s3SecretName" -}}
{{- if .Values.s3.existingSecret -}}
{{- .Values.s3.existingSecret -}}
{{- else -}}
{{- printf "%s-s3" (include "eoml.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* registry/repository:tag of one of the images. Call with (dict "root" $ "repository" "wrapper"). */}}
{{- define "eoml.image" -}}
{{- $image := .root.Values.image -}}
{{- $tag := default .root.Chart.AppVersion $image.tag -}}
{{- if $image.registry -}}
{{- printf "%s/%s:%s" (trimSuffix "/" $image.registry) .repository $tag -}}
{{- else -}}
{{- printf "%s:%s" .repository $tag -}}
{{- end -}}
{{- end -}}

{{/* host:port of the inference server as the Wrappers call it. */}}
{{- define "eoml.inferenceUrl" -}}
{{- if .Values.wrappers.inferenceUrl -}}
{{- .Values.wrappers.inferenceUrl -}}
{{- else -}}
{{- printf "%s-predictor.%s.svc.cluster.local:80" .Values.inference.name .Release.Namespace -}}
{{- end -}}
{{- end -}}

{{/*
Container securityContext: non-root, read-only root filesystem, no privilege escalation, no capabilities, the
runtime's default seccomp profile. Set on the container because Knative accepts these fields there without
feature flags (pod-level securityContext needs kubernetes.podspec-securitycontext).
Call with (dict "runAsUser" 10001 "runAsGroup" 10001).
*/}}
{{- define "eoml.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .runAsUser }}
runAsGroup: {{ .runAsGroup }}
allowPrivilegeEscalation: false
privileged: false
readOnlyRootFilesystem: true
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Prometheus scrape annotations (nothing when scrape is false). Call with the component's metrics values. */}}
{{- define "eoml.prometheusAnnotations" -}}
{{- if .scrape -}}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .port | quote }}
prometheus.io/path: {{ .path | quote }}
{{- end -}}
{{- end -}}

{{- define "eoml.commonEnv" -}}
- name: EOML_LOG_LEVEL
  value: {{ .Values.logging.level | quote }}
- name: EOML_LOG_FORMAT
  value: {{ .Values.logging.format | quote }}
{{- end -}}
