"""The README's Python snippets run as written, and the quick start actually tunes λ."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_blocks_run() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2
    namespace: dict[str, object] = {}
    exec(compile("\n".join(blocks), str(README), "exec"), namespace)
    outer, inner = namespace["outer"], namespace["inner"]
    assert inner.count == 500 and outer.count == 50  # type: ignore[attr-defined]
    assert namespace["contribution"][0].shape == (5,)  # type: ignore[index]
    rate, adapt = namespace["rate"], namespace["adapt"]
    assert adapt.count == 50 and rate.count == 10  # type: ignore[attr-defined]
    norm = rate.last_hypergrad_norm  # type: ignore[attr-defined]
    assert norm is not None and norm > 0  # the learned rate received a hypergradient
