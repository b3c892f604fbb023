"""Oracles for simulated active learning: the file's human labels or a synthetic reward-model teacher.

`human`: the label is the file's `chosen` response (what `hide_preferences` hides).

`model`: a fixed, seeded random reward MLP over the *same* frozen features the
server trains on (the prompt+completion vectors). Its Bradley-Terry probability
`P(A) = sigmoid((r(a) - r(b)) / T)` is sampled once per item, with the temperature T
chosen by bisection so that the expected agreement with the teacher's own argmax,
`mean(max(P(A), 1 - P(A)))`, equals the requested rate (0.89 by default). The
same teacher labels the held-out test items, so the test log-likelihood has a known
ceiling. The teacher needs the features on the client side; `extract_features` asks
the server for them: it uploads the texts to a temporary SERVER-feature pool, waits
until they are featurised and reads the vectors back with ExportItems, so they are
exactly the vectors a SERVER-feature pool holds (the server's extractor and its feature
cache; nothing of the server runs in the client).

Redundancy (`expand_redundancy`): each pool item is repeated R times with tiny
Gaussian noise on its three vectors and an independent teacher draw per copy, the
situation of Reddit TL;DR where one post carries many comparisons. It needs
client-supplied features, so model-oracle pools are FEATURE_SOURCE_CLIENT pools.

This module is part of the `balpm[sim]` extra (numpy).

Letter legend: N items, D feature dimension, H teacher hidden width.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from balpm.data import HiddenPair
from balpm.errors import BalpmError, FailedPreconditionError, InvalidInputError, missing_dependency
from balpm.progress import bar

try:
    import numpy as np
except ImportError as e:  # pragma: no cover - depends on the installed extras
    raise missing_dependency("numpy", "sim", "balpm.oracles (the simulation's oracles)") from e

if TYPE_CHECKING:
    from balpm.client import Client

ORACLES = ("human", "model")


@dataclass(frozen=True)
class PairFeatures:
    """Frozen features of N pairs: prompt, prompt+completion A, prompt+completion B (float32 [N, D])."""

    prompt_N_D: np.ndarray
    a_N_D: np.ndarray
    b_N_D: np.ndarray

    def __len__(self) -> int:
        return int(self.prompt_N_D.shape[0])

    def take(self, rows: Sequence[int] | np.ndarray) -> PairFeatures:
        """The features of the given rows."""
        idx = np.asarray(rows, dtype=np.int64)
        return PairFeatures(self.prompt_N_D[idx], self.a_N_D[idx], self.b_N_D[idx])


def extract_features(
    client: Client,
    pairs: Sequence[HiddenPair],
    *,
    pool_id: str = "",
    chunk_size: int = 500,
    timeout_s: float = 3600.0,
    progress: bool = False,
    keep_pool: bool = False,
) -> tuple[PairFeatures, dict[str, Any]]:
    """Features of the items, extracted by the server.

    Uploads the texts to a new SERVER-feature pool, waits until the server has featurised them, reads the
    vectors back with ExportItems and deletes the pool. The server embeds exactly what it embeds for any
    SERVER-feature pool (prompt, prompt + completion A, prompt + completion B) with its extractor and its
    feature cache, so texts it featurised before cost a cache look-up.

    Args:
        client: Connected SDK client.
        pairs: Items (their `item` dicts carry prompt / completion_a / completion_b).
        pool_id: Id of the temporary pool ("" = generated).
        chunk_size: Items per upload chunk.
        timeout_s: Deadline of the upload and of the wait for featurisation.
        progress: Show upload / featurisation / export progress bars on stderr.
        keep_pool: Keep the pool (e.g. to inspect it).

    Returns:
        (features, {"pool_id", "items", "feature_dim", "extractor", "seconds"}).

    Raises:
        balpm.errors.InvalidInputError: The server rejected an item (e.g. a text over its size limit).
        balpm.errors.UnimplementedError: The server has no ExportItems (an older server).
    """
    t0 = time.perf_counter()
    if not pairs:
        empty = np.zeros((0, 0), dtype=np.float32)
        return PairFeatures(empty, empty, empty), {"pool_id": "", "items": 0, "feature_dim": 0, "seconds": 0.0}
    pool_id = pool_id or f"features-{uuid.uuid4().hex[:16]}"
    items = [
        {
            "item_id": f"x{i}",
            "prompt": p.item.get("prompt", ""),
            "completion_a": p.item.get("completion_a", ""),
            "completion_b": p.item.get("completion_b", ""),
        }
        for i, p in enumerate(pairs)
    ]
    n = len(items)
    pool = client.create_pool(pool_id, feature_source="SERVER")
    try:
        with bar(n, "upload", "item", enabled=progress) as b:
            summary = client.upload_items(pool_id, items, chunk_size=chunk_size, progress=b.set, timeout_s=timeout_s)
        if summary.rejections:
            r = summary.rejections[0]
            raise InvalidInputError.local(
                f"the server rejected {len(summary.rejections)} of {n} texts; first: pair #{r.index}: "
                f"{r.field}: {r.message} [{r.reason}]",
                reason="ITEM_REJECTED",
                field=f"pairs[{r.index}]",
            )
        with bar(n, "featurise", "item", enabled=progress) as b:
            client.wait_pool_ready(pool_id, timeout_s=timeout_s, progress=lambda p: b.set(int(p.featurized_count)))
        vectors: dict[str, tuple[Any, Any, Any]] = {}
        with bar(n, "export features", "item", enabled=progress) as b:
            for it in client.export_items(pool_id, include_features=True):
                vectors[it.item_id] = (it.prompt_features, it.completion_a_features, it.completion_b_features)
                b.update()
    finally:
        if not keep_pool:
            _delete_quietly(client, pool_id)
    missing = [it["item_id"] for it in items if it["item_id"] not in vectors or not vectors[it["item_id"]][0]]
    if missing:
        raise FailedPreconditionError.local(
            f"ExportItems returned no features for {len(missing)} of {n} items (first {missing[0]})",
            reason="FEATURES_MISSING",
        )
    parts = [np.asarray([vectors[it["item_id"]][k] for it in items], dtype=np.float32) for k in range(3)]
    info = {
        "pool_id": pool_id,
        "items": n,
        "feature_dim": int(parts[0].shape[1]),
        "extractor": pool.extractor,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return PairFeatures(*parts), info


def _delete_quietly(client: Client, pool_id: str) -> None:
    """Delete a temporary pool; a failure here must not hide the error that ended the work."""
    with contextlib.suppress(BalpmError):
        client.delete_pool(pool_id)


class BradleyTerryTeacher:
    """A fixed reward r(x) over completion features, Bradley-Terry with a temperature fitted for an agreement.

    Subclasses define `reward`, and `_prepare` when they standardise inputs.
    """

    temperature: float = 1.0

    def reward(self, x_N_D: np.ndarray) -> np.ndarray:
        """Rewards r(x) of completion feature vectors (float64 [N])."""
        raise NotImplementedError

    def _prepare(self, both_2N_D: np.ndarray) -> None:
        """Set input statistics from every completion vector the teacher will label (none by default)."""

    def margin(self, feats: PairFeatures) -> np.ndarray:
        """r(a) - r(b) before the temperature."""
        return self.reward(feats.a_N_D) - self.reward(feats.b_N_D)

    def prob_a(self, feats: PairFeatures) -> np.ndarray:
        """P(A preferred) = sigmoid((r(a) - r(b)) / T)."""
        return np.asarray(1.0 / (1.0 + np.exp(-self.margin(feats) / self.temperature)), dtype=np.float64)

    def fit(self, feats: PairFeatures, agreement: float) -> BradleyTerryTeacher:
        """Fit the input statistics to `feats` and T so that the expected agreement is `agreement`.

        Args:
            feats: Features the teacher will label (pool and test together).
            agreement: Target mean of max(P(A), 1 - P(A)), in (0.5, 1).

        Returns:
            self.
        """
        if not 0.5 < agreement < 1.0:
            raise InvalidInputError.local(f"agreement must be in (0.5, 1), got {agreement}", field="agreement")
        self._prepare(np.concatenate([feats.a_N_D, feats.b_N_D]).astype(np.float64))
        m = np.abs(self.margin(feats))
        lo, hi = 1e-6, 1e6  # agreement falls as T grows: bisect on log T
        for _ in range(200):
            mid = float(np.sqrt(lo * hi))
            agree = float(np.mean(1.0 / (1.0 + np.exp(-m / mid))))
            if agree > agreement:
                lo = mid
            else:
                hi = mid
        self.temperature = float(np.sqrt(lo * hi))
        return self

    def expected_agreement(self, feats: PairFeatures) -> float:
        """Mean of max(P(A), 1 - P(A)) over `feats`."""
        p = self.prob_a(feats)
        return float(np.mean(np.maximum(p, 1.0 - p)))

    def sample(self, feats: PairFeatures, rng: np.random.Generator) -> list[str]:
        """One Bradley-Terry draw per pair: "A" or "B"."""
        p = self.prob_a(feats)
        draws = rng.random(p.shape[0]) < p
        return ["A" if d else "B" for d in draws.tolist()]


@dataclass
class RewardTeacher(BradleyTerryTeacher):
    """A fixed random tanh MLP reward over z-scored completion features, with a bias (`teacher="reward"`).

    Args:
        dim: Feature dimension D.
        seed: Seed of the weights.
        hidden: Hidden width H.
        mean_D: Feature mean used to standardise inputs (set by `fit`).
        std_D: Feature standard deviation used to standardise inputs (set by `fit`).
        temperature: Bradley-Terry temperature T (set by `fit`).
    """

    dim: int
    seed: int = 0
    hidden: int = 64
    mean_D: np.ndarray = field(default_factory=lambda: np.zeros(0))
    std_D: np.ndarray = field(default_factory=lambda: np.zeros(0))
    temperature: float = 1.0

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        self.W1_D_H = rng.normal(size=(self.dim, self.hidden)) / np.sqrt(self.dim)
        self.b1_H = rng.normal(size=self.hidden) * 0.5
        self.w2_H = rng.normal(size=self.hidden) / np.sqrt(self.hidden)

    def _prepare(self, both_2N_D: np.ndarray) -> None:
        self.mean_D = both_2N_D.mean(axis=0)
        self.std_D = both_2N_D.std(axis=0) + 1e-6

    def reward(self, x_N_D: np.ndarray) -> np.ndarray:
        """Rewards r(x) of completion feature vectors (float64 [N])."""
        z = (np.asarray(x_N_D, dtype=np.float64) - self.mean_D) / self.std_D
        return np.asarray(np.tanh(z @ self.W1_D_H + self.b1_H) @ self.w2_H, dtype=np.float64)


@dataclass
class NearLinearTeacher(BradleyTerryTeacher):
    """r(x) = tanh(3 x W1) w2 on the raw features, W1 ~ N(0, 1/D) (`teacher="near_linear"`).

    On unit-norm sentence embeddings the tanh stays close to linear: a linear fit on
    (a - b) explains most of its logit, the regime where an ensemble's uncertainty tracks
    the real error and active learning has something to find.

    Args:
        dim: Feature dimension D.
        seed: Seed of the weights.
        hidden: Hidden width H.
        temperature: Bradley-Terry temperature T (set by `fit`).
    """

    dim: int
    seed: int = 0
    hidden: int = 64
    temperature: float = 1.0

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        self.W1_D_H = rng.normal(size=(self.dim, self.hidden)) / np.sqrt(self.dim)
        self.w2_H = rng.normal(size=self.hidden) / np.sqrt(self.hidden)

    def reward(self, x_N_D: np.ndarray) -> np.ndarray:
        """Rewards r(x) of completion feature vectors (float64 [N])."""
        x = np.asarray(x_N_D, dtype=np.float64)
        return np.asarray(np.tanh(3.0 * (x @ self.W1_D_H)) @ self.w2_H, dtype=np.float64)


TEACHERS: dict[str, type[RewardTeacher] | type[NearLinearTeacher]] = {
    "reward": RewardTeacher,
    "near_linear": NearLinearTeacher,
}


def with_features(pair: HiddenPair, feats: PairFeatures, row: int, preference: str | None = None) -> HiddenPair:
    """A copy of `pair` whose item carries client features (and, when given, a new preference)."""
    item = dict(pair.item)
    item["prompt_features"] = feats.prompt_N_D[row].tolist()
    item["completion_a_features"] = feats.a_N_D[row].tolist()
    item["completion_b_features"] = feats.b_N_D[row].tolist()
    pref = pair.preference if preference is None else preference
    if item.get("split") == "HELDOUT":
        item["heldout_preference"] = pref
    return HiddenPair(item, pref)


def expand_redundancy(
    pairs: Sequence[HiddenPair], feats: PairFeatures, redundancy: int, noise: float, seed: int
) -> tuple[list[HiddenPair], PairFeatures]:
    """Repeat each item `redundancy` times with tiny Gaussian feature noise.

    Copies keep the prompt text (so "distinct prompts" counts posts, not copies) and get
    ids `<id>.r<j>`; the noise is `noise` times each feature's pool standard deviation.

    Args:
        pairs: Pool items.
        feats: Their features.
        redundancy: R >= 1 (1 returns the input unchanged).
        noise: Relative noise scale.
        seed: Seed of the noise.

    Returns:
        (R * N items in prompt-major order, their features).
    """
    if redundancy < 1:
        raise InvalidInputError.local(f"redundancy must be >= 1, got {redundancy}", field="redundancy")
    if redundancy == 1:
        return list(pairs), feats
    rng = np.random.default_rng(seed)
    idx = np.repeat(np.arange(len(pairs)), redundancy)
    parts = []
    for arr in (feats.prompt_N_D, feats.a_N_D, feats.b_N_D):
        scale = noise * arr.std(axis=0, keepdims=True)
        parts.append((arr[idx] + scale * rng.standard_normal((idx.size, arr.shape[1]))).astype(np.float32))
    out_feats = PairFeatures(*parts)
    out = []
    for j, i in enumerate(idx.tolist()):
        item = dict(pairs[i].item)
        item["item_id"] = f"{item['item_id'][:120]}.r{j % redundancy}"
        out.append(HiddenPair(item, pairs[i].preference))
    return out, out_feats


@dataclass(frozen=True)
class OracleData:
    """Pool and test items ready to upload, with the labels the oracle will reveal."""

    pool: list[HiddenPair]
    test: list[HiddenPair]
    feature_source: str
    info: dict[str, Any]


def human_oracle_data(pool: list[HiddenPair], test: list[HiddenPair]) -> OracleData:
    """The file's own labels; the server extracts the features (SERVER pool)."""
    return OracleData(list(pool), list(test), "SERVER", {"oracle": "human"})


