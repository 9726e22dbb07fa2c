"""Sphinx configuration of the segloss documentation site.

Build (from the repository root): ``python -m sphinx -W --keep-going -b html docs docs/_build/html``.
The Markdown pages are read by MyST; the API reference is generated from the docstrings by autodoc.
"""

import importlib.metadata

project = "segloss"
author = "segloss contributors"
copyright = "segloss contributors"
release = importlib.metadata.version("segloss")  # the one version, from pyproject.toml
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",  # Google-style "Args:" / "Returns:" sections of the docstrings
    "sphinx.ext.mathjax",  # `.. math::` in docstrings and $$ ... $$ in the pages
    "sphinx.ext.viewcode",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build"]

myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3  # links such as losses.md#the-shared-input-path

autodoc_member_order = "bysource"
autodoc_typehints = "description"  # signatures stay short; types are listed with the arguments
autodoc_default_options = {"members": True, "show-inheritance": False}
# torch modules' forward/extra_repr and nn.Module internals are not part of segloss's API pages
autodoc_inherit_docstrings = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "alabaster"
html_title = f"segloss {release}"
html_theme_options = {"description": "Segmentation losses for MONAI", "page_width": "1100px"}
