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

{{/*
Kafka security of the platform's own clients (controller, Wrappers): EOML_KAFKA_* from the Secrets that kafka.net
names (the same ones the KafkaSources reference), certificates mounted as files. Nothing when kafka.net is {}.
*/}}
{{- define "eoml.kafkaTlsFiles" -}}
{{- /* tls field -> (env suffix, file name) */ -}}
{{- toJson (dict "caCert" (list "SSL_CA_LOCATION" "ca.crt") "cert" (list "SSL_CERTIFICATE_LOCATION" "user.crt") "key" (list "SSL_KEY_LOCATION" "user.key")) -}}
{{- end -}}

{{- define "eoml.kafkaEnv" -}}
{{- $net := .Values.kafka.net -}}
{{- $sasl := dig "sasl" "enable" false $net -}}
{{- $tls := dig "tls" "enable" false $net -}}
{{- if or $sasl $tls }}
- name: EOML_KAFKA_SECURITY_PROTOCOL
  value: {{ ternary (ternary "SASL_SSL" "SASL_PLAINTEXT" $tls) "SSL" $sasl | quote }}
{{- end }}
{{- if $sasl }}
{{- if not (and $net.sasl.user $net.sasl.password) }}
{{- fail "kafka.net.sasl.enable needs sasl.user and sasl.password (Secret references)" }}
{{- end }}
{{- with $net.sasl.type }}
- name: EOML_KAFKA_SASL_MECHANISM
  valueFrom:
    secretKeyRef:
      {{- toYaml .secretKeyRef | nindent 6 }}
{{- end }}
- name: EOML_KAFKA_SASL_USERNAME
  valueFrom:
    secretKeyRef:
      {{- toYaml $net.sasl.user.secretKeyRef | nindent 6 }}
- name: EOML_KAFKA_SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      {{- toYaml $net.sasl.password.secretKeyRef | nindent 6 }}
{{- end }}
{{- if $tls }}
{{- range $field, $file := include "eoml.kafkaTlsFiles" . | fromJson }}
{{- if hasKey $net.tls $field }}
- name: EOML_KAFKA_{{ index $file 0 }}
  value: {{ printf "/etc/eoml/kafka/%s/%s" (lower $field) (index $file 1) | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- end -}}

{{- define "eoml.kafkaVolumeMounts" -}}
{{- $net := .Values.kafka.net -}}
{{- if dig "tls" "enable" false $net }}
{{- range $field, $file := include "eoml.kafkaTlsFiles" . | fromJson }}
{{- if hasKey $net.tls $field }}
- name: kafka-{{ lower $field }}
  mountPath: /etc/eoml/kafka/{{ lower $field }}
  readOnly: true
{{- end }}
{{- end }}
{{- end }}
{{- end -}}

{{- define "eoml.kafkaVolumes" -}}
{{- $net := .Values.kafka.net -}}
{{- if dig "tls" "enable" false $net }}
{{- range $field, $file := include "eoml.kafkaTlsFiles" . | fromJson }}
{{- with get $net.tls $field }}
- name: kafka-{{ lower $field }}
  secret:
    secretName: {{ .secretKeyRef.name }}
    items:
      - key: {{ .secretKeyRef.key }}
        path: {{ index $file 1 }}
{{- end }}
{{- end }}
{{- end }}
{{- end -}}

{{/* One service account per Wrapper service (its serviceName, default its task). Call with (dict "root" $ "task" "classify"). */}}
{{- define "eoml.wrapperTaskServiceAccount" -}}
{{- printf "%s-%s" (include "eoml.wrapperServiceAccount" .root) .task | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The OIDC audience of a Knative Service, as Knative names audiences: <group>/<kind>/<namespace>/<name>. */}}
{{- define "eoml.serviceAudience" -}}
{{- printf "serving.knative.dev/service/%s/%s" .namespace .name | lower -}}
{{- end -}}

{{/* The subject of a KafkaSource's OIDC identity, or (name "*") of every KafkaSource of a namespace. Knative hashes
the head of names over 63 characters but keeps the suffix, so long names fall back to the namespace pattern. */}}
{{- define "eoml.sourceSubject" -}}
{{- $account := printf "%s-oidc-sources.knative.dev-kafkasource" .name -}}
{{- if gt (len $account) 63 -}}{{- $account = "*-oidc-sources.knative.dev-kafkasource" -}}{{- end -}}
{{- printf "system:serviceaccount:%s:%s" .namespace $account -}}
{{- end -}}

{{/* EOML_AUTH_* of a service: OIDC sender identity when auth.oidc.enabled. Call with
(dict "root" $ "audience" "..." "subjects" (list ...)), and "routeSubjects" (dict "<route>" (list ...)) where a
route accepts fewer senders than the service. */}}
{{- define "eoml.authEnv" -}}
{{- $oidc := .root.Values.auth.oidc -}}
{{- if $oidc.enabled -}}
- name: EOML_AUTH_MODE
  value: oidc
