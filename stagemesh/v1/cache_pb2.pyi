from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class BlockStored(_message.Message):
    __slots__ = ("replica_id", "block_hashes")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    block_hashes: bytes
    def __init__(self, replica_id: _Optional[str] = ..., block_hashes: _Optional[bytes] = ...) -> None: ...

class BlockRemoved(_message.Message):
    __slots__ = ("replica_id", "block_hashes")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    block_hashes: bytes
    def __init__(self, replica_id: _Optional[str] = ..., block_hashes: _Optional[bytes] = ...) -> None: ...

class ReplicaCleared(_message.Message):
    __slots__ = ("replica_id",)
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    def __init__(self, replica_id: _Optional[str] = ...) -> None: ...

class BlockEvent(_message.Message):
    __slots__ = ("stored", "removed", "cleared")
    STORED_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    CLEARED_FIELD_NUMBER: _ClassVar[int]
    stored: BlockStored
    removed: BlockRemoved
    cleared: ReplicaCleared
    def __init__(self, stored: _Optional[_Union[BlockStored, _Mapping]] = ..., removed: _Optional[_Union[BlockRemoved, _Mapping]] = ..., cleared: _Optional[_Union[ReplicaCleared, _Mapping]] = ...) -> None: ...

class PublishRequest(_message.Message):
    __slots__ = ("hash_size_bytes", "events")
    HASH_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    hash_size_bytes: int
    events: _containers.RepeatedCompositeFieldContainer[BlockEvent]
    def __init__(self, hash_size_bytes: _Optional[int] = ..., events: _Optional[_Iterable[_Union[BlockEvent, _Mapping]]] = ...) -> None: ...

class PublishResponse(_message.Message):
    __slots__ = ("applied_events",)
    APPLIED_EVENTS_FIELD_NUMBER: _ClassVar[int]
    applied_events: int
    def __init__(self, applied_events: _Optional[int] = ...) -> None: ...

class BlockChain(_message.Message):
    __slots__ = ("block_hashes",)
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    block_hashes: bytes
    def __init__(self, block_hashes: _Optional[bytes] = ...) -> None: ...

class MatchRequest(_message.Message):
    __slots__ = ("hash_size_bytes", "chains")
    HASH_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHAINS_FIELD_NUMBER: _ClassVar[int]
    hash_size_bytes: int
    chains: _containers.RepeatedCompositeFieldContainer[BlockChain]
    def __init__(self, hash_size_bytes: _Optional[int] = ..., chains: _Optional[_Iterable[_Union[BlockChain, _Mapping]]] = ...) -> None: ...

class ReplicaOverlap(_message.Message):
    __slots__ = ("replica_id", "matched_blocks")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    MATCHED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    matched_blocks: int
    def __init__(self, replica_id: _Optional[str] = ..., matched_blocks: _Optional[int] = ...) -> None: ...

class ChainMatch(_message.Message):
    __slots__ = ("overlaps",)
    OVERLAPS_FIELD_NUMBER: _ClassVar[int]
    overlaps: _containers.RepeatedCompositeFieldContainer[ReplicaOverlap]
    def __init__(self, overlaps: _Optional[_Iterable[_Union[ReplicaOverlap, _Mapping]]] = ...) -> None: ...

class MatchResponse(_message.Message):
    __slots__ = ("chains",)
    CHAINS_FIELD_NUMBER: _ClassVar[int]
    chains: _containers.RepeatedCompositeFieldContainer[ChainMatch]
    def __init__(self, chains: _Optional[_Iterable[_Union[ChainMatch, _Mapping]]] = ...) -> None: ...

class ClearReplicaRequest(_message.Message):
    __slots__ = ("replica_id",)
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    def __init__(self, replica_id: _Optional[str] = ...) -> None: ...

class ClearReplicaResponse(_message.Message):
    __slots__ = ("removed_blocks",)
    REMOVED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    removed_blocks: int
    def __init__(self, removed_blocks: _Optional[int] = ...) -> None: ...

class GetEpochRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetEpochResponse(_message.Message):
    __slots__ = ("epoch",)
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    epoch: str
    def __init__(self, epoch: _Optional[str] = ...) -> None: ...
