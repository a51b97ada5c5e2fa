"""Privacy budgets of one peer: planning a run and accounting for it as it goes.

The arithmetic is Opacus's (its RDP or PRV accountant over a history of Gaussian mechanisms,
``(noise_multiplier, sample_rate, steps)``); this module decides which mechanisms a run
applies and what they protect:

* **record level** (``record_epsilon``): neighbouring datasets of this peer differ in one
  record (a window of ``seq_len + 1`` tokens). DP-SGD steps count as ``(sigma, q)``; a noised
  round contribution also protects every record (below), so it composes in as ``(sigma_c /
  2, 1)``.
* **peer level** (``peer_epsilon``): neighbouring datasets are *any* two datasets of this
  peer. Only the noised contribution protects this: the clipped update moves by at most
  twice its bound between two datasets (replace-one adjacency, sensitivity ``2 C``), hence
  the effective multiplier ``sigma_c / 2`` at sample rate 1 (every round sees the peer's
  whole data).

Everything here is plain Python over floats; Opacus is imported on first use.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any

from swarmlm.privacy.config import PrivacyConfig

log = logging.getLogger(__name__)

# Renyi orders: Opacus's defaults stop at 63, too low for the small epsilons of strongly
# noised runs (Opacus then warns that the optimum is the largest order and the bound is
# loose). More orders can only tighten the bound.
_ALPHAS: list[float] = [1 + x / 10.0 for x in range(1, 100)] + [
    float(a) for a in [*range(12, 64), 80, 96, 128, 192, 256, 384, 512, 1024]
]

# Opacus warns when the best order is the first or last of the list: the bound is then looser
# than it could be, never wrong (it is an upper bound at every order)
warnings.filterwarnings("ignore", message="Optimal order is the (largest|smallest) alpha")

Mechanism = tuple[float, float, int]  # (noise multiplier, sample rate, steps)


class PrivacyError(Exception):
    """Base of the privacy package's errors."""


class PrivacyConfigError(PrivacyError, ValueError):
    """The privacy settings cannot be met (names the values and what would fit)."""


class PrivacyBudgetExhaustedError(PrivacyError):
    """The next step or round would spend more than ``privacy.target_epsilon``."""


def _epsilon(history: list[Mechanism], delta: float, accountant: str) -> float:
    """(epsilon at ``delta``) of composing ``history``; 0 for an empty history."""
    history = [m for m in history if m[2] > 0]
    if not history:
        return 0.0
    from opacus.accountants import PRVAccountant, RDPAccountant

    if accountant == "prv":
        prv = PRVAccountant()
        prv.history = list(history)
        return float(prv.get_epsilon(delta))
    rdp = RDPAccountant()
    rdp.history = list(history)
    eps, _ = rdp.get_privacy_spent(delta=delta, alphas=_ALPHAS)
    return float(eps)


def _calibrate(target: float, delta: float, q: float, steps: int, accountant: str) -> float:
    """The smallest noise multiplier (within 1 %) whose ``steps`` at rate ``q`` spend at
    most ``target``: bisection over sigma, as Opacus's ``get_noise_multiplier``, with our
    Renyi orders."""
    lo, hi = 0.0, 1.0
    while _epsilon([(hi, q, steps)], delta, accountant) > target:
        lo, hi = hi, 2 * hi
        if hi > 1e6:
            raise PrivacyConfigError(
                f"privacy.target_epsilon={target} cannot be met at delta {delta} with "
                f"{steps} steps at sample rate {q:.4g}, even with noise multiplier 1e6"
            )
    while hi - lo > 0.005 * hi:
        mid = (lo + hi) / 2
        if _epsilon([(mid, q, steps)], delta, accountant) > target:
            lo = mid
        else:
            hi = mid
    return hi


def _steps_that_fit(sigma: float, q: float, target: float, delta: float, acc: str) -> int:
    """How many steps of ``(sigma, q)`` fit in ``target`` (0 when not even one)."""
    if _epsilon([(sigma, q, 1)], delta, acc) > target:
        return 0
    lo, hi = 1, 2
    while _epsilon([(sigma, q, hi)], delta, acc) <= target:
        lo, hi = hi, 2 * hi
        if hi > 10**9:
            return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _epsilon([(sigma, q, mid)], delta, acc) <= target:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(frozen=True)
class PrivacyPlan:
    """The noise a run uses and what its planned steps and rounds spend."""

    noise_multiplier: float | None  # DP-SGD (None: off)
    sample_rate: float | None
    steps: int
    contribution_noise_multiplier: float | None  # contribution noise (None: off)
    rounds: int
    record_epsilon: float | None
    peer_epsilon: float | None
    delta: float


