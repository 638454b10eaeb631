{{/* Names: 63 characters is the DNS label limit Kubernetes puts on names and labels. */}}
{{- define "vbatch.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "vbatch.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* "<fullname>-<suffix>", still within 63 characters. Call with (list . "suffix"). */}}
{{- define "vbatch.componentName" -}}
{{- $root := index . 0 }}
{{- printf "%s-%s" (include "vbatch.fullname" $root | trunc (int (sub 62 (len (index . 1)))) | trimSuffix "-") (index . 1) }}
{{- end }}

{{- define "vbatch.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "vbatch.labels" -}}
helm.sh/chart: {{ include "vbatch.chart" . }}
app.kubernetes.io/name: {{ include "vbatch.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: vbatch
{{- end }}

{{/* Selector labels must never change across upgrades (Deployment selectors are immutable),
so they carry only name, instance and component. Call with (list . "gateway"). */}}
{{- define "vbatch.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "vbatch.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "vbatch.componentLabels" -}}
{{ include "vbatch.labels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{/* "repo:tag", the tag defaulting to appVersion so a chart release pins its images. */}}
{{- define "vbatch.image" -}}
{{- $root := index . 0 }}
{{- $image := index . 1 }}
{{- printf "%s:%s" $image.repository (default $root.Chart.AppVersion $image.tag) }}
{{- end }}

{{- define "vbatch.serviceAccountName" -}}
{{- include "vbatch.componentName" . }}
{{- end }}

{{- define "vbatch.configMapName" -}}
{{- include "vbatch.componentName" (list . "config") }}
{{- end }}

{{- define "vbatch.storageSecretName" -}}
{{- if .Values.storage.existingSecret }}
{{- .Values.storage.existingSecret }}
{{- else }}
{{- include "vbatch.componentName" (list . "storage") }}
{{- end }}
{{- end }}

{{- define "vbatch.apiKeysSecretName" -}}
{{- if .Values.apiKeys.existingSecret }}
{{- .Values.apiKeys.existingSecret }}
{{- else }}
{{- include "vbatch.componentName" (list . "api-keys") }}
{{- end }}
{{- end }}

{{/* The one kopf peering object all operator replicas of this release share. */}}
{{- define "vbatch.peeringName" -}}
{{- include "vbatch.componentName" (list . "operator") }}
{{- end }}

{{/* Where the config files appear inside the pods. */}}
{{- define "vbatch.configDir" -}}/etc/vbatch/config{{- end }}
{{- define "vbatch.keysDir" -}}/etc/vbatch/keys{{- end }}
{{- define "vbatch.caDir" -}}/etc/vbatch/ca{{- end }}
{{- define "vbatch.webhooksDir" -}}/etc/vbatch/webhooks{{- end }}

{{/* Plain (non-secret) settings every vbatch process reads, as a name -> value map: the
gateway and operator get them as env entries, the worker pods through the worker config
(whose `env` is such a map). */}}
{{- define "vbatch.plainEnv" -}}
VBATCH_STORAGE: s3
VBATCH_S3_ENDPOINT: {{ .Values.storage.endpoint | quote }}
VBATCH_S3_BUCKET: {{ .Values.storage.bucket | quote }}
VBATCH_S3_SECURE: {{ .Values.storage.secure | toString | quote }}
{{- with .Values.storage.region }}
VBATCH_S3_REGION: {{ . | quote }}
{{- end }}
{{- if .Values.storage.caConfigMap }}
# The S3 client (minio, over urllib3) trusts the bundle SSL_CERT_FILE names.
SSL_CERT_FILE: {{ printf "%s/%s" (include "vbatch.caDir" .) .Values.storage.caConfigMapKey | quote }}
{{- end }}
VBATCH_MODEL_CATALOG: {{ include "vbatch.configDir" . }}/catalog.yaml
VBATCH_FILE_EXPIRY_MIN_SECONDS: {{ .Values.files.expiryMinSeconds | int | toString | quote }}
VBATCH_OUTPUT_RETENTION_SECONDS: {{ .Values.files.outputRetentionSeconds | int | toString | quote }}
{{- end }}

{{/* The storage credentials' Secret keys are the setting names themselves, so worker pods
can take the whole Secret with envFrom (the operator's worker config names Secrets, not
keys) while gateway and operator reference the same keys one by one. */}}
{{- define "vbatch.storageEnv" -}}
{{- range $name, $value := include "vbatch.plainEnv" . | fromYaml }}
- name: {{ $name }}
  value: {{ $value | quote }}
{{- end }}
{{- range list "VBATCH_S3_ACCESS_KEY" "VBATCH_S3_SECRET_KEY" }}
- name: {{ . }}
  valueFrom:
    secretKeyRef:
      name: {{ include "vbatch.storageSecretName" $ }}
      key: {{ . }}
{{- end }}
{{- end }}

{{/* Volumes every vbatch pod has: a writable /tmp (the root filesystem is read-only), the
catalog, and the storage CA when one is configured. */}}
{{- define "vbatch.commonVolumes" -}}
- name: tmp
  emptyDir: {}
- name: config
  configMap:
    name: {{ include "vbatch.configMapName" . }}
{{- if .Values.storage.caConfigMap }}
- name: storage-ca
  configMap:
    name: {{ .Values.storage.caConfigMap }}
{{- end }}
{{- end }}

{{- define "vbatch.commonVolumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: config
  mountPath: {{ include "vbatch.configDir" . }}
  readOnly: true
{{- if .Values.storage.caConfigMap }}
- name: storage-ca
  mountPath: {{ include "vbatch.caDir" . }}
  readOnly: true
{{- end }}
{{- end }}

{{/* The generated API key, computed once per render and shared by the Secret and NOTES
(templates render in one pass over the same .Values). On upgrade the existing Secret is
looked up and kept, so the key handed out at install keeps working; its plain text is
never recoverable (only the hash is stored), so NOTES only shows it when it is new. */}}
{{- define "vbatch.apiKeys.ensure" -}}
{{- if not (hasKey .Values "__vbatchApiKeys") }}
{{- $state := dict "reused" false "key" "" "file" "" }}
{{- if not .Values.apiKeys.existingSecret }}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (include "vbatch.apiKeysSecretName" .) }}
{{- $data := dig "data" (dict) ($existing | default (dict)) }}
{{- if hasKey $data .Values.apiKeys.existingSecretKey }}
{{- $_ := set $state "reused" true }}
{{- $_ := set $state "file" (index $data .Values.apiKeys.existingSecretKey | b64dec) }}
{{- else }}
{{- /* 43 alphanumerics carry ~256 bits, like `vbatch keys create`'s keys. */}}
{{- $key := printf "vb-%s" (randAlphaNum 43) }}
{{- $_ := set $state "key" $key }}
{{- $_ := set $state "file" (printf "sha256:%s %s\n" (sha256sum $key) .Values.apiKeys.generate.project) }}
{{- end }}
{{- end }}
{{- $_ := set .Values "__vbatchApiKeys" $state }}
{{- end }}
{{- end }}
