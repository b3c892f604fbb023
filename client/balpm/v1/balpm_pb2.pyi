import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.rpc import status_pb2 as _status_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FeatureSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FEATURE_SOURCE_UNSPECIFIED: _ClassVar[FeatureSource]
    FEATURE_SOURCE_CLIENT: _ClassVar[FeatureSource]
    FEATURE_SOURCE_SERVER: _ClassVar[FeatureSource]

class Strategy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STRATEGY_UNSPECIFIED: _ClassVar[Strategy]
    STRATEGY_RANDOM: _ClassVar[Strategy]
    STRATEGY_BALD: _ClassVar[Strategy]
    STRATEGY_SOFTMAX_BALD: _ClassVar[Strategy]
    STRATEGY_POWER_BALD: _ClassVar[Strategy]
    STRATEGY_SOFTRANK_BALD: _ClassVar[Strategy]
    STRATEGY_BALPM: _ClassVar[Strategy]
    STRATEGY_ENTROPY_ONLY: _ClassVar[Strategy]
    STRATEGY_APL_CERTAINTY: _ClassVar[Strategy]
    STRATEGY_APL_ENTROPY: _ClassVar[Strategy]
    STRATEGY_APL_HYBRID: _ClassVar[Strategy]

class Preference(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PREFERENCE_UNSPECIFIED: _ClassVar[Preference]
    PREFERENCE_A: _ClassVar[Preference]
    PREFERENCE_B: _ClassVar[Preference]
    PREFERENCE_TIE: _ClassVar[Preference]

class Split(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SPLIT_UNSPECIFIED: _ClassVar[Split]
    SPLIT_POOL: _ClassVar[Split]
    SPLIT_HELDOUT: _ClassVar[Split]

class PosteriorKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    POSTERIOR_KIND_UNSPECIFIED: _ClassVar[PosteriorKind]
    POSTERIOR_KIND_MLP_ENSEMBLE: _ClassVar[PosteriorKind]
    POSTERIOR_KIND_LORA_ENSEMBLE: _ClassVar[PosteriorKind]

class KnnConvention(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KNN_CONVENTION_UNSPECIFIED: _ClassVar[KnnConvention]
    KNN_CONVENTION_STANDARD: _ClassVar[KnnConvention]
    KNN_CONVENTION_AUTHORS: _ClassVar[KnnConvention]

class FeatureStorage(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FEATURE_STORAGE_UNSPECIFIED: _ClassVar[FeatureStorage]
    FEATURE_STORAGE_FLOAT32: _ClassVar[FeatureStorage]
    FEATURE_STORAGE_FLOAT16: _ClassVar[FeatureStorage]
FEATURE_SOURCE_UNSPECIFIED: FeatureSource
FEATURE_SOURCE_CLIENT: FeatureSource
FEATURE_SOURCE_SERVER: FeatureSource
STRATEGY_UNSPECIFIED: Strategy
STRATEGY_RANDOM: Strategy
STRATEGY_BALD: Strategy
STRATEGY_SOFTMAX_BALD: Strategy
STRATEGY_POWER_BALD: Strategy
STRATEGY_SOFTRANK_BALD: Strategy
STRATEGY_BALPM: Strategy
STRATEGY_ENTROPY_ONLY: Strategy
STRATEGY_APL_CERTAINTY: Strategy
STRATEGY_APL_ENTROPY: Strategy
STRATEGY_APL_HYBRID: Strategy
PREFERENCE_UNSPECIFIED: Preference
PREFERENCE_A: Preference
PREFERENCE_B: Preference
PREFERENCE_TIE: Preference
SPLIT_UNSPECIFIED: Split
SPLIT_POOL: Split
SPLIT_HELDOUT: Split
POSTERIOR_KIND_UNSPECIFIED: PosteriorKind
POSTERIOR_KIND_MLP_ENSEMBLE: PosteriorKind
POSTERIOR_KIND_LORA_ENSEMBLE: PosteriorKind
KNN_CONVENTION_UNSPECIFIED: KnnConvention
KNN_CONVENTION_STANDARD: KnnConvention
KNN_CONVENTION_AUTHORS: KnnConvention
FEATURE_STORAGE_UNSPECIFIED: FeatureStorage
FEATURE_STORAGE_FLOAT32: FeatureStorage
FEATURE_STORAGE_FLOAT16: FeatureStorage

class PoolSettings(_message.Message):
    __slots__ = ("feature_source", "feature_dim", "ensemble_size", "hidden_sizes", "knn_k", "beta", "d_ent", "default_strategy", "standardize_features", "labels_per_item", "epochs", "posterior_kind", "lora_model_path", "temperature", "apl_beta_dpo", "apl_policy_model_path", "apl_reference_model_path", "knn_convention", "auto_update_min_labels", "auto_update_interval_s", "bootstrap", "patience", "val_fraction", "train_batch_size", "learning_rate", "weight_decay", "control_fraction", "stop_slope_per_1k", "feature_storage")
    FEATURE_SOURCE_FIELD_NUMBER: _ClassVar[int]
    FEATURE_DIM_FIELD_NUMBER: _ClassVar[int]
    ENSEMBLE_SIZE_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZES_FIELD_NUMBER: _ClassVar[int]
    KNN_K_FIELD_NUMBER: _ClassVar[int]
    BETA_FIELD_NUMBER: _ClassVar[int]
    D_ENT_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_STRATEGY_FIELD_NUMBER: _ClassVar[int]
    STANDARDIZE_FEATURES_FIELD_NUMBER: _ClassVar[int]
    LABELS_PER_ITEM_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    POSTERIOR_KIND_FIELD_NUMBER: _ClassVar[int]
    LORA_MODEL_PATH_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    APL_BETA_DPO_FIELD_NUMBER: _ClassVar[int]
    APL_POLICY_MODEL_PATH_FIELD_NUMBER: _ClassVar[int]
    APL_REFERENCE_MODEL_PATH_FIELD_NUMBER: _ClassVar[int]
    KNN_CONVENTION_FIELD_NUMBER: _ClassVar[int]
    AUTO_UPDATE_MIN_LABELS_FIELD_NUMBER: _ClassVar[int]
    AUTO_UPDATE_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    BOOTSTRAP_FIELD_NUMBER: _ClassVar[int]
    PATIENCE_FIELD_NUMBER: _ClassVar[int]
    VAL_FRACTION_FIELD_NUMBER: _ClassVar[int]
    TRAIN_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    CONTROL_FRACTION_FIELD_NUMBER: _ClassVar[int]
    STOP_SLOPE_PER_1K_FIELD_NUMBER: _ClassVar[int]
    FEATURE_STORAGE_FIELD_NUMBER: _ClassVar[int]
    feature_source: FeatureSource
    feature_dim: int
    ensemble_size: int
    hidden_sizes: _containers.RepeatedScalarFieldContainer[int]
    knn_k: int
    beta: float
    d_ent: float
    default_strategy: Strategy
    standardize_features: bool
    labels_per_item: int
    epochs: int
    posterior_kind: PosteriorKind
    lora_model_path: str
    temperature: float
    apl_beta_dpo: float
    apl_policy_model_path: str
    apl_reference_model_path: str
    knn_convention: KnnConvention
    auto_update_min_labels: int
    auto_update_interval_s: float
    bootstrap: bool
    patience: int
    val_fraction: float
    train_batch_size: int
    learning_rate: float
    weight_decay: float
    control_fraction: float
    stop_slope_per_1k: float
    feature_storage: FeatureStorage
    def __init__(self, feature_source: _Optional[_Union[FeatureSource, str]] = ..., feature_dim: _Optional[int] = ..., ensemble_size: _Optional[int] = ..., hidden_sizes: _Optional[_Iterable[int]] = ..., knn_k: _Optional[int] = ..., beta: _Optional[float] = ..., d_ent: _Optional[float] = ..., default_strategy: _Optional[_Union[Strategy, str]] = ..., standardize_features: _Optional[bool] = ..., labels_per_item: _Optional[int] = ..., epochs: _Optional[int] = ..., posterior_kind: _Optional[_Union[PosteriorKind, str]] = ..., lora_model_path: _Optional[str] = ..., temperature: _Optional[float] = ..., apl_beta_dpo: _Optional[float] = ..., apl_policy_model_path: _Optional[str] = ..., apl_reference_model_path: _Optional[str] = ..., knn_convention: _Optional[_Union[KnnConvention, str]] = ..., auto_update_min_labels: _Optional[int] = ..., auto_update_interval_s: _Optional[float] = ..., bootstrap: _Optional[bool] = ..., patience: _Optional[int] = ..., val_fraction: _Optional[float] = ..., train_batch_size: _Optional[int] = ..., learning_rate: _Optional[float] = ..., weight_decay: _Optional[float] = ..., control_fraction: _Optional[float] = ..., stop_slope_per_1k: _Optional[float] = ..., feature_storage: _Optional[_Union[FeatureStorage, str]] = ...) -> None: ...

class Pool(_message.Message):
    __slots__ = ("pool_id", "settings", "state", "item_count", "heldout_count", "label_count", "labelled_item_count", "leased_item_count", "posterior_version", "featurized_count", "extractor", "create_time", "featurization_pause", "excluded_count")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[Pool.State]
        STATE_READY: _ClassVar[Pool.State]
        STATE_FEATURIZING: _ClassVar[Pool.State]
    STATE_UNSPECIFIED: Pool.State
    STATE_READY: Pool.State
    STATE_FEATURIZING: Pool.State
    POOL_ID_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ITEM_COUNT_FIELD_NUMBER: _ClassVar[int]
    HELDOUT_COUNT_FIELD_NUMBER: _ClassVar[int]
    LABEL_COUNT_FIELD_NUMBER: _ClassVar[int]
    LABELLED_ITEM_COUNT_FIELD_NUMBER: _ClassVar[int]
    LEASED_ITEM_COUNT_FIELD_NUMBER: _ClassVar[int]
    POSTERIOR_VERSION_FIELD_NUMBER: _ClassVar[int]
    FEATURIZED_COUNT_FIELD_NUMBER: _ClassVar[int]
    EXTRACTOR_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    FEATURIZATION_PAUSE_FIELD_NUMBER: _ClassVar[int]
    EXCLUDED_COUNT_FIELD_NUMBER: _ClassVar[int]
    pool_id: str
    settings: PoolSettings
    state: Pool.State
    item_count: int
    heldout_count: int
    label_count: int
    labelled_item_count: int
    leased_item_count: int
    posterior_version: int
    featurized_count: int
    extractor: str
    create_time: _timestamp_pb2.Timestamp
    featurization_pause: FeaturizationPause
    excluded_count: int
    def __init__(self, pool_id: _Optional[str] = ..., settings: _Optional[_Union[PoolSettings, _Mapping]] = ..., state: _Optional[_Union[Pool.State, str]] = ..., item_count: _Optional[int] = ..., heldout_count: _Optional[int] = ..., label_count: _Optional[int] = ..., labelled_item_count: _Optional[int] = ..., leased_item_count: _Optional[int] = ..., posterior_version: _Optional[int] = ..., featurized_count: _Optional[int] = ..., extractor: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., featurization_pause: _Optional[_Union[FeaturizationPause, _Mapping]] = ..., excluded_count: _Optional[int] = ...) -> None: ...

class FeaturizationPause(_message.Message):
    __slots__ = ("reason", "message", "paused_since", "next_retry_time", "attempts")
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    PAUSED_SINCE_FIELD_NUMBER: _ClassVar[int]
    NEXT_RETRY_TIME_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    reason: str
    message: str
    paused_since: _timestamp_pb2.Timestamp
    next_retry_time: _timestamp_pb2.Timestamp
    attempts: int
    def __init__(self, reason: _Optional[str] = ..., message: _Optional[str] = ..., paused_since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., next_retry_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., attempts: _Optional[int] = ...) -> None: ...

class CreatePoolRequest(_message.Message):
    __slots__ = ("pool_id", "settings")
    POOL_ID_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    pool_id: str
    settings: PoolSettings
    def __init__(self, pool_id: _Optional[str] = ..., settings: _Optional[_Union[PoolSettings, _Mapping]] = ...) -> None: ...

class CreatePoolResponse(_message.Message):
    __slots__ = ("pool",)
    POOL_FIELD_NUMBER: _ClassVar[int]
    pool: Pool
    def __init__(self, pool: _Optional[_Union[Pool, _Mapping]] = ...) -> None: ...

class GetPoolRequest(_message.Message):
    __slots__ = ("pool_id",)
    POOL_ID_FIELD_NUMBER: _ClassVar[int]
    pool_id: str
    def __init__(self, pool_id: _Optional[str] = ...) -> None: ...

class GetPoolResponse(_message.Message):
    __slots__ = ("pool",)
    POOL_FIELD_NUMBER: _ClassVar[int]
    pool: Pool
    def __init__(self, pool: _Optional[_Union[Pool, _Mapping]] = ...) -> None: ...

class ListPoolsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListPoolsResponse(_message.Message):
    __slots__ = ("pools", "next_page_token")
    POOLS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    pools: _containers.RepeatedCompositeFieldContainer[Pool]
    next_page_token: str
    def __init__(self, pools: _Optional[_Iterable[_Union[Pool, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DeletePoolRequest(_message.Message):
    __slots__ = ("pool_id",)
    POOL_ID_FIELD_NUMBER: _ClassVar[int]
    pool_id: str
    def __init__(self, pool_id: _Optional[str] = ...) -> None: ...

class DeletePoolResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AplScores(_message.Message):
    __slots__ = ("logp_policy_a", "logp_policy_b", "logp_ref_a", "logp_ref_b", "predictive_entropy")
    LOGP_POLICY_A_FIELD_NUMBER: _ClassVar[int]
    LOGP_POLICY_B_FIELD_NUMBER: _ClassVar[int]
    LOGP_REF_A_FIELD_NUMBER: _ClassVar[int]
    LOGP_REF_B_FIELD_NUMBER: _ClassVar[int]
    PREDICTIVE_ENTROPY_FIELD_NUMBER: _ClassVar[int]
    logp_policy_a: float
    logp_policy_b: float
    logp_ref_a: float
    logp_ref_b: float
    predictive_entropy: float
    def __init__(self, logp_policy_a: _Optional[float] = ..., logp_policy_b: _Optional[float] = ..., logp_ref_a: _Optional[float] = ..., logp_ref_b: _Optional[float] = ..., predictive_entropy: _Optional[float] = ...) -> None: ...

class Item(_message.Message):
    __slots__ = ("item_id", "prompt", "completion_a", "completion_b", "prompt_features", "completion_a_features", "completion_b_features", "split", "heldout_preference", "apl_scores")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_A_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_B_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FEATURES_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_A_FEATURES_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_B_FEATURES_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    HELDOUT_PREFERENCE_FIELD_NUMBER: _ClassVar[int]
    APL_SCORES_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    prompt: str
    completion_a: str
    completion_b: str
    prompt_features: _containers.RepeatedScalarFieldContainer[float]
    completion_a_features: _containers.RepeatedScalarFieldContainer[float]
    completion_b_features: _containers.RepeatedScalarFieldContainer[float]
    split: Split
    heldout_preference: Preference
    apl_scores: AplScores
    def __init__(self, item_id: _Optional[str] = ..., prompt: _Optional[str] = ..., completion_a: _Optional[str] = ..., completion_b: _Optional[str] = ..., prompt_features: _Optional[_Iterable[float]] = ..., completion_a_features: _Optional[_Iterable[float]] = ..., completion_b_features: _Optional[_Iterable[float]] = ..., split: _Optional[_Union[Split, str]] = ..., heldout_preference: _Optional[_Union[Preference, str]] = ..., apl_scores: _Optional[_Union[AplScores, _Mapping]] = ...) -> None: ...

class UploadHeader(_message.Message):
    __slots__ = ("pool_id",)
    POOL_ID_FIELD_NUMBER: _ClassVar[int]
    pool_id: str
    def __init__(self, pool_id: _Optional[str] = ...) -> None: ...

class ItemChunk(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[Item]
    def __init__(self, items: _Optional[_Iterable[_Union[Item, _Mapping]]] = ...) -> None: ...

class UploadItemsRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: UploadHeader
    chunk: ItemChunk
    def __init__(self, header: _Optional[_Union[UploadHeader, _Mapping]] = ..., chunk: _Optional[_Union[ItemChunk, _Mapping]] = ...) -> None: ...

class Rejection(_message.Message):
    __slots__ = ("id", "index", "field", "reason", "message")
    ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    id: str
    index: int
    field: str
    reason: str
    message: str
    def __init__(self, id: _Optional[str] = ..., index: _Optional[int] = ..., field: _Optional[str] = ..., reason: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class UploadItemsResponse(_message.Message):
    __slots__ = ("accepted_count", "duplicate_count", "rejections", "pool")
    ACCEPTED_COUNT_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_COUNT_FIELD_NUMBER: _ClassVar[int]
    REJECTIONS_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    accepted_count: int
    duplicate_count: int
    rejections: _containers.RepeatedCompositeFieldContainer[Rejection]
    pool: Pool
    def __init__(self, accepted_count: _Optional[int] = ..., duplicate_count: _Optional[int] = ..., rejections: _Optional[_Iterable[_Union[Rejection, _Mapping]]] = ..., pool: _Optional[_Union[Pool, _Mapping]] = ...) -> None: ...

class Label(_message.Message):
    __slots__ = ("label_id", "item_id", "preference", "annotator_id", "replaces_label_id")
    LABEL_ID_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    PREFERENCE_FIELD_NUMBER: _ClassVar[int]
    ANNOTATOR_ID_FIELD_NUMBER: _ClassVar[int]
    REPLACES_LABEL_ID_FIELD_NUMBER: _ClassVar[int]
    label_id: str
    item_id: str
    preference: Preference
    annotator_id: str
    replaces_label_id: str
    def __init__(self, label_id: _Optional[str] = ..., item_id: _Optional[str] = ..., preference: _Optional[_Union[Preference, str]] = ..., annotator_id: _Optional[str] = ..., replaces_label_id: _Optional[str] = ...) -> None: ...

class IngestLabelsRequest(_message.Message):
    __slots__ = ("pool_id", "labels", "request_id")
    POOL_ID_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    pool_id: str
    labels: _containers.RepeatedCompositeFieldContainer[Label]
    request_id: str
    def __init__(self, pool_id: _Optional[str] = ..., labels: _Optional[_Iterable[_Union[Label, _Mapping]]] = ..., request_id: _Optional[str] = ...) -> None: ...

class IngestLabelsResponse(_message.Message):
    __slots__ = ("stored_count", "duplicate_count", "label_count", "auto_update_operation_id")
    STORED_COUNT_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_COUNT_FIELD_NUMBER: _ClassVar[int]
    LABEL_COUNT_FIELD_NUMBER: _ClassVar[int]
    AUTO_UPDATE_OPERATION_ID_FIELD_NUMBER: _ClassVar[int]
    stored_count: int
    duplicate_count: int
    label_count: int
    auto_update_operation_id: str
    def __init__(self, stored_count: _Optional[int] = ..., duplicate_count: _Optional[int] = ..., label_count: _Optional[int] = ..., auto_update_operation_id: _Optional[str] = ...) -> None: ...

class UpdatePosteriorRequest(_message.Message):
    __slots__ = ("pool_id", "seed", "warm_start", "epochs")
    POOL_ID_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    WARM_START_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    pool_id: str
    seed: int
    warm_start: bool
    epochs: int
    def __init__(self, pool_id: _Optional[str] = ..., seed: _Optional[int] = ..., warm_start: _Optional[bool] = ..., epochs: _Optional[int] = ...) -> None: ...

class UpdatePosteriorResponse(_message.Message):
    __slots__ = ("operation",)
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    operation: Operation
    def __init__(self, operation: _Optional[_Union[Operation, _Mapping]] = ...) -> None: ...

class TrainingProgress(_message.Message):
    __slots__ = ("epoch", "epochs", "train_loss", "val_log_likelihood")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    VAL_LOG_LIKELIHOOD_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    epochs: int
    train_loss: float
    val_log_likelihood: float
    def __init__(self, epoch: _Optional[int] = ..., epochs: _Optional[int] = ..., train_loss: _Optional[float] = ..., val_log_likelihood: _Optional[float] = ...) -> None: ...

class TrainingResult(_message.Message):
    __slots__ = ("posterior_version", "label_count", "val_log_likelihood", "train_s", "epochs_run")
    POSTERIOR_VERSION_FIELD_NUMBER: _ClassVar[int]
    LABEL_COUNT_FIELD_NUMBER: _ClassVar[int]
    VAL_LOG_LIKELIHOOD_FIELD_NUMBER: _ClassVar[int]
    TRAIN_S_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_RUN_FIELD_NUMBER: _ClassVar[int]
    posterior_version: int
    label_count: int
    val_log_likelihood: float
    train_s: float
    epochs_run: int
    def __init__(self, posterior_version: _Optional[int] = ..., label_count: _Optional[int] = ..., val_log_likelihood: _Optional[float] = ..., train_s: _Optional[float] = ..., epochs_run: _Optional[int] = ...) -> None: ...

class Operation(_message.Message):
    __slots__ = ("operation_id", "pool_id", "state", "done", "progress", "result", "error", "create_time", "update_time")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[Operation.State]
        STATE_PENDING: _ClassVar[Operation.State]
        STATE_RUNNING: _ClassVar[Operation.State]
        STATE_SUCCEEDED: _ClassVar[Operation.State]
        STATE_FAILED: _ClassVar[Operation.State]
        STATE_CANCELLED: _ClassVar[Operation.State]
    STATE_UNSPECIFIED: Operation.State
    STATE_PENDING: Operation.State
    STATE_RUNNING: Operation.State
    STATE_SUCCEEDED: Operation.State
    STATE_FAILED: Operation.State
    STATE_CANCELLED: Operation.State
    OPERATION_ID_FIELD_NUMBER: _ClassVar[int]
    POOL_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    operation_id: str
    pool_id: str
    state: Operation.State
    done: bool
    progress: TrainingProgress
    result: TrainingResult
    error: _status_pb2.Status
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    def __init__(self, operation_id: _Optional[str] = ..., pool_id: _Optional[str] = ..., state: _Optional[_Union[Operation.State, str]] = ..., done: _Optional[bool] = ..., progress: _Optional[_Union[TrainingProgress, _Mapping]] = ..., result: _Optional[_Union[TrainingResult, _Mapping]] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class GetOperationRequest(_message.Message):
    __slots__ = ("operation_id",)
    OPERATION_ID_FIELD_NUMBER: _ClassVar[int]
    operation_id: str
    def __init__(self, operation_id: _Optional[str] = ...) -> None: ...

class GetOperationResponse(_message.Message):
    __slots__ = ("operation",)
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    operation: Operation
    def __init__(self, operation: _Optional[_Union[Operation, _Mapping]] = ...) -> None: ...

class WatchOperationRequest(_message.Message):
    __slots__ = ("operation_id",)
    OPERATION_ID_FIELD_NUMBER: _ClassVar[int]
    operation_id: str
    def __init__(self, operation_id: _Optional[str] = ...) -> None: ...

class WatchOperationResponse(_message.Message):
    __slots__ = ("operation",)
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    operation: Operation
    def __init__(self, operation: _Optional[_Union[Operation, _Mapping]] = ...) -> None: ...

class CancelOperationRequest(_message.Message):
    __slots__ = ("operation_id",)
    OPERATION_ID_FIELD_NUMBER: _ClassVar[int]
    operation_id: str
    def __init__(self, operation_id: _Optional[str] = ...) -> None: ...

class CancelOperationResponse(_message.Message):
    __slots__ = ("operation",)
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    operation: Operation
    def __init__(self, operation: _Optional[_Union[Operation, _Mapping]] = ...) -> None: ...

class StrategyOptions(_message.Message):
    __slots__ = ("beta", "d_ent", "temperature", "apl_entropy_top_s", "apl_beta_dpo")
    BETA_FIELD_NUMBER: _ClassVar[int]
    D_ENT_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    APL_ENTROPY_TOP_S_FIELD_NUMBER: _ClassVar[int]
    APL_BETA_DPO_FIELD_NUMBER: _ClassVar[int]
    beta: float
    d_ent: float
    temperature: float
    apl_entropy_top_s: int
    apl_beta_dpo: float
    def __init__(self, beta: _Optional[float] = ..., d_ent: _Optional[float] = ..., temperature: _Optional[float] = ..., apl_entropy_top_s: _Optional[int] = ..., apl_beta_dpo: _Optional[float] = ...) -> None: ...

class AcquireBatchRequest(_message.Message):
    __slots__ = ("pool_id", "batch_size", "strategy", "seed", "lease_ttl_s", "annotator_id", "options")
    POOL_ID_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    LEASE_TTL_S_FIELD_NUMBER: _ClassVar[int]
    ANNOTATOR_ID_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    pool_id: str
    batch_size: int
    strategy: Strategy
    seed: int
    lease_ttl_s: float
    annotator_id: str
    options: StrategyOptions
    def __init__(self, pool_id: _Optional[str] = ..., batch_size: _Optional[int] = ..., strategy: _Optional[_Union[Strategy, str]] = ..., seed: _Optional[int] = ..., lease_ttl_s: _Optional[float] = ..., annotator_id: _Optional[str] = ..., options: _Optional[_Union[StrategyOptions, _Mapping]] = ...) -> None: ...

class ScoreComponents(_message.Message):
    __slots__ = ("total", "epistemic", "entropy")
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    EPISTEMIC_FIELD_NUMBER: _ClassVar[int]
    ENTROPY_FIELD_NUMBER: _ClassVar[int]
    total: float
    epistemic: float
    entropy: float
    def __init__(self, total: _Optional[float] = ..., epistemic: _Optional[float] = ..., entropy: _Optional[float] = ...) -> None: ...

class AcquiredItem(_message.Message):
    __slots__ = ("item", "scores", "rank", "control")
    ITEM_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    CONTROL_FIELD_NUMBER: _ClassVar[int]
    item: Item
    scores: ScoreComponents
    rank: int
    control: bool
    def __init__(self, item: _Optional[_Union[Item, _Mapping]] = ..., scores: _Optional[_Union[ScoreComponents, _Mapping]] = ..., rank: _Optional[int] = ..., control: _Optional[bool] = ...) -> None: ...

class AcquireBatchResponse(_message.Message):
    __slots__ = ("items", "posterior_version", "strategy", "lease_expire_time", "acquire_s")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    POSTERIOR_VERSION_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    ACQUIRE_S_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[AcquiredItem]
    posterior_version: int
    strategy: Strategy
    lease_expire_time: _timestamp_pb2.Timestamp
    acquire_s: float
    def __init__(self, items: _Optional[_Iterable[_Union[AcquiredItem, _Mapping]]] = ..., posterior_version: _Optional[int] = ..., strategy: _Optional[_Union[Strategy, str]] = ..., lease_expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., acquire_s: _Optional[float] = ...) -> None: ...

class ReleaseItemsRequest(_message.Message):
    __slots__ = ("pool_id", "item_ids", "annotator_id")
    POOL_ID_FIELD_NUMBER: _ClassVar[int]
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    ANNOTATOR_ID_FIELD_NUMBER: _ClassVar[int]
    pool_id: str
    item_ids: _containers.RepeatedScalarFieldContainer[str]
    annotator_id: str
    def __init__(self, pool_id: _Optional[str] = ..., item_ids: _Optional[_Iterable[str]] = ..., annotator_id: _Optional[str] = ...) -> None: ...

class ReleaseItemsResponse(_message.Message):
    __slots__ = ("released_count",)
    RELEASED_COUNT_FIELD_NUMBER: _ClassVar[int]
    released_count: int
    def __init__(self, released_count: _Optional[int] = ...) -> None: ...

class ExcludeItemsRequest(_message.Message):
    __slots__ = ("pool_id", "item_ids", "include")
    POOL_ID_FIELD_NUMBER: _ClassVar[int]
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_FIELD_NUMBER: _ClassVar[int]
    pool_id: str
    item_ids: _containers.RepeatedScalarFieldContainer[str]
    include: bool
    def __init__(self, pool_id: _Optional[str] = ..., item_ids: _Optional[_Iterable[str]] = ..., include: _Optional[bool] = ...) -> None: ...

class ExcludeItemsResponse(_message.Message):
    __slots__ = ("changed_count", "excluded_count")
    CHANGED_COUNT_FIELD_NUMBER: _ClassVar[int]
    EXCLUDED_COUNT_FIELD_NUMBER: _ClassVar[int]
    changed_count: int
    excluded_count: int
    def __init__(self, changed_count: _Optional[int] = ..., excluded_count: _Optional[int] = ...) -> None: ...

class ItemScores(_message.Message):
    __slots__ = ("item_id", "apl_scores")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    APL_SCORES_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    apl_scores: AplScores
    def __init__(self, item_id: _Optional[str] = ..., apl_scores: _Optional[_Union[AplScores, _Mapping]] = ...) -> None: ...

class UpdateItemScoresRequest(_message.Message):
    __slots__ = ("pool_id", "scores")
    POOL_ID_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    pool_id: str
    scores: _containers.RepeatedCompositeFieldContainer[ItemScores]
    def __init__(self, pool_id: _Optional[str] = ..., scores: _Optional[_Iterable[_Union[ItemScores, _Mapping]]] = ...) -> None: ...

class UpdateItemScoresResponse(_message.Message):
    __slots__ = ("updated_count",)
    UPDATED_COUNT_FIELD_NUMBER: _ClassVar[int]
    updated_count: int
    def __init__(self, updated_count: _Optional[int] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("pool_id", "item_ids", "items")
    POOL_ID_FIELD_NUMBER: _ClassVar[int]
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    pool_id: str
    item_ids: _containers.RepeatedScalarFieldContainer[str]
    items: _containers.RepeatedCompositeFieldContainer[Item]
    def __init__(self, pool_id: _Optional[str] = ..., item_ids: _Optional[_Iterable[str]] = ..., items: _Optional[_Iterable[_Union[Item, _Mapping]]] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("item_id", "prob_a", "epistemic", "aleatoric", "member_probs")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    PROB_A_FIELD_NUMBER: _ClassVar[int]
    EPISTEMIC_FIELD_NUMBER: _ClassVar[int]
    ALEATORIC_FIELD_NUMBER: _ClassVar[int]
    MEMBER_PROBS_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    prob_a: float
    epistemic: float
    aleatoric: float
    member_probs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, item_id: _Optional[str] = ..., prob_a: _Optional[float] = ..., epistemic: _Optional[float] = ..., aleatoric: _Optional[float] = ..., member_probs: _Optional[_Iterable[float]] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("predictions", "posterior_version")
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    POSTERIOR_VERSION_FIELD_NUMBER: _ClassVar[int]
    predictions: _containers.RepeatedCompositeFieldContainer[Prediction]
    posterior_version: int
    def __init__(self, predictions: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ..., posterior_version: _Optional[int] = ...) -> None: ...

class LabelledItem(_message.Message):
    __slots__ = ("item", "preference")
    ITEM_FIELD_NUMBER: _ClassVar[int]
    PREFERENCE_FIELD_NUMBER: _ClassVar[int]
    item: Item
    preference: Preference
    def __init__(self, item: _Optional[_Union[Item, _Mapping]] = ..., preference: _Optional[_Union[Preference, str]] = ...) -> None: ...

class EvaluateRequest(_message.Message):
    __slots__ = ("pool_id", "items")
    POOL_ID_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    pool_id: str
    items: _containers.RepeatedCompositeFieldContainer[LabelledItem]
    def __init__(self, pool_id: _Optional[str] = ..., items: _Optional[_Iterable[_Union[LabelledItem, _Mapping]]] = ...) -> None: ...

class EvaluateResponse(_message.Message):
    __slots__ = ("log_likelihood", "accuracy", "brier", "ece", "mean_epistemic", "count", "posterior_version")
    LOG_LIKELIHOOD_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    BRIER_FIELD_NUMBER: _ClassVar[int]
    ECE_FIELD_NUMBER: _ClassVar[int]
    MEAN_EPISTEMIC_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    POSTERIOR_VERSION_FIELD_NUMBER: _ClassVar[int]
    log_likelihood: float
    accuracy: float
    brier: float
    ece: float
    mean_epistemic: float
    count: int
    posterior_version: int
    def __init__(self, log_likelihood: _Optional[float] = ..., accuracy: _Optional[float] = ..., brier: _Optional[float] = ..., ece: _Optional[float] = ..., mean_epistemic: _Optional[float] = ..., count: _Optional[int] = ..., posterior_version: _Optional[int] = ...) -> None: ...

class ExportLabelsRequest(_message.Message):
    __slots__ = ("pool_id", "page_size", "page_token")
    POOL_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    pool_id: str
    page_size: int
    page_token: str
    def __init__(self, pool_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ExportedLabel(_message.Message):
    __slots__ = ("label", "item", "create_time", "control", "superseded_by")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    ITEM_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    CONTROL_FIELD_NUMBER: _ClassVar[int]
    SUPERSEDED_BY_FIELD_NUMBER: _ClassVar[int]
    label: Label
    item: Item
    create_time: _timestamp_pb2.Timestamp
    control: bool
    superseded_by: str
    def __init__(self, label: _Optional[_Union[Label, _Mapping]] = ..., item: _Optional[_Union[Item, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., control: _Optional[bool] = ..., superseded_by: _Optional[str] = ...) -> None: ...

class ExportLabelsResponse(_message.Message):
    __slots__ = ("labels", "next_page_token")
    LABELS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    labels: _containers.RepeatedCompositeFieldContainer[ExportedLabel]
    next_page_token: str
    def __init__(self, labels: _Optional[_Iterable[_Union[ExportedLabel, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ExportItemsRequest(_message.Message):
    __slots__ = ("pool_id", "page_size", "page_token", "include_features", "split")
    POOL_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_FEATURES_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    pool_id: str
    page_size: int
    page_token: str
    include_features: bool
    split: Split
    def __init__(self, pool_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., include_features: _Optional[bool] = ..., split: _Optional[_Union[Split, str]] = ...) -> None: ...

class ExportItemsResponse(_message.Message):
    __slots__ = ("items", "next_page_token")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[Item]
    next_page_token: str
    def __init__(self, items: _Optional[_Iterable[_Union[Item, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetLearningCurveRequest(_message.Message):
    __slots__ = ("pool_id", "next_batch_size")
    POOL_ID_FIELD_NUMBER: _ClassVar[int]
    NEXT_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    pool_id: str
    next_batch_size: int
    def __init__(self, pool_id: _Optional[str] = ..., next_batch_size: _Optional[int] = ...) -> None: ...

class LearningCurvePoint(_message.Message):
    __slots__ = ("label_count", "posterior_version", "eval_count", "log_likelihood", "log_likelihood_stderr", "accuracy")
    LABEL_COUNT_FIELD_NUMBER: _ClassVar[int]
    POSTERIOR_VERSION_FIELD_NUMBER: _ClassVar[int]
    EVAL_COUNT_FIELD_NUMBER: _ClassVar[int]
    LOG_LIKELIHOOD_FIELD_NUMBER: _ClassVar[int]
    LOG_LIKELIHOOD_STDERR_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    label_count: int
    posterior_version: int
    eval_count: int
    log_likelihood: float
    log_likelihood_stderr: float
    accuracy: float
    def __init__(self, label_count: _Optional[int] = ..., posterior_version: _Optional[int] = ..., eval_count: _Optional[int] = ..., log_likelihood: _Optional[float] = ..., log_likelihood_stderr: _Optional[float] = ..., accuracy: _Optional[float] = ...) -> None: ...

class SavingsEstimate(_message.Message):
    __slots__ = ("estimable", "reason", "control_labels_needed", "labels_saved_share", "labels_saved_share_low", "labels_saved_share_high", "random_label_count", "active_label_count", "log_likelihood")
    ESTIMABLE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CONTROL_LABELS_NEEDED_FIELD_NUMBER: _ClassVar[int]
    LABELS_SAVED_SHARE_FIELD_NUMBER: _ClassVar[int]
    LABELS_SAVED_SHARE_LOW_FIELD_NUMBER: _ClassVar[int]
    LABELS_SAVED_SHARE_HIGH_FIELD_NUMBER: _ClassVar[int]
    RANDOM_LABEL_COUNT_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_LABEL_COUNT_FIELD_NUMBER: _ClassVar[int]
    LOG_LIKELIHOOD_FIELD_NUMBER: _ClassVar[int]
    estimable: bool
    reason: str
    control_labels_needed: int
    labels_saved_share: float
    labels_saved_share_low: float
    labels_saved_share_high: float
    random_label_count: int
    active_label_count: float
    log_likelihood: float
    def __init__(self, estimable: _Optional[bool] = ..., reason: _Optional[str] = ..., control_labels_needed: _Optional[int] = ..., labels_saved_share: _Optional[float] = ..., labels_saved_share_low: _Optional[float] = ..., labels_saved_share_high: _Optional[float] = ..., random_label_count: _Optional[int] = ..., active_label_count: _Optional[float] = ..., log_likelihood: _Optional[float] = ...) -> None: ...

class LogLikelihoodGain(_message.Message):
    __slots__ = ("estimable", "reason", "label_count", "gain", "gain_low", "gain_high")
    ESTIMABLE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    LABEL_COUNT_FIELD_NUMBER: _ClassVar[int]
    GAIN_FIELD_NUMBER: _ClassVar[int]
    GAIN_LOW_FIELD_NUMBER: _ClassVar[int]
    GAIN_HIGH_FIELD_NUMBER: _ClassVar[int]
    estimable: bool
    reason: str
    label_count: int
    gain: float
    gain_low: float
    gain_high: float
    def __init__(self, estimable: _Optional[bool] = ..., reason: _Optional[str] = ..., label_count: _Optional[int] = ..., gain: _Optional[float] = ..., gain_low: _Optional[float] = ..., gain_high: _Optional[float] = ...) -> None: ...

class StoppingSignal(_message.Message):
    __slots__ = ("estimable", "reason", "slope_per_1k_labels", "slope_low", "slope_high", "expected_information_gain", "recommendation", "threshold_per_1k_labels")
    class Recommendation(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        RECOMMENDATION_UNSPECIFIED: _ClassVar[StoppingSignal.Recommendation]
        RECOMMENDATION_CONTINUE: _ClassVar[StoppingSignal.Recommendation]
        RECOMMENDATION_DIMINISHING: _ClassVar[StoppingSignal.Recommendation]
        RECOMMENDATION_STOP: _ClassVar[StoppingSignal.Recommendation]
    RECOMMENDATION_UNSPECIFIED: StoppingSignal.Recommendation
    RECOMMENDATION_CONTINUE: StoppingSignal.Recommendation
    RECOMMENDATION_DIMINISHING: StoppingSignal.Recommendation
    RECOMMENDATION_STOP: StoppingSignal.Recommendation
    ESTIMABLE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SLOPE_PER_1K_LABELS_FIELD_NUMBER: _ClassVar[int]
    SLOPE_LOW_FIELD_NUMBER: _ClassVar[int]
    SLOPE_HIGH_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_INFORMATION_GAIN_FIELD_NUMBER: _ClassVar[int]
    RECOMMENDATION_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_PER_1K_LABELS_FIELD_NUMBER: _ClassVar[int]
    estimable: bool
    reason: str
    slope_per_1k_labels: float
    slope_low: float
    slope_high: float
    expected_information_gain: float
    recommendation: StoppingSignal.Recommendation
    threshold_per_1k_labels: float
    def __init__(self, estimable: _Optional[bool] = ..., reason: _Optional[str] = ..., slope_per_1k_labels: _Optional[float] = ..., slope_low: _Optional[float] = ..., slope_high: _Optional[float] = ..., expected_information_gain: _Optional[float] = ..., recommendation: _Optional[_Union[StoppingSignal.Recommendation, str]] = ..., threshold_per_1k_labels: _Optional[float] = ...) -> None: ...

class GetLearningCurveResponse(_message.Message):
    __slots__ = ("active", "random", "savings", "stopping", "label_count", "control_label_count", "compute_time", "computing", "fits_done", "fits_total", "error", "gain")
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    RANDOM_FIELD_NUMBER: _ClassVar[int]
    SAVINGS_FIELD_NUMBER: _ClassVar[int]
    STOPPING_FIELD_NUMBER: _ClassVar[int]
    LABEL_COUNT_FIELD_NUMBER: _ClassVar[int]
    CONTROL_LABEL_COUNT_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_TIME_FIELD_NUMBER: _ClassVar[int]
    COMPUTING_FIELD_NUMBER: _ClassVar[int]
    FITS_DONE_FIELD_NUMBER: _ClassVar[int]
    FITS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    GAIN_FIELD_NUMBER: _ClassVar[int]
    active: _containers.RepeatedCompositeFieldContainer[LearningCurvePoint]
    random: _containers.RepeatedCompositeFieldContainer[LearningCurvePoint]
    savings: SavingsEstimate
    stopping: StoppingSignal
    label_count: int
    control_label_count: int
    compute_time: _timestamp_pb2.Timestamp
    computing: bool
    fits_done: int
    fits_total: int
    error: str
    gain: LogLikelihoodGain
    def __init__(self, active: _Optional[_Iterable[_Union[LearningCurvePoint, _Mapping]]] = ..., random: _Optional[_Iterable[_Union[LearningCurvePoint, _Mapping]]] = ..., savings: _Optional[_Union[SavingsEstimate, _Mapping]] = ..., stopping: _Optional[_Union[StoppingSignal, _Mapping]] = ..., label_count: _Optional[int] = ..., control_label_count: _Optional[int] = ..., compute_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., computing: _Optional[bool] = ..., fits_done: _Optional[int] = ..., fits_total: _Optional[int] = ..., error: _Optional[str] = ..., gain: _Optional[_Union[LogLikelihoodGain, _Mapping]] = ...) -> None: ...
