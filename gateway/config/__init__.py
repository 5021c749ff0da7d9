"""Configuration: TOML files parsed once into frozen objects (see ``config/gateway.toml``)."""

from gateway.config.loader import is_valid_ae_title, load_config
from gateway.config.model import (
    AllowEntry,
    DestinationConfig,
    DicomConfig,
    GatewayConfig,
    RouteConfig,
)

__all__ = [
    "AllowEntry",
    "DestinationConfig",
    "DicomConfig",
    "GatewayConfig",
    "RouteConfig",
    "is_valid_ae_title",
    "load_config",
]
