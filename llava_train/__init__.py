"""llava_train: train efficient LLaVA-style multimodal LLMs from recipe YAMLs."""

__version__ = "0.1.0"
