"""Packaging beyond pyproject.toml: `configs/` (the Hydra config tree, kept at the top level
where users and `ray job submit` look for it) ships inside the wheel as `trainer/configs`, so a
non-editable install finds it from any directory (`trainer.main.CONFIG_DIR`)."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithConfigs(build_py):
    def run(self) -> None:
        super().run()
        src = Path(__file__).resolve().parent / "configs"
        shutil.copytree(src, Path(self.build_lib) / "trainer" / "configs", dirs_exist_ok=True)


setup(cmdclass={"build_py": BuildPyWithConfigs})
