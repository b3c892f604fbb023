"""Domain records: what the service stores and returns, independent of gRPC.

The storage layer takes and returns these records (never bare tuples of columns), so
neither side depends on a column order.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from balpm_server.acquisition import KnnConvention, Strategy


class FeatureSource(str, enum.Enum):
    """Where a pool's features come from."""

    CLIENT = "CLIENT"
    SERVER = "SERVER"


class FeatureStorage(str, enum.Enum):
    """Precision of a pool's stored feature arrays (computations always upcast them)."""

    FLOAT32 = "FLOAT32"
    FLOAT16 = "FLOAT16"

    @property
    def dtype(self) -> type[np.floating]:
        """The numpy dtype of the stored values."""
        return np.float16 if self is FeatureStorage.FLOAT16 else np.float32


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
    auto_update_min_labels: int = 0  # retrain after this many new labels (0: off)
    auto_update_interval_s: float = 0.0  # or this long after the latest posterior, if new labels (0: off)
    # Posterior training (EnsembleConfig), as pool settings. bootstrap off since issue 18's sweep
    # (bench/results/issue18/): members differ by init seed and shuffle order only.
    bootstrap: bool = False
    patience: int = 5
    val_fraction: float = 0.1
    train_batch_size: int = 32  # small: early rounds have a few hundred labels
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    # Share of every batch drawn uniformly at random (the control arm; 0..0.5). 0.1 costs a
    # tenth of the batches' selection and gives an unbiased evaluation set that grows with
    # the labels (100 control labels per 1,000): what the savings estimate is measured on.
    control_fraction: float = 0.1
    stop_slope_per_1k: float = 0.005  # stopping signal: held-out LL gain per 1,000 labels worth continuing for
    # Stored feature precision: FLOAT16 halves the N x D x 3 arrays in memory and on disk
    # (values up to 65504 in magnitude); settings stored before it existed load as FLOAT32.
    feature_storage: FeatureStorage = FeatureStorage.FLOAT32

    def __post_init__(self) -> None:
        """Coerce `knn_convention` and `feature_storage` given by value (e.g. from settings JSON) to enums."""
        object.__setattr__(self, "knn_convention", KnnConvention(self.knn_convention))
        object.__setattr__(self, "feature_storage", FeatureStorage(self.feature_storage))


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
    replaces: str = ""  # the label this one revises, as sent ("" for a first answer)
    supersedes: str = ""  # the latest revision of that answer when stored: the label it replaces


@dataclass(frozen=True)
class StoredLabel:
    """A label with its storage sequence number and time."""

    seq: int
    label_id: str
    item_id: str
    preference: Preference
    annotator_id: str
    create_time_s: float
    control: bool = False  # the item was leased to this annotator by the control arm
    replaces: str = ""  # the label this one revised
    superseded_by: str = ""  # the label that revised this one ("" while it is the latest)


@dataclass(frozen=True)
class FeaturizationPause:
    """Server-side featurisation of a pool failed and waits for its next attempt.

    Attributes:
        reason: Stable reason of the latest failure (the extractor's, e.g. TRITON_UNAVAILABLE).
        message: What failed, for people (no paths).
        paused_since_s: Epoch seconds of the first failure since the last success.
        next_retry_s: Epoch seconds of the next attempt.
        attempts: Failed attempts since the last success.
    """

    reason: str
    message: str
    paused_since_s: float
    next_retry_s: float
    attempts: int


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
    featurization_pause: FeaturizationPause | None = None  # runtime state, not stored
    excluded_count: int = 0


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
    auto_update_operation_id: str = ""  # the UpdatePosterior this ingest started ("" when none)


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
    control: bool = False  # drawn uniformly at random by the control arm


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


# ---- storage records ------------------------------------------------------------------------


class PoolInsert(enum.Enum):
    """Outcome of inserting a pool (`SqlStore.insert_pool`)."""

    INSERTED = "INSERTED"
    NAME_TAKEN = "NAME_TAKEN"  # the tenant already has a pool with this id
    AT_LIMIT = "AT_LIMIT"  # the tenant already holds its maximum number of pools


@dataclass(frozen=True)
class PoolRef:
    """A pool's tenant-visible id and its storage key."""

    pool_id: str
    key: str


@dataclass(frozen=True)
class ItemRecord:
    """An item as stored: its content, its feature row and whether its features are stored."""

    item_id: str
    row: int
    split: Split
    prompt: str
    completion_a: str
    completion_b: str
    heldout_preference: Preference | None
    featurized: bool  # True when the features are stored (client features are, on upload)
    digest: str  # content digest, for idempotent re-uploads
    apl: AplScores | None = None


