"""The trainer and its components: config, optimizers, schedules, precision, checkpoints.

Import the loop from :mod:`swarmlm.train.trainer`; this package root stays light so that the
config and checkpoint code load without the data pipeline.
"""

from swarmlm.train.config import RunConfig

__all__ = ["RunConfig"]
