"""The two layers as installed: `--user-dir` loads the plugin alone; a wheel runs the kit.

A wheel of this checkout is built in seconds (setuptools' backend, no network): its file list
must hold every module and every config.  The session's tiny-preset grid (conftest's
`tiny_grid`, which tests/test_table4.py reads) is run by that wheel, installed (not editable)
into a venv outside the checkout (harness.install_wheel), from another folder: the slow test
here checks that it used the installed package's files only.
"""

import json
import os
import subprocess
import sys
import textwrap
import zipfile

import pytest
from harness import TINY_GRID_RUNS, clean_environment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKOUT_PACKAGES = os.path.join(REPO, "fairseq_asam")  # fairseq_asam_experiments has it too
PLUGIN_MODULES = {
    "fairseq_asam",
    "fairseq_asam.checkpoint",
    "fairseq_asam.errors",
    "fairseq_asam.looksam",
    "fairseq_asam.optim",
    "fairseq_asam.perturbation",
    "fairseq_asam.two_pass",
}
# The `experiments` extra of setup.py, as import names.
KIT_DEPENDENCIES = {
    "sacrebleu",
    "subword_nmt",
    "sacremoses",
    "matplotlib",
    "regex",
    "filelock",
    "submitit",
    "hydra_plugins",
}


def python_output(code: str, cwd=None) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_user_dir_loads_the_plugin_and_nothing_of_the_kit(tmp_path):
    """What `--user-dir` imports, measured in a fresh process against what the fairseq modules
    the plugin uses load by themselves."""
    out = python_output(
        """
        import argparse, json, sys
        import numpy, omegaconf, torch
        from fairseq import metrics, utils
        from fairseq.optim import register_optimizer
        from fairseq.optim.adam import FairseqAdam
        from fairseq.tasks import FairseqTask
        before = set(sys.modules)
        utils.import_user_module(argparse.Namespace(user_dir=%r))
        print(json.dumps({"before": sorted(before), "after": sorted(sys.modules)}))
        """
        % os.path.join(REPO, "fairseq_asam"),
        cwd=str(tmp_path),
    )
    modules = json.loads(out.strip().splitlines()[-1])
    new = set(modules["after"]) - set(modules["before"])
    assert {m for m in modules["after"] if m.startswith("fairseq_asam")} == PLUGIN_MODULES
    assert not {m.split(".")[0] for m in new} & KIT_DEPENDENCIES, sorted(new)
    assert "fairseq_asam_experiments" not in modules["after"]


def test_plugin_source_imports_nothing_of_the_kit():
    """The dependency goes one way: no plugin module mentions the kit or its dependencies."""
    for module in PLUGIN_MODULES:
        path = os.path.join(REPO, *module.split(".")) + ".py"
        if module == "fairseq_asam":
            path = os.path.join(REPO, "fairseq_asam", "__init__.py")
        with open(path, encoding="utf-8") as f:
            imports = [line for line in f if line.lstrip().startswith(("import ", "from "))]
        assert not [line for line in imports if "experiments" in line], path
        assert not [
            line for line in imports if line.split()[1].split(".")[0] in KIT_DEPENDENCIES
        ], path


PLUGIN_MAX_LINES, MAX_FUNCTION_LINES = 1000, 80


def test_plugin_stays_small():
    """What `import fairseq_asam` loads (issue 18's measure): at most 1,000 lines, and no
    function over 80 lines in it."""
    import ast

    total = 0
    for module in PLUGIN_MODULES:
        name = "__init__" if module == "fairseq_asam" else module.split(".")[-1]
        with open(os.path.join(REPO, "fairseq_asam", name + ".py"), encoding="utf-8") as f:
            source = f.read()
        total += len(source.splitlines())
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                assert length <= MAX_FUNCTION_LINES, f"{module}.{node.name}: {length} lines"
    assert total <= PLUGIN_MAX_LINES, total


def test_configs_ship_as_package_data():
    from fairseq_asam_experiments import recipe

    folder = recipe.config_dir()
    for name in (
        "README.md",
        recipe.RECIPE_ARGS,
        recipe.TINY_OVERRIDES_ARGS,
        "iwslt14_de_en/asam_late.args",
        os.path.join(recipe.HYDRA_CONFIG_DIR, "asam.yaml"),
    ):
        assert os.path.isfile(os.path.join(folder, name)), name


def files_to_ship():
    """What a wheel must hold, by its path in the wheel, from the checkout: every module of the
    fairseq_asam and fairseq_asam_experiments packages, and every file of configs/ (the package
    fairseq_asam_experiments.configs: args files, hydra yaml, README.md)."""
    expected = set()
    for folder, package, only_modules in (
        ("fairseq_asam", "fairseq_asam", True),
        ("fairseq_asam_experiments", "fairseq_asam_experiments", True),
        ("configs", "fairseq_asam_experiments/configs", False),
    ):
        top = os.path.join(REPO, folder)
        for path, subfolders, names in os.walk(top):
            subfolders[:] = [d for d in subfolders if d != "__pycache__"]
            inside = os.path.relpath(path, top).replace(os.sep, "/")
            for name in names:
                if name.startswith(".") or name.endswith(".pyc"):
                    continue
                if only_modules and not name.endswith(".py"):
                    continue
                expected.add("/".join(p for p in (package, inside, name) if p != "."))
    return expected


