"""The kit's module structure (issue 16): imports go one way (no cycle, function-level imports
counted), the commands have a real entry point, and `fairseq-asam-table4 --help` answers without
loading torch or fairseq."""

import ast
import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "fairseq_asam.experiments"
KIT = os.path.join(REPO, *PACKAGE.split("."))


def kit_imports(source: str, modules) -> set:
    """The kit modules a module's source imports, anywhere in it (functions included)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 1:
            base = node.module.split(".")[0] if node.module else None
            names = [base] if base else [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name.startswith(PACKAGE + "."):
                name = name[len(PACKAGE) + 1 :].split(".")[0]
            if name in modules:
                found.add(name)
    return found


def find_cycle(graph: dict):
    """One cycle of `graph` ({module: modules it imports}) as a list of modules, or None."""
    done, path = set(), []

    def visit(node):
        if node in path:
            return path[path.index(node) :] + [node]
        if node in done:
            return None
        path.append(node)
        for target in sorted(graph[node]):
            cycle = visit(target)
            if cycle:
                return cycle
        path.pop()
        done.add(node)
        return None

    for node in sorted(graph):
        cycle = visit(node)
        if cycle:
            return cycle
    return None


def test_the_cycle_finder_sees_a_cycle_through_a_function_level_import():
    # The check's own negative control: a cycle hidden in a function is found.
    modules = {"a", "b", "c"}
    graph = {
        "a": kit_imports("from . import b\n", modules),
        "b": kit_imports("def f():\n    from .c import x\n", modules),
        "c": kit_imports("def g():\n    import fairseq_asam.experiments.a\n", modules),
    }
    assert graph == {"a": {"b"}, "b": {"c"}, "c": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_among_the_kits_modules():
    modules = {name[:-3] for name in os.listdir(KIT) if name.endswith(".py")}
    graph = {}
    for module in modules:
        with open(os.path.join(KIT, module + ".py"), encoding="utf-8") as f:
            graph[module] = kit_imports(f.read(), modules) - {module}
    assert "runner" in graph["cli"] and "cluster" in graph["cli"]  # the graph sees them
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_table4_help_loads_neither_torch_nor_fairseq(tmp_path):
    """As pip's console script runs it (a file named fairseq-asam-table4), in a new process."""
    script = tmp_path / "fairseq-asam-table4"
    script.write_text(
        textwrap.dedent(
            """
            import sys
            from fairseq_asam.experiments.cli import table4_main
            try:
                table4_main()
            except SystemExit as done:
                assert done.code == 0, done.code
            print(sorted(m for m in ("torch", "fairseq") if m in sys.modules))
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(
        [sys.executable, str(script), "--help"],
        capture_output=True,
        text=True,
        cwd=str(tmp_path),
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("usage: fairseq-asam-table4")
    assert "--launcher {local,slurm,submitit-local}" in done.stdout
    assert done.stdout.splitlines()[-1] == "[]"


def test_the_runner_starts_fairseq_asam_sharpness_through_python_m():
    """`python -m fairseq_asam.experiments NAME`: the runner's command for the sharpness."""
    from fairseq_asam.experiments import runner

    assert runner.SHARPNESS_COMMAND == (sys.executable, "-m", PACKAGE, "sharpness")
    done = subprocess.run(
        [*runner.SHARPNESS_COMMAND, "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("usage: fairseq-asam-sharpness")
    unknown = subprocess.run(
        [sys.executable, "-m", PACKAGE, "train"], capture_output=True, text=True, cwd=REPO
    )
    assert unknown.returncode == 2
    assert "invalid choice: 'train'" in unknown.stderr


def test_a_console_command_installs_the_plugin_before_its_work(tmp_path):
    """Under a console script the plugin is not installed at import (the --help test); a
    command's work runs with it installed, as `--user-dir` would have it."""
    script = tmp_path / "fairseq-asam-report"
    script.write_text(
        textwrap.dedent(
            """
            import sys
            from fairseq_asam.experiments import cli
            assert "fairseq" not in sys.modules

            def work():
                from fairseq.optim import OPTIMIZER_REGISTRY
                from fairseq.tasks import FairseqTask
                from fairseq_asam import two_pass

                installed = getattr(FairseqTask.train_step, two_pass._INSTALLED_MARK, False)
                print(sorted(k for k in OPTIMIZER_REGISTRY if k in ("asam", "sam")), installed)
                return 0

            sys.exit(cli._run("fairseq-asam-report", work))
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[-1] == "['asam', 'sam'] True"