- name: EOML_AUTH_ISSUER
  value: {{ $oidc.issuer | quote }}
- name: EOML_AUTH_DISCOVERY_URL
  value: {{ $oidc.discoveryUrl | quote }}
- name: EOML_AUTH_AUDIENCE
  value: {{ .audience | quote }}
- name: EOML_AUTH_ALLOWED_SUBJECTS
  value: {{ join "," .subjects | quote }}
{{- with .routeSubjects }}
- name: EOML_AUTH_ROUTE_SUBJECTS
  value: {{ toJson . | quote }}
{{- end }}
# The API server serves its discovery document to service accounts, over TLS signed by the cluster CA.
- name: EOML_AUTH_CA_FILE
  value: /var/run/secrets/kubernetes.io/serviceaccount/ca.crt
- name: EOML_AUTH_DISCOVERY_TOKEN_FILE
  value: /var/run/secrets/kubernetes.io/serviceaccount/token
{{- else -}}
- name: EOML_AUTH_MODE
  value: none
{{- end -}}
{{- end -}}

{{/* EOML_S3_POLICY_*: the S3 endpoints workflow messages may name (the model store's endpoint always). */}}
{{- define "eoml.s3PolicyEnv" -}}
{{- $modelStore := printf "%s://%s" (ternary "https" "http" .Values.s3.useHttps) .Values.s3.endpoint -}}
- name: EOML_S3_POLICY_ALLOWED_ENDPOINTS
  value: {{ join "," (prepend .Values.s3EndpointPolicy.allowedEndpoints $modelStore | uniq) | quote }}
- name: EOML_S3_POLICY_ALLOW_HTTP
  value: {{ (not .Values.s3.useHttps) | toString | quote }}
- name: EOML_S3_POLICY_DENIED_CIDRS
  value: {{ join "," .Values.s3EndpointPolicy.clusterCidrs | quote }}
{{- end -}}

{{- define "eoml.restrictedApiSecretName" -}}
{{- default (printf "%s-inference-admin-key" (include "eoml.fullname" .)) .Values.inference.restrictedApi.existingSecret -}}
{{- end -}}

{{/* Triton's restricted API options WITHOUT their value ("<apis>:<headerKey>"): a value on the command line is
in every process list (ps, /proc/<pid>/cmdline, the node's container runtime). The value is the Secret, mounted
as a file (eoml.restrictedApiKeyFile): our server reads it (EOML_INFERENCE_RESTRICTED_API_KEY_FILE); tritonserver,
which takes these options from argv only, gets it from the preload library (eoml.restrictedApiPreload*). */}}
{{- define "eoml.restrictedApiArgs" -}}
{{- $restricted := .Values.inference.restrictedApi -}}
{{- if $restricted.enabled -}}
{{- $spec := printf "%s:%s" (join "," $restricted.apis) $restricted.headerKey -}}
- {{ printf "--http-restricted-api=%s" $spec | quote }}
- {{ printf "--grpc-restricted-protocol=%s" $spec | quote }}
{{- end -}}
{{- end -}}

{{- define "eoml.restrictedApiKeyDir" -}}/var/run/secrets/eoml/restricted-api{{- end -}}
{{- define "eoml.restrictedApiPreloadDir" -}}/opt/eoml-preload{{- end -}}
{{- define "eoml.restrictedApiPreloadLibrary" -}}libeoml_restricted_key.so{{- end -}}

{{- define "eoml.restrictedApiEnv" -}}
{{- if .Values.inference.restrictedApi.enabled -}}
- name: EOML_INFERENCE_RESTRICTED_API_KEY_FILE
  value: {{ include "eoml.restrictedApiKeyDir" . }}/key
{{- end -}}
{{- end -}}

{{/* Real Triton: the preload library completes the value-less options from the key file inside the process. */}}
{{- define "eoml.restrictedApiPreloadEnv" -}}
- name: EOML_RESTRICTED_API_KEY_FILE
  value: {{ include "eoml.restrictedApiKeyDir" . }}/key
- name: LD_PRELOAD
  value: {{ include "eoml.restrictedApiPreloadDir" . }}/{{ include "eoml.restrictedApiPreloadLibrary" . }}
{{- end -}}

{{/* ipBlock peers for "cidrs"; a 0.0.0.0/0 or ::/0 among them gets "except" (those of its address family). */}}
{{- define "eoml.egressCidrs" -}}
{{- $except := .except -}}
{{- range .cidrs }}
- ipBlock:
    cidr: {{ . }}
    {{- $family := ternary "v6" "v4" (contains ":" .) }}
    {{- $carved := list }}
    {{- range $except }}
    {{- if eq (ternary "v6" "v4" (contains ":" .)) $family }}
    {{- $carved = append $carved . }}
    {{- end }}
    {{- end }}
    {{- if and (or (eq . "0.0.0.0/0") (eq . "::/0")) $carved }}
    except:
      {{- toYaml $carved | nindent 6 }}
    {{- end }}
{{- end }}
{{- end -}}