def test_wheel_ships_every_module_and_config(wheel):
    from fairseq_asam_experiments import recipe

    with zipfile.ZipFile(wheel) as archive:
        shipped = set(archive.namelist())
    expected = files_to_ship()
    configs = "fairseq_asam_experiments/configs/"
    hydra = recipe.HYDRA_CONFIG_DIR.replace(os.sep, "/")
    # The walk found what the recipe reads (so a wrong folder cannot make this test vacuous).
    for name in (
        "README.md",
        recipe.RECIPE_ARGS,
        recipe.TINY_OVERRIDES_ARGS,
        f"{hydra}/asam.yaml",
        f"{hydra}/row/asam.yaml",
    ):
        assert configs + name in expected, name
    assert {"fairseq_asam/two_pass.py", "fairseq_asam_experiments/cli.py"} <= expected
    assert sorted(expected - shipped) == []
    # Nothing else: the packages and the wheel's metadata (no tests/, scripts/ or build/).
    assert all(
        name.split("/")[0] in ("fairseq_asam", "fairseq_asam_experiments")
        or name.split("/")[0].endswith(".dist-info")
        for name in shipped
    ), sorted(shipped)


@pytest.mark.slow
def test_the_wheel_runs_the_tiny_preset_outside_the_checkout(wheel_venv, tiny_grid, tmp_path):
    """The session's grid (conftest's `tiny_grid`) is the wheel's: its commands name the installed
    plugin, and each of its Python processes (harness.PROCESS_RECORD) took both packages from the
    wheel."""
    venv, purelib = wheel_venv
    where = subprocess.run(
        [
            os.path.join(venv, "bin", "python"),
            "-c",
            "import importlib.util; from fairseq_asam_experiments import recipe; "  # no torch
            "print(importlib.util.find_spec('fairseq_asam').origin); print(recipe.config_dir())",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=clean_environment(),
        timeout=300,
    )
    assert where.returncode == 0, where.stderr[-3000:]
    package_file, config_dir = where.stdout.split()[-2:]
    assert package_file == os.path.join(purelib, "fairseq_asam", "__init__.py")
    assert config_dir == os.path.join(purelib, "fairseq_asam_experiments", "configs")
    assert tiny_grid.report.strip() in tiny_grid.stdout  # the report, printed
    plugin = os.path.join(purelib, "fairseq_asam")
    for name in TINY_GRID_RUNS:
        run = tiny_grid.out / "runs" / name
        assert f"--user-dir {plugin}" in (run / "command.txt").read_text()
        results = json.loads((run / "results.json").read_text())
        for split in ("valid", "test"):
            assert f"--user-dir {plugin}" in results[split]["command"]
    # Every Python process of the grid took both packages from the wheel, and each kind ran,
    # once per run: a `python -m` child's argv starts with its module's file.
    for process in tiny_grid.processes:
        for package, path in process["files"].items():
            assert path is None or path.startswith(purelib + os.sep), (package, process["argv"])
    started = [process["argv"][0] for process in tiny_grid.processes]
    kit = os.path.join(purelib, "fairseq_asam_experiments")
    # The evaluation's child and the sharpness, from the wheel; fairseq-train and the job.
    for program in (os.path.join(kit, "evaluation.py"), os.path.join(kit, "__main__.py")):
        assert started.count(program) == len(TINY_GRID_RUNS), (program, started)
    for module in ("fairseq_cli/train.py", "submitit/core/_submit.py"):
        assert sum(s.endswith(module) for s in started) == len(TINY_GRID_RUNS), (module, started)
    assert not [s for s in started if s.startswith(CHECKOUT_PACKAGES)]  # both share the prefix
    trained = [p for p in tiny_grid.processes if p["argv"][0].endswith("fairseq_cli/train.py")]
    assert all(p["files"]["fairseq_asam"] == os.path.join(plugin, "__init__.py") for p in trained)


def test_cluster_dependencies_are_the_kits_not_the_plugins():
    """submitit and hydra-submitit-launcher come with the `experiments` extra only; the launcher
    line installed with fairseq-fixed never asks for another hydra-core."""
    import ast

    with open(os.path.join(REPO, "setup.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    (call,) = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup"
    ]
    arguments = {k.arg: k.value for k in call.keywords}
    plugin = " ".join(ast.literal_eval(arguments["install_requires"]))
    assert "submitit" not in plugin and "hydra" not in plugin
    kit = ast.literal_eval(arguments["extras_require"])["experiments"]
    assert "submitit>=1.5,<2" in kit
    assert "hydra-submitit-launcher>=1.2,<1.3" in kit
    from importlib.metadata import requires, version

    assert version("hydra-core") == "1.3.2"  # fairseq-fixed's pin, kept by the launcher
    assert any(
        r.startswith("hydra-core") and ">=1.1" in r for r in requires("hydra-submitit-launcher")
    )
