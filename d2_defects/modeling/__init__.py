from . import backbone, meta_arch  # noqa: F401  registers backbones and meta-architectures
