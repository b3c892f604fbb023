"""Conversions between `balpm.v1` messages and domain records (no logic beyond mapping)."""

from __future__ import annotations

from typing import Any, cast

import grpc
from google.protobuf import timestamp_pb2
from google.rpc import status_pb2

from balpm.v1 import balpm_pb2 as pb
from balpm_server import errors
from balpm_server.acquisition import KnnConvention, Strategy
from balpm_server.domain import models as m
from balpm_server.domain.learning_curve import CurveReport
from balpm_server.posterior.savings import CurvePoint, Recommendation

STRATEGY_FROM_PB: dict[int, Strategy] = {
    pb.STRATEGY_RANDOM: Strategy.RANDOM,
    pb.STRATEGY_BALD: Strategy.BALD,
    pb.STRATEGY_SOFTMAX_BALD: Strategy.SOFTMAX_BALD,
    pb.STRATEGY_POWER_BALD: Strategy.POWER_BALD,
    pb.STRATEGY_SOFTRANK_BALD: Strategy.SOFTRANK_BALD,
    pb.STRATEGY_BALPM: Strategy.BALPM,
    pb.STRATEGY_ENTROPY_ONLY: Strategy.ENTROPY_ONLY,
    pb.STRATEGY_APL_CERTAINTY: Strategy.APL_CERTAINTY,
    pb.STRATEGY_APL_ENTROPY: Strategy.APL_ENTROPY,
    pb.STRATEGY_APL_HYBRID: Strategy.APL_HYBRID,
}
STRATEGY_TO_PB: dict[Strategy, Any] = {s: n for n, s in STRATEGY_FROM_PB.items()}
KNN_CONVENTION_FROM_PB: dict[int, KnnConvention] = {
    pb.KNN_CONVENTION_UNSPECIFIED: KnnConvention.STANDARD,
    pb.KNN_CONVENTION_STANDARD: KnnConvention.STANDARD,
    pb.KNN_CONVENTION_AUTHORS: KnnConvention.AUTHORS,
}
KNN_CONVENTION_TO_PB: dict[KnnConvention, Any] = {
    KnnConvention.STANDARD: pb.KNN_CONVENTION_STANDARD,
    KnnConvention.AUTHORS: pb.KNN_CONVENTION_AUTHORS,
}
FEATURE_STORAGE_FROM_PB: dict[int, m.FeatureStorage] = {
    pb.FEATURE_STORAGE_UNSPECIFIED: m.FeatureStorage.FLOAT32,
    pb.FEATURE_STORAGE_FLOAT32: m.FeatureStorage.FLOAT32,
    pb.FEATURE_STORAGE_FLOAT16: m.FeatureStorage.FLOAT16,
}
FEATURE_STORAGE_TO_PB: dict[m.FeatureStorage, Any] = {
    m.FeatureStorage.FLOAT32: pb.FEATURE_STORAGE_FLOAT32,
    m.FeatureStorage.FLOAT16: pb.FEATURE_STORAGE_FLOAT16,
}
PREF_FROM_PB: dict[int, m.Preference] = {
    pb.PREFERENCE_A: m.Preference.A,
    pb.PREFERENCE_B: m.Preference.B,
    pb.PREFERENCE_TIE: m.Preference.TIE,
}
PREF_TO_PB: dict[m.Preference, Any] = {p: n for n, p in PREF_FROM_PB.items()}
OP_STATE_TO_PB = {
    m.OperationState.PENDING: pb.Operation.STATE_PENDING,
    m.OperationState.RUNNING: pb.Operation.STATE_RUNNING,
    m.OperationState.SUCCEEDED: pb.Operation.STATE_SUCCEEDED,
    m.OperationState.FAILED: pb.Operation.STATE_FAILED,
    m.OperationState.CANCELLED: pb.Operation.STATE_CANCELLED,
}
GRPC_CODE_NUMBERS: dict[str, int] = {c.name: c.value[0] for c in grpc.StatusCode}


def timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    """A protobuf Timestamp from epoch seconds."""
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def strategy_from_pb(value: int, field: str = "strategy") -> Strategy | None:
    """Map a Strategy enum number; None for UNSPECIFIED; INVALID_ARGUMENT for unknown numbers."""
    if value == pb.STRATEGY_UNSPECIFIED:
        return None
    try:
        return STRATEGY_FROM_PB[value]
    except KeyError:
        raise errors.InvalidArgument(
            f"{field} {value} is not a known Strategy", field=field, reason="UNKNOWN_ENUM"
        ) from None


def preference_from_pb(value: int, field: str) -> m.Preference:
    """Map a Preference enum number; UNSPECIFIED or unknown numbers are INVALID_ARGUMENT."""
    try:
        return PREF_FROM_PB[value]
    except KeyError:
        raise errors.InvalidArgument(
            f"{field} must be PREFERENCE_A, PREFERENCE_B or PREFERENCE_TIE", field=field, reason="UNKNOWN_ENUM"
        ) from None


def pool_settings_from_pb(s: pb.PoolSettings) -> m.PoolSettings:
    """Domain settings with documented defaults for unset fields."""
    d = m.PoolSettings()
    if s.feature_source not in (pb.FEATURE_SOURCE_UNSPECIFIED, pb.FEATURE_SOURCE_CLIENT, pb.FEATURE_SOURCE_SERVER):
        raise errors.InvalidArgument("settings.feature_source is unknown", field="settings.feature_source")
    if s.posterior_kind not in (0, 1, 2):
        raise errors.InvalidArgument("settings.posterior_kind is unknown", field="settings.posterior_kind")
    default_strategy = strategy_from_pb(s.default_strategy, "settings.default_strategy") or d.default_strategy
    if s.knn_convention not in KNN_CONVENTION_FROM_PB:
        raise errors.InvalidArgument(
            f"settings.knn_convention {s.knn_convention} is not a known KnnConvention",
            field="settings.knn_convention",
            reason="UNKNOWN_ENUM",
        )
    if s.feature_storage not in FEATURE_STORAGE_FROM_PB:
        raise errors.InvalidArgument(
            f"settings.feature_storage {s.feature_storage} is not a known FeatureStorage",
            field="settings.feature_storage",
            reason="UNKNOWN_ENUM",
        )
    return m.PoolSettings(
        feature_source=m.FeatureSource.CLIENT
        if s.feature_source == pb.FEATURE_SOURCE_CLIENT
        else m.FeatureSource.SERVER,
        feature_dim=s.feature_dim,
        ensemble_size=s.ensemble_size or d.ensemble_size,
        hidden_sizes=tuple(s.hidden_sizes) or d.hidden_sizes,
        knn_k=s.knn_k or d.knn_k,
        beta=s.beta if s.HasField("beta") else d.beta,
        d_ent=s.d_ent if s.HasField("d_ent") else d.d_ent,
        default_strategy=default_strategy,
        standardize_features=s.standardize_features,
        labels_per_item=s.labels_per_item or d.labels_per_item,
        epochs=s.epochs or d.epochs,
        posterior_kind="lora_ensemble" if s.posterior_kind == pb.POSTERIOR_KIND_LORA_ENSEMBLE else "mlp_ensemble",
        lora_model_path=s.lora_model_path,
        temperature=s.temperature if s.HasField("temperature") else d.temperature,
        apl_beta_dpo=s.apl_beta_dpo if s.HasField("apl_beta_dpo") else d.apl_beta_dpo,
        apl_policy_model_path=s.apl_policy_model_path,
        apl_reference_model_path=s.apl_reference_model_path,
        knn_convention=KNN_CONVENTION_FROM_PB[s.knn_convention],
        auto_update_min_labels=s.auto_update_min_labels,
        auto_update_interval_s=s.auto_update_interval_s,
        bootstrap=s.bootstrap if s.HasField("bootstrap") else d.bootstrap,
        patience=s.patience or d.patience,
        val_fraction=s.val_fraction if s.HasField("val_fraction") else d.val_fraction,
        train_batch_size=s.train_batch_size or d.train_batch_size,
        learning_rate=s.learning_rate if s.HasField("learning_rate") else d.learning_rate,
        weight_decay=s.weight_decay if s.HasField("weight_decay") else d.weight_decay,
        control_fraction=s.control_fraction if s.HasField("control_fraction") else d.control_fraction,
        stop_slope_per_1k=s.stop_slope_per_1k if s.HasField("stop_slope_per_1k") else d.stop_slope_per_1k,
        feature_storage=FEATURE_STORAGE_FROM_PB[s.feature_storage],
    )


