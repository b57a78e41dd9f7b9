from setuptools import setup

setup(
    name="grokfast_metrics",
    version="0.1.0",
    description="Fast linear mapping number (LMN) for tracking grokking at every training step",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[
        "grokfast_metrics",
        "grokfast_metrics.foundation",
        "grokfast_metrics.kernels",
        "grokfast_metrics.compute",
        "grokfast_metrics.dropin",
        "grokfast_metrics.tracking",
        "grokfast_metrics.experiment",
        "grokfast_metrics.figures",
        "grokfast_metrics.sweep",
        "grokfast_metrics.bench",
        "grokfast_metrics.cli",
    ],
    package_dir={"grokfast_metrics": "grokfast_metrics", "grokfast_metrics.kernels": "kernels"},
    # the fused CPU kernel's C++ source, compiled on first use with the system compiler
    package_data={"grokfast_metrics.kernels": ["cpu_fused.cpp"]},
    # mpmath: grokfast_metrics.compute.exact (50-digit yardstick); filelock: one sweep or run per output directory
    install_requires=["torch>=2.1", "numpy", "scipy", "tqdm", "matplotlib", "mpmath", "filelock>=3.12"],
    extras_require={
        "triton": ["triton>=3.0"],
        # sweeps on a Ray cluster (grokfast-metrics sweep --engine ray); the local process pool needs nothing
        "ray": ["ray>=2.9"],
        # optional integrations of the drop-in tracker (the library imports without them)
        "torchmetrics": ["torchmetrics>=1.0"],
        "tensorboard": ["tensorboard"],
        # HookedTransformer was removed in TransformerLens 4.0; 3.9 installs beside torch 2.13 without touching it
        "transformer-lens": ["transformer-lens>=2.0,<4"],
        # mypy: the type check of .ci/run (mypy.ini), its exact version pinned in .ci/constraints.txt
        "test": [
            "pytest",
            "pytest-benchmark",
            "hypothesis",
            "ruff",
            "mypy",
            "triton>=3.0",
            "ray>=2.9",
            "torchmetrics>=1.0",
            "tensorboard",
            "transformer-lens>=2.0,<4",
        ],
    },
    entry_points={"console_scripts": ["grokfast-metrics=grokfast_metrics.cli.main:main"]},
)
