"""The runtime environment dmx gives its actors on a cluster (``--runtime-env``): dmx's own
packages by ``py_modules``, the user's keys as given, bad input as one line."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from dmx.runner import runtime_env as renv


def test_auto_ships_dmx_packages_on_a_cluster_and_nothing_on_the_embedded_ray():
    env = renv.resolve(renv.parse("auto"), cluster=True)
    assert [Path(m).name for m in env["py_modules"]] == list(renv.DMX_PACKAGES)
    assert "__pycache__" in env["excludes"]
    assert renv.resolve(renv.parse("auto"), cluster=False) is None


def test_none_gives_the_actors_no_runtime_environment():
    assert renv.resolve(renv.parse("none"), cluster=True) is None


def test_a_users_keys_are_kept_and_dmx_packages_come_first(tmp_path: Path):
    mine = tmp_path / "mymodels"
    spec = tmp_path / "env.yaml"
    spec.write_text(f"py_modules: [{mine}]\nenv_vars: {{OMP_NUM_THREADS: '1'}}\n")
    env = renv.resolve(renv.parse(str(spec)), cluster=True)
    assert env["env_vars"] == {"OMP_NUM_THREADS": "1"}
    assert env["py_modules"][-1] == str(mine)
    assert [Path(m).name for m in env["py_modules"][:-1]] == list(renv.DMX_PACKAGES)


def test_pinned_stands_for_dmx_requirements_at_the_drivers_versions():
    env = renv.resolve(renv.parse('{"uv": "pinned"}'), cluster=True)
    import torch
    assert f"torch=={torch.__version__}" in env["uv"]
    assert not any(r.startswith("ray==") for r in env["uv"])   # the cluster's Ray runs it


def test_an_environment_that_installs_dmx_gets_no_py_modules():
    env = renv.resolve(renv.parse('{"pip": ["dmx==0.1.0", "nncf"]}'), cluster=True)
    assert "py_modules" not in env


@pytest.mark.parametrize("value, words", [
    ('{"pip": [1, 2]}', "pip must be"),
    ('{"pip": ["a"], "uv": ["b"]}', "not both"),
    ('{"workdir": "."}', "unknown key 'workdir'"),
    ('{"env_vars": {"A": 1}}', "env_vars must map"),
    ('{"pip": [', "not valid JSON"),
    ("[1, 2]", "no such file"),
    ("missing.yaml", "no such file"),
])
def test_bad_runtime_env_is_one_line_naming_the_key(value: str, words: str):
    with pytest.raises(renv.RuntimeEnvError) as e:
        renv.parse(value)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_a_yaml_file_that_is_not_a_mapping_is_refused(tmp_path: Path):
    p = tmp_path / "env.yaml"
    p.write_text("- pip\n- uv\n")
    with pytest.raises(renv.RuntimeEnvError, match="mapping"):
        renv.parse(str(p))
    p.write_text("pip: [a\n")
    with pytest.raises(renv.RuntimeEnvError) as e:
        renv.parse(str(p))
    assert "\n" not in str(e.value)


def test_the_code_digest_changes_with_one_byte_of_dmx(tmp_path: Path):
    import shutil
    dirs = []
    for src in renv.package_dirs():          # the package as the nodes get it (dmx/runner/...)
        shutil.copytree(src, tmp_path / Path(src).name,
                        ignore=shutil.ignore_patterns("__pycache__"))
        dirs.append(str(tmp_path / Path(src).name))
    assert renv.code_digest(dirs) == renv.code_digest()
    (tmp_path / "dmx" / "runner" / "worker.py").write_text(
        (tmp_path / "dmx" / "runner" / "worker.py").read_text() + "\n# edited\n")
    assert renv.code_digest(dirs) != renv.code_digest()


def test_a_node_whose_versions_differ_is_named_with_what_differs():
    driver = {"python": "3.11.7", "dmx_code": "a" * 20,
              "packages": {"torch": "2.13.0", "numpy": "2.4.6", "dmx": "0.1.0"}}
    nodes = {"gpu-1/0a1b2c3d": {"python": "3.11.7", "dmx_code": "a" * 20,
                                "packages": {"torch": "2.13.0", "numpy": "2.4.6", "dmx": None}},
             "gpu-2/4e5f6a7b": {"python": "3.11.7", "dmx_code": "b" * 20,
                                "packages": {"torch": "2.12.1", "numpy": "2.4.6"}}}
    lines = renv.mismatches(driver, nodes)
    assert len(lines) == 1 and lines[0].startswith("node gpu-2/4e5f6a7b differs")
    assert "torch 2.12.1 (driver 2.13.0)" in lines[0] and "dmx code bbbbbbbb" in lines[0]


def test_describe_is_one_line():
    env = renv.resolve({"pip": ["nncf==3.4.0"], "env_vars": {"A": "1"}}, cluster=True)
    line = renv.describe(env)
    assert "py_modules dmx;" in line and "pip 1 requirement" in line and "env_vars" in line
    assert json.dumps(env)             # plain JSON: what the manifest records
