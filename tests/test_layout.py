"""The package's layout: the losses never import the miners, and the tests mirror the packages."""

from __future__ import annotations


def test_losses_never_import_the_miners() -> None:
    """The losses reach miners through :mod:`deepmetric.interfaces` only, so that the two
    packages do not import each other (a cycle breaks partial imports)."""
    import ast
    from pathlib import Path

    import deepmetric.losses

    offenders = []
    for path in Path(deepmetric.losses.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [f"{'.' * node.level}{node.module or ''}"]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            if any(name in ("..miners", "deepmetric.miners") for name in names):
                offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []


def test_the_tests_mirror_the_packages() -> None:
    """Each sub-package ``deepmetric/<pkg>/`` has its tests in the package ``tests/<pkg>/``, and no
    test module at the top of ``tests/`` is named after a sub-package or after a module that
    lives only inside one (``tests/test_triplet.py`` belongs in ``tests/losses/``)."""
    from pathlib import Path

    import deepmetric

    source, tests = Path(deepmetric.__file__).parent, Path(__file__).parent
    packages = sorted(p.name for p in source.iterdir() if (p / "__init__.py").is_file())
    top_level = {p.stem for p in source.glob("*.py")}
    nested = {p.stem.lstrip("_") for pkg in packages for p in (source / pkg).glob("*.py")}
    missing = [pkg for pkg in packages if not (tests / pkg / "__init__.py").is_file()]
    assert missing == [], f"add a test package tests/<pkg>/ (with __init__.py) for {missing}"
    misplaced = [
        path.name
        for path in tests.glob("test_*.py")
        if (subject := path.stem.removeprefix("test_")) in packages
        or any(subject.startswith(f"{pkg}_") for pkg in packages)
        or (subject in nested and subject not in top_level)
    ]
    assert misplaced == [], f"move {misplaced} into the tests/<pkg>/ of the module they test"
