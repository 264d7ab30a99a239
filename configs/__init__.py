"""The experiment configs, shipped inside the package as `fairseq_asam_experiments.configs`.

setup.py maps that package onto this folder, so a wheel and an editable install both carry it;
`fairseq_asam_experiments.recipe.config_dir()` finds it with importlib.resources.  This file
makes the folder a regular package (importlib.resources needs one); it holds no code.
"""
