from .trainer import Trainer, ddp_kwargs

__all__ = ["Trainer", "ddp_kwargs"]
