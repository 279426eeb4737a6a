{{/*
Prefill and decode workers share one shape; the per-role files under templates/prefill and
templates/decode each render one object from these definitions.
Args of every define here: dict "root" $ "role" "prefill|decode".
*/}}

{{/* Container resources; with gpu.enabled one GPU, for the one process (EP rank) a worker pod runs. */}}
{{- define "k2serve.worker.resources" -}}
{{- $res := deepCopy ((index .root.Values .role).resources | default dict) -}}
{{- if .root.Values.gpu.enabled -}}
{{- $gpu := .root.Values.gpu.resourceName -}}
{{- $_ := set $res "limits" (merge (dict $gpu "1") ($res.limits | default dict)) -}}
{{- $_ = set $res "requests" (merge (dict $gpu "1") ($res.requests | default dict)) -}}
{{- end -}}
{{- toYaml $res -}}
{{- end -}}

{{/* The pod spec of a worker. */}}
{{- define "k2serve.worker.podSpec" -}}
{{- $root := .root -}}
{{- $v := $root.Values -}}
{{- $w := index $v .role -}}
{{- $startupFailures := max 1 (div (int $w.startupTimeoutSeconds) 10) -}}
{{ include "k2serve.podCommon" $root }}
terminationGracePeriodSeconds: {{ int $w.terminationGracePeriodSeconds }}
{{- with (include "k2serve.initContainers" (dict "root" $root "component" .role)) }}
initContainers:
  {{- . | nindent 2 }}
{{- end }}
containers:
  - name: {{ .role }}
    image: {{ include "k2serve.image" (dict "root" $root "gpu" true) }}
    imagePullPolicy: {{ $v.image.pullPolicy }}
    command: {{ include "k2serve.worker.command" . }}
    args: {{ include "k2serve.args.worker" . }}
    ports:
      - name: grpc
        containerPort: {{ int $w.port }}
        protocol: TCP
      - name: metrics
        containerPort: {{ int $w.metricsPort }}
        protocol: TCP
      {{- if eq (include "k2serve.transferBackend" .) "torch" }}
      - name: transfer
        containerPort: {{ int $w.transfer.port }}
        protocol: TCP
      {{- end }}
      {{- if gt (int $w.ep.size) 1 }}
      - name: ep
        containerPort: {{ int $w.ep.port }}
        protocol: TCP
      {{- end }}
    env:
      {{- include "k2serve.podEnv" $root | nindent 6 }}
      {{- if $v.gpu.enabled }}
      {{- range $name, $value := $v.gpu.nccl.env }}
      - name: {{ $name }}
        value: {{ $value | quote }}
      {{- end }}
      {{- end }}
    envFrom:
      - configMapRef:
          name: {{ include "k2serve.fullname" $root }}
    startupProbe:
      {{- include "k2serve.workerProbe" (dict "root" $root "port" $w.port) | nindent 6 }}
      periodSeconds: 10
      failureThreshold: {{ $startupFailures }}
    livenessProbe:
      {{- include "k2serve.workerProbe" (dict "root" $root "port" $w.port) | nindent 6 }}
      periodSeconds: 10
      timeoutSeconds: 5
      failureThreshold: 3
    readinessProbe:
      {{- include "k2serve.workerProbe" (dict "root" $root "port" $w.port) | nindent 6 }}
      periodSeconds: 5
      timeoutSeconds: 3
      failureThreshold: 2
    resources:
      {{- include "k2serve.worker.resources" . | nindent 6 }}
    securityContext:
      {{- include "k2serve.containerSecurityContext" $root | nindent 6 }}
    volumeMounts:
      {{- include "k2serve.volumeMounts" (dict "root" $root "component" .role) | nindent 6 }}
volumes:
  {{- include "k2serve.volumes" (dict "root" $root "component" .role) | nindent 2 }}
{{- $nodeSelector := merge (dict) ($w.nodeSelector | default dict) (ternary $v.gpu.nodeSelector dict $v.gpu.enabled) }}
{{- with $nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- $tolerations := concat ($w.tolerations | default list) (ternary $v.gpu.tolerations list $v.gpu.enabled) }}
{{- with $tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $w.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Template metadata of a worker pod. */}}
{{- define "k2serve.worker.podMetadata" -}}
labels:
  {{- include "k2serve.componentLabels" (dict "root" .root "component" .role) | nindent 2 }}