def pool_to_pb(info: m.PoolInfo) -> pb.Pool:
    """The Pool message of a pool."""
    s = info.settings
    settings = pb.PoolSettings(
        feature_source=pb.FEATURE_SOURCE_CLIENT
        if s.feature_source == m.FeatureSource.CLIENT
        else pb.FEATURE_SOURCE_SERVER,
        feature_dim=s.feature_dim,
        ensemble_size=s.ensemble_size,
        hidden_sizes=list(s.hidden_sizes),
        knn_k=s.knn_k,
        beta=s.beta,
        d_ent=s.d_ent,
        default_strategy=cast(Any, STRATEGY_TO_PB[s.default_strategy]),
        standardize_features=s.standardize_features,
        labels_per_item=s.labels_per_item,
        epochs=s.epochs,
        posterior_kind=pb.POSTERIOR_KIND_LORA_ENSEMBLE
        if s.posterior_kind == "lora_ensemble"
        else pb.POSTERIOR_KIND_MLP_ENSEMBLE,
        lora_model_path=s.lora_model_path,
        temperature=s.temperature,
        apl_beta_dpo=s.apl_beta_dpo,
        apl_policy_model_path=s.apl_policy_model_path,
        apl_reference_model_path=s.apl_reference_model_path,
        knn_convention=KNN_CONVENTION_TO_PB[s.knn_convention],
        auto_update_min_labels=s.auto_update_min_labels,
        auto_update_interval_s=s.auto_update_interval_s,
        bootstrap=s.bootstrap,
        patience=s.patience,
        val_fraction=s.val_fraction,
        train_batch_size=s.train_batch_size,
        learning_rate=s.learning_rate,
        weight_decay=s.weight_decay,
        control_fraction=s.control_fraction,
        stop_slope_per_1k=s.stop_slope_per_1k,
        feature_storage=FEATURE_STORAGE_TO_PB[s.feature_storage],
    )
    msg = pb.Pool(
        pool_id=info.pool_id,
        settings=settings,
        state=pb.Pool.STATE_FEATURIZING if info.state == m.PoolState.FEATURIZING else pb.Pool.STATE_READY,
        item_count=info.item_count,
        heldout_count=info.heldout_count,
        label_count=info.label_count,
        labelled_item_count=info.labelled_item_count,
        leased_item_count=info.leased_item_count,
        posterior_version=info.posterior_version,
        featurized_count=info.featurized_count,
        excluded_count=info.excluded_count,
        extractor=info.extractor,
        create_time=timestamp(info.create_time_s),
    )
    pause = info.featurization_pause
    if pause is not None:
        msg.featurization_pause.CopyFrom(
            pb.FeaturizationPause(
                reason=pause.reason,
                message=pause.message,
                paused_since=timestamp(pause.paused_since_s),
                next_retry_time=timestamp(pause.next_retry_s),
                attempts=pause.attempts,
            )
        )
    return msg