def _refuse(
    what: str,
    cfg: PrivacyConfig,
    spent: float,
    sigma: float,
    q: float,
    n: int,
    unit: str,
    fit_sigma: float,
    fit_n: int,
    field: str,
) -> PrivacyConfigError:
    return PrivacyConfigError(
        f"privacy.target_epsilon={cfg.target_epsilon} is impossible with privacy.{field}="
        f"{sigma:g} over {n} {unit} at sample rate {q:.4g} (delta {cfg.target_delta:g}): "
        f"the run would spend {what} epsilon {spent:.3g}. Raise privacy.{field} to at least "
        f"{fit_sigma:.3g}"
        + (f", run at most {fit_n} {unit}" if fit_n else f" (not even one of the {unit} fits)")
        + f", or unset privacy.{field} to calibrate it"
    )


def plan_privacy(
    cfg: PrivacyConfig,
    *,
    steps: int = 0,
    sample_rate: float | None = None,
    rounds: int = 0,
) -> PrivacyPlan:
    """Calibrate the unset noise multipliers and check the budget of a planned run.

    ``steps``/``sample_rate``: the DP-SGD steps and Poisson rate (when ``cfg.dp_sgd``;
    ``sample_rate`` None skips the DP-SGD part, as at config time before the data's size is
    known); ``rounds``: the contributions this peer plans to send. Raises
    :class:`PrivacyConfigError` naming the values when the target cannot be met.
    """
    acc, delta, target = cfg.accountant, cfg.target_delta, cfg.target_epsilon
    sigma: float | None = None
    if cfg.dp_sgd and sample_rate is not None:
        if not 0 < sample_rate <= 1:
            raise PrivacyConfigError(
                f"DP-SGD sample rate {sample_rate:.4g} (expected batch / records) must be in "
                "(0, 1]: the expected batch is larger than this peer's records"
            )
        sigma = cfg.noise_multiplier
        if sigma is None:
            assert target is not None  # the config validator insists on one of them
            sigma = _calibrate(target, delta, sample_rate, steps, acc)
    sigma_c: float | None = None
    if cfg.contribution_noise:
        sigma_c = cfg.contribution_noise_multiplier
        if sigma_c is None:
            assert target is not None
            sigma_c = 2 * _calibrate(target, delta, 1.0, rounds, acc)
    record: list[Mechanism] = []
    peer: list[Mechanism] = []
    if sigma is not None and sample_rate is not None:
        record.append((sigma, sample_rate, steps))
    if sigma_c is not None:
        record.append((sigma_c / 2, 1.0, rounds))
        peer.append((sigma_c / 2, 1.0, rounds))
    record_eps = _epsilon(record, delta, acc) if record else None
    peer_eps = _epsilon(peer, delta, acc) if peer else None
    if target is not None:
        if peer_eps is not None and peer_eps > target * 1.0001:
            assert sigma_c is not None
            raise _refuse(
                "peer-level", cfg, peer_eps, sigma_c, 1.0, rounds, "rounds",
                2 * _calibrate(target, delta, 1.0, rounds, acc),
                _steps_that_fit(sigma_c / 2, 1.0, target, delta, acc),
                "contribution_noise_multiplier",
            )  # fmt: skip
        if record_eps is not None and record_eps > target * 1.0001:
            if sigma is not None and sample_rate is not None and sigma_c is None:
                raise _refuse(
                    "record-level", cfg, record_eps, sigma, sample_rate, steps, "steps",
                    _calibrate(target, delta, sample_rate, steps, acc),
                    _steps_that_fit(sigma, sample_rate, target, delta, acc),
                    "noise_multiplier",
                )  # fmt: skip
            raise PrivacyConfigError(
                f"privacy.target_epsilon={target} is impossible: {steps} DP-SGD steps with "
                f"privacy.noise_multiplier={sigma} at sample rate {sample_rate} and {rounds} "
                f"rounds with privacy.contribution_noise_multiplier={sigma_c} spend "
                f"record-level epsilon {record_eps:.3g} (delta {delta:g}); raise either noise "
                "multiplier or plan fewer steps or rounds"
            )
    return PrivacyPlan(sigma, sample_rate, steps, sigma_c, rounds, record_eps, peer_eps, delta)


