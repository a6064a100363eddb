"""Deterministic synthetic card-fraud world: users, merchants and labelled checkout transactions.

The same generator seeds the feature store and the training set, so the demo model's scores mean
something: rows drawn from risky users/merchants with unusual amounts score higher.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SEED = 20261122
N_USERS = 10_000
N_MERCHANTS = 1_000

USER_FEATURES: dict[str, tuple[float, str]] = {
    # name: (default for unknown users, description)
    "txn_count_1h": (0.0, "Transactions in the last hour"),
    "txn_count_24h": (2.0, "Transactions in the last 24 hours"),
    "avg_amount_7d": (45.0, "Average transaction amount over 7 days"),
    "account_age_days": (365.0, "Days since the account was opened"),
    "chargeback_rate_90d": (0.0, "Share of transactions charged back in 90 days"),
    "distinct_merchants_24h": (1.0, "Distinct merchants used in 24 hours"),
    "failed_logins_24h": (0.0, "Failed logins in 24 hours"),
    "card_present_ratio_30d": (0.5, "Share of card-present transactions in 30 days"),
}
MERCHANT_FEATURES: dict[str, tuple[float, str]] = {
    "fraud_rate_30d": (0.01, "Share of the merchant's transactions reported as fraud in 30 days"),
    "avg_ticket": (50.0, "Average ticket size"),
    "txn_volume_24h": (100.0, "Transactions in the last 24 hours"),
    "merchant_age_days": (720.0, "Days since the merchant was onboarded"),
}
USER_MAX_AGE_MS = 24 * 3600 * 1000
MERCHANT_MAX_AGE_MS = 7 * 24 * 3600 * 1000


def user_id(index: int) -> str:
    return f"u{index}"


def merchant_id(index: int) -> str:
    return f"m{index}"


@dataclass(frozen=True)
class World:
    users: np.ndarray  # [N_USERS, 8] float32, columns in USER_FEATURES order
    merchants: np.ndarray  # [N_MERCHANTS, 4] float32
    user_risk: np.ndarray  # [N_USERS] latent risk in [0, 1]
    merchant_risk: np.ndarray  # [N_MERCHANTS]


def make_world(n_users: int = N_USERS, n_merchants: int = N_MERCHANTS, seed: int = SEED) -> World:
    rng = np.random.default_rng(seed)
    user_risk = (rng.random(n_users) < 0.06) * rng.uniform(0.5, 1.0, n_users)
    merchant_risk = (rng.random(n_merchants) < 0.05) * rng.uniform(0.5, 1.0, n_merchants)
    users = np.column_stack(
        [
            rng.poisson(0.3 + 4 * user_risk),
            rng.poisson(3 + 15 * user_risk),
            rng.lognormal(3.6, 0.5, n_users),
            np.maximum(1, rng.exponential(900, n_users) * (1 - 0.9 * user_risk)),
            np.clip(rng.beta(1, 80, n_users) + 0.15 * user_risk, 0, 1),
            rng.poisson(1 + 6 * user_risk),
            rng.poisson(0.1 + 3 * user_risk),
            np.clip(rng.beta(4, 4, n_users) - 0.4 * user_risk, 0, 1),
        ]
    ).astype(np.float32)
    merchants = np.column_stack(
        [
            np.clip(rng.beta(1, 150, n_merchants) + 0.2 * merchant_risk, 0, 1),
            rng.lognormal(3.8, 0.7, n_merchants),
            rng.poisson(200, n_merchants) * (1 - 0.5 * merchant_risk),
            np.maximum(1, rng.exponential(1000, n_merchants) * (1 - 0.8 * merchant_risk)),
        ]
    ).astype(np.float32)
    return World(users, merchants, user_risk.astype(np.float32), merchant_risk.astype(np.float32))


@dataclass(frozen=True)
class Transactions:
    user_index: np.ndarray
    merchant_index: np.ndarray
    amount: np.ndarray  # float32
    label: np.ndarray  # 1 = fraud


def fraud_logit(world: World, user_index: np.ndarray, merchant_index: np.ndarray, amount: np.ndarray):
    """Ground-truth log-odds of fraud for a transaction."""
    usual = world.users[user_index, 2]
    return (
        -5.0
        + 4.0 * world.user_risk[user_index]
        + 3.5 * world.merchant_risk[merchant_index]
        + 1.2 * np.log1p(amount / usual)
    )


def sample_transactions(world: World, n: int, seed: int = SEED + 1) -> Transactions:
    rng = np.random.default_rng(seed)
    user_index = rng.integers(0, len(world.users), n)
    merchant_index = rng.integers(0, len(world.merchants), n)
    usual = world.users[user_index, 2]
    spike = rng.random(n) < 0.1 + 0.5 * world.user_risk[user_index]
    amount = (usual * rng.lognormal(0, 0.4, n) * np.where(spike, rng.uniform(3, 12, n), 1.0)).astype(np.float32)
    probability = 1 / (1 + np.exp(-fraud_logit(world, user_index, merchant_index, amount)))
    label = (rng.random(n) < probability).astype(np.float32)
    return Transactions(user_index, merchant_index, amount, label)


def feature_matrix(world: World, user_index: np.ndarray, merchant_index: np.ndarray, amount: np.ndarray):
    """Model input rows: user features, merchant features, then the request-time amount."""
    return np.column_stack([world.users[user_index], world.merchants[merchant_index], amount]).astype(np.float32)
