from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
FLOAT16: DType
BFLOAT16: DType

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Plan(_message.Message):
    __slots__ = ("model_id", "family", "model_type", "num_layers", "hidden_size", "trunk_start", "trunk_end", "fingerprint", "config_digest", "weights_digest", "dtype", "device", "weights", "placement")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    MODEL_TYPE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    TRUNK_START_FIELD_NUMBER: _ClassVar[int]
    TRUNK_END_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    CONFIG_DIGEST_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_DIGEST_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    family: str
    model_type: str
    num_layers: int
    hidden_size: int
    trunk_start: int
    trunk_end: int
    fingerprint: str
    config_digest: str
    weights_digest: str
    dtype: DType
    device: str
    weights: str
    placement: _containers.RepeatedCompositeFieldContainer[DeviceLayers]
    def __init__(self, model_id: _Optional[str] = ..., family: _Optional[str] = ..., model_type: _Optional[str] = ..., num_layers: _Optional[int] = ..., hidden_size: _Optional[int] = ..., trunk_start: _Optional[int] = ..., trunk_end: _Optional[int] = ..., fingerprint: _Optional[str] = ..., config_digest: _Optional[str] = ..., weights_digest: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., device: _Optional[str] = ..., weights: _Optional[str] = ..., placement: _Optional[_Iterable[_Union[DeviceLayers, _Mapping]]] = ...) -> None: ...

