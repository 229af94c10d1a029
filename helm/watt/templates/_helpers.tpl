{{/* Names and labels shared by every object of the release. */}}
{{- define "watt.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 55 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 55 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "watt.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "watt.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "watt.image" -}}
{{- printf "%s/%s:%s" .root.Values.image.registry .name (default .root.Chart.AppVersion .root.Values.image.tag) -}}
{{- end -}}

{{- define "watt.controllerAddress" -}}
{{- printf "https://%s-controller:%d" (include "watt.fullname" .) (int .Values.controller.grpcPort) -}}
{{- end -}}

{{- /* The Secret whose ca.crt clients trust the controller's certificate with: cert-manager's, or the chart's. */ -}}
{{- define "watt.serverCaSecret" -}}
{{- if .Values.certManager.enabled -}}
{{- printf "%s-controller-tls" (include "watt.fullname" .) -}}
{{- else -}}
{{- printf "%s-pki" (include "watt.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- /* The DNS names the controller's certificate is for: the Service, and each replica's own name (which followers give clients for the leader). */ -}}
{{- define "watt.controllerHosts" -}}
{{- $service := printf "%s-controller" (include "watt.fullname" .) -}}
{{- $peers := printf "*.%s-controller-peers.%s.svc" (include "watt.fullname" .) .Release.Namespace -}}
{{- toJson (list $service (printf "%s.%s" $service .Release.Namespace) (printf "%s.%s.svc" $service .Release.Namespace) (printf "%s.%s.svc.cluster.local" $service .Release.Namespace) $peers (printf "%s.cluster.local" $peers) "localhost") -}}
{{- end -}}