def model_oracle_data(
    pool: Sequence[HiddenPair],
    pool_feats: PairFeatures,
    test: Sequence[HiddenPair],
    test_feats: PairFeatures,
    *,
    agreement: float = 0.89,
    redundancy: int = 1,
    noise: float = 0.01,
    teacher_seed: int = 0,
    label_seed: int = 0,
    teacher_hidden: int = 64,
    teacher: str = "reward",
) -> OracleData:
    """Items with client features, labelled by a fixed random reward-model teacher.

    Args:
        pool: Pool items (text only; the file's labels are discarded).
        pool_feats: Their features.
        test: Held-out items.
        test_feats: Their features.
        agreement: Expected agreement of a draw with the teacher's argmax.
        redundancy: Copies R of each pool item.
        noise: Relative feature noise of the copies.
        teacher_seed: Seed of the teacher's weights (fixed across runs).
        label_seed: Seed of the Bradley-Terry draws and the copy noise.
        teacher_hidden: Hidden width of the teacher.
        teacher: "reward" (`RewardTeacher`) or "near_linear" (`NearLinearTeacher`).

    Returns:
        CLIENT-feature items whose preferences are the teacher's draws.
    """
    if teacher not in TEACHERS:
        raise InvalidInputError.local(f"unknown teacher {teacher!r}; choose from {', '.join(TEACHERS)}",
                                      field="teacher")
    pool_x, pool_xf = expand_redundancy(pool, pool_feats, redundancy, noise, seed=label_seed + 7919)
    model = TEACHERS[teacher](pool_feats.a_N_D.shape[1], seed=teacher_seed, hidden=teacher_hidden)
    both = PairFeatures(
        np.concatenate([pool_xf.prompt_N_D, test_feats.prompt_N_D]),
        np.concatenate([pool_xf.a_N_D, test_feats.a_N_D]),
        np.concatenate([pool_xf.b_N_D, test_feats.b_N_D]),
    )
    model.fit(both, agreement)
    rng = np.random.default_rng(label_seed)
    pool_labels = model.sample(pool_xf, rng)
    test_labels = model.sample(test_feats, rng)
    pool_out = [with_features(p, pool_xf, i, pool_labels[i]) for i, p in enumerate(pool_x)]
    test_out = [with_features(p, test_feats, i, test_labels[i]) for i, p in enumerate(test)]
    p_test = model.prob_a(test_feats)
    y_test = np.array([lb == "A" for lb in test_labels], dtype=np.float64)
    eps = 1e-12
    bayes_ll = float(np.mean(y_test * np.log(p_test + eps) + (1 - y_test) * np.log(1 - p_test + eps)))
    info = {
        "oracle": "model",
        "teacher": teacher,
        "agreement_target": agreement,
        "agreement_expected": model.expected_agreement(both),
        "temperature": model.temperature,
        "redundancy": redundancy,
        "noise": noise,
        "teacher_seed": teacher_seed,
        "teacher_hidden": teacher_hidden,
        "test_bayes_log_likelihood": bayes_ll,
        "test_bayes_accuracy": float(np.mean((p_test > 0.5) == (y_test > 0.5))),
    }
    return OracleData(pool_out, test_out, "CLIENT", info)


