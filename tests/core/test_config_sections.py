"""Every params.yaml section is checked: a misspelt key is a one-line error, and params.yaml and the code agree."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from aerialseg.core.config import SECTION_KEYS, section
from aerialseg.core.errors import AerialsegError

REPO = Path(__file__).resolve().parents[2]
PARAMS = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", sorted(SECTION_KEYS))
def test_params_yaml_and_the_code_name_the_same_keys(name):
    assert sorted(PARAMS[name]) == sorted(SECTION_KEYS[name])


@pytest.mark.parametrize("name", sorted(SECTION_KEYS))
def test_a_misspelt_key_is_refused_where_the_section_is_read(name):
    params = {**PARAMS, name: {**PARAMS[name], "sizee": 1}}
    with pytest.raises(AerialsegError, match=f"unknown {name} key"):
        section(params, name)


def test_the_cli_names_the_params_file_and_the_typo_in_one_line(tmp_path):
    params = {**PARAMS, "tiles": {**PARAMS["tiles"], "overlapp": 32}}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    cli = Path(sys.executable).parent / "aerialseg"
    run = subprocess.run([str(cli), "tiles", "--params", str(tmp_path / "p.yaml")], capture_output=True, text=True,
                         cwd=tmp_path)
    assert run.returncode == 2 and run.stderr.count("\n") == 1
    assert "p.yaml" in run.stderr and "unknown tiles key(s) overlapp" in run.stderr
