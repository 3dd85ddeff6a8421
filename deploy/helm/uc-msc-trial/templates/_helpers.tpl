{{/* The services behind the gateway, in shared/settings.py's SERVICES order. */}}
{{- define "trial.backends" -}}
randomization dosing safety efficacy audit
{{- end -}}

{{- define "trial.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* <release>-<chart>, or the release name alone when it already contains the chart's. Kept
short enough that "<fullname>-randomization" and "<fullname>-migrate-randomization" fit in 63. */}}
{{- define "trial.fullname" -}}
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

{{- define "trial.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels of every object. */}}
{{- define "trial.labels" -}}
helm.sh/chart: {{ include "trial.chart" . }}
app.kubernetes.io/name: {{ include "trial.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: {{ include "trial.name" . }}
{{- end -}}

{{/* Selector labels of one component: call with (dict "root" $ "component" "dosing"). */}}
{{- define "trial.selectorLabels" -}}
app.kubernetes.io/name: {{ include "trial.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "trial.componentLabels" -}}
{{ include "trial.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "trial.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "trial.secretName" -}}
{{- default (printf "%s-secrets" (include "trial.fullname" .)) .Values.secrets.existingSecret -}}
{{- end -}}

{{- define "trial.kafkaSaslSecretName" -}}
{{- default (include "trial.secretName" .) .Values.kafka.sasl.existingSecret -}}
{{- end -}}

{{/* An env entry read from the release's Secret: (dict "root" $ "name" "TRIAL_X" "key" "k"). */}}
{{- define "trial.secretEnv" -}}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      name: {{ default (include "trial.secretName" .root) .secret }}
      key: {{ .key }}
{{- end -}}

{{/* The protocol files: the chart's copy of the version, with protocol.files over it. */}}
{{- define "trial.protocolFiles" -}}
{{- $files := dict -}}
{{- range $path, $_ := .Files.Glob (printf "files/protocol/%s/*.json" .Values.protocol.version) -}}
{{- $_ := set $files (base $path) ($.Files.Get $path) -}}
{{- end -}}
{{- range $name, $content := .Values.protocol.files -}}
{{- $_ := set $files $name $content -}}
{{- end -}}
{{- if not $files -}}
{{- fail (printf "no protocol files: files/protocol/%s/*.json is empty and protocol.files is not set" .Values.protocol.version) -}}
{{- end -}}
{{- toYaml $files -}}
{{- end -}}

{{/* Container securityContext, resources and the writable emptyDirs every container mounts. */}}
{{- define "trial.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: data
  mountPath: /home/trial/data
{{- end -}}

{{- define "trial.volumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: 256Mi
- name: data
  emptyDir:
    sizeLimit: 256Mi
{{- end -}}

{{/* Settings every container gets (gateway, services, migrations): call with the root. */}}
{{- define "trial.commonEnv" -}}
- name: TRIAL_ENV
  value: {{ .Values.environment | quote }}
- name: TRIAL_DATA_DIR
  value: /home/trial/data
- name: MPLCONFIGDIR
  value: /tmp/matplotlib
{{- end -}}

{{/* Refuse at render time what production mode refuses at start-up (shared/settings.py): the
token checks (D41) and plaintext Kafka (D52). */}}
{{- define "trial.checkAuth" -}}
{{- if eq .Values.environment "production" -}}
{{- if .Values.auth.jwksUrl -}}
{{- if not (and .Values.auth.issuer .Values.auth.audience) -}}
{{- fail "auth.jwksUrl needs auth.issuer and auth.audience in production: a token issued to another application would be accepted" -}}
{{- end -}}
{{- else if not .Values.auth.allowHs256 -}}
{{- fail "production needs auth.jwksUrl (with auth.issuer and auth.audience), or auth.allowHs256=true to accept tokens signed with the shared secret" -}}
{{- end -}}
{{- if not (or .Values.kafka.sasl.enabled .Values.kafka.allowPlaintext) -}}
{{- fail "production refuses plaintext Kafka: set kafka.sasl.enabled=true (each service its own principal), or kafka.allowPlaintext=true where nothing else reaches the brokers" -}}
{{- end -}}
{{- end -}}
{{- end -}}
