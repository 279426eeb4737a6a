from k2serve.proto import kv_transfer_pb2 as _kv_transfer_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WorkerRole(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WORKER_ROLE_UNSPECIFIED: _ClassVar[WorkerRole]
    WORKER_ROLE_PREFILL: _ClassVar[WorkerRole]
    WORKER_ROLE_DECODE: _ClassVar[WorkerRole]
    WORKER_ROLE_BOTH: _ClassVar[WorkerRole]

class KVTier(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KV_TIER_DEVICE: _ClassVar[KVTier]
    KV_TIER_HOST: _ClassVar[KVTier]
    KV_TIER_DISK: _ClassVar[KVTier]
    KV_TIER_SHARED: _ClassVar[KVTier]
WORKER_ROLE_UNSPECIFIED: WorkerRole
WORKER_ROLE_PREFILL: WorkerRole
WORKER_ROLE_DECODE: WorkerRole
WORKER_ROLE_BOTH: WorkerRole
KV_TIER_DEVICE: KVTier
KV_TIER_HOST: KVTier
KV_TIER_DISK: KVTier
KV_TIER_SHARED: KVTier

class WorkerCapacity(_message.Message):
    __slots__ = ("free_blocks", "total_blocks", "max_batch")
    FREE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    free_blocks: int
    total_blocks: int
    max_batch: int
    def __init__(self, free_blocks: _Optional[int] = ..., total_blocks: _Optional[int] = ..., max_batch: _Optional[int] = ...) -> None: ...

class WorkerInfo(_message.Message):
    __slots__ = ("worker_id", "role", "grpc_address", "kv_endpoints", "model", "num_layers", "kv_dim", "block_size", "kv_dtype", "capacity", "ep_size", "ready", "metrics_url", "publishes_kv_events", "kv_block_hashes", "kv_block_tiers", "kv_store", "kv_store_capacity_blocks", "kv_store_hashes")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    GRPC_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    KV_ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    KV_DIM_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    KV_DTYPE_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    EP_SIZE_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    METRICS_URL_FIELD_NUMBER: _ClassVar[int]
    PUBLISHES_KV_EVENTS_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCK_TIERS_FIELD_NUMBER: _ClassVar[int]
    KV_STORE_FIELD_NUMBER: _ClassVar[int]
    KV_STORE_CAPACITY_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    KV_STORE_HASHES_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    role: WorkerRole
    grpc_address: str
    kv_endpoints: _containers.RepeatedCompositeFieldContainer[_kv_transfer_pb2.KVEndpoint]
    model: str
    num_layers: int
    kv_dim: int
    block_size: int
    kv_dtype: str
    capacity: WorkerCapacity
    ep_size: int
    ready: bool
    metrics_url: str
    publishes_kv_events: bool
    kv_block_hashes: _containers.RepeatedScalarFieldContainer[int]
    kv_block_tiers: _containers.RepeatedScalarFieldContainer[KVTier]
    kv_store: str
    kv_store_capacity_blocks: int
    kv_store_hashes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, worker_id: _Optional[str] = ..., role: _Optional[_Union[WorkerRole, str]] = ..., grpc_address: _Optional[str] = ..., kv_endpoints: _Optional[_Iterable[_Union[_kv_transfer_pb2.KVEndpoint, _Mapping]]] = ..., model: _Optional[str] = ..., num_layers: _Optional[int] = ..., kv_dim: _Optional[int] = ..., block_size: _Optional[int] = ..., kv_dtype: _Optional[str] = ..., capacity: _Optional[_Union[WorkerCapacity, _Mapping]] = ..., ep_size: _Optional[int] = ..., ready: _Optional[bool] = ..., metrics_url: _Optional[str] = ..., publishes_kv_events: _Optional[bool] = ..., kv_block_hashes: _Optional[_Iterable[int]] = ..., kv_block_tiers: _Optional[_Iterable[_Union[KVTier, str]]] = ..., kv_store: _Optional[str] = ..., kv_store_capacity_blocks: _Optional[int] = ..., kv_store_hashes: _Optional[_Iterable[int]] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("heartbeat_interval_ms", "lease_ms")
    HEARTBEAT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    heartbeat_interval_ms: int
    lease_ms: int
    def __init__(self, heartbeat_interval_ms: _Optional[int] = ..., lease_ms: _Optional[int] = ...) -> None: ...

class WorkerLoad(_message.Message):
    __slots__ = ("running", "waiting", "free_blocks", "total_blocks", "prefix_query_tokens", "prefix_hit_tokens", "queued_prefill_tokens", "prefill_tokens_per_s", "prompts_computed", "decode_step_ms", "decode_step_batch", "leased_blocks", "reload_tokens_per_s")
    class ReloadTokensPerSEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    FREE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_QUERY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_HIT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    QUEUED_PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_COMPUTED_FIELD_NUMBER: _ClassVar[int]
    DECODE_STEP_MS_FIELD_NUMBER: _ClassVar[int]
    DECODE_STEP_BATCH_FIELD_NUMBER: _ClassVar[int]
    LEASED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    RELOAD_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    running: int
    waiting: int
    free_blocks: int
    total_blocks: int
    prefix_query_tokens: int
    prefix_hit_tokens: int
    queued_prefill_tokens: int
    prefill_tokens_per_s: float
    prompts_computed: int
    decode_step_ms: float
    decode_step_batch: float
    leased_blocks: int
    reload_tokens_per_s: _containers.ScalarMap[str, float]
    def __init__(self, running: _Optional[int] = ..., waiting: _Optional[int] = ..., free_blocks: _Optional[int] = ..., total_blocks: _Optional[int] = ..., prefix_query_tokens: _Optional[int] = ..., prefix_hit_tokens: _Optional[int] = ..., queued_prefill_tokens: _Optional[int] = ..., prefill_tokens_per_s: _Optional[float] = ..., prompts_computed: _Optional[int] = ..., decode_step_ms: _Optional[float] = ..., decode_step_batch: _Optional[float] = ..., leased_blocks: _Optional[int] = ..., reload_tokens_per_s: _Optional[_Mapping[str, float]] = ...) -> None: ...

class KVEvents(_message.Message):
    __slots__ = ("block_hashes", "removed", "tiers", "store_puts", "store_misses")
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    STORE_PUTS_FIELD_NUMBER: _ClassVar[int]
    STORE_MISSES_FIELD_NUMBER: _ClassVar[int]
    block_hashes: _containers.RepeatedScalarFieldContainer[int]
    removed: _containers.RepeatedScalarFieldContainer[bool]
    tiers: _containers.RepeatedScalarFieldContainer[KVTier]
    store_puts: _containers.RepeatedScalarFieldContainer[int]
    store_misses: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, block_hashes: _Optional[_Iterable[int]] = ..., removed: _Optional[_Iterable[bool]] = ..., tiers: _Optional[_Iterable[_Union[KVTier, str]]] = ..., store_puts: _Optional[_Iterable[int]] = ..., store_misses: _Optional[_Iterable[int]] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("worker_id", "load", "ready", "kv_events")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    KV_EVENTS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    load: WorkerLoad
    ready: bool
    kv_events: KVEvents
    def __init__(self, worker_id: _Optional[str] = ..., load: _Optional[_Union[WorkerLoad, _Mapping]] = ..., ready: _Optional[bool] = ..., kv_events: _Optional[_Union[KVEvents, _Mapping]] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("known",)
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    known: bool
    def __init__(self, known: _Optional[bool] = ...) -> None: ...

class DeregisterRequest(_message.Message):
    __slots__ = ("worker_id",)
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    def __init__(self, worker_id: _Optional[str] = ...) -> None: ...

class DeregisterResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