class PrivacyLedger:
    """What one peer has spent so far; checked before each step and round, saved in
    checkpoints (``state_dict``) so a resumed run keeps counting from where it stopped."""

    def __init__(self, cfg: PrivacyConfig, plan: PrivacyPlan) -> None:
        self.cfg = cfg
        self.plan = plan
        self.steps = 0
        self.rounds = 0
        self._warned = False
        self._cache: dict[tuple[int, int], tuple[float | None, float | None]] = {}

    def _spent(self, steps: int, rounds: int) -> tuple[float | None, float | None]:
        """(record epsilon, peer epsilon) after ``steps`` DP-SGD steps and ``rounds``
        noised contributions (None for a level no mechanism protects)."""
        key = (steps, rounds)
        if key not in self._cache:
            p, acc, delta = self.plan, self.cfg.accountant, self.cfg.target_delta
            record: list[Mechanism] = []
            peer: list[Mechanism] = []
            if p.noise_multiplier is not None and p.sample_rate is not None:
                record.append((p.noise_multiplier, p.sample_rate, steps))
            if p.contribution_noise_multiplier is not None:
                m = (p.contribution_noise_multiplier / 2, 1.0, rounds)
                record.append(m)
                peer.append(m)
            self._cache = {
                key: (
                    _epsilon(record, delta, acc) if record else None,
                    _epsilon(peer, delta, acc) if peer else None,
                )
            }
        return self._cache[key]

    @property
    def record_epsilon(self) -> float | None:
        return self._spent(self.steps, self.rounds)[0]

    @property
    def peer_epsilon(self) -> float | None:
        return self._spent(self.steps, self.rounds)[1]

    def check(self, *, steps: int = 0, rounds: int = 0) -> None:
        """Before spending: raise :class:`PrivacyBudgetExhaustedError` (``on_budget_spent
        = stop``) or warn once (``warn``) when ``steps`` more DP-SGD steps and ``rounds``
        more noised contributions would exceed the target; a no-op without a target."""
        target = self.cfg.target_epsilon
        if target is None:
            return
        spent = [e for e in self._spent(self.steps + steps, self.rounds + rounds) if e is not None]
        worst = max(spent, default=0.0)
        if worst <= target * 1.0001:
            return
        msg = (
            f"privacy budget spent: {steps} more DP-SGD step(s) and {rounds} more round(s) "
            f"would bring epsilon to {worst:.3g} > privacy.target_epsilon={target} (delta "
            f"{self.cfg.target_delta:g}) after {self.steps} steps and {self.rounds} rounds"
        )
        if self.cfg.on_budget_spent == "stop":
            raise PrivacyBudgetExhaustedError(msg)
        if not self._warned:
            log.warning("%s; going on (privacy.on_budget_spent = warn)", msg)
            self._warned = True

    def spend(self, *, steps: int = 0, rounds: int = 0) -> None:
        self.steps += steps
        self.rounds += rounds

    def report(self) -> dict[str, Any]:
        """The figures for logs, the round report and metrics (JSON-able)."""
        record, peer = self._spent(self.steps, self.rounds)
        return {
            "epsilon": max((e for e in (record, peer) if e is not None), default=0.0),
            "record_epsilon": record,
            "peer_epsilon": peer,
            "delta": self.cfg.target_delta,
            "target_epsilon": self.cfg.target_epsilon,
            "dp_steps": self.steps,
            "noised_rounds": self.rounds,
            "noise_multiplier": self.plan.noise_multiplier,
            "contribution_noise_multiplier": self.plan.contribution_noise_multiplier,
            "sample_rate": self.plan.sample_rate,
            "accountant": self.cfg.accountant,
        }

    def state_dict(self) -> dict[str, Any]:
        p = self.plan
        return {
            "steps": self.steps,
            "rounds": self.rounds,
            "noise_multiplier": p.noise_multiplier,
            "sample_rate": p.sample_rate,
            "contribution_noise_multiplier": p.contribution_noise_multiplier,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue counting; the mechanisms must be the ones the saved steps used, or the
        history would be accounted at the wrong noise."""
        p = self.plan
        for name, ours in (
            ("noise_multiplier", p.noise_multiplier),
            ("sample_rate", p.sample_rate),
            ("contribution_noise_multiplier", p.contribution_noise_multiplier),
        ):
            theirs = state.get(name)
            if (theirs is None) != (ours is None) or (
                theirs is not None and ours is not None and abs(theirs - ours) > 1e-9 * ours
            ):
                raise PrivacyConfigError(
                    f"privacy: the checkpoint's {name} was {theirs}, this run's is {ours}: "
                    "a resumed run must keep its mechanisms (the accountant's history would "
                    "be wrong); keep the privacy settings and the data unchanged"
                )
        self.steps = int(state["steps"])
        self.rounds = int(state["rounds"])
