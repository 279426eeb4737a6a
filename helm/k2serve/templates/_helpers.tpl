{{/* Names, labels and the shared lookups of the chart. */}}

{{- define "k2serve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "k2serve.fullname" -}}
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

{{/* The name of one component's objects: "<fullname>-<component>" (component: router, prefill, decode, redis). */}}
{{- define "k2serve.componentName" -}}
{{- printf "%s-%s" (include "k2serve.fullname" .root) .component -}}
{{- end -}}

{{- define "k2serve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "k2serve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "k2serve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "k2serve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: k2serve
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels of one component; args: dict "root" $ "component" "router". */}}
{{- define "k2serve.componentSelectorLabels" -}}
{{ include "k2serve.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "k2serve.componentLabels" -}}
{{ include "k2serve.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "k2serve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "k2serve.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The k2serve image; args: dict "root" $ "gpu" bool (a GPU worker takes the cuda variant under variant=auto). */}}
{{- define "k2serve.image" -}}
{{- $img := .root.Values.image -}}
{{- $variant := $img.variant -}}
{{- if eq $variant "auto" -}}
{{- $variant = ternary "cuda" "cpu" (and .gpu .root.Values.gpu.enabled) -}}
{{- end -}}
{{- $tag := default (printf "%s-%s" .root.Chart.AppVersion $variant) $img.tag -}}
{{- printf "%s:%s" $img.repository $tag -}}
{{- end -}}

{{/* The checkpoint directory every k2serve process is given with --model. */}}
{{- define "k2serve.modelDir" -}}
{{- if .Values.model.preset -}}
{{- printf "%s/%s-seed%d" (trimSuffix "/" .Values.model.mountPath) .Values.model.preset (int .Values.model.seed) -}}
{{- else -}}
{{- .Values.model.path -}}
{{- end -}}
{{- end -}}

{{/* The router's gRPC address workers register with. */}}
{{/* Where workers register: the router's internal listener. */}}
{{- define "k2serve.routerAddress" -}}
{{- printf "%s.%s.svc:%d" (include "k2serve.componentName" (dict "root" . "component" "router")) .Release.Namespace (int .Values.router.internalPort) -}}
{{- end -}}

{{- define "k2serve.clusterToken.secretName" -}}
{{- default (printf "%s-cluster-token" (include "k2serve.fullname" .)) .Values.clusterToken.existingSecret -}}
{{- end -}}

{{/* Whether the router talks to Redis over TLS with the chart's certificate and CA. */}}
{{- define "k2serve.redis.tls" -}}
{{- if .Values.redis.enabled -}}{{ .Values.redis.tls.enabled }}{{- else -}}{{ .Values.redis.external.tls }}{{- end -}}
{{- end -}}

{{/* The chart's Redis as the router dials it (no password: that comes from a mounted Secret file). */}}
{{- define "k2serve.redis.url" -}}
{{- printf "%s://%s.%s.svc:%d/0" (ternary "rediss" "redis" .Values.redis.tls.enabled) (include "k2serve.componentName" (dict "root" . "component" "redis")) .Release.Namespace (int .Values.redis.port) -}}
{{- end -}}

{{- define "k2serve.redis.secretName" -}}
{{- default (printf "%s-auth" (include "k2serve.componentName" (dict "root" . "component" "redis"))) .Values.redis.auth.existingSecret -}}
{{- end -}}

{{/* A worker role's workload as JSON {apiVersion, kind, name}; args: dict "root" $ "role" "prefill". */}}
{{- define "k2serve.workload" -}}
{{- $name := include "k2serve.componentName" (dict "root" .root "component" .role) -}}
{{- if eq .role "router" -}}
{{- dict "apiVersion" "apps/v1" "kind" "Deployment" "name" $name | toJson -}}
{{- else -}}
{{- dict "apiVersion" "apps/v1" "kind" "StatefulSet" "name" $name | toJson -}}
{{- end -}}
{{- end -}}

{{/* Checks that the schema cannot express; rendered from the ConfigMap, which is always present. */}}
{{- define "k2serve.validate" -}}
{{- if and .Values.redis.enabled .Values.redis.external.urlSecretRef.name -}}
{{- fail "redis: set either redis.enabled or redis.external.urlSecretRef.name, not both" -}}
{{- end -}}
{{- $redisTLS := or (and .Values.redis.enabled .Values.redis.tls.enabled) (and (not .Values.redis.enabled) .Values.redis.external.tls) -}}
{{- if and $redisTLS (not (and .Values.tls.enabled .Values.tls.caKey)) -}}
{{- fail "redis.tls.enabled / redis.external.tls: Redis over TLS uses the chart's certificate and CA; set tls.enabled and tls.caKey" -}}
{{- end -}}
{{- range $role := list "prefill" "decode" -}}
{{- $w := index $.Values $role -}}
{{- if and $.Values.tls.enabled (eq $w.transfer.backend "torch") -}}
{{- fail (printf "%s.transfer.backend torch with tls.enabled: torch.distributed sends the KV cache in plaintext and the workers refuse --transfer-backend torch with --tls-*; set %s.transfer.backend to grpc, or tls.enabled to false" $role $role) -}}
{{- end -}}
{{- if and (gt (int $w.ep.size) 1) $w.autoscaling.enabled -}}
{{- fail (printf "%s: autoscaling adds and removes single pods, which would split expert-parallel groups of ep.size (%d); set %s.replicas (groups) instead" $role (int $w.ep.size) $role) -}}
{{- end -}}
{{- if and $w.ep.eplb.enabled (eq (int $w.ep.size) 1) -}}
{{- fail (printf "%s.ep.eplb.enabled needs %s.ep.size > 1: one rank holds every expert" $role $role) -}}
{{- end -}}
{{- if and $w.ep.eplb.enabled (mod (int $w.ep.eplb.numRedundantExperts) (int $w.ep.size)) -}}
{{- fail (printf "%s.ep.eplb.numRedundantExperts (%d) must be a multiple of %s.ep.size (%d): each rank gets an equal share" $role (int $w.ep.eplb.numRedundantExperts) $role (int $w.ep.size)) -}}
{{- end -}}
{{- $taken := list (int $w.port) -}}
{{- if eq (include "k2serve.transferBackend" (dict "root" $ "role" $role)) "torch" -}}
{{- $taken = append $taken (int $w.transfer.port) -}}
{{- end -}}
{{- if and (gt (int $w.ep.size) 1) (has (int $w.ep.port) $taken) -}}
{{- fail (printf "%s.ep.port (%d) is already the worker's gRPC or transfer port" $role (int $w.ep.port)) -}}
{{- end -}}
{{- end -}}
{{- range $role := list "router" "prefill" "decode" -}}
{{- $as := (index $.Values $role).autoscaling -}}
{{- if and $as.enabled (gt (int $as.minReplicas) (int $as.maxReplicas)) -}}
{{- fail (printf "%s.autoscaling: minReplicas (%d) exceeds maxReplicas (%d)" $role (int $as.minReplicas) (int $as.maxReplicas)) -}}
{{- end -}}
{{- end -}}
{{- if .Values.planner.enabled -}}
{{- $p := .Values.planner -}}
{{- range $role := list "prefill" "decode" -}}
{{- if (index $.Values $role).autoscaling.enabled -}}
{{- fail (printf "planner.enabled with %s.autoscaling.enabled: the planner and the autoscaler would both set the %s StatefulSet's replicas; turn one off" $role $role) -}}
{{- end -}}
{{- $b := index $p $role -}}
{{- if gt (int $b.minReplicas) (int $b.maxReplicas) -}}
{{- fail (printf "planner.%s: minReplicas (%d) exceeds maxReplicas (%d)" $role (int $b.minReplicas) (int $b.maxReplicas)) -}}
{{- end -}}
{{- end -}}
{{- if and .Values.tls.enabled (not .Values.tls.caKey) -}}
{{- fail "planner.enabled with tls.enabled needs tls.caKey: the planner verifies the router's certificate against that CA" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
The KV transfer backend a worker role runs (--transfer-backend); args: dict "root" $ "role" "prefill|decode".
transfer.backend "auto": torch (NCCL point to point between the GPUs, no host staging) when
gpu.enabled and not tls.enabled (torch.distributed has no TLS), else grpc. "grpc" / "torch": as set.
*/}}
{{- define "k2serve.transferBackend" -}}
{{- $w := index .root.Values .role -}}
{{- if eq $w.transfer.backend "auto" -}}
{{- ternary "torch" "grpc" (and .root.Values.gpu.enabled (not .root.Values.tls.enabled)) -}}
{{- else -}}
{{- $w.transfer.backend -}}
{{- end -}}
{{- end -}}

{{/* "true" when the chart runs its own Mooncake Store master (kvStore.backend mooncake, no
kvStore.master); empty otherwise. */}}
{{- define "k2serve.kvStore.ownMaster" -}}
{{- if and (eq .Values.kvStore.backend "mooncake") (not .Values.kvStore.master) -}}true{{- end -}}
{{- end -}}
