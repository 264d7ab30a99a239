import os
import runpy

from setuptools import setup

# The plugin (what `--user-dir` loads) needs torch and fairseq; the experiment kit
# (fairseq_asam_experiments: data preparation, Table 4 runner, evaluation, report, sharpness,
# trajectories, benchmark) needs the `experiments` extra too.
CONFIGS_PACKAGE = "fairseq_asam_experiments.configs"
# fairseq-asam-<command> -> its module's `main`: one list, in the kit's __init__ (no imports).
COMMANDS = runpy.run_path(
    os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "fairseq_asam_experiments", "__init__.py"
    )
)["COMMANDS"]
CONSOLE_SCRIPTS = [
    f"fairseq-asam-{name} = fairseq_asam_experiments.{module}:main"
    for name, module in COMMANDS.items()
]

with open("README.md", encoding="utf-8") as readme:
    long_description = readme.read()

setup(
    name="fairseq-asam",
    version="0.1.0",
    description="ASAM and SAM (sharpness-aware minimization) optimizers for fairseq",
    long_description=long_description,
    long_description_content_type="text/markdown",
    packages=["fairseq_asam", "fairseq_asam_experiments", CONFIGS_PACKAGE],
    # The checkout's top-level configs/ ships inside the package, found with importlib.resources.
    package_dir={CONFIGS_PACKAGE: "configs"},
    package_data={CONFIGS_PACKAGE: ["*.md", "*/*.args", "hydra/*/*.yaml", "hydra/*/*/*.yaml"]},
    # 3.10 reached its end of life in October 2026, and its fairseq (official 0.12.2) needs an
    # omegaconf whose metadata pip >= 24.1 rejects; fairseq-fixed imports on 3.11 and later.
    python_requires=">=3.11",
    install_requires=["torch>=2.1", "numpy"],
    extras_require={
        # Left out of install_requires so that an existing fairseq is never replaced.
        "fairseq": ["fairseq-fixed==0.12.3.1"],
        "experiments": [
            "sacrebleu>=2.0",
            "subword-nmt",
            "sacremoses",
            "matplotlib",
            "pandas",  # the report's aggregation
            "scipy",  # Kendall's tau (fairseq-asam-correlation)
            "regex",
            "filelock>=3.12",  # the run lock (experiments.layout)
            # --launcher slurm / submitit-local (experiments.cluster), and the hydra route
            # (fairseq-hydra-train --multirun hydra/launcher=submitit_slurm); the launcher's
            # 1.2 line needs hydra-core >= 1.1 (fairseq-fixed pins 1.3.2).
            "submitit>=1.5,<2",
            "hydra-submitit-launcher>=1.2,<1.3",
        ],
        "dev": ["pytest", "pytest-xdist>=3.8", "tensorboardX", "ruff==0.17.5"],
    },
    entry_points={"console_scripts": CONSOLE_SCRIPTS},
)
