"""Drop-in replacements for the EMA classes of other libraries, on sema's fused kernels.

Change one import and keep the rest of the training script:

- :mod:`sema.compat.timm`: ``ModelEmaV3`` (timm's ``timm.utils.ModelEmaV3``)
- :mod:`sema.compat.torch_ema`: ``ExponentialMovingAverage`` (torch_ema 0.3)
- :mod:`sema.compat.diffusers`: ``EMAModel`` (``diffusers.training_utils.EMAModel``)
- :mod:`sema.compat.ema_pytorch`: ``EMA`` (ema-pytorch's ``ema_pytorch.EMA``)

Each module imports only torch and sema (never the peer library). What differs from each peer,
and what is not supported and why: docs/drop-ins.md.
"""
