{{/* Pieces every k2serve pod shares: security contexts, volumes, the model init container, env. */}}

{{- define "k2serve.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ int .Values.podSecurity.runAsUser }}
runAsGroup: {{ int .Values.podSecurity.runAsGroup }}
fsGroup: {{ int .Values.podSecurity.fsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "k2serve.containerSecurityContext" -}}
runAsNonRoot: true
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Volumes of a k2serve pod; args: dict "root" $ "component" "router|prefill|decode". */}}
{{- define "k2serve.volumes" -}}
{{- $v := .root.Values -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ $v.tmpSizeLimit }}
{{- if $v.model.preset }}
- name: model
  emptyDir: {}
{{- else if $v.model.volume }}
- name: model
  {{- toYaml $v.model.volume | nindent 2 }}
{{- end }}
{{- if ne .component "router" }}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ ternary $v.gpu.shmSize (index $v .component).shmSize $v.gpu.enabled }}
{{- end }}
- name: cluster-token
  secret:
    secretName: {{ include "k2serve.clusterToken.secretName" .root }}
    defaultMode: 0440
    items:
      - key: {{ $v.clusterToken.key }}
        path: token
{{- if $v.tls.enabled }}
- name: tls
  secret:
    secretName: {{ $v.tls.existingSecret }}
    defaultMode: 0440
    items:
      - key: {{ $v.tls.certKey }}
        path: tls.crt
      - key: {{ $v.tls.keyKey }}
        path: tls.key
      {{- if $v.tls.caKey }}
      - key: {{ $v.tls.caKey }}
        path: ca.crt
      {{- end }}
{{- end }}
{{- if and (eq .component "router") $v.redis.enabled }}
- name: redis-auth
  secret:
    secretName: {{ include "k2serve.redis.secretName" .root }}
    defaultMode: 0440
    items:
      - key: {{ $v.redis.auth.key }}
        path: password
{{- end }}
{{- end -}}

{{- define "k2serve.volumeMounts" -}}
{{- $v := .root.Values -}}
- name: tmp
  mountPath: /tmp
{{- if or $v.model.preset $v.model.volume }}
- name: model
  mountPath: {{ $v.model.mountPath }}
  readOnly: true
{{- end }}
{{- if ne .component "router" }}
- name: dshm
  mountPath: /dev/shm
{{- end }}
- name: cluster-token
  mountPath: /etc/k2serve/cluster-token
  readOnly: true
{{- if $v.tls.enabled }}
- name: tls
  mountPath: /etc/k2serve/tls
  readOnly: true
{{- end }}
{{- if and (eq .component "router") $v.redis.enabled }}
- name: redis-auth
  mountPath: /etc/k2serve/redis
  readOnly: true
{{- end }}
{{- end -}}

{{/* initContainers: `k2serve init-model` writes the preset checkpoint (nothing when a path is served). */}}
{{- define "k2serve.initContainers" -}}
{{- if .root.Values.model.preset -}}
- name: init-model
  image: {{ include "k2serve.image" (dict "root" .root "gpu" (ne .component "router")) }}
  imagePullPolicy: {{ .root.Values.image.pullPolicy }}
  command: ["k2serve"]
  args: {{ include "k2serve.args.initModel" .root }}
  envFrom:
    - configMapRef:
        name: {{ include "k2serve.fullname" .root }}
  securityContext:
    {{- include "k2serve.containerSecurityContext" .root | nindent 4 }}
  volumeMounts:
    - name: tmp
      mountPath: /tmp
    - name: model
      mountPath: {{ .root.Values.model.mountPath }}
{{- end }}
{{- end -}}

{{/* The downward-API variables the worker args refer to as $(POD_NAME) and $(POD_IP). */}}
{{- define "k2serve.podEnv" -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: POD_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
{{- end -}}

{{/* Pod-level fields shared by every k2serve pod spec. */}}
{{- define "k2serve.podCommon" -}}
serviceAccountName: {{ include "k2serve.serviceAccountName" . }}
automountServiceAccountToken: false
enableServiceLinks: false
securityContext:
  {{- include "k2serve.podSecurityContext" . | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Template annotations that roll pods when the ConfigMap changes. */}}
{{- define "k2serve.podAnnotations" -}}
checksum/config: {{ include (print .root.Template.BasePath "/configmap.yaml") .root | sha256sum }}
{{- with .extra }}
{{ toYaml . }}
{{- end }}
{{- end -}}
