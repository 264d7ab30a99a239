"""One loader for the kit: a fairseq checkpoint, its task set up on a data folder, the model and
criterion, and a split's batches; torch and fairseq are imported by the functions that use them
(`--help` needs neither).  A checkpoint trained without -s/-t takes the data folder's pair.
"""

import itertools
import os
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence

from .errors import ExperimentError, SettingError

INDEX_SUFFIX = ".idx"  # fairseq's binarized index files: `{split}.{src}-{tgt}.{lang}.idx`


@dataclass
class Loaded:
    model: Any  # torch.nn.Module
    criterion: Any  # torch.nn.Module
    task: Any
    cfg: Any


def check_split(data_bin: str, split: str, flag: str = "--subset") -> None:
    """Raises SettingError naming the folder or `flag` unless `data_bin` has `split` binarized
    (in its first folder: of several, fairseq's --data reads the dictionaries from the first)."""
    folder = data_bin.split(os.pathsep)[0]
    if not os.path.isdir(folder):
        raise SettingError(f"data-bin folder not found: {folder}")
    splits = sorted({f.split(".")[0] for f in os.listdir(folder) if f.endswith(INDEX_SUFFIX)})
    if split not in splits:
        has = ", ".join(splits) or "no binarized split"
        raise SettingError(f"{flag} {split}: no such split in {folder} (it has: {has})")


def read_checkpoint(path: str) -> dict:
    """A fairseq checkpoint's saved dict, memory-mapped where the file allows it (tensors are
    read when used).  fairseq's own checkpoints are trusted: unpickled in full."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as error:  # not a zip checkpoint (mmap needs one), or not a checkpoint
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception:
            raise ExperimentError(f"{path} is not a fairseq checkpoint: {error}") from None
    if not isinstance(state, dict) or "model" not in state:
        raise ExperimentError(f"{path} is not a fairseq checkpoint (no model weights)")
    return state


def saved_settings(state: dict, group: str) -> dict:
    """One group of the settings a checkpoint was trained with: cfg.task, cfg.checkpoint, ..."""
    return dict((state.get("cfg") or {}).get(group) or {})


def check_fits(checkpoint: str, data_bin: str, split: str) -> None:
    """ExperimentError naming both unless a translation checkpoint fits the data folder: a language
    pair (its own, else the folder's as fairseq infers it) with `split`, embedding-sized dicts."""
    from fairseq.data import Dictionary
    from fairseq.data.data_utils import infer_language_pair

    state = read_checkpoint(checkpoint)
    task = saved_settings(state, "task")
    if not str(task.get("_name") or "").startswith("translation"):
        return  # other tasks: load_checkpoint reports what fairseq finds
    folder = data_bin.split(os.pathsep)[0]
    source, target = task.get("source_lang"), task.get("target_lang")
    if source is None or target is None:  # trained without -s/-t: as fairseq's task infers it
        source, target = infer_language_pair(folder)
    mismatch = f"checkpoint {checkpoint} ({task['_name']}, {source}-{target}) does not fit {folder}"
    if source is None:
        raise ExperimentError(f"{mismatch}: neither names a language pair to translate")
    pairs = ((source, target), (target, source))
    indexed = (os.path.join(folder, f"{split}.{a}-{b}.{source}{INDEX_SUFFIX}") for a, b in pairs)
    if not any(os.path.isfile(path) for path in indexed):
        raise ExperimentError(f"{mismatch}: it has no {split} split for the pair {source}-{target}")
    for side, lang, module in (("source", source, "encoder"), ("target", target, "decoder")):
        path = os.path.join(folder, f"dict.{lang}.txt")
        if not os.path.isfile(path):
            raise ExperimentError(f"{mismatch}: {os.path.basename(path)} is missing")
        size = len(Dictionary.load(path))
        embeddings = state["model"].get(f"{module}.embed_tokens.weight")
        if embeddings is not None and size != embeddings.shape[0]:
            raise ExperimentError(
                f"{mismatch}: its {side} dictionary has {size} symbols, "
                f"the checkpoint's {side} embeddings {embeddings.shape[0]}"
            )


def load_checkpoint(checkpoint: str, data_bin: str, split: str) -> Loaded:
    """The checkpoint's model and criterion (eval mode, CPU), its task set up on `data_bin`
    and its cfg; `check_fits` first, and fairseq's own failure as one ExperimentError."""
    from fairseq import checkpoint_utils

    check_fits(checkpoint, data_bin, split)
    try:
        models, cfg, task = checkpoint_utils.load_model_ensemble_and_task(
            [checkpoint], arg_overrides={"data": data_bin}
        )
        criterion = task.build_criterion(cfg.criterion)
    except Exception as error:  # what check_fits cannot see (other tasks): fairseq's words
        reason = " ".join(str(error).split()) or type(error).__name__
        where = f"checkpoint {checkpoint} with the data in {data_bin}"
        raise ExperimentError(f"cannot load {where}: {reason}") from error
    return Loaded(models[0].eval(), criterion.eval(), task, cfg)


def build_from_args(argv: Sequence[str], make_task: Optional[Callable] = None) -> Loaded:
    """A model initialised from fairseq-train's options (torch.manual_seed(--seed) before it is
    built), its criterion, task (`make_task(cfg)`, default: set up on the data folder) and cfg."""
    import torch
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    args = options.parse_args_and_arch(options.get_training_parser(), list(argv))
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task) if make_task is None else make_task(cfg)
    torch.manual_seed(cfg.common.seed)
    return Loaded(task.build_model(cfg.model), task.build_criterion(cfg.criterion), task, cfg)


def first_batches(task, dataset, count: int, shuffle: bool = False, **options) -> List[Any]:
    """The first `count` batches of `dataset` (fewer if it has fewer) cut by fairseq's batch
    iterator (`options`: max_tokens, max_sentences, seed, ...), in its fixed order or shuffled by
    the seed as training draws them; the same on every call."""
    iterator = task.get_batch_iterator(dataset=dataset, disable_iterator_cache=True, **options)
    return list(itertools.islice(iterator.next_epoch_itr(shuffle=shuffle), count))


def split_batches(loaded: Loaded, split: str, count: int, shuffle: bool = False, **options):
    """`first_batches` of a split of the loaded task's data, within the model's positions."""
    from fairseq import utils

    task = loaded.task
    task.load_dataset(split, combine=False, epoch=1)
    model_positions = loaded.model.max_positions()
    options["max_positions"] = utils.resolve_max_positions(task.max_positions(), model_positions)
    return first_batches(task, task.dataset(split), count, shuffle, **options)
