"""stmvl: video-language pretraining with spatio-temporal masking (STM) on the UMT recipe."""

__version__ = "0.1.0"
