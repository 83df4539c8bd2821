"""stmvl: video-language pretraining with spatio-temporal masking (STM) on the UMT recipe.

Top-level shortcuts (imported on first use, so ``import stmvl`` stays light):
``stmvl.load_model(dir)``, ``stmvl.encode_video``, ``stmvl.encode_text``, ``stmvl.search`` (see stmvl.api).
"""

__version__ = "0.1.0"

_API = ("load_model", "encode_video", "encode_text", "search", "SearchHit")
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    # PEP 562 lazy attribute: torch and the model code load only when the API is actually used.
    if name in _API:
        from stmvl import api

        return getattr(api, name)
    raise AttributeError(f"module 'stmvl' has no attribute {name!r}")
