"""The two layers as installed: `--user-dir` loads the plugin alone; a wheel runs the kit.

A wheel of this checkout is built in seconds (setuptools' backend, no network): its file list
must hold every module and every config.  The slow wheel test installs it (not editable) into a
new venv outside the checkout and runs `fairseq-asam-table4 --preset tiny --optimizers adam`
from another folder.  To stay within minutes, that venv gets torch, fairseq and the kit's
dependencies from the environment running the tests: a `.pth` line adds its site-packages
folder(s) at the end of the new venv's sys.path.  Python does not run the `.pth` files of a
folder added that way, so an editable fairseq_asam of the running environment stays invisible,
and fairseq_asam can only come from the wheel (which the test checks).
"""

import glob
import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import textwrap
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
# Build artefacts and local state that a copy of the checkout for building leaves out.
NOT_SOURCE = shutil.ignore_patterns(
    ".git",
    ".venv",
    "runs",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    "data-bin",
    ".pytest_cache",
)
WHEEL_TEST_TIMEOUT_SECONDS = 900


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


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """A wheel of this checkout, built from a copy of it (a build leaves build/ and *.egg-info
    in its source folder, and an old build/ would end up in the wheel).  setuptools' PEP 517
    backend, called directly as pip calls it for a project without pyproject.toml: no network,
    a few seconds (pip wheel takes 3 times as long)."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    shutil.copytree(REPO, source, ignore=NOT_SOURCE)
    build = (
        "import sys; from setuptools.build_meta import __legacy__ as backend; "
        "backend.build_wheel(sys.argv[1])"
    )
    done = subprocess.run(
        [sys.executable, "-c", build, str(root / "dist")],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (built,) = glob.glob(str(root / "dist" / "fairseq_asam-*.whl"))
    return built


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


@pytest.fixture(scope="module")
def wheel_venv(wheel, tmp_path_factory):
    """A venv outside the checkout with this checkout's wheel installed (not editable)."""
    root = tmp_path_factory.mktemp("venv")
    venv = root / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120
    )
    python = str(venv / "bin" / "python")
    # Installed before the .pth below exists, so that pip sees no other fairseq_asam.
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            python,
            "install",
            "--no-deps",
            "--no-index",
            "--quiet",
            wheel,
        ],
        check=True,
        timeout=600,
    )
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    with open(os.path.join(purelib, "running-environment.pth"), "w", encoding="utf-8") as pth:
        pth.writelines(
            folder + "\n" for folder in site.getsitepackages() + [sysconfig.get_paths()["purelib"]]
        )
    return venv, purelib


def clean_environment():
    """This environment without what would make the venv see the checkout."""
    return {
        k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")
    }


@pytest.mark.slow
def test_wheel_runs_the_tiny_preset_outside_the_checkout(wheel_venv, tmp_path):
    venv, purelib = wheel_venv
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = clean_environment()
    where = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import fairseq_asam; from fairseq_asam_experiments import recipe; "
            "print(fairseq_asam.__file__); print(recipe.config_dir())",
        ],
        capture_output=True,
        text=True,
        cwd=elsewhere,
        env=env,
        timeout=300,
    )
    assert where.returncode == 0, where.stderr[-3000:]
    package_file, config_dir = where.stdout.split()[-2:]
    assert package_file == os.path.join(purelib, "fairseq_asam", "__init__.py")
    assert config_dir == os.path.join(purelib, "fairseq_asam_experiments", "configs")

    out = tmp_path / "out"
    done = subprocess.run(
        [
            str(venv / "bin" / "fairseq-asam-table4"),
            "--preset",
            "tiny",
            "--optimizers",
            "adam",
            "--max-update",  # a few updates: the wheel's files and paths are what is tested
            "4",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=elsewhere,
        env=env,
        timeout=WHEEL_TEST_TIMEOUT_SECONDS,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    table = (out / "report" / "table4.md").read_text()
    assert "| Adam | 1 |" in table and table.strip() in done.stdout  # the report, printed
    command = (out / "runs" / "adam-seed1" / "command.txt").read_text()
    assert f"--user-dir {os.path.join(purelib, 'fairseq_asam')}" in command
    assert REPO not in command and REPO not in done.stdout


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
