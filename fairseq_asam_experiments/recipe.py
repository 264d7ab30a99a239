"""The fairseq-train argument files of `configs/` (shipped as the package
`fairseq_asam_experiments.configs`, see setup.py): where they are, how they read and combine.

An argument file holds one option per line, `--flag value`, the value being the rest of the
line (it may hold spaces: `--adam-betas (0.9, 0.98)`); '#' starts a comment line.  Files are
applied in order, a later file's flag replacing an earlier one's in place.
"""

import importlib.resources
import importlib.util
import itertools
import os
import pathlib
from typing import List, Optional, Sequence, Tuple

from .errors import SettingError

CONFIG_PACKAGE = "fairseq_asam_experiments.configs"
RECIPE_ARGS = "iwslt14_de_en/common.args"
OPTIMIZER_ARGS = "iwslt14_de_en/{optimizer}.args"
EVAL_BLEU_ARGS = "iwslt14_de_en/eval_bleu.args"
# The checkpoint protocol's training flags, by the --best-checkpoint-metric it selects with.
SELECTION_ARGS = {
    "bleu": "iwslt14_de_en/checkpoint_best_bleu.args",
    "loss": "iwslt14_de_en/checkpoint_best_loss.args",
}
TINY_OVERRIDES_ARGS = "tiny/overrides.args"
HYDRA_CONFIG_DIR = os.path.join("hydra", "iwslt14_de_en")

Option = Tuple[str, Optional[str]]  # (flag, value or None for a switch)


def plugin_dir() -> str:
    """The plugin's folder for fairseq's `--user-dir`, found without importing it (torch)."""
    return importlib.util.find_spec("fairseq_asam").submodule_search_locations[0]


def config_dir() -> str:
    """The folder holding the argument files and the hydra YAML: the installed package's (wheel
    or editable), else, for a checkout on PYTHONPATH, the checkout's own configs/."""
    try:
        return str(importlib.resources.files(CONFIG_PACKAGE))
    except ModuleNotFoundError:
        return str(pathlib.Path(__file__).absolute().parent.parent / "configs")


def read_args_file(path: str) -> List[Option]:
    """The options of one argument file, in order."""
    if not os.path.isfile(path):
        raise SettingError(f"argument file not found: {path}")
    options = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            flag, _, value = line.partition(" ")
            if not flag.startswith("--"):
                raise SettingError(f"{path}:{number}: expected '--flag [value]', got {line!r}")
            options.append((flag, value.strip() or None))
    return options


def merge_options(*option_lists: Sequence[Option]) -> List[str]:
    """argv from option lists, a later list's flag replacing an earlier one in place."""
    merged = dict(itertools.chain.from_iterable(option_lists))  # a key keeps its first place
    return [x for flag, value in merged.items() for x in (flag, value) if x is not None]


def training_options(
    args_files: Sequence[str],
    optimizer: str,
    eval_bleu: bool = False,
    folder: Optional[str] = None,
    selection_metric: Optional[str] = None,
) -> List[Option]:
    """The options of `args_files`, then the optimizer's, the checkpoint protocol's (by its
    --best-checkpoint-metric) and the --eval-bleu file, from `folder` (default: `config_dir()`);
    without data, --save-dir, --seed, --user-dir."""
    files = [*args_files, OPTIMIZER_ARGS.format(optimizer=optimizer)]
    files += [SELECTION_ARGS[selection_metric]] if selection_metric else []
    files += [EVAL_BLEU_ARGS] if eval_bleu else []
    folder = folder or config_dir()
    return [option for name in files for option in read_args_file(os.path.join(folder, name))]
