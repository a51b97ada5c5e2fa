"""Alignment from human feedback: preference data, safety filter, reward model, PPO, DPO.

Pure maths lives in :mod:`swarmlm.rlhf.losses`; models in :mod:`swarmlm.rlhf.modeling`; the
runs behind ``swarmlm rlhf reward|ppo|dpo|sample`` in :mod:`~swarmlm.rlhf.reward`,
:mod:`~swarmlm.rlhf.ppo_run`, :mod:`~swarmlm.rlhf.dpo` and :mod:`~swarmlm.rlhf.sample`.
"""

from swarmlm.rlhf.errors import ModelMismatchError, PreferenceFormatError, RLHFError
from swarmlm.rlhf.preferences import PreferencePair, read_preferences
from swarmlm.rlhf.safety import SafetyConfig, SafetyFilter, build_safety_filter

__all__ = [
    "ModelMismatchError",
    "PreferenceFormatError",
    "PreferencePair",
    "RLHFError",
    "SafetyConfig",
    "SafetyFilter",
    "build_safety_filter",
    "read_preferences",
]