def apl_from_pb(item: pb.Item) -> m.AplScores | None:
    """APL scores of an item, or None when absent."""
    if not item.HasField("apl_scores"):
        return None
    a = item.apl_scores
    return m.AplScores(
        a.logp_policy_a,
        a.logp_policy_b,
        a.logp_ref_a,
        a.logp_ref_b,
        a.predictive_entropy if a.HasField("predictive_entropy") else None,
    )


def item_from_pb(item: pb.Item, field: str) -> m.ItemIn:
    """A domain item from a message (enum values checked, the rest by the domain)."""
    if item.split not in (pb.SPLIT_UNSPECIFIED, pb.SPLIT_POOL, pb.SPLIT_HELDOUT):
        raise errors.InvalidArgument(f"{field}.split is unknown", field=f"{field}.split", reason="UNKNOWN_ENUM")
    split = m.Split.HELDOUT if item.split == pb.SPLIT_HELDOUT else m.Split.POOL
    pref = None
    if split == m.Split.HELDOUT:
        pref = preference_from_pb(item.heldout_preference, f"{field}.heldout_preference")
    return m.ItemIn(
        item_id=item.item_id,
        prompt=item.prompt,
        completion_a=item.completion_a,
        completion_b=item.completion_b,
        prompt_features=tuple(item.prompt_features),
        completion_a_features=tuple(item.completion_a_features),
        completion_b_features=tuple(item.completion_b_features),
        split=split,
        heldout_preference=pref,
        apl=apl_from_pb(item),
    )


def split_from_pb(value: int, field: str = "split") -> m.Split | None:
    """Map a Split enum number; None for UNSPECIFIED; INVALID_ARGUMENT for unknown numbers."""
    if value == pb.SPLIT_UNSPECIFIED:
        return None
    if value not in (pb.SPLIT_POOL, pb.SPLIT_HELDOUT):
        raise errors.InvalidArgument(f"{field} {value} is not a known Split", field=field, reason="UNKNOWN_ENUM")
    return m.Split.HELDOUT if value == pb.SPLIT_HELDOUT else m.Split.POOL


def exported_item_to_pb(e: m.ExportedItem) -> pb.Item:
    """An Item message with every stored field (and the feature vectors, when exported)."""
    it = e.item
    msg = pb.Item(
        item_id=it.item_id,
        prompt=it.prompt,
        completion_a=it.completion_a,
        completion_b=it.completion_b,
        split=pb.SPLIT_HELDOUT if it.split == m.Split.HELDOUT else pb.SPLIT_POOL,
    )
    if it.heldout_preference is not None:
        msg.heldout_preference = PREF_TO_PB[it.heldout_preference]
    if it.apl is not None:
        a = it.apl
        msg.apl_scores.CopyFrom(
            pb.AplScores(logp_policy_a=a.logp_policy_a, logp_policy_b=a.logp_policy_b, logp_ref_a=a.logp_ref_a,
                         logp_ref_b=a.logp_ref_b)
        )
        if a.predictive_entropy is not None:
            msg.apl_scores.predictive_entropy = a.predictive_entropy
    if e.features:
        msg.prompt_features.extend(e.features["prompt"].tolist())
        msg.completion_a_features.extend(e.features["a"].tolist())
        msg.completion_b_features.extend(e.features["b"].tolist())
    return msg


def item_text_to_pb(item: m.ItemText) -> pb.Item:
    """An Item message with text fields only."""
    return pb.Item(
        item_id=item.item_id, prompt=item.prompt, completion_a=item.completion_a, completion_b=item.completion_b
    )


def rejection_to_pb(r: m.Rejection) -> pb.Rejection:
    """A Rejection message."""
    return pb.Rejection(id=r.id, index=r.index, field=r.field, reason=r.reason, message=r.message)


