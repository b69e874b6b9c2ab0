"""sema: fast Switch EMA (SEMA) for PyTorch.

``SwitchEMA`` keeps an exponential moving average of a model's weights in flat buckets and
switches it into the live model (after every epoch by default); ``sema.ops`` holds the
functional ops of the kernel contract; ``available_backends()`` says what can run here.
"""

from __future__ import annotations

from sema import ops
from sema.backends import BackendUnavailableError, available_backends
from sema.buckets import BucketMovedError, FlatBucket, ParamAliasError, live_state_dict
from sema.offload import OffloadRaceWarning, OffloadWorkerError
from sema.post_hoc import PostHocEMA
from sema.schedules import DecaySchedule
from sema.switch_ema import SwappedWriteError, SwitchEMA, SwitchHorizonWarning, UntrackedParamWarning

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "BucketMovedError",
    "DecaySchedule",
    "FlatBucket",
    "OffloadRaceWarning",
    "OffloadWorkerError",
    "ParamAliasError",
    "PostHocEMA",
    "SwappedWriteError",
    "SwitchEMA",
    "SwitchHorizonWarning",
    "UntrackedParamWarning",
    "__version__",
    "available_backends",
    "live_state_dict",
    "ops",
]
