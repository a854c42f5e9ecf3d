"""Typed configuration: dataclass sections, YAML + dotted overrides, pure validation."""

from megatron_swift.config.loader import ConfigError, load_config, parse_overrides
from megatron_swift.config.parallel import ParallelConfig

__all__ = ["ConfigError", "ParallelConfig", "load_config", "parse_overrides"]
