from setuptools import find_packages, setup

setup(
    name="fairseq-asam",
    version="0.1.0",
    description="ASAM and SAM (sharpness-aware minimization) optimizers for fairseq",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["fairseq_asam", "fairseq_asam.*"]),
    python_requires=">=3.8",
    install_requires=[
        "torch>=2.1",
        "numpy",
        "regex",
        "sacrebleu>=2.0",
        "sentencepiece",
        "subword-nmt",
        "sacremoses",
        "matplotlib",
    ],
    extras_require={
        # Left out of install_requires so that an existing fairseq is never replaced:
        # official 0.12.2 does not import on Python >= 3.11, where the fairseq-fixed fork does.
        "fairseq": [
            "fairseq==0.12.2; python_version < '3.11'",
            "fairseq-fixed==0.12.3.1; python_version >= '3.11'",
        ],
        "dev": ["pytest", "tensorboardX"],
    },
)
