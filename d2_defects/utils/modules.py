"""Small helpers on ``nn.Module`` shared by the engine and the models."""
from torch.nn.parallel import DistributedDataParallel

__all__ = ["unwrap_model"]


def unwrap_model(model):
    """The model inside a ``DistributedDataParallel`` wrapper (``model.module``), or ``model`` itself."""
    return model.module if isinstance(model, DistributedDataParallel) else model
