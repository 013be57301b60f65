"""The shape of the code: no import cycles, one table per name, nothing duplicated."""
import ast
from pathlib import Path

from nanlab.config import options
from nanlab.config import schema

ROOT = Path(__file__).resolve().parents[1]


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[0] == "scenarios":
        parts = ("nanlab", *parts)
    return ".".join(p for p in parts if p != "__init__")


def import_graph() -> dict:
    """{module: nanlab modules it imports}, counting imports inside functions too."""
    files = [*(ROOT / "nanlab").rglob("*.py"), *(ROOT / "scenarios").rglob("*.py")]
    modules = {_module_name(f): f for f in files}
    graph = {}
    for me, f in modules.items():
        package = me if f.name == "__init__.py" else me.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                # "from nanlab.kernels import check" names a submodule when one exists
                edges |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
        # importing a package's own parent __init__ is not a dependency worth a cycle
        graph[me] = {e for e in edges if e in modules and e != me and not me.startswith(e + ".")}
    return graph


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert graph["nanlab.kernels.catalogue"] == {"nanlab.config.options"}
    state = {}

    def visit(m, path):
        if state.get(m) == "done":
            return None
        if state.get(m) == "open":
            return path[path.index(m):] + [m]
        state[m] = "open"
        for n in sorted(graph[m]):
            cycle = visit(n, path + [m])
            if cycle:
                return cycle
        state[m] = "done"
        return None

    for module in sorted(graph):
        cycle = visit(module, [])
        assert cycle is None, " -> ".join(cycle)


def test_every_enum_comes_from_the_one_table():
    assert [m.value for m in schema.DType] == list(options.DTYPES)
    assert [m.value for m in schema.OptimizerName] == list(options.OPTIMIZERS)
    assert [m.value for m in schema.InitName] == list(options.INITS)
    assert [m.value for m in schema.KernelKind] == list(options.KERNEL_KINDS)


def test_every_option_table_entry_builds_a_torch_object():
    import torch

    from nanlab.lab.build import DTYPES, apply_init, make_optimizer
    from omegaconf import OmegaConf

    assert all(isinstance(DTYPES[name], torch.dtype) for name in options.DTYPES)
    param = torch.nn.Parameter(torch.ones(2))
    for name, option in options.OPTIMIZERS.items():
        cfg = OmegaConf.create({"name": name, "lr": 0.1, **options.OPTIMIZER_DEFAULTS})
        assert type(make_optimizer(cfg, [param])).__name__ == option.torch_class
    for name in options.INITS:
        torch.manual_seed(0)
        layer = torch.nn.Linear(64, 64)
        before = layer.weight.detach().clone()
        apply_init(layer, OmegaConf.create({"name": name, "std": 0.5}))
        assert torch.equal(layer.weight, before) == (name == "default"), name


def test_a_scenario_name_is_written_once():
    """Neither NAME nor a YAML file repeats what the file name says."""
    for path in (ROOT / "scenarios").glob("[!_]*.py"):
        tree = ast.parse(path.read_text())
        assigned = {t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets
                    if isinstance(t, ast.Name)}
        assert "NAME" not in assigned, path.name
        docstring = tree.body[0].value
        # FRAMEWORKS names its builder module ("nanlab.scenarios.frameworks.<name>:..."),
        # a module path, as an import statement would; it does not declare the name.
        references = {id(n) for node in tree.body if isinstance(node, ast.Assign)
                      and any(isinstance(t, ast.Name) and t.id == "FRAMEWORKS" for t in node.targets)
                      for n in ast.walk(node.value)}
        strings = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
                   and n is not docstring and id(n) not in references]
        assert not [text for text in strings if path.stem in text], path.name
    assert not list((ROOT / "conf").rglob("scenario/*.yaml"))


def test_the_top_level_stays_small_and_every_part_is_a_subpackage():
    top = sorted(p.name for p in (ROOT / "nanlab").glob("*.py"))
    assert len(top) <= 8, top
    for part in ("config", "lab", "debug", "sweeps", "reports", "kernels", "frameworks"):
        assert (ROOT / "nanlab" / part / "__init__.py").is_file(), part


def test_the_architecture_page_names_every_module_and_only_modules_that_exist():
    import re

    page = (ROOT / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"`(nanlab/[\w/]+\.py)`", page))
    assert named and all((ROOT / path).is_file() for path in named), sorted(p for p in named if not (ROOT / p).is_file())
    for part in ("config", "lab", "debug", "sweeps", "reports"):
        for module in (ROOT / "nanlab" / part).glob("*.py"):
            if module.name != "__init__.py":
                assert f"nanlab/{part}/{module.name}" in named, module


def test_subpackage_inits_import_nothing():
    """`import nanlab.lab.result` must not pay for the rest of lab/ (results load without torch)."""
    for init in (ROOT / "nanlab").glob("*/__init__.py"):
        if init.parent.name in ("kernels", "frameworks"):
            continue
        tree = ast.parse(init.read_text())
        assert not [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))], init
