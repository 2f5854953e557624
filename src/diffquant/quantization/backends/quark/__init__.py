"""The AMD Quark backend: recipe -> QConfig (config.py), quantize and reload (backend.py), and every
read of Quark's internals (internals.py). Nothing here imports Quark until it is used."""

from diffquant.quantization.backends.quark.backend import QuarkBackend
from diffquant.quantization.backends.quark.config import to_quark_config
from diffquant.quantization.backends.quark.internals import import_quark

__all__ = ["QuarkBackend", "import_quark", "to_quark_config"]
