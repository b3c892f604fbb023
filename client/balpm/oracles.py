"""Oracles for simulated active learning: the file's human labels or a synthetic reward-model teacher.

`human`: the label is the file's `chosen` response (what `hide_preferences` hides).

`model`: a fixed, seeded random reward MLP over the *same* frozen features the
server trains on (the prompt+completion vectors). Its Bradley-Terry probability
`P(A) = sigmoid((r(a) - r(b)) / T)` is sampled once per item, with the temperature T
chosen by bisection so that the expected agreement with the teacher's own argmax,
`mean(max(P(A), 1 - P(A)))`, equals the requested rate (0.89 by default). The
same teacher labels the held-out test items, so the test log-likelihood has a known
ceiling. The teacher needs the features on the client side; `extract_features`
computes them with the server's own embedded extractor behind the server's own disk
cache (`<data_dir>/feature_cache.sqlite3`), so they are bit-identical to the vectors
a SERVER-feature pool holds, and texts the server already featurised cost a look-up.

Redundancy (`expand_redundancy`): each pool item is repeated R times with tiny
Gaussian noise on its three vectors and an independent teacher draw per copy, the
situation of Reddit TL;DR where one post carries many comparisons. It needs
client-supplied features, so model-oracle pools are FEATURE_SOURCE_CLIENT pools.

Letter legend: N items, D feature dimension, H teacher hidden width.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from balpm.data import HiddenPair

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
    pairs: Sequence[HiddenPair],
    *,
    cache_path: str | Path,
    model_path: str = "",
    pooling: str = "mean",
    device: str = "auto",
    max_length_tokens: int = 256,
    batch_size: int = 64,
) -> tuple[PairFeatures, dict[str, int]]:
    """Features of the items with the server's embedded extractor and its disk cache.

    The texts are exactly those the server embeds for a SERVER-feature pool
    (prompt, prompt + completion A, prompt + completion B) and the cache key is the
    server's (extractor name, text), so a warm cache answers without running the model.

    Args:
        pairs: Items (their `item` dicts carry prompt / completion_a / completion_b).
        cache_path: The SQLite cache file (the server uses `<data_dir>/feature_cache.sqlite3`).
        model_path: Local model folder ("" = the bundled all-MiniLM-L6-v2).
        pooling: "mean" or "last_token" (causal LMs).
        device: Torch device for texts missing from the cache.
        max_length_tokens: Truncation length (the server's default is 256).
        batch_size: Texts per forward pass.

    Returns:
        (features, {"hits": cached texts, "misses": texts embedded now}).
    """
    from balpm_server.features.cache import CachedExtractor
    from balpm_server.features.transformers_extractor import TransformersExtractor
    from balpm_server.settings import default_model_path

    inner = TransformersExtractor(
        model_path or default_model_path(),
        pooling=pooling,
        max_length_tokens=max_length_tokens,
        batch_size=batch_size,
        device=device,
    )
    ex = CachedExtractor(inner, Path(cache_path))
    prompts = [p.item["prompt"] for p in pairs]
    texts_a = [p.item["prompt"] + p.item["completion_a"] for p in pairs]
    texts_b = [p.item["prompt"] + p.item["completion_b"] for p in pairs]

    async def run() -> np.ndarray:
        try:
            return await ex.embed(prompts + texts_a + texts_b)
        finally:
            await ex.close()

    feats = asyncio.run(run())
    n = len(pairs)
    return PairFeatures(feats[:n], feats[n : 2 * n], feats[2 * n :]), {"hits": ex.hits, "misses": ex.misses}


@dataclass
class RewardTeacher:
    """A fixed random tanh MLP reward over completion features, Bradley-Terry with temperature.

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

    def reward(self, x_N_D: np.ndarray) -> np.ndarray:
        """Rewards r(x) of completion feature vectors (float64 [N])."""
        z = (np.asarray(x_N_D, dtype=np.float64) - self.mean_D) / self.std_D
        return np.asarray(np.tanh(z @ self.W1_D_H + self.b1_H) @ self.w2_H, dtype=np.float64)

    def margin(self, feats: PairFeatures) -> np.ndarray:
        """r(a) - r(b) before the temperature."""
        return self.reward(feats.a_N_D) - self.reward(feats.b_N_D)

    def prob_a(self, feats: PairFeatures) -> np.ndarray:
        """P(A preferred) = sigmoid((r(a) - r(b)) / T)."""
        return np.asarray(1.0 / (1.0 + np.exp(-self.margin(feats) / self.temperature)), dtype=np.float64)

    def fit(self, feats: PairFeatures, agreement: float) -> RewardTeacher:
        """Set the input standardisation from `feats` and T so that the expected agreement is `agreement`.

        Args:
            feats: Features the teacher will label (pool and test together).
            agreement: Target mean of max(P(A), 1 - P(A)), in (0.5, 1).

        Returns:
            self.
        """
        if not 0.5 < agreement < 1.0:
            raise ValueError(f"agreement must be in (0.5, 1), got {agreement}")
        both = np.concatenate([feats.a_N_D, feats.b_N_D]).astype(np.float64)
        self.mean_D = both.mean(axis=0)
        self.std_D = both.std(axis=0) + 1e-6
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
        raise ValueError(f"redundancy must be >= 1, got {redundancy}")
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

    Returns:
        CLIENT-feature items whose preferences are the teacher's draws.
    """
    pool_x, pool_xf = expand_redundancy(pool, pool_feats, redundancy, noise, seed=label_seed + 7919)
    teacher = RewardTeacher(pool_feats.a_N_D.shape[1], seed=teacher_seed, hidden=teacher_hidden)
    both = PairFeatures(
        np.concatenate([pool_xf.prompt_N_D, test_feats.prompt_N_D]),
        np.concatenate([pool_xf.a_N_D, test_feats.a_N_D]),
        np.concatenate([pool_xf.b_N_D, test_feats.b_N_D]),
    )
    teacher.fit(both, agreement)
    rng = np.random.default_rng(label_seed)
    pool_labels = teacher.sample(pool_xf, rng)
    test_labels = teacher.sample(test_feats, rng)
    pool_out = [with_features(p, pool_xf, i, pool_labels[i]) for i, p in enumerate(pool_x)]
    test_out = [with_features(p, test_feats, i, test_labels[i]) for i, p in enumerate(test)]
    p_test = teacher.prob_a(test_feats)
    y_test = np.array([lb == "A" for lb in test_labels], dtype=np.float64)
    eps = 1e-12
    bayes_ll = float(np.mean(y_test * np.log(p_test + eps) + (1 - y_test) * np.log(1 - p_test + eps)))
    info = {
        "oracle": "model",
        "agreement_target": agreement,
        "agreement_expected": teacher.expected_agreement(both),
        "temperature": teacher.temperature,
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
    cache_path: str | Path = "./balpm-data/feature_cache.sqlite3",
    model_path: str = "",
    pooling: str = "mean",
    device: str = "auto",
    features: tuple[PairFeatures, PairFeatures] | None = None,
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
        cache_path: The server's feature cache file (`<data_dir>/feature_cache.sqlite3`).
        model_path: Local model folder of the extractor ("" = bundled MiniLM).
        pooling: "mean" or "last_token".
        device: Torch device for texts missing from the cache.
        features: Precomputed (pool, test) features; skips `extract_features`.

    Returns:
        The oracle's items and labels.
    """
    if oracle == "human":
        if redundancy != 1:
            raise ValueError("redundancy needs the model oracle (copies of a human label would be fabricated)")
        return human_oracle_data(pool, test)
    if oracle != "model":
        raise ValueError(f"unknown oracle {oracle!r}; choose from {', '.join(ORACLES)}")
    if features is None:
        kw: dict[str, Any] = {"cache_path": cache_path, "model_path": model_path, "pooling": pooling, "device": device}
        pool_f, _ = extract_features(pool, **kw)
        test_f, _ = extract_features(test, **kw)
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
    )