def prepare_oracle(
    pool: list[HiddenPair],
    test: list[HiddenPair],
    oracle: str,
    *,
    agreement: float = 0.89,
    redundancy: int = 1,
    noise: float = 0.01,
    teacher_seed: int = 0,
    label_seed: int = 0,
    client: Client | None = None,
    features: tuple[PairFeatures, PairFeatures] | None = None,
    progress: bool = False,
    teacher: str = "reward",
) -> OracleData:
    """Build the items and labels of one oracle.

    Args:
        pool: Pool items with the file's labels.
        test: Held-out items with the file's labels.
        oracle: "human" or "model".
        agreement: Model oracle: expected agreement with the teacher's argmax.
        redundancy: Copies per pool item (model oracle; the human oracle needs R = 1).
        noise: Relative feature noise of the copies.
        teacher_seed: Seed of the teacher's weights.
        label_seed: Seed of the teacher's draws and of the copy noise.
        client: Model oracle: the server that extracts the features (`extract_features`), unless
            `features` are given.
        features: Precomputed (pool, test) features; skips `extract_features`.
        progress: Show the feature extraction's progress bars.
        teacher: Model oracle: "reward" or "near_linear" (see `TEACHERS`).

    Returns:
        The oracle's items and labels.

    Raises:
        balpm.errors.InvalidInputError: Unknown oracle, redundancy with the human oracle, or a model
            oracle with neither `client` nor `features`.
    """
    if oracle == "human":
        if redundancy != 1:
            raise InvalidInputError.local(
                "redundancy needs the model oracle (copies of a human label would be fabricated)", field="redundancy"
            )
        return human_oracle_data(pool, test)
    if oracle != "model":
        raise InvalidInputError.local(f"unknown oracle {oracle!r}; choose from {', '.join(ORACLES)}", field="oracle")
    if features is None:
        if client is None:
            raise InvalidInputError.local("the model oracle needs a client (or precomputed features)", field="client")
        both, _ = extract_features(client, list(pool) + list(test), progress=progress)
        pool_f, test_f = both.take(range(len(pool))), both.take(range(len(pool), len(pool) + len(test)))
    else:
        pool_f, test_f = features
    return model_oracle_data(
        pool,
        pool_f,
        test,
        test_f,
        agreement=agreement,
        redundancy=redundancy,
        noise=noise,
        teacher_seed=teacher_seed,
        label_seed=label_seed,
        teacher=teacher,
    )
