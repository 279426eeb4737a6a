from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ChecksumKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CHECKSUM_KIND_UNSPECIFIED: _ClassVar[ChecksumKind]
    CHECKSUM_XXH3_128: _ClassVar[ChecksumKind]
    CHECKSUM_FLETCHER64_PAIR: _ClassVar[ChecksumKind]
CHECKSUM_KIND_UNSPECIFIED: ChecksumKind
CHECKSUM_XXH3_128: ChecksumKind
CHECKSUM_FLETCHER64_PAIR: ChecksumKind

class KVEndpoint(_message.Message):
    __slots__ = ("backend", "address", "payload_device", "fallback")
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_DEVICE_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_FIELD_NUMBER: _ClassVar[int]
    backend: str
    address: str
    payload_device: str
    fallback: KVEndpoint
    def __init__(self, backend: _Optional[str] = ..., address: _Optional[str] = ..., payload_device: _Optional[str] = ..., fallback: _Optional[_Union[KVEndpoint, _Mapping]] = ...) -> None: ...

class KVChunkHeader(_message.Message):
    __slots__ = ("transfer_id", "layer", "token_offset", "num_tokens", "kv_dim", "dtype", "byte_length", "checksum_kind", "checksum_lo", "checksum_hi", "traceparent")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    TOKEN_OFFSET_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    BYTE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_KIND_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_LO_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_HI_FIELD_NUMBER: _ClassVar[int]
    TRACEPARENT_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    layer: int
    token_offset: int
    num_tokens: int
    kv_dim: int
    dtype: str
    byte_length: int
    checksum_kind: ChecksumKind
    checksum_lo: int
    checksum_hi: int
    traceparent: str
    def __init__(self, transfer_id: _Optional[str] = ..., layer: _Optional[int] = ..., token_offset: _Optional[int] = ..., num_tokens: _Optional[int] = ..., kv_dim: _Optional[int] = ..., dtype: _Optional[str] = ..., byte_length: _Optional[int] = ..., checksum_kind: _Optional[_Union[ChecksumKind, str]] = ..., checksum_lo: _Optional[int] = ..., checksum_hi: _Optional[int] = ..., traceparent: _Optional[str] = ...) -> None: ...

class KVChunk(_message.Message):
    __slots__ = ("header", "payload")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    header: KVChunkHeader
    payload: bytes
    def __init__(self, header: _Optional[_Union[KVChunkHeader, _Mapping]] = ..., payload: _Optional[bytes] = ...) -> None: ...

class KVPushAck(_message.Message):
    __slots__ = ("transfer_id", "ok", "error", "layers_received", "bytes_received")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    LAYERS_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    ok: bool
    error: str
    layers_received: int
    bytes_received: int
    def __init__(self, transfer_id: _Optional[str] = ..., ok: _Optional[bool] = ..., error: _Optional[str] = ..., layers_received: _Optional[int] = ..., bytes_received: _Optional[int] = ...) -> None: ...

class KVControlFrame(_message.Message):
    __slots__ = ("chunk", "ack", "goodbye")
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    GOODBYE_FIELD_NUMBER: _ClassVar[int]
    chunk: KVChunkHeader
    ack: KVPushAck
    goodbye: bool
    def __init__(self, chunk: _Optional[_Union[KVChunkHeader, _Mapping]] = ..., ack: _Optional[_Union[KVPushAck, _Mapping]] = ..., goodbye: _Optional[bool] = ...) -> None: ...
