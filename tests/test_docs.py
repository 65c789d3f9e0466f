"""The code blocks of docs/from-torch-distributions.md run as written."""
import re
from pathlib import Path

import pytest

from conftest import INTERPRET

PAGE = Path(__file__).resolve().parents[1] / "docs" / "from-torch-distributions.md"


@pytest.mark.skipif(INTERPRET, reason="main-process test (backend-independent)")
def test_from_torch_distributions_page_runs():
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(), re.S)
    assert len(blocks) >= 4
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(PAGE), "exec"), namespace)  # noqa: S102 (the page's own examples)
