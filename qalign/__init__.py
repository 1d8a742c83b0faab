"""qalign: QLoRA supervised fine-tuning and preference alignment on one consumer GPU."""

__version__ = "0.1.0"
