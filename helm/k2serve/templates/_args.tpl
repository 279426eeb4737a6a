{{/*
The k2serve command lines, as JSON arrays of strings. Each follows `k2serve <subcommand> --help`
of k2serve/cli/parser.py; tests/test_helm_cli_args.py parses every rendered one with build_parser().
Integers go through `int` (Helm reads numbers as floats, and 1000000 would print as 1e+06).
*/}}

{{/* `k2serve init-model`: writes the preset checkpoint into the model emptyDir. */}}
{{- define "k2serve.args.initModel" -}}
{{- $m := .Values.model -}}
{{- list "init-model" (include "k2serve.modelDir" .) "--preset" $m.preset "--seed" (printf "%d" (int $m.seed)) "--dtype" $m.dtype | toJson -}}
{{- end -}}

{{/* --model and --served-model-name, shared by the router and the workers. */}}
{{- define "k2serve.args.model" -}}
{{- $args := list "--model" (include "k2serve.modelDir" .) -}}
{{- with .Values.model.servedModelName -}}
{{- $args = concat $args (list "--served-model-name" .) -}}
{{- end -}}
{{- $args | toJson -}}
{{- end -}}

{{/* Engine sizes of a worker (add_engine_args). */}}
{{- define "k2serve.args.engine" -}}
{{- $e := .Values.engine -}}
{{- $pool := ternary (list "--memory-budget-mb" (printf "%d" (int $e.memoryBudgetMb))) (list "--kv-cache-mb" (printf "%d" (int $e.kvCacheMb))) (gt (int $e.memoryBudgetMb) 0) -}}
{{- $args := concat (list "--block-size" (printf "%d" (int $e.blockSize))) $pool (list
  "--max-num-seqs" (printf "%d" (int $e.maxNumSeqs))
  "--max-num-batched-tokens" (printf "%d" (int $e.maxNumBatchedTokens))
  "--max-waiting" (printf "%d" (int $e.maxWaiting))
  "--kv-cache-dtype" $e.kvCacheDtype) -}}
{{- if gt (int $e.maxModelLen) 0 -}}
{{- $args = concat $args (list "--max-model-len" (printf "%d" (int $e.maxModelLen))) -}}
{{- end -}}
{{- if not $e.prefixCaching -}}
{{- $args = append $args "--no-prefix-caching" -}}
{{- end -}}
{{- if gt (int $e.kvOffloadHostMb) 0 -}}
{{- $args = concat $args (list "--kv-offload-host-mb" (printf "%d" (int $e.kvOffloadHostMb))) -}}
{{- end -}}
{{- if $e.kvOffloadDir -}}
{{- $args = concat $args (list "--kv-offload-dir" $e.kvOffloadDir "--kv-offload-disk-mb" (printf "%d" (int $e.kvOffloadDiskMb))) -}}
{{- end -}}
{{- if not $e.kvOffloadAsync -}}
{{- $args = append $args "--no-kv-offload-async" -}}
{{- end -}}
{{- if gt (int $e.kvReloadTimeoutS) 0 -}}
{{- $args = concat $args (list "--kv-reload-timeout-s" (printf "%d" (int $e.kvReloadTimeoutS))) -}}
{{- end -}}
{{- if $e.kvSessionLeaseS -}}
{{- $args = concat $args (list "--kv-session-lease-s" (toString $e.kvSessionLeaseS)) -}}
{{- end -}}
{{- $args = concat $args (include "k2serve.args.kvStore" . | fromJsonArray) -}}
{{- $args | toJson -}}
{{- end -}}

{{/* The shared KV tier's flags (kvStore): the chart's own master unless kvStore.master names one;
each worker is reached at its pod IP ($(POD_IP), k2serve.podEnv). */}}
{{- define "k2serve.args.kvStore" -}}
{{- $k := .Values.kvStore -}}
{{- $args := list -}}
{{- if eq $k.backend "mooncake" -}}
{{- $master := $k.master -}}
{{- $metadata := $k.metadata -}}
{{- if not $master -}}
{{- $host := printf "%s.%s.svc" (include "k2serve.componentName" (dict "root" . "component" "kvstore")) .Release.Namespace -}}
{{- $master = printf "%s:%d" $host (int $k.masterServer.port) -}}
{{- $metadata = $metadata | default (printf "http://%s:%d/metadata" $host (int $k.masterServer.metadataPort)) -}}
{{- end -}}
{{- $args = list "--kv-store" "mooncake" "--kv-store-master" $master "--kv-store-segment-mb" (printf "%d" (int $k.segmentMb)) "--kv-store-local-hostname" "$(POD_IP)" -}}
{{- with $metadata -}}
{{- $args = concat $args (list "--kv-store-metadata" .) -}}
{{- end -}}
{{- if not $k.putOnCompute -}}
{{- $args = append $args "--no-kv-store-put-on-compute" -}}
{{- end -}}
{{- end -}}
{{- $args | toJson -}}
{{- end -}}

