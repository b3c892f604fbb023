"""Domain records: what the service stores and returns, independent of gRPC."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from balpm_server.acquisition import KnnConvention, Strategy


class FeatureSource(str, enum.Enum):
    """Where a pool's features come from."""

    CLIENT = "CLIENT"
    SERVER = "SERVER"


class Split(enum.IntEnum):
    """Pool items may be acquired; held-out items only evaluate."""

    POOL = 1
    HELDOUT = 2


class Preference(enum.IntEnum):
    """Which completion was preferred."""

    A = 1
    B = 2
    TIE = 3

    @property
    def target(self) -> float:
        """Bradley-Terry target P(A preferred)."""
        return {Preference.A: 1.0, Preference.B: 0.0, Preference.TIE: 0.5}[self]


class PoolState(str, enum.Enum):
    """Lifecycle of a pool."""

    READY = "READY"
    FEATURIZING = "FEATURIZING"


class OperationState(str, enum.Enum):
    """Lifecycle of a long-running operation."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def done(self) -> bool:
        """True for terminal states."""
        return self in (OperationState.SUCCEEDED, OperationState.FAILED, OperationState.CANCELLED)


@dataclass(frozen=True)
class PoolSettings:
    """Settings fixed at pool creation (defaults are the BAL-PM reference settings)."""

    feature_source: FeatureSource = FeatureSource.SERVER
    feature_dim: int = 0
    ensemble_size: int = 5
    hidden_sizes: tuple[int, ...] = (2048, 256)
    knn_k: int = 13
    beta: float = 0.01
    d_ent: float = 1.0
    default_strategy: Strategy = Strategy.BALPM
    standardize_features: bool = False
    labels_per_item: int = 1
    epochs: int = 30
    posterior_kind: str = "mlp_ensemble"
    lora_model_path: str = ""
    temperature: float = 1.0
    apl_beta_dpo: float = 0.1
    apl_policy_model_path: str = ""
    apl_reference_model_path: str = ""
    # r_k convention of the BAL-PM entropy term; settings stored before it existed load
    # as STANDARD, and a stored string value ("AUTHORS") is turned back into the enum.
    knn_convention: KnnConvention = KnnConvention.STANDARD

    def __post_init__(self) -> None:
        """Coerce `knn_convention` given by value (e.g. from settings JSON) to the enum."""
        object.__setattr__(self, "knn_convention", KnnConvention(self.knn_convention))


@dataclass(frozen=True)
class AplScores:
    """Client-supplied log-probabilities of one item for the APL strategies (nats)."""

    logp_policy_a: float
    logp_policy_b: float
    logp_ref_a: float
    logp_ref_b: float
    predictive_entropy: float | None = None


@dataclass(frozen=True)
class ItemIn:
    """An item as uploaded or passed for prediction."""

    item_id: str
    prompt: str = ""
    completion_a: str = ""
    completion_b: str = ""
    prompt_features: tuple[float, ...] = ()
    completion_a_features: tuple[float, ...] = ()
    completion_b_features: tuple[float, ...] = ()
    split: Split = Split.POOL
    heldout_preference: Preference | None = None
    apl: AplScores | None = None


@dataclass(frozen=True)
class ExportedItem:
    """A stored item as ExportItems sends it (features added by the domain when asked)."""

    row: int
    featurized: bool
    item: ItemIn


@dataclass(frozen=True)
class ItemText:
    """The text fields of a stored item."""

    item_id: str
    prompt: str
    completion_a: str
    completion_b: str


@dataclass(frozen=True)
class LabelIn:
    """A label as ingested."""

    label_id: str
    item_id: str
    preference: Preference
    annotator_id: str


@dataclass(frozen=True)
class StoredLabel:
    """A label with its storage sequence number and time."""

    seq: int
    label_id: str
    item_id: str
    preference: Preference
    annotator_id: str
    create_time_s: float


@dataclass(frozen=True)
class PoolInfo:
    """A pool and its counters."""

    pool_id: str
    tenant: str
    settings: PoolSettings
    state: PoolState
    extractor: str
    create_time_s: float
    item_count: int = 0
    heldout_count: int = 0
    label_count: int = 0
    labelled_item_count: int = 0
    leased_item_count: int = 0
    posterior_version: int = 0
    featurized_count: int = 0
    # Storage key of this pool instance (see `storage.sqlite_store`); never shown to clients.
    key: str = ""


@dataclass(frozen=True)
class Rejection:
    """Why one uploaded item was not stored."""

    id: str
    index: int
    field: str
    reason: str
    message: str


@dataclass(frozen=True)
class UploadResult:
    """Outcome of one UploadItems stream."""

    accepted_count: int
    duplicate_count: int
    rejections: tuple[Rejection, ...]


@dataclass(frozen=True)
class IngestResult:
    """Outcome of one IngestLabels call."""

    stored_count: int
    duplicate_count: int
    label_count: int


@dataclass
class Operation:
    """A long-running training operation (mutable while running)."""

    operation_id: str
    pool_id: str
    tenant: str
    state: OperationState
    create_time_s: float
    update_time_s: float
    epoch: int = 0
    epochs: int = 0
    train_loss: float = float("nan")
    val_log_likelihood: float = float("nan")
    result: dict[str, float] = field(default_factory=dict)
    error_code: str = ""
    error_message: str = ""
    # Storage key of the pool instance the operation trains; never shown to clients.
    pool_key: str = ""


@dataclass(frozen=True)
class LabelWrite:
    """The write of one IngestLabels call: its new labels and its request-id record."""

    pool_key: str
    labels: tuple[LabelIn, ...]
    labels_per_item: int
    request_id: str  # "" when the call has none
    request_digest: str
    response_json: str


@dataclass(frozen=True)
class AcquiredItem:
    """One acquired item with its score components."""

    item: ItemText
    total: float
    epistemic: float
    entropy: float
    rank: int


@dataclass(frozen=True)
class AcquireResult:
    """Outcome of AcquireBatch."""

    items: tuple[AcquiredItem, ...]
    posterior_version: int
    strategy: Strategy
    lease_expire_time_s: float
    acquire_s: float


@dataclass(frozen=True)
class PredictionOut:
    """Prediction for one item."""

    item_id: str
    prob_a: float
    epistemic: float
    aleatoric: float
    member_probs: tuple[float, ...]


@dataclass(frozen=True)
class EvaluationOut:
    """Evaluation metrics of the ensemble mean prediction."""

    log_likelihood: float
    accuracy: float
    brier: float
    ece: float
    mean_epistemic: float
    count: int
    posterior_version: int
