"""The README's Python example runs as written and does what it says."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no Python example"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    pruned, reloaded, x = namespace["pruned"], namespace["reloaded"], namespace["x"]
    assert namespace["info"]["flops_fraction"] <= 0.5
    assert (tmp_path / "resnet18_pruned" / "channels.json").is_file()
    assert (tmp_path / "resnet18_pruned.onnx").is_file()
    assert (pruned(x) - reloaded(x)).abs().max().item() < 1e-5
