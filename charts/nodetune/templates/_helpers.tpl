{{/* Names are fixed (not prefixed with the release name): the binary, the admission policies
and the agents' RBAC refer to them, and one nodetune runs per cluster. */}}

{{- define "nodetune.labels" -}}
app.kubernetes.io/name: nodetune
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end }}

{{- define "nodetune.image" -}}
{{- $tag := .Values.image.tag | default .Chart.AppVersion -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}:{{ $tag }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ $tag }}
{{- end -}}
{{- end }}

{{- define "nodetune.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{- define "nodetune.logEnv" -}}
- name: RUST_LOG
  value: {{ .Values.log.level | quote }}
- name: NODETUNE_LOG_JSON
  value: {{ eq .Values.log.format "json" | quote }}
{{- end }}

{{- define "nodetune.policyConfigMap" -}}nodetune-policy{{- end }}

{{/* CEL: the scope of the canonical dotted key in .key, as the agent computes it
(src/sysctl/scope.rs, tabled in files/scopes.json). */}}
{{- define "nodetune.celScope" -}}
{{- $k := .key -}}
({{ $k }}.startsWith('net.') ? (({{ $k }} in {{ .scopes.nodeNetExact | toJson }} || {{ .scopes.nodeNetPrefixes | toJson }}.exists(p, {{ $k }}.startsWith(p))) ? 'Node' : 'NetworkNamespace') : (({{ $k }} in {{ .scopes.ipcExact | toJson }} || {{ .scopes.ipcPrefixes | toJson }}.exists(p, {{ $k }}.startsWith(p))) ? 'IPCNamespace' : 'Node'))
{{- end }}
