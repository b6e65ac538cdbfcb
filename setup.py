"""trivit: training vision transformers with example, token and attention sparsity.

The repository's top-level folders are mapped onto the ``trivit`` package
(``engine/`` is ``trivit.engine`` and so on), so nothing installs a top-level
``datasets`` module that would shadow Hugging Face's.
"""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent
SUBPACKAGES = ("engine", "sparse", "datasets")

setup(
    name="trivit",
    version="0.1.0",
    description="Tri-level sparse (examples, tokens, attention) training for vision transformers",
    python_requires=">=3.10",
    packages=["trivit", *(f"trivit.{name}" for name in SUBPACKAGES),
              *(f"trivit.{name}.{sub}" for name in SUBPACKAGES for sub in find_packages(HERE / name))],
    package_dir={"trivit": "trivit", **{f"trivit.{name}": name for name in SUBPACKAGES}},
    install_requires=[
        # Floors: the oldest releases the whole test suite passes with (docs/DEPENDENCIES.md).
        "torch>=2.9",
        "torchvision>=0.24",
        "timm>=1.0.31",
        "webdataset>=0.2.100",
        "accelerate>=1.0",
        "deepspeed>=0.16.4",
        "tensorboard",
        "tqdm",
        "safetensors",
        "matplotlib",
        "pyyaml",
        # Pillow 13 rejects posterize with 0 bits, which timm's RandAugment (DeiT's
        # rand-m9-mstd0.5-inc1) asks for at the top of its magnitude range.
        "pillow<13",
        "numpy",
    ],
    extras_require={"test": ["pytest>=8", "pytest-timeout", "psutil", "ruff>=0.6"]},
    entry_points={"console_scripts": ["trivit = trivit.cli:main"]},
)
