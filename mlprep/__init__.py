"""mlprep: the importable library behind the Snakemake workflow.

Each pipeline lives in its own subpackage; the modules at this level (io, ids, rng, failures,
stats, devices, encoders, logs) are the pieces every pipeline shares.
"""

__version__ = "0.1.0"
