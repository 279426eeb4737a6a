{{/*
Autoscaling and disruption budgets, the same for the router and both worker roles.
Args of every define here: dict "root" $ "role" "router|prefill|decode".
*/}}

{{- define "k2serve.scaleTargetRef" -}}
{{- $t := include "k2serve.workload" . | fromJson -}}
apiVersion: {{ $t.apiVersion }}
kind: {{ $t.kind }}
name: {{ $t.name }}
{{- end -}}

{{- define "k2serve.hpa" -}}
{{- $as := (index .root.Values .role).autoscaling -}}
{{- if and $as.enabled (eq $as.engine "hpa") -}}
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: {{ include "k2serve.componentName" (dict "root" .root "component" .role) }}
  labels:
    {{- include "k2serve.componentLabels" (dict "root" .root "component" .role) | nindent 4 }}
spec:
  scaleTargetRef:
    {{- include "k2serve.scaleTargetRef" . | nindent 4 }}
  minReplicas: {{ int $as.minReplicas }}
  maxReplicas: {{ int $as.maxReplicas }}
  metrics:
    {{- toYaml $as.metrics | nindent 4 }}
{{- end -}}
{{- end -}}

{{- define "k2serve.scaledObject" -}}
{{- $as := (index .root.Values .role).autoscaling -}}
{{- if and $as.enabled (eq $as.engine "keda") -}}
apiVersion: keda.sh/v1alpha1
kind: ScaledObject
metadata:
  name: {{ include "k2serve.componentName" (dict "root" .root "component" .role) }}
  labels:
    {{- include "k2serve.componentLabels" (dict "root" .root "component" .role) | nindent 4 }}
spec:
  scaleTargetRef:
    {{- include "k2serve.scaleTargetRef" . | nindent 4 }}
  minReplicaCount: {{ int $as.minReplicas }}
  maxReplicaCount: {{ int $as.maxReplicas }}
  pollingInterval: {{ int $as.keda.pollingInterval }}
  cooldownPeriod: {{ int $as.keda.cooldownPeriod }}
  triggers:
    - type: prometheus
      metadata:
        serverAddress: {{ $as.keda.serverAddress | quote }}
        query: {{ $as.keda.query | quote }}
        threshold: {{ $as.keda.threshold | quote }}
      {{- with $as.keda.authenticationRef }}
      authenticationRef:
        name: {{ . }}
      {{- end }}
{{- end -}}
{{- end -}}

{{- define "k2serve.pdb" -}}
{{- $pdb := (index .root.Values .role).pdb -}}
{{- if $pdb.enabled -}}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "k2serve.componentName" (dict "root" .root "component" .role) }}
  labels:
    {{- include "k2serve.componentLabels" (dict "root" .root "component" .role) | nindent 4 }}
spec:
  maxUnavailable: {{ int $pdb.maxUnavailable }}
  selector:
    matchLabels:
      {{- include "k2serve.componentSelectorLabels" (dict "root" .root "component" .role) | nindent 6 }}
{{- end -}}
{{- end -}}
