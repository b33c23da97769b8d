"""The README stays true: every option is documented, and CI runs the README's own two commands."""

import dataclasses
import re

from conftest import REPO
from trainer.config import TrainConfig, _field_docs


def test_every_option_is_in_the_readme_table_with_its_default_and_doc():
    readme = (REPO / "README.md").read_text()
    docs = _field_docs()
    for field in dataclasses.fields(TrainConfig):
        row = re.search(rf"^\| `--{field.name}` \| `([^`]*)` \| (.*) \|$", readme, re.MULTILINE)
        assert row, f"README has no row for --{field.name}"
        assert row.group(1) == str(field.default), field.name
        assert row.group(2).replace(r"\|", "|") == docs[field.name].replace("%%", "%"), field.name


def test_ci_runs_the_two_commands_of_the_readme():
    readme = (REPO / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", readme, re.DOTALL).group(1).strip().splitlines()
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines()
          if line and not line.startswith(("#", "set ", "cd "))]
    assert first_block == ci == ['pip install -e ".[test]"', "python -m pytest"]


def test_the_readme_layout_names_every_module_of_the_tree():
    layout = re.search(r"^## Layout\n(.*?)^```\n(.*?)^```", (REPO / "README.md").read_text(),
                       re.DOTALL | re.MULTILINE).group(2)
    named = set(re.findall(r"(?:^|\s)((?:data/)?[a-z_]+\.py)\b", layout))
    tree = {str(p.relative_to(REPO / "trainer")) for p in (REPO / "trainer").rglob("*.py")
            if p.name not in ("__init__.py", "__main__.py")}
    assert named == tree