@dataclass(frozen=True)
class ItemIndex:
    """Every item of a pool in row order (row r of each array is feature row r).

    Attributes:
        item_ids: Item ids by row.
        rows_N: int64 feature rows (0..N-1 in a sound pool).
        split_N: int8 `Split` values.
        heldout_target_N: float64 target P(A preferred) of held-out items (NaN otherwise).
        pending_count: Items after these, still featurising (they join once their features exist).
    """

    item_ids: list[str]
    rows_N: np.ndarray
    split_N: np.ndarray
    heldout_target_N: np.ndarray
    pending_count: int = 0


@dataclass(frozen=True)
class PendingFeatures:
    """An item whose features the server still has to extract."""

    row: int
    prompt: str
    completion_a: str
    completion_b: str


@dataclass(frozen=True)
class ItemAplScores:
    """New APL scores of one item."""

    item_id: str
    scores: AplScores


@dataclass(frozen=True)
class LabelContent:
    """What a label says; two labels with one label_id must say the same."""

    item_id: str
    preference: Preference
    annotator_id: str
    replaces: str = ""


@dataclass(frozen=True)
class ExistingLabel:
    """A stored label's content and the label that revised it ("" while it is the latest)."""

    content: LabelContent
    superseded_by: str = ""


@dataclass(frozen=True)
class LabelTargets:
    """Every label of a pool as training data, in storage order.

    Attributes:
        rows_L: int64 feature row of each label's item.
        targets_L: float32 target P(A preferred).
        control_L: bool, the label came from the random control arm (empty when not read).
        seq_L: int64 storage sequence number (empty when not read).
        current_L: bool, the label is its annotator's latest revision (empty when not read).
    """

    rows_L: np.ndarray
    targets_L: np.ndarray
    control_L: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    seq_L: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    current_L: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))


@dataclass(frozen=True)
class LabelledBy:
    """One annotator has labelled the item at a feature row."""

    row: int
    annotator_id: str


@dataclass(frozen=True)
class LeaseRecord:
    """An unexpired lease of the item at a feature row."""

    row: int
    annotator_id: str
    expire_s: float


@dataclass(frozen=True)
class LeaseRequest:
    """The leases one AcquireBatch call writes (`SqlStore.lease_and_read`)."""

    pool_key: str
    item_ids: tuple[str, ...]
    annotator_id: str
    expire_s: float
    control_ids: frozenset[str] = frozenset()  # those of item_ids the control arm drew


@dataclass(frozen=True)
class RequestRecord:
    """A recorded IngestLabels request id: the digest of its labels and its response."""

    digest: str
    response_json: str


@dataclass(frozen=True)
class ExportedItem:
    """An item of ExportItems, with its feature vectors when asked for and stored.

    Attributes:
        item: The stored item.
        features: Kind ("prompt", "a", "b") -> float32 `[D]`; empty when not sent.
    """

    item: ItemRecord
    features: Mapping[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class StoreCounts:
    """Totals over one store, for the metrics scrape.

    Attributes:
        pools_by_state: Lower-case pool state -> pools.
        pool_items: Items of SPLIT_POOL.
        heldout_items: Items of SPLIT_HELDOUT.
        featurized_items: Items whose features are stored.
        labels: Labels stored.
        active_leases: Leases not yet expired.
        expired_leases: Expired leases not yet purged.
    """

    pools_by_state: Mapping[str, int]
    pool_items: int
    heldout_items: int
    featurized_items: int
    labels: int
    active_leases: int
    expired_leases: int


@dataclass(frozen=True)
class ReplicaRecord:
    """A cluster replica as the database knows it.

    Attributes:
        replica_id: Its name.
        address: host:port the other replicas dial.
        heartbeat_s: Its last heartbeat (epoch seconds).
    """

    replica_id: str
    address: str
    heartbeat_s: float


@dataclass(frozen=True)
class OwnerRecord:
    """Who owns a pool in cluster mode.

    Attributes:
        pool_key: The pool's storage key.
        replica_id: The owner replica.
        epoch: Fencing epoch: grows by one at every change of owner.
        expire_s: When the ownership ends unless renewed (epoch seconds).
    """

    pool_key: str
    replica_id: str
    epoch: int
    expire_s: float


@dataclass(frozen=True)
class LabelEvent:
    """One stored label as the owner's occupancy needs it (label ingest on another replica).

    Attributes:
        seq: Its storage sequence number.
        row: Its item's feature row.
        annotator_id: Who labelled it.
    """

    seq: int
    row: int
    annotator_id: str


def server_apl(info: PoolInfo) -> bool:
    """Whether the server computes the pool's APL scores (both models configured)."""
    return bool(info.settings.apl_policy_model_path and info.settings.apl_reference_model_path)