{{/* `k2serve router`. The API key comes from $K2SERVE_API_KEY (a Secret ref); the chart's Redis by
--redis-url with its password in a mounted Secret file, an external one from $REDIS_URL (a Secret
ref); over TLS with the chart's certificate and CA. */}}
{{- define "k2serve.args.router" -}}
{{- $r := .Values.router -}}
{{- $args := list "router" "--host" "0.0.0.0"
  "--port" (printf "%d" (int $r.httpPort))
  "--grpc-port" (printf "%d" (int $r.grpcPort))
  "--internal-port" (printf "%d" (int $r.internalPort)) -}}
{{- $args = concat $args (include "k2serve.args.model" . | fromJsonArray) -}}
{{- $args = concat $args (list
  "--heartbeat-timeout" (toString $r.heartbeatTimeout)
  "--max-queue" (printf "%d" (int $r.maxQueue))) -}}
{{- $args = concat $args (include "k2serve.args.tls" . | fromJsonArray) -}}
{{- if .Values.redis.enabled -}}
{{- $args = concat $args (list "--redis-url" (include "k2serve.redis.url" .) "--redis-password-file" "/etc/k2serve/redis/password") -}}
{{- end -}}
{{- if eq (include "k2serve.redis.tls" .) "true" -}}
{{- $args = concat $args (list "--redis-ca" "/etc/k2serve/tls/ca.crt" "--redis-cert" "/etc/k2serve/tls/tls.crt" "--redis-key" "/etc/k2serve/tls/tls.key") -}}
{{- end -}}
{{- $args | toJson -}}
{{- end -}}

{{/* Credential flags of every router and worker process: the cluster token (the Secret mounted by
k2serve.volumes), its certificate, and with tls.caKey the CA for mutual TLS on every hop. */}}
{{- define "k2serve.args.tls" -}}
{{- $args := list "--cluster-token-file" "/etc/k2serve/cluster-token/token" -}}
{{- if .Values.tls.enabled -}}
{{- $args = concat $args (list "--tls-cert" "/etc/k2serve/tls/tls.crt" "--tls-key" "/etc/k2serve/tls/tls.key") -}}
{{- if .Values.tls.caKey -}}
{{- $args = concat $args (list "--tls-ca" "/etc/k2serve/tls/ca.crt") -}}
{{- end -}}
{{- end -}}
{{- $args | toJson -}}
{{- end -}}

{{/*
`k2serve prefill|decode`; args: dict "root" $ "role" "prefill". Every pod is one worker process (one
expert-parallel rank when ep.size > 1) that advertises its stable DNS name under the headless
Service and registers with the router. An EP rank's --ep-rank and --ep-init depend on its pod's
ordinal, so k2serve.worker.command appends them at start; the flags here are the same for every pod.
*/}}
{{- define "k2serve.args.worker" -}}
{{- $root := .root -}}
{{- $w := index $root.Values .role -}}
{{- $name := include "k2serve.componentName" (dict "root" $root "component" .role) -}}
{{- $args := list .role -}}
{{- $args = concat $args (include "k2serve.args.model" $root | fromJsonArray) (list "--dtype" $root.Values.model.dtype) -}}
{{- $args = concat $args (include "k2serve.args.engine" $root | fromJsonArray) -}}
{{- if $root.Values.gpu.enabled -}}
{{- $args = concat $args (list "--device" "cuda") -}}
{{- end -}}
{{- $args = concat $args (list "--host" "0.0.0.0" "--port" (printf "%d" (int $w.port))) -}}
{{- $args = concat $args (list "--metrics-port" (printf "%d" (int $w.metricsPort))) -}}
{{- $args = concat $args (list "--advertise-host" (printf "$(POD_NAME).%s-headless.%s.svc" $name $root.Release.Namespace)) -}}
{{- $args = concat $args (list "--router" (include "k2serve.routerAddress" $root)) -}}
{{- $transfer := include "k2serve.transferBackend" . -}}
{{- $args = concat $args (list "--worker-id" "$(POD_NAME)" "--transfer-backend" $transfer) -}}
{{- if eq $transfer "torch" -}}
{{- $args = concat $args (list "--transfer-port" (printf "%d" (int $w.transfer.port))) -}}
{{- end -}}
{{- $args = concat $args (list "--ep" (printf "%d" (int $w.ep.size))) -}}
{{- if gt (int $w.ep.size) 1 -}}
{{- $args = concat $args (list "--ep-timeout" (toString $w.ep.timeoutSeconds)) -}}
{{- if $w.ep.eplb.enabled -}}
{{- $eplb := dict "window_size" (int $w.ep.eplb.windowSize) "step_interval" (int $w.ep.eplb.stepInterval) "num_redundant_experts" (int $w.ep.eplb.numRedundantExperts) -}}
{{- $args = concat $args (list "--enable-eplb" "--eplb-config" ($eplb | toJson)) -}}
{{- end -}}
{{- end -}}
{{- $args = concat $args (list "--heartbeat-interval" (toString $w.heartbeatInterval)) -}}
{{- $args = concat $args (include "k2serve.args.tls" $root | fromJsonArray) -}}
{{- $args | toJson -}}
{{- end -}}