class DeviceLayers(_message.Message):
    __slots__ = ("device", "start", "end")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    device: str
    start: int
    end: int
    def __init__(self, device: _Optional[str] = ..., start: _Optional[int] = ..., end: _Optional[int] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_sessions", "max_context", "max_message_bytes", "max_cache_bytes", "rollback_depth")
    MAX_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ROLLBACK_DEPTH_FIELD_NUMBER: _ClassVar[int]
    max_sessions: int
    max_context: int
    max_message_bytes: int
    max_cache_bytes: int
    rollback_depth: int
    def __init__(self, max_sessions: _Optional[int] = ..., max_context: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., max_cache_bytes: _Optional[int] = ..., rollback_depth: _Optional[int] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoReply(_message.Message):
    __slots__ = ("plan", "limits", "server_version", "sessions_open", "batching", "cache_allocated_bytes", "cache_used_bytes")
    PLAN_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_OPEN_FIELD_NUMBER: _ClassVar[int]
    BATCHING_FIELD_NUMBER: _ClassVar[int]
    CACHE_ALLOCATED_BYTES_FIELD_NUMBER: _ClassVar[int]
    CACHE_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    plan: Plan
    limits: Limits
    server_version: str
    sessions_open: int
    batching: Batching
    cache_allocated_bytes: int
    cache_used_bytes: int
    def __init__(self, plan: _Optional[_Union[Plan, _Mapping]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., server_version: _Optional[str] = ..., sessions_open: _Optional[int] = ..., batching: _Optional[_Union[Batching, _Mapping]] = ..., cache_allocated_bytes: _Optional[int] = ..., cache_used_bytes: _Optional[int] = ...) -> None: ...

class Batching(_message.Message):
    __slots__ = ("enabled", "batches", "batched_steps")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    BATCHED_STEPS_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    batches: int
    batched_steps: int
    def __init__(self, enabled: _Optional[bool] = ..., batches: _Optional[int] = ..., batched_steps: _Optional[int] = ...) -> None: ...

class OpenSession(_message.Message):
    __slots__ = ("fingerprint", "config_digest", "weights_digest", "trunk_start", "trunk_end", "wire_dtype", "client", "weights", "refusals_in_stream", "client_weights")
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    CONFIG_DIGEST_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_DIGEST_FIELD_NUMBER: _ClassVar[int]
    TRUNK_START_FIELD_NUMBER: _ClassVar[int]
    TRUNK_END_FIELD_NUMBER: _ClassVar[int]
    WIRE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    REFUSALS_IN_STREAM_FIELD_NUMBER: _ClassVar[int]
    CLIENT_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    fingerprint: str
    config_digest: str
    weights_digest: str
    trunk_start: int
    trunk_end: int
    wire_dtype: DType
    client: str
    weights: str
    refusals_in_stream: bool
    client_weights: str
    def __init__(self, fingerprint: _Optional[str] = ..., config_digest: _Optional[str] = ..., weights_digest: _Optional[str] = ..., trunk_start: _Optional[int] = ..., trunk_end: _Optional[int] = ..., wire_dtype: _Optional[_Union[DType, str]] = ..., client: _Optional[str] = ..., weights: _Optional[str] = ..., refusals_in_stream: _Optional[bool] = ..., client_weights: _Optional[str] = ...) -> None: ...

class Step(_message.Message):
    __slots__ = ("step_id", "position", "hidden")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    position: int
    hidden: Tensor
    def __init__(self, step_id: _Optional[int] = ..., position: _Optional[int] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class SessionRequest(_message.Message):
    __slots__ = ("open", "step")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    open: OpenSession
    step: Step
    def __init__(self, open: _Optional[_Union[OpenSession, _Mapping]] = ..., step: _Optional[_Union[Step, _Mapping]] = ...) -> None: ...

class SessionOpened(_message.Message):
    __slots__ = ("session_id", "plan")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    plan: Plan
    def __init__(self, session_id: _Optional[str] = ..., plan: _Optional[_Union[Plan, _Mapping]] = ...) -> None: ...

class StepResult(_message.Message):
    __slots__ = ("step_id", "hidden", "compute_us", "cached_length", "rollback_floor")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_US_FIELD_NUMBER: _ClassVar[int]
    CACHED_LENGTH_FIELD_NUMBER: _ClassVar[int]
    ROLLBACK_FLOOR_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    hidden: Tensor
    compute_us: int
    cached_length: int
    rollback_floor: int
    def __init__(self, step_id: _Optional[int] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., compute_us: _Optional[int] = ..., cached_length: _Optional[int] = ..., rollback_floor: _Optional[int] = ...) -> None: ...

class StepRefused(_message.Message):
    __slots__ = ("step_id", "code", "message")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    code: int
    message: str
    def __init__(self, step_id: _Optional[int] = ..., code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class SessionReply(_message.Message):
    __slots__ = ("opened", "result", "refused")
    OPENED_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    opened: SessionOpened
    result: StepResult
    refused: StepRefused
    def __init__(self, opened: _Optional[_Union[SessionOpened, _Mapping]] = ..., result: _Optional[_Union[StepResult, _Mapping]] = ..., refused: _Optional[_Union[StepRefused, _Mapping]] = ...) -> None: ...

class MonitorRequest(_message.Message):
    __slots__ = ("interval_s",)
    INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    interval_s: float
    def __init__(self, interval_s: _Optional[float] = ...) -> None: ...

class GpuSample(_message.Message):
    __slots__ = ("index", "name", "utilization_percent", "memory_used_bytes", "memory_total_bytes", "temperature_c", "power_w")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    UTILIZATION_PERCENT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_C_FIELD_NUMBER: _ClassVar[int]
    POWER_W_FIELD_NUMBER: _ClassVar[int]
    index: int
    name: str
    utilization_percent: float
    memory_used_bytes: int
    memory_total_bytes: int
    temperature_c: float
    power_w: float
    def __init__(self, index: _Optional[int] = ..., name: _Optional[str] = ..., utilization_percent: _Optional[float] = ..., memory_used_bytes: _Optional[int] = ..., memory_total_bytes: _Optional[int] = ..., temperature_c: _Optional[float] = ..., power_w: _Optional[float] = ...) -> None: ...

class MonitorSample(_message.Message):
    __slots__ = ("time", "interval_s", "cpu_percent", "load_1m", "load_5m", "load_15m", "mem_used_bytes", "mem_total_bytes", "daemon_rss_bytes", "gpus", "gpu_status", "sessions_open", "steps_queued", "steps", "tokens_per_s", "step_p50_ms", "step_p95_ms", "trunk_cache_bytes", "trunk_cache_used_bytes", "trunk_cache_budget_bytes")
    TIME_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    CPU_PERCENT_FIELD_NUMBER: _ClassVar[int]
    LOAD_1M_FIELD_NUMBER: _ClassVar[int]
    LOAD_5M_FIELD_NUMBER: _ClassVar[int]
    LOAD_15M_FIELD_NUMBER: _ClassVar[int]
    MEM_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEM_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    DAEMON_RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    GPU_STATUS_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_OPEN_FIELD_NUMBER: _ClassVar[int]
    STEPS_QUEUED_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    STEP_P50_MS_FIELD_NUMBER: _ClassVar[int]
    STEP_P95_MS_FIELD_NUMBER: _ClassVar[int]
    TRUNK_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    TRUNK_CACHE_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    TRUNK_CACHE_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    time: float
    interval_s: float
    cpu_percent: float
    load_1m: float
    load_5m: float
    load_15m: float
    mem_used_bytes: int
    mem_total_bytes: int
    daemon_rss_bytes: int
    gpus: _containers.RepeatedCompositeFieldContainer[GpuSample]
    gpu_status: str
    sessions_open: int
    steps_queued: int
    steps: int
    tokens_per_s: float
    step_p50_ms: float
    step_p95_ms: float
    trunk_cache_bytes: int
    trunk_cache_used_bytes: int
    trunk_cache_budget_bytes: int
    def __init__(self, time: _Optional[float] = ..., interval_s: _Optional[float] = ..., cpu_percent: _Optional[float] = ..., load_1m: _Optional[float] = ..., load_5m: _Optional[float] = ..., load_15m: _Optional[float] = ..., mem_used_bytes: _Optional[int] = ..., mem_total_bytes: _Optional[int] = ..., daemon_rss_bytes: _Optional[int] = ..., gpus: _Optional[_Iterable[_Union[GpuSample, _Mapping]]] = ..., gpu_status: _Optional[str] = ..., sessions_open: _Optional[int] = ..., steps_queued: _Optional[int] = ..., steps: _Optional[int] = ..., tokens_per_s: _Optional[float] = ..., step_p50_ms: _Optional[float] = ..., step_p95_ms: _Optional[float] = ..., trunk_cache_bytes: _Optional[int] = ..., trunk_cache_used_bytes: _Optional[int] = ..., trunk_cache_budget_bytes: _Optional[int] = ...) -> None: ...
