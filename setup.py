"""What pyproject.toml cannot declare: the Hydra config tree stays at the top of the repository (conf/) and
ships inside the wheel as soupbench/conf, so an installed soupbench finds its configs beside its code.
setuptools treats every folder of package data as a package, so each conf/ folder is declared one; they are
discovered here so that a new config group needs no edit."""

from setuptools import find_namespace_packages, find_packages, setup

CONF_PACKAGES = ["soupbench.conf", *(f"soupbench.conf.{p}" for p in find_namespace_packages("conf"))]

setup(
    packages=[*find_packages(include=["soupbench", "soupbench.*"]), *CONF_PACKAGES],
    package_dir={"soupbench.conf": "conf"},
    package_data={p: ["*.yaml"] for p in CONF_PACKAGES},
)
