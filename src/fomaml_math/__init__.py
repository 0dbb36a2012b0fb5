"""FOMAML vs SFT on MATH: a reproducible, Snakemake-driven meta-learning study."""

__version__ = "0.1.0"
