"""dmx: distributed matrix experiment runner for image-model divergence audits."""
__version__ = "0.1.0"
