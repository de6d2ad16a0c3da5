"""The package's two sides: ``remote/`` is exactly what ships to a cluster."""
import ast
import io
import os
import zipfile

import scipion_cloudexec
from scipion_cloudexec.cluster import bundle

PKG = os.path.dirname(os.path.abspath(scipion_cloudexec.__file__))
REMOTE = os.path.join(PKG, "remote")


def _package_imports(path: str):
    """(level, module) of every import of the package in a file."""
    tree = ast.parse(open(path).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level or (node.module or "").startswith("scipion_cloudexec"):
                yield node.level, node.module or ""
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("scipion_cloudexec"):
                    yield 0, alias.name


def test_remote_imports_only_itself_and_version():
    for name in sorted(os.listdir(REMOTE)):
        if not name.endswith(".py"):
            continue
        for level, module in _package_imports(os.path.join(REMOTE, name)):
            ok = (level == 1 or (level == 2 and module == "version")
                  or module.startswith("scipion_cloudexec.remote")
                  or module == "scipion_cloudexec.version")
            assert ok, "remote/%s imports %s%s: the cluster has only remote/ and version" % (
                name, "." * level, module)


def test_bundle_is_everything_in_remote():
    names = set(zipfile.ZipFile(io.BytesIO(bundle.build()[0])).namelist())
    shipped = {n for n in os.listdir(REMOTE) if n.endswith(".py")}
    assert {"scipion_cloudexec/remote/" + n for n in shipped} <= names
    assert names == {"__main__.py", "scipion_cloudexec/__init__.py",
                     "scipion_cloudexec/version.py"} | {"scipion_cloudexec/remote/" + n
                                                        for n in shipped}