annotations:
  {{- include "k2serve.podAnnotations" (dict "root" .root "extra" (index .root.Values .role).podAnnotations) | nindent 2 }}
{{- end -}}

{{/*
The workers of a role as one StatefulSet: `replicas` pods, or with ep.size > 1 `replicas` groups of
ep.size pods, ordinals [g * size, (g + 1) * size) forming group g (see k2serve.worker.command).
Pods start in parallel, so a group's ranks meet without waiting for each other to be ready.
The annotation k2serve.io/ep-size tells `k2serve planner --connector kubernetes` the group size, so
that it scales in whole groups.
*/}}
{{- define "k2serve.worker.statefulset" -}}
{{- $w := index .root.Values .role -}}
{{- $name := include "k2serve.componentName" (dict "root" .root "component" .role) -}}
apiVersion: apps/v1
kind: StatefulSet
metadata:
  name: {{ $name }}
  labels:
    {{- include "k2serve.componentLabels" (dict "root" .root "component" .role) | nindent 4 }}
  annotations:
    k2serve.io/ep-size: {{ int $w.ep.size | quote }}
spec:
  serviceName: {{ $name }}-headless
  {{- if not $w.autoscaling.enabled }}
  replicas: {{ mul (int $w.replicas) (int $w.ep.size) }}
  {{- end }}
  podManagementPolicy: Parallel
  selector:
    matchLabels:
      {{- include "k2serve.componentSelectorLabels" (dict "root" .root "component" .role) | nindent 6 }}
  template:
    metadata:
      {{- include "k2serve.worker.podMetadata" . | nindent 6 }}
    spec:
      {{- include "k2serve.worker.podSpec" . | nindent 6 }}
{{- end -}}

{{/* Headless Service: stable per-pod DNS names (the advertised worker addresses, an EP group's rendezvous). */}}
{{- define "k2serve.worker.headlessService" -}}
{{- $w := index .root.Values .role -}}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "k2serve.componentName" (dict "root" .root "component" .role) }}-headless
  labels:
    {{- include "k2serve.componentLabels" (dict "root" .root "component" .role) | nindent 4 }}
spec:
  clusterIP: None
  publishNotReadyAddresses: true
  selector:
    {{- include "k2serve.componentSelectorLabels" (dict "root" .root "component" .role) | nindent 4 }}
  ports:
    - name: grpc
      port: {{ int $w.port }}
      targetPort: grpc
      appProtocol: grpc
    {{- if eq (include "k2serve.transferBackend" .) "torch" }}
    - name: transfer
      port: {{ int $w.transfer.port }}
      targetPort: transfer
    {{- end }}
    {{- if gt (int $w.ep.size) 1 }}
    - name: ep
      port: {{ int $w.ep.port }}
      targetPort: ep
    {{- end }}
{{- end -}}

{{/* Workers accept traffic only from the router and from the release's other workers (any port: KV transfer, EP collectives), and on the metrics port from monitoring.allowFrom (empty: anyone). */}}
{{- define "k2serve.worker.networkPolicy" -}}
{{- if .root.Values.networkPolicy.enabled -}}
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: {{ include "k2serve.componentName" (dict "root" .root "component" .role) }}
  labels:
    {{- include "k2serve.componentLabels" (dict "root" .root "component" .role) | nindent 4 }}
spec:
  podSelector:
    matchLabels:
      {{- include "k2serve.componentSelectorLabels" (dict "root" .root "component" .role) | nindent 6 }}
  policyTypes: ["Ingress"]
  ingress:
    - from:
        - podSelector:
            matchLabels:
              {{- include "k2serve.selectorLabels" .root | nindent 14 }}
            matchExpressions:
              - key: app.kubernetes.io/component
                operator: In
                values: ["router", "prefill", "decode"]
    - ports:
        - port: metrics
          protocol: TCP
      {{- with .root.Values.monitoring.allowFrom }}
      from:
        {{- toYaml . | nindent 8 }}
      {{- end }}
{{- end -}}
{{- end -}}

{{/* A worker's probe: the gRPC health service, or (kubelet's gRPC probe cannot speak TLS) a TCP check
of the same port when TLS is on. */}}
{{- define "k2serve.workerProbe" -}}
{{- if .root.Values.tls.enabled -}}
tcpSocket:
  port: {{ int .port }}
{{- else -}}
grpc:
  port: {{ int .port }}
{{- end -}}
{{- end -}}