{{/*
The worker container's command (JSON array); its args are k2serve.args.worker. Alone (ep.size 1):
k2serve itself. In an expert-parallel group: a POSIX shell that reads the pod's StatefulSet ordinal
from $POD_NAME ("<statefulset>-<ordinal>"), so pod i is rank i % size of group i / size, and execs
k2serve (which then gets SIGTERM directly) with the args plus --ep-rank and --ep-init: the
rendezvous that rank 0 of the group, pod (i - rank), hosts on ep.port.
*/}}
{{- define "k2serve.worker.command" -}}
{{- $w := index .root.Values .role -}}
{{- $size := int $w.ep.size -}}
{{- if eq $size 1 -}}
{{- list "k2serve" | toJson -}}
{{- else -}}
{{- $name := include "k2serve.componentName" (dict "root" .root "component" .role) -}}
{{- $rank0 := printf "%s-$((ordinal - rank)).%s-headless.%s.svc" $name $name .root.Release.Namespace -}}
{{- $script := printf "ordinal=${POD_NAME##*-}; rank=$((ordinal %% %d)); exec k2serve \"$@\" --ep-rank \"$rank\" --ep-init \"tcp://%s:%d\"" $size $rank0 (int $w.ep.port) -}}
{{- list "sh" "-c" $script "k2serve" | toJson -}}
{{- end -}}
{{- end -}}

{{/* `k2serve planner` with the Kubernetes connector, scaling this release's worker StatefulSets. The
API key (for the router's /cluster/workers) comes from $K2SERVE_API_KEY. */}}
{{- define "k2serve.args.planner" -}}
{{- $v := .Values -}}
{{- $p := $v.planner -}}
{{- $scheme := ternary "https" "http" $v.tls.enabled -}}
{{- $router := printf "%s://%s.%s.svc:%d" $scheme (include "k2serve.componentName" (dict "root" . "component" "router")) .Release.Namespace (int $v.router.httpPort) -}}
{{- $args := list "planner" "--connector" "kubernetes" "--router" $router
  "--namespace" .Release.Namespace
  "--statefulset-prefill" (include "k2serve.componentName" (dict "root" . "component" "prefill"))
  "--statefulset-decode" (include "k2serve.componentName" (dict "root" . "component" "decode"))
  "--interval" (toString $p.interval)
  "--ttft-slo" (toString $p.ttftSlo)
  "--itl-slo" (toString $p.itlSlo)
  "--quantile" (toString $p.quantile)
  "--min-prefill" (printf "%d" (int $p.prefill.minReplicas))
  "--max-prefill" (printf "%d" (int $p.prefill.maxReplicas))
  "--min-decode" (printf "%d" (int $p.decode.minReplicas))
  "--max-decode" (printf "%d" (int $p.decode.maxReplicas)) -}}
{{- if $v.tls.enabled -}}
{{- $args = concat $args (list "--router-ca" "/etc/k2serve/tls/ca.crt") -}}
{{- end -}}
{{- concat $args $p.extraArgs | toJson -}}
{{- end -}}