def operation_to_pb(op: m.Operation) -> pb.Operation:
    """An Operation message."""
    msg = pb.Operation(
        operation_id=op.operation_id,
        pool_id=op.pool_id,
        state=OP_STATE_TO_PB[op.state],
        done=op.state.done,
        progress=pb.TrainingProgress(
            epoch=op.epoch, epochs=op.epochs, train_loss=op.train_loss, val_log_likelihood=op.val_log_likelihood
        ),
        create_time=timestamp(op.create_time_s),
        update_time=timestamp(op.update_time_s),
    )
    if op.result:
        r = op.result
        msg.result.CopyFrom(
            pb.TrainingResult(
                posterior_version=int(r["posterior_version"]),
                label_count=int(r["label_count"]),
                val_log_likelihood=float(r["val_log_likelihood"]),
                train_s=float(r["train_s"]),
                epochs_run=int(r["epochs_run"]),
            )
        )
    if op.error_code:
        msg.error.CopyFrom(status_pb2.Status(code=GRPC_CODE_NUMBERS.get(op.error_code, 2), message=op.error_message))
    return msg


def options_from_pb(o: pb.StrategyOptions) -> dict[str, float]:
    """Per-request strategy overrides that are set."""
    out: dict[str, float] = {}
    for name in ("beta", "d_ent", "temperature", "apl_beta_dpo"):
        if o.HasField(name):
            out[name] = getattr(o, name)
    if o.apl_entropy_top_s:
        out["apl_entropy_top_s"] = float(o.apl_entropy_top_s)
    return out



def _curve_point_to_pb(p: CurvePoint) -> pb.LearningCurvePoint:
    return pb.LearningCurvePoint(
        label_count=p.label_count, posterior_version=p.version, eval_count=len(p.ll_I),
        log_likelihood=p.log_likelihood, log_likelihood_stderr=p.stderr, accuracy=p.accuracy,
    )


RECOMMENDATION_TO_PB = {
    None: pb.StoppingSignal.RECOMMENDATION_UNSPECIFIED,
    Recommendation.CONTINUE: pb.StoppingSignal.RECOMMENDATION_CONTINUE,
    Recommendation.DIMINISHING: pb.StoppingSignal.RECOMMENDATION_DIMINISHING,
    Recommendation.STOP: pb.StoppingSignal.RECOMMENDATION_STOP,
}


def learning_curve_to_pb(report: CurveReport) -> pb.GetLearningCurveResponse:
    """The GetLearningCurve reply of a report."""
    curve, sv, sl = report.curve, report.curve.savings, report.curve.slope
    msg = pb.GetLearningCurveResponse(
        active=[_curve_point_to_pb(p) for p in curve.active],
        random=[_curve_point_to_pb(p) for p in curve.random],
        savings=pb.SavingsEstimate(
            estimable=sv.estimable, reason=sv.reason, control_labels_needed=sv.control_labels_needed,
            labels_saved_share=sv.share, labels_saved_share_low=sv.low, labels_saved_share_high=sv.high,
            random_label_count=sv.random_labels, active_label_count=sv.active_labels, log_likelihood=sv.log_likelihood,
        ),
        stopping=pb.StoppingSignal(
            estimable=sl.estimable, reason=sl.reason, slope_per_1k_labels=sl.per_1k, slope_low=sl.low,
            slope_high=sl.high, expected_information_gain=report.expected_information_gain,
            recommendation=cast(Any, RECOMMENDATION_TO_PB[curve.recommendation]),
            threshold_per_1k_labels=curve.threshold_per_1k,
        ),
        gain=pb.LogLikelihoodGain(
            estimable=curve.gain.estimable, reason=curve.gain.reason, label_count=curve.gain.label_count,
            gain=curve.gain.gain, gain_low=curve.gain.low, gain_high=curve.gain.high,
        ),
        label_count=curve.label_count,
        control_label_count=curve.control_label_count,
        computing=report.computing,
        fits_done=report.fits_done,
        fits_total=report.fits_total,
        error=report.error,
    )
    if curve.compute_time_s:
        msg.compute_time.CopyFrom(timestamp(curve.compute_time_s))
    return msg
